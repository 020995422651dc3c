"""Batch entry point: queue a JSONL file of tasks, wait for them, print progress and a summary.

    python -m dag.batch tasks.jsonl [--api http://127.0.0.1:8000 [--api-key KEY] | --db URL] [--timeout 3600]
    ray job submit --working-dir . -- .venv/bin/python -m dag.batch tasks.jsonl --api http://127.0.0.1:8000

One task per line: {"task_type": "t2v", "params": {...}, "priority": 0, "project_id": null,
"dependant_on": null}. `dependant_on` may be a task id or "#N", the task made from line N of the
same file (1-based), so a file can describe a chain. So may any param that names a task (a key
ending in `_task_id`, at any depth, e.g. `input_video_task_id`); a line whose only "#N" is such a
param, and that has no `dependant_on`, also waits for line N. Every line is validated, and every
"#N" checked to name an earlier line, before anything is queued.
Exit codes: 0 all Complete; 1 some Failed/Cancelled; 2 bad input; 3 timeout.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from db.http_client import open_tasks
from db.models import TaskStatus
from db.store import InvalidTask, TaskStoreError, new_task


def read_lines(path: Path) -> list[dict]:
    try:
        text = path.read_text()
    except OSError as error:
        raise InvalidTask(str(path), f"cannot read: {error.strerror}") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise InvalidTask(f"line {number}", f"invalid JSON: {error.msg}") from None
        if not isinstance(row, dict):
            raise InvalidTask(f"line {number}", "must be a JSON object")
        rows.append((number, row))
    if not rows:
        raise InvalidTask(str(path), "holds no tasks")
    return rows


LINE_REFERENCE = re.compile(r"#(\d+)")


def _line_reference(value: Any, number: int, field: str) -> int | None:
    """The line N that a "#N" value names (None for anything else); it must be an earlier line."""
    if not isinstance(value, str) or not value.startswith("#"):
        return None
    match = LINE_REFERENCE.fullmatch(value)
    target = int(match.group(1)) if match else -1
    if not 1 <= target < number:
        raise InvalidTask(f"line {number}: {field}", f"{value} names no earlier line")
    return target


def _param_references(params: Any, number: int, path: str = "params") -> dict[str, int]:
    """Every "#N" in params under a key that names a task (`*_task_id`), by its dotted path."""
    found: dict[str, int] = {}
    if isinstance(params, list):
        params = dict(enumerate(params))
    for key, value in params.items() if isinstance(params, dict) else ():
        where = f"{path}.{key}"
        if isinstance(value, dict | list):
            found.update(_param_references(value, number, where))
        elif str(key).endswith("_task_id") and (target := _line_reference(value, number, where)):
            found[where] = target
    return found


def _substitute(params: Any, ids: Mapping[int, str]) -> Any:
    """Params with each task-naming "#N" replaced by the id of the task made from line N."""
    if isinstance(params, dict):
        return {
            key: ids[int(value[1:])]
            if str(key).endswith("_task_id") and isinstance(value, str) and LINE_REFERENCE.fullmatch(value)
            else _substitute(value, ids)
            for key, value in params.items()
        }
    if isinstance(params, list):
        return [_substitute(value, ids) for value in params]
    return params


def resolve_references(number: int, row: dict, ids: Mapping[int, str]) -> dict:
    """The line with its "#N" references (in `dependant_on` and in params) replaced by task ids."""
    dependency = _line_reference(row.get("dependant_on"), number, "dependant_on")
    in_params = set(_param_references(row.get("params"), number).values())
    if dependency is None and row.get("dependant_on") is None and len(in_params) == 1:
        dependency = in_params.pop()  # the task it reads from must finish first
    resolved = {**row, "params": _substitute(row["params"], ids)} if "params" in row else dict(row)
    if dependency is not None:
        resolved["dependant_on"] = ids[dependency]
    return resolved


class _AnyLine(dict):
    """Every line's task id is one well-formed placeholder: validates lines before anything exists."""

    def __missing__(self, key: int) -> str:
        return "00000000-0000-4000-8000-000000000000"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dag.batch", description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--api", help="a running service's URL (default: talk to the database)")
    parser.add_argument("--db", help="database URL (default: $HWGP_DB or sqlite:///tasks.db)")
    parser.add_argument(
        "--api-key", help="API key for --api, sent as a Bearer token (default: $HWGP_API_KEY)"
    )
    parser.add_argument("--timeout", type=float, default=None, help="seconds to wait (default: forever)")
    parser.add_argument("--poll", type=float, default=2.0, help="seconds between progress lines")
    args = parser.parse_args(argv)
    try:
        rows = read_lines(args.file)
        # Validate every line first: a bad line 40 must not leave lines 1-39 queued.
        for number, row in rows:
            try:
                new_task(**resolve_references(number, row, _AnyLine()))
            except InvalidTask as error:
                if error.field.startswith("line "):
                    raise
                raise InvalidTask(f"line {number}: {error.field}", error.problem) from None
        with open_tasks(args.db, args.api, api_key=args.api_key) as tasks:
            ids: dict[int, str] = {}
            for number, row in rows:
                ids[number] = tasks.create(new_task(**resolve_references(number, row, ids))).id
            print(f"queued {len(ids)} tasks from {args.file}", flush=True)
            return _wait(tasks, list(ids.values()), args.timeout, args.poll)
    except TaskStoreError as error:
        print(f"batch: error: {error}", file=sys.stderr)
        return 2


def _wait(tasks, ids: list[str], timeout: float | None, poll: float) -> int:
    deadline = None if timeout is None else time.monotonic() + timeout
    started = time.monotonic()
    while True:
        current = [tasks.get(task_id) for task_id in ids]
        counts = {status: sum(t.status == status for t in current) for status in TaskStatus}
        done = sum(counts[s] for s in (TaskStatus.COMPLETE, TaskStatus.FAILED, TaskStatus.CANCELLED))
        line = ", ".join(f"{n} {s.value}" for s, n in counts.items() if n)
        print(f"[{time.monotonic() - started:6.0f} s] {done}/{len(ids)} finished: {line}", flush=True)
        if done == len(ids):
            break
        if deadline is not None and time.monotonic() > deadline:
            print("timed out", flush=True)
            return 3
        time.sleep(poll)
    for task in current:
        detail = task.output_location if task.status == TaskStatus.COMPLETE else task.error_message
        print(f"{task.id} {task.task_type:14} {task.status.value:10} {detail}")
    failed = [t for t in current if t.status != TaskStatus.COMPLETE]
    print(f"summary: {len(current) - len(failed)} complete, {len(failed)} failed or cancelled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
