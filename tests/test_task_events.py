"""Task results, live events and webhooks without Ray: the real dispatcher and api over a real SQLite /
PostgreSQL tasks table, a runner standing in for the GPU, a real loopback webhook receiver."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_dispatcher import CATALOG, FAST, MODELS, in_loop, until
from test_webhooks import SECRET, Receiver

from db.models import TaskStatus
from db.store import TaskStore, open_store
from deployments.api import create_app
from deployments.config import IngressConfig
from deployments.dispatcher import BlockingPool, Dispatcher, Job, RunResult, TaskFailure
from deployments.events import EventBus
from deployments.routing import Routing
from deployments.task_types import GENERATION, UTILITY
from deployments.webhooks import (
    SIGNATURE_HEADER,
    WebhookNotifier,
    WebhookSender,
    WebhookSettings,
    verify_signature,
)
from storage import InputFetcher, OutputStorage, StorageConfig
from Wan2GP.artifact import Artifact

# What the engine reports about a generation (Wan2GP/engine.py), as a runner hands it over.
ENGINE_METADATA = {
    "task_type": "t2v",
    "model": "tiny-t2v",
    "model_source": "tiny:t2v",
    "frames": 5,
    "fps": 16,
    "width": 64,
    "height": 48,
    "seed": 1234,
    "steps": 3,
    "guidance": 5.0,
    "loras": [{"file": "x.safetensors", "multiplier": 0.7}],
    "ignored_params": ["use_styleboost_loras"],
    "timings": {"load": 0.25, "encode_prompt": 0.125, "denoise": 1.5, "decode": 0.5, "encode_file": 0.0625},
}


class SteppingGpu:
    """A runner that fetches (timed), reports `steps` steps `step_s` apart, then returns an artifact with
    the engine's metadata, or fails when the prompt says "fail"."""

    def __init__(self, steps: int = 3, step_s: float = 0.02):
        self.steps, self.step_s = steps, step_s
        self.params_seen: list[dict] = []

    async def run(self, job: Job) -> RunResult:
        self.params_seen.append(dict(job.task.params))
        with job.timed("input_fetch"):
            await asyncio.sleep(0.01)
        job.timings["load"] = 0.5  # as the replica's "loaded" event reports it
        for step in range(1, self.steps + 1):
            await asyncio.sleep(self.step_s)
            await job.progress(step, self.steps)
        if job.task.params.get("prompt") == "fail":
            raise TaskFailure("the engine refused: prompt: fail")
        data = b"video bytes of " + job.task.id.encode()
        return RunResult(Artifact(data, f"{job.task.id}.mp4", "video/mp4", dict(ENGINE_METADATA)), "tiny-t2v")


@pytest.fixture
def running() -> list[Dispatcher]:
    """Dispatchers a test started: `in_loop` stops them before its event loop closes."""
    return []


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TaskStore]:
    url = (
        f"sqlite:///{tmp_path / 'tasks.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("pg_schema_url")
    )
    with open_store(url) as opened:
        yield opened


def make(store: TaskStore, tmp_path: Path, runner, webhooks: WebhookSender | None = None, *, bus=True):
    storage = OutputStorage(StorageConfig(root=str(tmp_path / "files")))
    (tmp_path / "inputs").mkdir(exist_ok=True)
    routing = Routing(CATALOG, MODELS, InputFetcher([str(tmp_path / "inputs")], outputs=storage), ["T2V"])
    events = EventBus() if bus else None
    observers = [o for o in (events, WebhookNotifier(webhooks) if webhooks else None) if o is not None]
    dispatcher = Dispatcher(
        store,
        storage,
        routing,
        {GENERATION: runner, UTILITY: runner},
        {"T2V": 1},
        IngressConfig(**FAST),
        pool=BlockingPool(4),
        observers=observers,
    )
    app = create_app(
        store=store,
        storage=storage,
        routing=routing,
        dispatcher=dispatcher,
        pool=dispatcher.pool,
        max_request_bytes=100_000,
        events=events,
        webhooks=webhooks,
        events_poll_s=0.05,
        events_keepalive_s=0.1,
    )
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://api")
    return dispatcher, client


