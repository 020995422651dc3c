"""Webhooks: a signed POST to a task's `webhook_url` when it completes or fails.

Ray-free. Delivery goes through the same SSRF guard as input downloads (`storage/guarded_http.py`):
the host is resolved once, private addresses are refused unless allowlisted, every attempt has a total
deadline, and redirects are not followed (a webhook endpoint answers, it does not send us elsewhere).
Failed attempts (no answer, 429, 5xx) are retried with exponential backoff; 2xx ends delivery, and so
does any other 4xx (the receiver refused it: retrying will not help).

`webhook_url` is a task's own (a top-level field of POST /tasks, stored in its params, or
`params.webhook_url`), else `args.webhooks.default_url`. It is checked when the task is posted (422
naming `webhook_url`), and the engine never sees it: the dispatcher hands runners the task without it
(`without_delivery_keys`). `WebhookNotifier` is the dispatcher's observer that sends the events:
`task.completed` / `task.failed` with `{"event", "task": <the row, result included>}`.

Each request carries:
- `X-HWGP-Event`: `task.completed` or `task.failed`;
- `X-HWGP-Delivery`: one id per delivery, the same on every retry (receivers can drop duplicates);
- `X-HWGP-Signature`: `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" with the secret>`,
  when a secret is configured. Verify with `verify_signature`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from db.models import Task, TaskStatus
from storage.guarded_http import Budget, default_ssl_context, open_url
from storage.url_guard import (
    Allowlist,
    FetchProblem,
    SystemResolver,
    allowlist_from,
    check_target,
    parse_url,
    redact_url,
)

logger = logging.getLogger("ray.serve")

SIGNATURE_HEADER = "X-HWGP-Signature"
# Params that say where a task's events go, not how to generate: kept from the engine.
DELIVERY_KEYS = ("webhook_url",)
EVENTS = {TaskStatus.COMPLETE: "task.completed", TaskStatus.FAILED: "task.failed"}
SIGNATURE_TOLERANCE_S = 300


class WebhookSettings(BaseModel):
    """`args.webhooks` in serve_config.yaml."""

    model_config = ConfigDict(extra="forbid")

    default_url: str | None = Field(default=None, description="POSTed for tasks that name no webhook_url")
    secret: str | None = Field(
        default=None, description="HMAC-SHA256 signing secret; $HWGP_WEBHOOK_SECRET wins"
    )
    url_allow: list[str] = Field(
        default_factory=list,
        description="hosts (host or host:port) webhooks may reach although they resolve to private "
        "addresses; $HWGP_WEBHOOK_URL_ALLOW (comma-separated) wins",
    )
    max_attempts: int = Field(default=5, ge=1, le=20)
    attempt_timeout_s: float = Field(default=10.0, gt=0, le=120)
    first_backoff_s: float = Field(default=1.0, ge=0, le=60)
    max_backoff_s: float = Field(default=60.0, ge=0, le=3600)


def sign(secret: str, body: bytes, timestamp: int) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify_signature(
    secret: str,
    body: bytes,
    header: str,
    now: float | None = None,
    tolerance_s: float = SIGNATURE_TOLERANCE_S,
) -> bool:
    """What a receiver runs: the signature matches and is recent (replays of old deliveries fail)."""
    try:
        parts = dict(part.split("=", 1) for part in header.split(","))
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, body, timestamp), f"t={timestamp},v1={parts.get('v1', '')}")


@dataclass
class Delivery:
    """How a webhook delivery ended."""

    url: str
    delivered: bool
    attempts: int
    status: int | None = None
    error: str | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "url": redact_url(self.url),
            "delivered": self.delivered,
            "attempts": self.attempts,
            "status": self.status,
            "error": self.error,
        }


class WebhookSender:
    """Delivers task events; one small bounded pool of its own, never the loop's default executor."""

    def __init__(
        self,
        settings: WebhookSettings | None = None,
        *,
        env: Mapping[str, str] | None = None,
        max_concurrent: int = 4,
    ):
        self.settings = settings or WebhookSettings()
        env = os.environ if env is None else env
        self.secret = env.get("HWGP_WEBHOOK_SECRET") or self.settings.secret
        self.allow: Allowlist = allowlist_from(self.settings.url_allow, env, "HWGP_WEBHOOK_URL_ALLOW")
        self._pool = ThreadPoolExecutor(max_concurrent, thread_name_prefix="hwgp-webhook")
        self._resolve = SystemResolver(ThreadPoolExecutor(2, thread_name_prefix="hwgp-webhook-dns"))
        self._ssl = default_ssl_context(env)
        self._closed = threading.Event()

    def url_for(self, params: Mapping[str, Any]) -> str | None:
        """The URL a task's events go to: its own `webhook_url`, else the configured default."""
        return params.get("webhook_url") or self.settings.default_url

    def check_url(self, url: str) -> None:
        """Validate a webhook URL at POST time (scheme, host, public address or allowlisted).

        Raises ValueError with a message that does not reveal what the host resolved to."""
        try:
            check_target(parse_url(url), self.allow, self._resolve, timeout=5.0)
        except FetchProblem as problem:
            logger.info("webhook_url %s refused: %s", redact_url(url), problem.detail)
            raise ValueError(f"webhook_url: {problem.public}") from None

    async def deliver(self, url: str, event: str, payload: Mapping[str, Any]) -> Delivery:
        """POST the event, retrying with backoff; never raises (the outcome is in the Delivery)."""
        body = json.dumps({"event": event, **payload}, default=str).encode()
        delivery_id = str(uuid.uuid4())
        backoff = self.settings.first_backoff_s
        outcome = Delivery(url, delivered=False, attempts=0)
        loop = asyncio.get_running_loop()
        for attempt in range(1, self.settings.max_attempts + 1):
            outcome.attempts = attempt
            cancel = threading.Event()
            try:
                outcome.status = await loop.run_in_executor(
                    self._pool, self._post, url, event, body, delivery_id, cancel
                )
                outcome.error = None
            except FetchProblem as problem:
                outcome.status, outcome.error = None, problem.public
                logger.info("webhook %s attempt %d: %s", redact_url(url), attempt, problem.detail)
            except asyncio.CancelledError:
                cancel.set()
                raise
            except Exception as error:  # connection reset, TLS, protocol: all "no answer"
                outcome.status, outcome.error = None, "the delivery failed"
                logger.info(
                    "webhook %s attempt %d: %s: %s", redact_url(url), attempt, type(error).__name__, error
                )
            if outcome.status is not None:
                if 200 <= outcome.status < 300:
                    outcome.delivered = True
                    return outcome
                if outcome.status != 429 and outcome.status < 500:
                    outcome.error = f"the receiver answered HTTP {outcome.status}"
                    return outcome
                outcome.error = f"the receiver answered HTTP {outcome.status}"
            if attempt < self.settings.max_attempts and not self._closed.is_set():
                await asyncio.sleep(backoff)
                backoff = min(self.settings.max_backoff_s, max(backoff * 2, 0.01))
        logger.warning(
            "webhook %s not delivered after %d attempts: %s", redact_url(url), outcome.attempts, outcome.error
        )
        return outcome

    def _post(self, url: str, event: str, body: bytes, delivery_id: str, cancel: threading.Event) -> int:
        headers = {"Content-Type": "application/json", "X-HWGP-Event": event, "X-HWGP-Delivery": delivery_id}
        if self.secret:
            headers[SIGNATURE_HEADER] = sign(self.secret, body, int(time.time()))
        budget = Budget(self.settings.attempt_timeout_s, cancel=(cancel, self._closed))
        with open_url(
            url,
            allow=self.allow,
            resolve=self._resolve,
            budget=budget,
            ssl_context=self._ssl,
            max_redirects=0,
            method="POST",
            content=body,
            extra_headers=headers,
        ) as answer:
            for _ in answer.body:  # read (and drop) the answer so the connection closes cleanly
                budget.check()
            return answer.status

    def close(self) -> None:
        self._closed.set()
        self._pool.shutdown(wait=False, cancel_futures=True)


