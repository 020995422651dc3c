"""The batch file's "#N" references, resolved and checked before anything is queued."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dag.batch import resolve_references
from db.store import InvalidTask, open_store

IDS = {1: "11111111-1111-4111-8111-111111111111", 2: "22222222-2222-4222-8222-222222222222"}


def test_dependant_on_and_task_naming_params_are_resolved():
    row = {
        "task_type": "extract_frame",
        "params": {
            "input_video_task_id": "#1",
            "frame_index": 3,
            "note": "#2",
            "nested": [{"x_task_id": "#2"}],
        },
        "dependant_on": "#2",
    }
    resolved = resolve_references(3, row, IDS)
    assert resolved["dependant_on"] == IDS[2]
    assert resolved["params"]["input_video_task_id"] == IDS[1]
    assert resolved["params"]["nested"][0]["x_task_id"] == IDS[2]
    assert resolved["params"]["note"] == "#2"  # not a key that names a task: left as the client wrote it
    assert row["params"]["input_video_task_id"] == "#1"  # the line itself is not modified


def test_a_single_param_reference_implies_the_dependency():
    row = {"task_type": "extract_frame", "params": {"input_video_task_id": "#1", "frame_index": 0}}
    assert resolve_references(2, row, IDS)["dependant_on"] == IDS[1]
    explicit = {**row, "dependant_on": IDS[2]}
    assert resolve_references(2, explicit, IDS)["dependant_on"] == IDS[2]  # an explicit one wins


@pytest.mark.parametrize("reference", ["#2", "#0", "#x", "#-1"])
def test_a_reference_must_name_an_earlier_line(reference: str):
    row = {"task_type": "extract_frame", "params": {"input_video_task_id": reference}}
    with pytest.raises(InvalidTask) as caught:
        resolve_references(2, row, IDS)
    assert caught.value.field == "line 2: params.input_video_task_id"
    assert reference in caught.value.problem


def test_a_bad_reference_on_a_later_line_queues_nothing(tmp_path: Path):
    db = f"sqlite:///{tmp_path / 'batch.db'}"
    jobs = tmp_path / "jobs.jsonl"
    lines = [
        {"task_type": "t2v", "params": {"prompt": "a"}},
        {"task_type": "extract_frame", "params": {"input_video_task_id": "#5", "frame_index": 0}},
    ]
    jobs.write_text("\n".join(json.dumps(line) for line in lines))
    run = subprocess.run(
        [sys.executable, "-m", "dag.batch", str(jobs), "--db", db, "--timeout", "1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2
    assert "line 2: params.input_video_task_id" in run.stderr and "#5 names no earlier line" in run.stderr
    with open_store(db) as store:
        assert store.list() == []