def parse_sse(text: str) -> list[tuple[str, dict | None]]:
    """(event, data) per block; comments (keepalives) as ("comment", None)."""
    events: list[tuple[str, dict | None]] = []
    for block in text.strip().split("\n\n"):
        lines = block.split("\n")
        if lines[0].startswith(":"):
            events.append(("comment", None))
            continue
        fields = dict(line.split(": ", 1) for line in lines)
        events.append((fields["event"], json.loads(fields["data"])))
    return events


@in_loop
async def test_result_is_the_engine_metadata_plus_output_and_stage_timings(store, tmp_path, running):
    dispatcher, client = make(store, tmp_path, SteppingGpu())
    dispatcher.start()
    running.append(dispatcher)
    posted = await client.post("/tasks", json={"task_type": "t2v", "params": {"prompt": "a cat"}})
    task_id = posted.json()["id"]
    await until(lambda: store.get(task_id).status == TaskStatus.COMPLETE)
    result = (await client.get(f"/tasks/{task_id}")).json()["result"]
    reported = {k: v for k, v in ENGINE_METADATA.items() if k != "timings"}
    assert {k: result[k] for k in reported} == reported  # as the engine said, nothing invented
    assert result["output"] == {
        "bytes": len(b"video bytes of " + task_id.encode()),
        "media_type": "video/mp4",
        "filename": f"{task_id}.mp4",
        "uploaded": False,
    }
    timings = result["timings"]
    assert set(timings) == {
        "queue_wait", "input_fetch", "load", "text_encode", "denoise", "decode", "encode", "save"
    }  # fmt: skip
    assert timings["load"] == 0.75  # the replica's load plus the engine's
    assert (timings["text_encode"], timings["denoise"], timings["encode"]) == (0.125, 1.5, 0.0625)
    assert 0.01 <= timings["input_fetch"] < 5 and 0 < timings["save"] < 5 and 0 <= timings["queue_wait"] < 5
    await client.aclose()


@in_loop
async def test_event_stream_from_the_bus_status_progress_then_done_with_the_result(store, tmp_path, running):
    dispatcher, client = make(store, tmp_path, SteppingGpu(steps=4, step_s=0.05))
    task_id = (await client.post("/tasks", json={"task_type": "t2v", "params": {"prompt": "x"}})).json()["id"]
    stream = asyncio.ensure_future(client.get(f"/tasks/{task_id}/events"))
    await asyncio.sleep(0.05)  # the stream is open (and subscribed) before the task is claimed
    dispatcher.start()
    running.append(dispatcher)
    response = await asyncio.wait_for(stream, 10)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [(kind, data) for kind, data in parse_sse(response.text) if kind != "comment"]
    kinds = [kind for kind, _ in events]
    assert kinds[:2] == ["status", "status"] and kinds[-1] == "done", kinds
    assert [data["status"] for _, data in events[:2]] == ["Queued", "In Progress"]
    steps = [data for kind, data in events if kind == "progress"]
    assert [p["step"] for p in steps] == [1, 2, 3, 4] and all(p["total"] == 4 for p in steps)
    assert steps[0]["eta_s"] > steps[-1]["eta_s"] == 0 and steps[-1]["message"] == "step 4/4, ETA 0 s"
    done = events[-1][1]
    assert done["status"] == "Complete" and done["result"]["seed"] == 1234
    assert done["result"] == store.get(task_id).result
    await client.aclose()