def without_delivery_keys(task: Task) -> Task:
    """The task as runners and the engine see it: without `webhook_url`."""
    if not any(key in task.params for key in DELIVERY_KEYS):
        return task
    params = {k: v for k, v in task.params.items() if k not in DELIVERY_KEYS}
    return task.model_copy(update={"params": params})


class WebhookNotifier:
    """A dispatcher observer (`deployments.dispatcher.TaskObserver`) that POSTs each task's final event to
    its webhook; deliveries run as tasks on the event loop, so the dispatcher never waits for them."""

    def __init__(self, sender: WebhookSender):
        self.sender = sender
        self.deliveries: set[asyncio.Task[Delivery]] = set()

    def task_changed(self, task: Task) -> None:
        event = EVENTS.get(task.status)
        url = self.sender.url_for(task.params) if event else None
        if event is None or not url:
            return
        delivery = asyncio.get_running_loop().create_task(
            self._deliver(url, event, task), name=f"webhook-{task.id}"
        )
        self.deliveries.add(delivery)
        delivery.add_done_callback(self.deliveries.discard)

    def task_progress(self, task_id: str, progress: dict[str, Any]) -> None:
        """Webhooks are sent for final events only."""

    async def _deliver(self, url: str, event: str, task: Task) -> Delivery:
        outcome = await self.sender.deliver(url, event, {"task": task.model_dump(mode="json")})
        if outcome.delivered:
            logger.info("task %s: %s delivered to %s", task.id, event, redact_url(url))
        return outcome

    async def close(self, timeout_s: float = 5.0) -> None:
        """Let deliveries under way finish for up to `timeout_s`, then stop them and the sender."""
        if self.deliveries:
            await asyncio.wait(list(self.deliveries), timeout=timeout_s)
        for delivery in list(self.deliveries):
            delivery.cancel()
        self.sender.close()
