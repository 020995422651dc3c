"""`hwgp`: the command line over the tasks table.

    hwgp db init
    hwgp add-task --type t2v --params '{"prompt": "a cat", "model": "tiny-t2v"}'
    hwgp list [--status Queued] [--type t2v] [--json]
    hwgp show ID [--json]
    hwgp cancel ID
    hwgp wait ID [--timeout 600]       # a progress bar on stderr (live events with --api)

The database comes from `--db URL`, else `$HWGP_DB`, else `sqlite:///tasks.db`. With `--api URL`
(or `$HWGP_API`), add-task / list / show / cancel / wait go through a running service's HTTP API.

Supabase, as the original's flags and environment: `--db supabase` goes through the project's edge
functions at `--supabase-url` (`$SUPABASE_URL`) with `$SUPABASE_SERVICE_KEY`, or with a user's
`--supabase-access-token` (`$SUPABASE_ACCESS_TOKEN`). `hwgp db init --db postgresql://… --supabase`
applies the Supabase migrations (projects, tokens, RLS, SQL functions) after the tasks table.
Exit codes: 0 ok; 1 the awaited task failed or was cancelled; 2 bad input (one line on stderr,
nothing written); 3 `wait` timed out; 75 the database (or API) cannot answer now: try again later.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from db.http_client import HttpTasks, open_tasks
from db.models import Task, TaskStatus
from db.store import StoreUnavailable, TaskConflict, TaskNotFound, TaskStore, TaskStoreError, new_task

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3
EXIT_UNAVAILABLE = 75  # sysexits' EX_TEMPFAIL


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit 2."""


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS lets --db stand before or after the sub-command without one default hiding the other.
    common.add_argument(
        "--db", default=argparse.SUPPRESS, help="database URL (default: $HWGP_DB or sqlite:///tasks.db)"
    )
    _add_supabase_flags(common, argparse.SUPPRESS)
    # No abbreviations: `db init --supabase` must not read as an abbreviated --supabase-url.
    parser = argparse.ArgumentParser(
        prog="hwgp", description="Headless-Wan2GP Serve: manage the tasks table.", allow_abbrev=False
    )
    parser.add_argument("--db", default=None, help="database URL (default: $HWGP_DB or sqlite:///tasks.db)")
    _add_supabase_flags(parser, None)
    parser.add_argument(
        "--api", default=os.environ.get("HWGP_API"), help="use a running service's HTTP API instead"
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("HWGP_API_KEY"),
        help="API key for --api, sent as a Bearer token (default: $HWGP_API_KEY)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="database administration")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    init = db_sub.add_parser("init", parents=[common], help="create the tables / apply pending migrations")
    init.add_argument(
        "--supabase",
        action="store_true",
        help="also apply the Supabase migrations (projects, user_api_tokens, RLS, SQL functions)",
    )

    add = sub.add_parser("add-task", parents=[common], help="queue a task; prints its id")
    add.add_argument("--type", dest="task_type", required=True, help="task type, e.g. t2v, vace, flux")
    src = add.add_mutually_exclusive_group()
    src.add_argument("--params", help="params as a JSON object")
    src.add_argument("--params-file", type=Path, help="file holding the params JSON object")
    add.add_argument("--dependant-on", help="id of the task this one waits for")
    add.add_argument("--project-id")
    add.add_argument("--priority", type=int, default=0, help="higher runs first (default 0)")
    add.add_argument("--id", dest="task_id", help="task id to use (a UUID); generated when absent")

    ls = sub.add_parser("list", parents=[common], help="list tasks, newest first")
    ls.add_argument("--status", help="Queued, 'In Progress', Complete, Failed or Cancelled")
    ls.add_argument("--type", dest="task_type")
    ls.add_argument("--project-id")
    ls.add_argument("--limit", type=int, default=50)
    ls.add_argument("--offset", type=int, default=0)
    ls.add_argument("--json", action="store_true", help="one JSON array instead of a table")

    show = sub.add_parser("show", parents=[common], help="show one task")
    show.add_argument("task_id")
    show.add_argument("--json", action="store_true")

    cancel = sub.add_parser("cancel", parents=[common], help="cancel a queued or running task")
    cancel.add_argument("task_id")

    wait = sub.add_parser("wait", parents=[common], help="wait for a task to finish")
    wait.add_argument("task_id")
    wait.add_argument("--timeout", type=float, default=None, help="seconds (default: wait forever)")
    return parser


def _add_supabase_flags(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument(
        "--supabase-url",
        default=default,
        help="Supabase project URL for --db supabase (default: $SUPABASE_URL)",
    )
    parser.add_argument(
        "--supabase-access-token",
        default=default,
        help="a user's personal access token for --db supabase (default: $SUPABASE_ACCESS_TOKEN; "
        "without one, $SUPABASE_SERVICE_KEY)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except StoreUnavailable as exc:
        print(f"hwgp: unavailable, try again later: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (UsageError, TaskStoreError) as exc:
        print(f"hwgp: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _run(args: argparse.Namespace) -> int:
    if args.command == "add-task":
        # Validate everything before opening (or creating) the database.
        new = new_task(
            task_type=args.task_type,
            params=_read_params(args),
            dependant_on=args.dependant_on,
            project_id=args.project_id,
            priority=args.priority,
            id=args.task_id,
        )
        with _open(args) as store:
            print(store.create(new).id)
        return 0

    status = None
    if getattr(args, "status", None):
        try:
            status = TaskStatus.parse(args.status)
        except ValueError as exc:
            raise UsageError(f"--status: {exc}") from None
    if args.command == "db" and args.api:
        raise UsageError("db init talks to the database itself: use --db, not --api")
    # `db init` migrates below, so that it can report what it applied.
    with _open(args, migrate=False) as store:
        if args.command == "db":
            applied = store.migrate()
            print(f"{store.url}: " + (f"applied {', '.join(applied)}" if applied else "up to date"))
            return 0
        if args.command == "list":
            tasks = store.list(
                status=status,
                task_type=args.task_type,
                project_id=args.project_id,
                limit=args.limit,
                offset=args.offset,
            )
            if args.json:
                print(json.dumps([t.model_dump(mode="json") for t in tasks], indent=2))
            else:
                _print_table(tasks)
            return 0
        if args.command == "show":
            task = store.get(args.task_id)
            if args.json:
                print(task.model_dump_json(indent=2))
            else:
                for key, value in task.model_dump(mode="json").items():
                    if key == "result" and isinstance(value, dict):
                        for name, part in value.items():  # one line per part: model, seed, timings, ...
                            print(f"{'result.' + name:24} {json.dumps(part)}")
                        continue
                    shown = json.dumps(value) if isinstance(value, dict) else value
                    print(f"{key:24} {shown}")
            return 0
        if args.command == "cancel":
            try:
                task = store.cancel(args.task_id)
            except TaskConflict as exc:
                raise UsageError(str(exc)) from None
            print(f"{task.id} {task.status.value}")
            return 0
        if args.command == "wait":
            return _wait(store, args.task_id, args.timeout)
    raise UsageError(f"unknown command {args.command!r}")


def _open(args: argparse.Namespace, migrate: bool = True) -> TaskStore | HttpTasks:
    return open_tasks(_db_url(args), args.api, migrate=migrate, api_key=args.api_key)


def _db_url(args: argparse.Namespace) -> str | None:
    """`--db` as given, or the Supabase store URL that `--db supabase` / `db init --supabase` mean."""
    db = args.db
    if db == "supabase":
        from db.supabase_store import supabase_url_from_settings

        table = os.environ.get("POSTGRES_TABLE_NAME", "tasks")
        if table != "tasks":
            raise UsageError(
                f"POSTGRES_TABLE_NAME={table!r}: only the table 'tasks' is supported "
                "(the SQL functions and row-level security policies are written for it)"
            )
        if args.command == "db":
            raise UsageError("db init needs a database connection: --db postgresql://… --supabase")
        return supabase_url_from_settings(
            args.supabase_url or os.environ.get("SUPABASE_URL"),
            service_key=os.environ.get("SUPABASE_SERVICE_KEY"),
            access_token=args.supabase_access_token or os.environ.get("SUPABASE_ACCESS_TOKEN"),
        )
    if getattr(args, "supabase", False):
        if not db or not db.startswith(("postgresql:", "postgres:", "supabase+postgres")):
            raise UsageError("--supabase applies the Supabase migrations to a database: --db postgresql://…")
        return db if db.startswith("supabase+") else "supabase+" + db
    return db


def _read_params(args: argparse.Namespace) -> str:
    if args.params_file is not None:
        try:
            return args.params_file.read_text()
        except OSError as exc:
            raise UsageError(f"--params-file: cannot read {args.params_file}: {exc.strerror}") from None
    return args.params if args.params is not None else "{}"


def _wait(store: TaskStore | HttpTasks, task_id: str, timeout: float | None) -> int:
    """Wait for the task, drawing a progress bar on stderr: from the API's live events with `--api`,
    else from the row, polled. Prints the final status (and output or error) on stdout."""
    deadline = None if timeout is None else time.monotonic() + timeout
    task = store.get(task_id)  # TaskNotFound → exit 2 before any waiting
    with _ProgressBar(task) as bar:
        if isinstance(store, HttpTasks):
            with contextlib.suppress(StoreUnavailable):  # the stream broke: go on by polling
                task = _follow_events(store, task, bar, timeout)
        while not task.status.is_final:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            store.wait_for_work(min(1.0, remaining) if remaining is not None else 1.0)
            try:
                task = store.get(task_id)
            except TaskNotFound:
                raise UsageError(f"task {task_id} disappeared while waiting") from None
            bar.show_row(task)
    if not task.status.is_final:
        print(f"{task.id} {task.status.value} (timed out)")
        return EXIT_TIMEOUT
    detail = task.output_location if task.status == TaskStatus.COMPLETE else task.error_message
    print(f"{task.id} {task.status.value} {detail or ''}".rstrip())
    return 0 if task.status == TaskStatus.COMPLETE else EXIT_FAILED


def _follow_events(store: HttpTasks, task: Task, bar: _ProgressBar, timeout: float | None) -> Task:
    """Follow `GET /tasks/{id}/events` until a final event (the task then) or the timeout; a stream the
    server ended at its own deadline is opened again."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not task.status.is_final:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            break
        events = 0
        for event, data in store.events(task.id, timeout_s=remaining):
            events += 1
            if event == "progress":
                bar.show_progress(data)
            elif event in ("status", "done", "failed", "cancelled"):
                task = Task.model_validate(data)
                bar.show_row(task)
        if events == 0:  # the server closed the stream at once (shutting down?): poll instead
            break
    return task


class _ProgressBar:
    """A tqdm bar on stderr: denoising steps when the events give them, else percent of the row."""

    def __init__(self, task: Task):
        from tqdm import tqdm

        self.bar = tqdm(
            total=100, desc=task.id[:8], unit="%", file=sys.stderr, dynamic_ncols=True, leave=True
        )
        self.by_steps = False
        self.show_row(task)

    def show_progress(self, progress: dict) -> None:
        if "step" in progress and "total" in progress:
            if not self.by_steps:
                self.by_steps = True
                self.bar.unit = "step"
            self.bar.total = int(progress["total"])
            self.bar.n = int(progress["step"])
            eta = progress.get("eta_s")
            self.bar.set_postfix_str(f"ETA {eta:.0f} s" if eta is not None else "", refresh=False)
        else:
            self.bar.n = round(float(progress.get("progress", 0)) * (self.bar.total or 100))
            self.bar.set_postfix_str(progress.get("message") or "", refresh=False)
        self.bar.refresh()

    def show_row(self, task: Task) -> None:
        self.bar.set_description_str(f"{task.id[:8]} {task.status.value}", refresh=False)
        if task.status == TaskStatus.COMPLETE:
            self.bar.n = self.bar.total or 100
        elif not self.by_steps:
            self.bar.n = round(task.progress * (self.bar.total or 100))
            if task.progress_message:
                self.bar.set_postfix_str(task.progress_message, refresh=False)
        self.bar.refresh()

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def _print_table(tasks: list) -> None:
    print(f"{'id':36}  {'type':18} {'status':11} {'progress':>8}  {'created (UTC)':19}  output / error")
    for t in tasks:
        detail = t.output_location if t.status == TaskStatus.COMPLETE else (t.error_message or "")
        created = t.created_at.strftime("%Y-%m-%d %H:%M:%S")
        print(f"{t.id:36}  {t.task_type:18} {t.status.value:11} {t.progress:>8.0%}  {created:19}  {detail}")


if __name__ == "__main__":
    sys.exit(main())