@in_loop
async def test_event_stream_polls_a_task_another_worker_runs(store, tmp_path, running):
    _, client = make(store, tmp_path, SteppingGpu(), bus=False)  # no dispatcher runs here
    task = store.add("t2v", {"prompt": "x"})
    stream = asyncio.ensure_future(client.get(f"/tasks/{task.id}/events"))
    await asyncio.sleep(0.1)
    store.claim_next("elsewhere")
    await asyncio.sleep(0.15)
    store.set_progress(task.id, "elsewhere", 0.5, "step 2/4, ETA 3 s")
    await asyncio.sleep(0.15)
    store.complete(task.id, "files/x.mp4", "elsewhere", result={"seed": 9})
    events = [(k, d) for k, d in parse_sse((await asyncio.wait_for(stream, 10)).text) if k != "comment"]
    assert [k for k, _ in events] == ["status", "status", "progress", "done"]
    assert [d["status"] for _, d in events[:2]] == ["Queued", "In Progress"]
    assert events[2][1] == {"progress": 0.5, "message": "step 2/4, ETA 3 s"}
    assert events[3][1]["result"] == {"seed": 9} and events[3][1]["output_location"] == "files/x.mp4"
    await client.aclose()


@in_loop
async def test_event_stream_keeps_alive_and_ends_at_its_deadline_or_a_cancel(store, tmp_path, running):
    _, client = make(store, tmp_path, SteppingGpu())
    queued = store.add("t2v", {"prompt": "x"})
    response = await client.get(f"/tasks/{queued.id}/events", params={"timeout_s": 0.35})
    events = parse_sse(response.text)
    assert events[0][0] == "status" and events[-1] == ("timeout", {"task_id": queued.id, "timeout_s": 0.35})
    assert ("comment", None) in events  # keepalives while nothing happened
    stream = asyncio.ensure_future(client.get(f"/tasks/{queued.id}/events"))
    await asyncio.sleep(0.05)
    assert (await client.post(f"/tasks/{queued.id}/cancel")).status_code == 200
    events = parse_sse((await asyncio.wait_for(stream, 5)).text)
    assert events[-1][0] == "cancelled" and events[-1][1]["status"] == "Cancelled"
    missing = await client.get("/tasks/00000000-0000-0000-0000-000000000000/events")
    assert missing.status_code == 404
    bad = await client.get(f"/tasks/{queued.id}/events", params={"timeout_s": 0})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "timeout_s"]
    await client.aclose()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    import threading

    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def webhook_sender() -> WebhookSender:
    settings = WebhookSettings(
        secret=SECRET, url_allow=["127.0.0.1"], first_backoff_s=0.05, attempt_timeout_s=2
    )
    return WebhookSender(settings, env={})


@in_loop
async def test_webhook_url_is_checked_at_post_kept_from_the_engine_and_called_signed(
    store, tmp_path, running, receiver
):
    gpu = SteppingGpu(steps=1)
    dispatcher, client = make(store, tmp_path, gpu, webhook_sender())
    refused = [
        ({"webhook_url": "http://10.1.2.3/hook"}, ["body", "webhook_url"], "not allowed"),
        ({"webhook_url": "ftp://127.0.0.1/hook"}, ["body", "webhook_url"], "not allowed"),
        ({"params": {"prompt": "x", "webhook_url": "http://169.254.169.254/"}}, ["body", "params", "webhook_url"], ""),
        ({"params": {"prompt": "x", "webhook_url": 5}}, ["body", "params", "webhook_url"], "URL"),
        ({"webhook_url": receiver.url, "params": {"webhook_url": receiver.url + "2"}}, ["body", "webhook_url"], "twice"),
    ]  # fmt: skip
    for extra, loc, words in refused:
        body = {"task_type": "t2v", "params": {"prompt": "x"}, **extra}
        response = await client.post("/tasks", json=body)
        assert response.status_code == 422, response.text
        detail = response.json()["detail"][0]
        assert detail["loc"] == loc and words in detail["msg"], detail
    assert store.count_by_status()[TaskStatus.QUEUED] == 0  # nothing refused was written

    ok = await client.post(
        "/tasks", json={"task_type": "t2v", "params": {"prompt": "x"}, "webhook_url": receiver.url}
    )
    assert ok.status_code == 201 and ok.json()["params"]["webhook_url"] == receiver.url
    fails = await client.post(
        "/tasks", json={"task_type": "t2v", "params": {"prompt": "fail", "webhook_url": receiver.url}}
    )
    assert fails.status_code == 201
    dispatcher.start()
    running.append(dispatcher)
    await until(lambda: len(receiver.received) == 2, timeout_s=10)
    assert all("webhook_url" not in params for params in gpu.params_seen)  # the engine never sees it
    by_event = {}
    for _, headers, body in receiver.received:
        assert verify_signature(SECRET, body, headers[SIGNATURE_HEADER])
        payload = json.loads(body)
        assert headers["X-HWGP-Event"] == payload["event"]
        by_event[payload["event"]] = payload["task"]
    completed, failed = by_event["task.completed"], by_event["task.failed"]
    assert completed["id"] == ok.json()["id"] and completed["result"] == store.get(completed["id"]).result
    assert completed["result"]["seed"] == 1234
    assert (
        failed["id"] == fails.json()["id"] and failed["error_message"] == "the engine refused: prompt: fail"
    )
    await client.aclose()


