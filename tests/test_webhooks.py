"""Webhook delivery against a real loopback receiver: signed, retried with backoff, guarded like inputs."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from deployments.webhooks import SIGNATURE_HEADER, WebhookSender, WebhookSettings, sign, verify_signature

SECRET = "webhook-test-secret"


class Receiver(ThreadingHTTPServer):
    """Answers each POST with the next status of `statuses` (the last one repeats) and records it."""

    def __init__(self) -> None:
        self.statuses: list[int] = [200]
        self.received: list[tuple[float, dict[str, str], bytes]] = []
        self.delay_s = 0.0

        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append((time.monotonic(), dict(self.headers), body))
                time.sleep(receiver.delay_s)
                status = receiver.statuses[min(len(receiver.received), len(receiver.statuses)) - 1]
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except BrokenPipeError:  # the sender's deadline passed first
                    pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def sender(**settings) -> WebhookSender:
    base = {"secret": SECRET, "url_allow": ["127.0.0.1"], "first_backoff_s": 0.05, "attempt_timeout_s": 2}
    return WebhookSender(WebhookSettings(**{**base, **settings}), env={})


def test_delivery_is_signed_and_verifiable(receiver: Receiver):
    outcome = asyncio.run(sender().deliver(receiver.url, "task.completed", {"task": {"id": "t1"}}))
    assert outcome.delivered and outcome.attempts == 1 and outcome.status == 200
    (_, headers, body), *_ = receiver.received
    assert json.loads(body) == {"event": "task.completed", "task": {"id": "t1"}}
    assert headers["X-HWGP-Event"] == "task.completed" and headers["Content-Type"] == "application/json"
    assert verify_signature(SECRET, body, headers[SIGNATURE_HEADER])
    assert not verify_signature("another-secret", body, headers[SIGNATURE_HEADER])
    assert not verify_signature(SECRET, body + b" ", headers[SIGNATURE_HEADER])
    stale = sign(SECRET, body, int(time.time()) - 3600)
    assert not verify_signature(SECRET, body, stale)  # a replayed old delivery


def test_retried_with_backoff_until_delivered(receiver: Receiver):
    receiver.statuses = [500, 503, 429, 200]
    outcome = asyncio.run(sender().deliver(receiver.url, "task.failed", {"task": {"id": "t2"}}))
    assert outcome.delivered and outcome.attempts == 4
    times = [at for at, _, _ in receiver.received]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1 and gaps[2] >= 0.2  # doubling
    deliveries = {headers["X-HWGP-Delivery"] for _, headers, _ in receiver.received}
    assert len(deliveries) == 1  # one id across retries: receivers can drop duplicates


def test_gives_up_after_max_attempts_and_on_client_errors(receiver: Receiver):
    receiver.statuses = [500]
    outcome = asyncio.run(sender(max_attempts=3).deliver(receiver.url, "task.completed", {}))
    assert not outcome.delivered and outcome.attempts == 3 and "HTTP 500" in outcome.error
    receiver.received.clear()
    receiver.statuses = [410]
    outcome = asyncio.run(sender(max_attempts=3).deliver(receiver.url, "task.completed", {}))
    assert not outcome.delivered and outcome.attempts == 1 and outcome.status == 410


def test_each_attempt_has_a_deadline(receiver: Receiver):
    receiver.delay_s = 3
    started = time.monotonic()
    outcome = asyncio.run(
        sender(max_attempts=2, attempt_timeout_s=0.5).deliver(receiver.url, "task.completed", {})
    )
    assert not outcome.delivered and outcome.error == "the server did not answer in time"
    assert time.monotonic() - started < 2.5


def test_private_addresses_are_refused_unless_allowlisted(receiver: Receiver):
    guarded = WebhookSender(WebhookSettings(first_backoff_s=0.01, max_attempts=2), env={})
    outcome = asyncio.run(guarded.deliver(receiver.url, "task.completed", {}))
    assert not outcome.delivered and outcome.error == "the address is not allowed"
    assert receiver.received == []  # nothing reached the loopback receiver
    with pytest.raises(ValueError, match="webhook_url: the address is not allowed"):
        guarded.check_url("http://169.254.169.254/latest/meta-data")
    with pytest.raises(ValueError, match="webhook_url"):
        guarded.check_url("ftp://example.com/hook")
    allowed = WebhookSender(WebhookSettings(), env={"HWGP_WEBHOOK_URL_ALLOW": "127.0.0.1"})
    allowed.check_url(receiver.url)  # the environment's allowlist wins


def test_url_for_prefers_the_task_then_the_default():
    configured = WebhookSender(WebhookSettings(default_url="https://hooks.example/all"), env={})
    assert configured.url_for({"webhook_url": "https://hooks.example/mine"}) == "https://hooks.example/mine"
    assert configured.url_for({}) == "https://hooks.example/all"
    assert WebhookSender(env={}).url_for({}) is None
