"""API keys scoped to projects (issue 16 items 1, 2 and 8): the real api over a real dispatcher and SQLite."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import yaml
from api_fixtures import api

from deployments.app import build_app
from deployments.auth import (
    ApiKeys,
    AuthSettings,
    KeysFileError,
    check_exposure,
    is_loopback_host,
    load_keys,
    open_keys,
)
from deployments.config import AppConfig

ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdef"
OPS = "ops-key-0123456789abcdef"
KEYS = [
    {"name": "alice", "key": ALICE, "projects": ["p1"]},
    {"name": "bob", "key": BOB, "projects": ["p2", "p3"]},
    {"name": "ops", "key_sha256": hashlib.sha256(OPS.encode()).hexdigest(), "projects": "*"},
]
T2V = {"task_type": "t2v", "params": {"prompt": "a cat", "model": "tiny-t2v"}}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def wait_status(client, task_id: str, key: str, status: str = "Complete", timeout_s: float = 10) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        task = client.get(f"/tasks/{task_id}", headers=auth(key)).json()
        if task["status"] == status:
            return task
        time.sleep(0.02)
    raise AssertionError(f"{task_id} did not become {status}: {task}")


def test_every_route_needs_a_key_and_sees_only_its_projects(tmp_path: Path):
    with api(tmp_path, keys=KEYS) as (client, store, _):
        # Without a key (or with an unknown one): 401 everywhere but the bare liveness answer.
        any_id = "00000000-0000-0000-0000-000000000000"
        for method, path in [
            ("POST", "/tasks"),
            ("GET", "/tasks"),
            ("GET", f"/tasks/{any_id}"),
            ("POST", f"/tasks/{any_id}/cancel"),
            ("GET", f"/tasks/{any_id}/output"),
            ("GET", "/replicas"),
        ]:
            for headers in ({}, auth("not-a-key-at-all-but-long"), {"Authorization": f"Basic {ALICE}"}):
                response = client.request(
                    method, path, json=T2V if method == "POST" else None, headers=headers
                )
                assert response.status_code == 401, (method, path, headers, response.text)
                assert response.headers["www-authenticate"] == "Bearer"
        bare = client.get("/healthz")
        assert bare.status_code == 200 and bare.json() == {"status": "ok"}
        assert store.count_by_status() and sum(store.count_by_status().values()) == 0

        # A one-project key fills project_id; another project is 403; a multi-project key must choose.
        mine = client.post("/tasks", json=T2V, headers=auth(ALICE))
        assert mine.status_code == 201 and mine.json()["project_id"] == "p1"
        foreign = client.post("/tasks", json={**T2V, "project_id": "p2"}, headers=auth(ALICE))
        assert foreign.status_code == 403 and "p2" in foreign.text
        unchosen = client.post("/tasks", json=T2V, headers=auth(BOB))
        assert unchosen.status_code == 422 and unchosen.json()["detail"][0]["loc"] == ["body", "project_id"]
        bobs = [
            client.post("/tasks", json={**T2V, "project_id": p}, headers=auth(BOB)).json()
            for p in ("p2", "p3")
        ]
        assert [t["project_id"] for t in bobs] == ["p2", "p3"]

        # Another project's task is as unknown as a missing one: get, cancel, output, dependency.
        for method, path in [("GET", "/tasks/{}"), ("POST", "/tasks/{}/cancel"), ("GET", "/tasks/{}/output")]:
            response = client.request(method, path.format(bobs[0]["id"]), headers=auth(ALICE))
            assert response.status_code == 404, (path, response.text)
        depends = client.post("/tasks", json={**T2V, "dependant_on": bobs[0]["id"]}, headers=auth(ALICE))
        assert depends.status_code == 422 and depends.json()["detail"][0]["loc"] == ["body", "dependant_on"]
        assert "no task with id" in depends.text
        frame = {
            "task_type": "extract_frame",
            "params": {"input_video_task_id": bobs[0]["id"], "frame_index": 0},
        }
        assert client.post("/tasks", json=frame, headers=auth(ALICE)).status_code == 422
        assert client.get(f"/tasks/{bobs[0]['id']}", headers=auth(BOB)).status_code == 200
        assert client.get(f"/tasks/{bobs[0]['id']}", headers=auth(OPS)).status_code == 200

        # Lists show only the key's projects (a multi-project key's merged newest first).
        def listed(key: str, **query) -> list[str]:
            response = client.get("/tasks", params=query, headers=auth(key))
            assert response.status_code == 200, response.text
            return [t["id"] for t in response.json()]

        assert listed(ALICE) == [mine.json()["id"]]
        assert listed(ALICE, project_id="p2") == []
        assert listed(BOB) == [bobs[1]["id"], bobs[0]["id"]]
        assert listed(BOB, limit=1, offset=1) == [bobs[0]["id"]]
        assert listed(BOB, project_id="p3") == [bobs[1]["id"]]
        assert set(listed(OPS)) == {mine.json()["id"], *(t["id"] for t in bobs)}

        # The owner's task runs, and only the owner (or "*") reads its output.
        wait_status(client, mine.json()["id"], ALICE)
        output = client.get(f"/tasks/{mine.json()['id']}/output", headers=auth(ALICE))
        assert output.status_code == 200 and output.content.startswith(b"output of ")
        assert client.get(f"/tasks/{mine.json()['id']}/output", headers=auth(BOB)).status_code == 404
        cancelled = client.post(f"/tasks/{bobs[1]['id']}/cancel", headers=auth(BOB))
        assert cancelled.status_code in (200, 409)

        # Details (worker id with host and pid, database, queue) and /replicas only for "*" keys.
        assert client.get("/healthz", headers=auth(ALICE)).json() == {"status": "ok"}
        detailed = client.get("/healthz", headers=auth(OPS)).json()
        assert detailed["status"] == "ok" and "worker_id" in detailed and "tasks" in detailed
        assert client.get("/replicas", headers=auth(ALICE)).status_code == 403
        assert client.get("/replicas", headers=auth(OPS)).json() == {
            "T2V": {"host": "gpu-node-7", "pid": 4242}
        }
        assert client.get("/ui").status_code == 200  # the static page itself holds no data


def test_without_keys_everything_is_open_and_detailed(tmp_path: Path):
    with api(tmp_path) as (client, _, _):
        created = client.post("/tasks", json=T2V)
        assert created.status_code == 201 and created.json()["project_id"] is None
        assert "worker_id" in client.get("/healthz").json()
        assert client.get("/replicas").status_code == 200


def test_the_keys_file_is_reloaded_when_it_changes(tmp_path: Path):
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump([KEYS[0]]))
    keys = ApiKeys(path)
    assert keys.authenticate(ALICE).name == "alice" and keys.authenticate(BOB) is None
    carol = "carol-key-0123456789abcdef"
    path.write_text(yaml.safe_dump([KEYS[1], {"name": "carol", "key": carol, "projects": ["p9"]}]))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert keys.authenticate(ALICE) is None  # revoked without a restart
    assert keys.authenticate(carol).projects == frozenset({"p9"})
    path.write_text("- {name: broken")  # a bad edit keeps the last good keys
    assert keys.authenticate(carol) is not None
    path.unlink()  # so does a removed file
    assert keys.authenticate(BOB).name == "bob"


@pytest.mark.parametrize(
    "entries, problem",
    [
        ({"name": "x"}, "must be a list"),
        ([{"name": "a", "key": "short", "projects": ["p"]}], "entry 0: key: String should have at least 16"),
        ([{"name": "a", "key": ALICE, "key_sha256": "0" * 64, "projects": ["p"]}], "exactly one of key"),
        ([{"name": "a", "key": ALICE, "projects": []}], "entry 0: projects"),
        ([{"name": "a", "key": ALICE, "projects": "all"}], "entry 0: projects"),
        ([{"name": "a", "key_sha256": "xyz", "projects": ["p"]}], "entry 0: key_sha256"),
        ([KEYS[0], {**KEYS[1], "name": "alice"}], "entry 1: name 'alice' is used twice"),
        ([{"name": "a", "key": ALICE, "projects": ["p"], "admin": True}], "entry 0: admin"),
    ],
)
def test_bad_keys_files_are_refused_without_echoing_keys(tmp_path: Path, entries, problem: str):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(KeysFileError, match=problem) as refused:
        load_keys(path)
    assert ALICE not in str(refused.value)


def test_which_keys_file_is_in_force(tmp_path: Path):
    config_file, env_file = tmp_path / "config.json", tmp_path / "env.json"
    config_file.write_text(json.dumps([KEYS[0]]))
    env_file.write_text(json.dumps([KEYS[1]]))
    settings = AuthSettings(api_keys_file=str(config_file))
    assert open_keys(settings, env={}).authenticate(ALICE) is not None
    from_env = open_keys(settings, env={"HWGP_API_KEYS_FILE": str(env_file)})
    assert from_env.authenticate(BOB) is not None and from_env.authenticate(ALICE) is None
    assert open_keys(AuthSettings(), env={}) is None
    assert open_keys(AuthSettings(mode="none"), env={}) is None
    with pytest.raises(KeysFileError, match="auth.mode is 'none' but a keys file"):
        open_keys(AuthSettings(mode="none"), env={"HWGP_API_KEYS_FILE": str(env_file)})
    with pytest.raises(KeysFileError, match="cannot read"):
        open_keys(AuthSettings(api_keys_file=str(tmp_path / "missing.json")), env={})


def test_a_non_loopback_host_without_keys_refuses_to_start(tmp_path: Path):
    assert all(is_loopback_host(h) for h in ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"])
    assert not any(is_loopback_host(h) for h in ["0.0.0.0", "::", "10.0.0.5", "example.com", "", None])
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(KEYS))
    check_exposure(AuthSettings(), "127.0.0.1", env={})
    check_exposure(AuthSettings(api_keys_file=str(keys)), "0.0.0.0", env={})
    check_exposure(AuthSettings(), "0.0.0.0", env={"HWGP_API_KEYS_FILE": str(keys)})
    check_exposure(AuthSettings(mode="none"), "0.0.0.0", env={})
    with pytest.raises(
        ValueError, match="refusing to start: the HTTP proxy listens on '0.0.0.0'.*auth.mode: none"
    ):
        check_exposure(AuthSettings(), "0.0.0.0", env={})
    # The application builder refuses before building anything (no Serve running: the config's host).
    with pytest.raises(ValueError, match="refusing to start"):
        build_app({"http_host": "::"})


def test_the_shipped_serve_config_binds_loopback():
    config = yaml.safe_load((Path(__file__).parents[1] / "serve_config.yaml").read_text())
    assert config["http_options"]["host"] == "127.0.0.1"
    args = AppConfig.model_validate(config["applications"][0]["args"])
    check_exposure(args.auth, config["http_options"]["host"], env={})


def test_the_cli_and_batch_send_the_api_key(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch):
    from dag import batch
    from db import cli

    with api(tmp_path, keys=KEYS, over_http=True) as (client, store, _):
        url = str(client.base_url)
        params = json.dumps(T2V["params"])
        assert cli.main(["--api", url, "add-task", "--type", "t2v", "--params", params]) == 2
        assert (
            "an API key is needed" in capsys.readouterr().err and sum(store.count_by_status().values()) == 0
        )
        assert (
            cli.main(["--api", url, "--api-key", ALICE, "add-task", "--type", "t2v", "--params", params]) == 0
        )
        task_id = capsys.readouterr().out.strip()
        assert store.get(task_id).project_id == "p1"
        monkeypatch.setenv("HWGP_API_KEY", BOB)  # the environment's key, for both tools
        assert cli.main(["--api", url, "show", task_id]) == 2
        assert "no task with id" in capsys.readouterr().err
        lines = tmp_path / "tasks.jsonl"
        lines.write_text(json.dumps({**T2V, "project_id": "p2"}) + "\n")
        assert batch.main([str(lines), "--api", url, "--poll", "0.05", "--timeout", "20"]) == 0
        assert "1 complete, 0 failed" in capsys.readouterr().out
        assert batch.main([str(lines), "--api", url, "--api-key", ALICE]) == 2
        assert "may not create tasks in project 'p2'" in capsys.readouterr().err