@in_loop
async def test_webhook_url_is_refused_when_the_service_sends_none(store, tmp_path, running):
    _, client = make(store, tmp_path, SteppingGpu())
    response = await client.post(
        "/tasks",
        json={"task_type": "t2v", "params": {"prompt": "x"}, "webhook_url": "https://hooks.example/x"},
    )
    assert response.status_code == 422
    assert response.json()["detail"][0] == {
        "loc": ["body", "webhook_url"],
        "msg": "this service does not send webhooks",
    }
    await client.aclose()


class BrokenObserver:
    def task_changed(self, task) -> None:
        raise RuntimeError("observer bug")

    def task_progress(self, task_id, progress) -> None:
        raise RuntimeError("observer bug")


@in_loop
async def test_a_broken_observer_does_not_fail_the_task(store, tmp_path, running):
    dispatcher, client = make(store, tmp_path, SteppingGpu())
    dispatcher.observers.append(BrokenObserver())
    dispatcher.start()
    running.append(dispatcher)
    task = store.add("t2v", {"prompt": "x"})
    await until(lambda: store.get(task.id).status.is_final)
    assert store.get(task.id).status == TaskStatus.COMPLETE and store.get(task.id).result["seed"] == 1234
    await client.aclose()


@in_loop
async def test_a_task_given_up_by_maintenance_calls_its_webhook(store, tmp_path, running, receiver):
    dispatcher, client = make(store, tmp_path, SteppingGpu(), webhook_sender())
    dispatcher.settings = IngressConfig(**{**FAST, "stale_after_s": 0.05, "max_attempts": 1})
    task = store.add("t2v", {"prompt": "x", "webhook_url": receiver.url})
    store.claim_next("a-worker-that-died")
    await asyncio.sleep(0.1)
    await dispatcher.maintenance()
    await until(lambda: len(receiver.received) == 1, timeout_s=10)
    payload = json.loads(receiver.received[0][2])
    assert payload["event"] == "task.failed" and payload["task"]["id"] == task.id
    assert "stopped heartbeating" in payload["task"]["error_message"]
    await client.aclose()


@in_loop
async def test_the_configured_default_webhook_gets_tasks_that_name_none(store, tmp_path, running, receiver):
    settings = WebhookSettings(
        default_url=receiver.url, secret=SECRET, url_allow=["127.0.0.1"], first_backoff_s=0.05
    )
    dispatcher, client = make(store, tmp_path, SteppingGpu(steps=1), WebhookSender(settings, env={}))
    dispatcher.start()
    running.append(dispatcher)
    task_id = (await client.post("/tasks", json={"task_type": "t2v", "params": {"prompt": "x"}})).json()["id"]
    await until(lambda: len(receiver.received) == 1, timeout_s=10)
    _, headers, body = receiver.received[0]
    assert verify_signature(SECRET, body, headers[SIGNATURE_HEADER])
    assert json.loads(body)["task"]["id"] == task_id and json.loads(body)["event"] == "task.completed"
    await client.aclose()
