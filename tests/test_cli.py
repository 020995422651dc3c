"""The `hwgp` command line: the installed console script, run as a user runs it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from db.models import TaskStatus
from db.store import open_store

HWGP = shutil.which("hwgp") or str(Path(sys.executable).with_name("hwgp"))


def hwgp(*args: str, db: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [HWGP, "--db", db, *args], capture_output=True, text=True, input=stdin, timeout=60, check=False
    )


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'cli.db'}"


def test_init_add_list_show(db_url: str, tmp_path: Path):
    assert hwgp("db", "init", db=db_url).returncode == 0
    added = hwgp(
        "add-task", "--type", "t2v", "--params", '{"prompt": "a cat", "model": "tiny-t2v"}', db=db_url
    )
    assert added.returncode == 0, added.stderr
    task_id = added.stdout.strip()

    params_file = tmp_path / "p.json"
    params_file.write_text(json.dumps({"prompt": "after"}))
    second = hwgp(
        "add-task", "--type", "flux", "--params-file", str(params_file), "--dependant-on", task_id,
        "--priority", "2", "--project-id", "proj", db=db_url,
    )  # fmt: skip
    assert second.returncode == 0, second.stderr
    second_id = second.stdout.strip()

    listed = json.loads(hwgp("list", "--json", db=db_url).stdout)
    assert [t["id"] for t in listed] == [second_id, task_id]
    assert listed[0]["dependant_on"] == task_id and listed[0]["priority"] == 2
    table = hwgp("list", "--status", "queued", "--type", "flux", db=db_url).stdout
    assert second_id in table and task_id not in table

    shown = json.loads(hwgp("show", task_id, "--json", db=db_url).stdout)
    assert shown["params"] == {"prompt": "a cat", "model": "tiny-t2v"} and shown["status"] == "Queued"
    assert "a cat" in hwgp("show", task_id, db=db_url).stdout


def test_db_from_environment(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'env.db'}"
    env_run = subprocess.run(
        [HWGP, "add-task", "--type", "t2v"], capture_output=True, text=True, env={"HWGP_DB": url, "PATH": ""}
    )
    assert env_run.returncode == 0, env_run.stderr
    with open_store(url) as store:
        assert store.get(env_run.stdout.strip()).task_type == "t2v"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["add-task", "--type", "t2v", "--params", "{not json"], "params: is not valid JSON"),
        (["add-task", "--type", "t2v", "--params", "[1]"], "params: must be a JSON object"),
        (["add-task", "--type", "t2v", "--params-file", "/nonexistent/p.json"], "--params-file"),
        (
            ["add-task", "--type", "t2v", "--dependant-on", "5c6a1f0e-0000-4000-8000-000000000000"],
            "dependant_on",
        ),
        (["add-task", "--type", "no spaces allowed"], "task_type"),
        (["show", "5c6a1f0e-0000-4000-8000-000000000000"], "no task with id"),
        (["cancel", "5c6a1f0e-0000-4000-8000-000000000000"], "no task with id"),
        (["list", "--status", "Doing"], "--status: unknown status 'Doing'"),
        (["wait", "5c6a1f0e-0000-4000-8000-000000000000"], "no task with id"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(db_url: str, args: list[str], needle: str):
    keep = hwgp("add-task", "--type", "t2v", "--params", '{"keep": 1}', db=db_url).stdout.strip()
    before = hwgp("list", "--json", db=db_url).stdout
    result = hwgp(*args, db=db_url)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert hwgp("list", "--json", db=db_url).stdout == before
    assert keep in before


def test_cancel_and_wait_exit_codes(db_url: str):
    task_id = hwgp("add-task", "--type", "t2v", db=db_url).stdout.strip()
    timed_out = hwgp("wait", task_id, "--timeout", "0.3", db=db_url)
    assert timed_out.returncode == 3 and "Queued" in timed_out.stdout

    cancelled = hwgp("cancel", task_id, db=db_url)
    assert cancelled.returncode == 0 and "Cancelled" in cancelled.stdout
    again = hwgp("cancel", task_id, db=db_url)
    assert again.returncode == 2 and "it is Cancelled" in again.stderr
    assert hwgp("wait", task_id, db=db_url).returncode == 1


def test_wait_returns_when_a_worker_completes(db_url: str):
    task_id = hwgp("add-task", "--type", "t2v", db=db_url).stdout.strip()

    def worker() -> None:
        time.sleep(0.5)
        with open_store(db_url) as store:
            [task] = store.claim_next("w")
            store.set_progress(task.id, "w", 0.5, "step 1/2")
            store.complete(task.id, "files/x/out.mp4", worker_id="w")

    thread = threading.Thread(target=worker)
    thread.start()
    result = hwgp("wait", task_id, "--timeout", "30", db=db_url)
    thread.join()
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{task_id} Complete files/x/out.mp4"
    with open_store(db_url) as store:
        assert store.get(task_id).status == TaskStatus.COMPLETE


def test_wait_on_failure_exits_1_with_the_error(db_url: str):
    task_id = hwgp("add-task", "--type", "t2v", db=db_url).stdout.strip()
    with open_store(db_url) as store:
        store.fail(task_id, "resolution: expected WxH, got 'abc'")
    result = hwgp("wait", task_id, db=db_url)
    assert result.returncode == 1 and "resolution: expected WxH" in result.stdout


def test_postgres_url(pg_schema_url: str):
    added = hwgp("add-task", "--type", "vace", "--params", '{"prompt": "pg"}', db=pg_schema_url)
    assert added.returncode == 0, added.stderr
    shown = json.loads(hwgp("show", added.stdout.strip(), "--json", db=pg_schema_url).stdout)
    assert shown["params"] == {"prompt": "pg"}


def test_an_unreachable_database_exits_75_saying_to_try_again():
    started = time.monotonic()
    result = hwgp("list", db="postgresql://postgres@127.0.0.1:1/test?connect_timeout_s=1")
    assert result.returncode == 75
    assert "unavailable, try again later" in result.stderr and "1 s" in result.stderr
    assert time.monotonic() - started < 20
