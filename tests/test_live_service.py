"""Results, live events, webhooks, `hwgp wait` / `show` and the Prometheus metrics, through the real app:
a local Ray cluster exporting metrics, the Serve application on the tiny models, a loopback webhook
receiver allowlisted through $HWGP_WEBHOOK_URL_ALLOW."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_webhooks import SECRET, Receiver

from db.cli import main as hwgp
from db.store import open_store
from deployments.webhooks import SIGNATURE_HEADER, verify_signature
from hwgp_testing import free_port, running_app, wait_final

pytestmark = pytest.mark.slow

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana-dashboard.json"
SMALL = {"prompt": "a red square", "resolution": "64x48", "video_length": 5, "seed": 7}


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("live")
    db = f"sqlite:///{root / 'tasks.db'}"
    metrics_port = free_port()
    config = {
        "db": db,
        "storage": {"root": str(root / "files")},
        "models": "tiny",
        "deployments": {"T2V": {"num_gpus": 0.5, "num_cpus": 0.1}},
        "ingress": {
            "poll_interval_s": 0.2,
            "progress_interval_s": 0.0,
            "shutdown_grace_s": 1.0,
            "fail_unknown_task_types": True,
        },  # so a failure counter moves (default: off)
    }
    with pytest.MonkeyPatch.context() as env:
        # Read by the ingress replica (Ray's workers inherit the environment the cluster started with).
        env.setenv("HWGP_WEBHOOK_URL_ALLOW", f"127.0.0.1:{receiver.server_address[1]}")
        env.setenv("HWGP_WEBHOOK_SECRET", SECRET)
        with running_app(config, ray_init={"_metrics_export_port": metrics_port}) as client:
            yield {"client": client, "db": db, "metrics": f"http://127.0.0.1:{metrics_port}/metrics"}


def read_events(client: httpx.Client, task_id: str) -> list[tuple[str, dict]]:
    """The task's server-sent events as they arrive, until the stream ends."""
    events, kind = [], None
    with client.stream("GET", f"/tasks/{task_id}/events", params={"timeout_s": 120}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith(
            "text/event-stream"
        )
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((kind, json.loads(line.removeprefix("data: "))))
    return events


def test_events_stream_the_run_and_end_with_the_result_and_the_webhook_is_signed(service, receiver):
    client = service["client"]
    body = {"task_type": "t2v", "params": {**SMALL, "num_inference_steps": 3}, "webhook_url": receiver.url}
    task_id = client.post("/tasks", json=body).json()["id"]
    events = read_events(client, task_id)
    kinds = [kind for kind, _ in events]
    assert (
        kinds[0] == "status"
        and kinds[-1] == "done"
        and "In Progress" in [data["status"] for kind, data in events if kind == "status"]
    ), kinds
    steps = [data for kind, data in events if kind == "progress"]
    assert [p["step"] for p in steps] == [1, 2, 3] and steps[-1]["eta_s"] == 0, steps
    assert kinds.index("progress") > 0 and kinds.count("done") == 1

    done = events[-1][1]
    result = done["result"]
    assert done["status"] == "Complete" and client.get(f"/tasks/{task_id}").json()["result"] == result
    assert (result["model"], result["model_source"], result["seed"]) == ("tiny-t2v", "tiny:t2v", 7)
    assert (result["steps"], result["width"], result["height"], result["frames"]) == (3, 64, 48, 5)
    assert "webhook_url" not in json.dumps(result)  # the engine never saw it
    output = client.get(f"/tasks/{task_id}/output")
    assert result["output"]["bytes"] == len(output.content) and result["output"]["media_type"] == "video/mp4"
    timings = result["timings"]
    for stage in ("queue_wait", "input_fetch", "load", "text_encode", "denoise", "decode", "encode", "save"):
        assert timings[stage] >= 0, (stage, timings)
    assert timings["denoise"] > 0 and timings["load"] > 0  # the first task loaded the model

    deadline = time.monotonic() + 30
    while not receiver.received and time.monotonic() < deadline:
        time.sleep(0.05)
    (_, headers, raw), *_ = receiver.received
    assert verify_signature(SECRET, raw, headers[SIGNATURE_HEADER])
    payload = json.loads(raw)
    assert payload["event"] == "task.completed" and payload["task"]["id"] == task_id
    assert payload["task"]["result"] == result


def test_hwgp_wait_draws_progress_from_the_events_and_show_prints_the_result(service, capsys):
    client, api = service["client"], str(service["client"].base_url)
    task_id = client.post(
        "/tasks", json={"task_type": "t2v", "params": {**SMALL, "num_inference_steps": 6}}
    ).json()["id"]
    assert hwgp(["--api", api, "wait", task_id, "--timeout", "120"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"{task_id} Complete files/{task_id}/")
    assert "6/6" in err and "step" in err and "ETA" in err, err  # the bar, drawn from step events

    assert hwgp(["--api", api, "show", task_id]) == 0
    shown = capsys.readouterr().out
    assert re.search(r"^result\.seed\s+7$", shown, re.M) and re.search(r"^result\.steps\s+6$", shown, re.M)
    assert re.search(r'^result\.model\s+"tiny-t2v"$', shown, re.M)

    # Without --api the bar follows the row (polled).
    polled = client.post(
        "/tasks", json={"task_type": "t2v", "params": {**SMALL, "num_inference_steps": 2}}
    ).json()["id"]
    assert hwgp(["--db", service["db"], "wait", polled, "--timeout", "120"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"{polled} Complete") and "100%" in err and "Complete" in err, err


def test_prometheus_export_has_the_hwgp_counters_moving_and_the_dashboard_reads_them(service):
    client = service["client"]
    task_id = client.post("/tasks", json={"task_type": "t2v", "params": SMALL}).json()["id"]
    assert wait_final(client, task_id)["status"] == "Complete"
    with open_store(service["db"]) as store:  # a row no deployment serves: failed (fail_unknown_task_types)
        orphan = store.add("hunyuan", {}).id
    assert wait_final(client, orphan)["status"] == "Failed"

    def samples() -> dict[str, list[tuple[dict[str, str], float]]]:
        found: dict[str, list[tuple[dict[str, str], float]]] = {}
        for line in httpx.get(service["metrics"], timeout=10).text.splitlines():
            match = re.match(r"^(ray_hwgp_\w+)\{(.*)\} (\S+)$", line)
            if match:
                labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
                found.setdefault(match.group(1), []).append((labels, float(match.group(3))))
        return found

    def total(found: dict, name: str, **labels: str) -> float:
        return sum(v for tags, v in found.get(name, []) if all(tags.get(k) == w for k, w in labels.items()))

    deadline = time.monotonic() + 60  # Ray exports metrics every few seconds
    while True:
        found = samples()
        completed = total(found, "ray_hwgp_tasks_completed_total", task_type="t2v")
        if (completed >= 4 and total(found, "ray_hwgp_tasks_failed_total", task_type="hunyuan") >= 1) or (
            time.monotonic() > deadline
        ):
            break
        time.sleep(1)
    assert completed >= 4, sorted(found)  # every t2v task of this module
    assert total(found, "ray_hwgp_tasks_claimed_total", task_type="t2v") >= 4
    assert total(found, "ray_hwgp_tasks_failed_total", task_type="hunyuan") >= 1
    assert total(found, "ray_hwgp_generation_seconds_count", model="tiny-t2v") >= 4
    assert total(found, "ray_hwgp_replica_generations_total", model="tiny-t2v") >= 4
    assert total(found, "ray_hwgp_model_load_seconds_count", model="tiny-t2v") >= 1
    assert "ray_hwgp_queue_depth" in found and "ray_hwgp_in_flight" in found

    # Every metric the Grafana dashboard queries is exported, with the labels it groups by.
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    for expr in exprs:
        names = re.findall(r"ray_hwgp_\w+", expr)
        assert names, expr
        for name in names:
            assert name in found, (name, sorted(found))
            for group in re.findall(r"by \(([^)]*)\)", expr):
                for label in (g.strip() for g in group.split(",")):
                    assert label == "le" or label in found[name][0][0], (expr, label, found[name][0][0])
        assert "SessionName" in found[names[0]][0][0]
