"""Batch entry point: queue a JSONL file of tasks, wait for them, print progress and a summary.

    python -m dag.batch tasks.jsonl [--api http://127.0.0.1:8000 | --db URL] [--timeout 3600]
    ray job submit --working-dir . -- .venv/bin/python -m dag.batch tasks.jsonl --api http://127.0.0.1:8000

One task per line: {"task_type": "t2v", "params": {...}, "priority": 0, "project_id": null,
"dependant_on": null}. `dependant_on` may be a task id or "#N", the task made from line N of the
same file (1-based), so a file can describe a chain. Every line is validated before anything is
queued. Exit codes: 0 all Complete; 1 some Failed/Cancelled; 2 bad input; 3 timeout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dag.batch", description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--api", help="a running service's URL (default: talk to the database)")
    parser.add_argument("--db", help="database URL (default: $HWGP_DB or sqlite:///tasks.db)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds to wait (default: forever)")
    parser.add_argument("--poll", type=float, default=2.0, help="seconds between progress lines")
    args = parser.parse_args(argv)
    try:
        rows = read_lines(args.file)
        # Validate every line first: a bad line 40 must not leave lines 1-39 queued.
        for number, row in rows:
            dep = row.get("dependant_on")
            if isinstance(dep, str) and dep.startswith("#"):
                row = {**row, "dependant_on": None}
            try:
                new_task(**row)
            except InvalidTask as error:
                raise InvalidTask(f"line {number}: {error.field}", error.problem) from None
        with open_tasks(args.db, args.api) as tasks:
            ids: dict[int, str] = {}
            for number, row in rows:
                dep = row.get("dependant_on")
                if isinstance(dep, str) and dep.startswith("#"):
                    target = int(dep[1:]) if dep[1:].isdigit() else -1
                    if target not in ids:
                        raise InvalidTask(f"line {number}: dependant_on", f"{dep} names no earlier line")
                    row = {**row, "dependant_on": ids[target]}
                ids[number] = tasks.create(new_task(**row)).id
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
