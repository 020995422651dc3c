"""Live task events: an in-process bus the dispatcher publishes to, and the server-sent-events stream of
`GET /tasks/{id}/events`.

The stream, one `event:` / `data:` (JSON) block per event:

    status     the row: first the task as it is now, then on every status change (claimed, requeued)
    progress   {"step", "total", "progress", "eta_s", "message"} per denoising step of a task this
               process runs; {"progress", "message"} from the row for a task another worker runs
    done       the Complete row, `result` included            } the last event: the stream then ends
    failed     the Failed row, `error_message` included        }
    cancelled  the Cancelled row                               }
    timeout    {"task_id", "timeout_s"}: the stream's deadline passed first (the task goes on)

Events come from the bus when this process runs the task; the row is also read every `poll_s`, so a
task run by another ingress, or cancelled through another one, is followed too. A comment line
(`: keepalive`) goes out when nothing else did for `keepalive_s`, so proxies keep the connection open.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from db.models import Task, TaskStatus

FINAL_EVENTS = {TaskStatus.COMPLETE: "done", TaskStatus.FAILED: "failed", TaskStatus.CANCELLED: "cancelled"}


@dataclass(frozen=True)
class TaskEvent:
    kind: str  # "status" (task set) or "progress" (progress set)
    task: Task | None = None
    progress: dict[str, Any] | None = None


class Subscription:
    """One listener's queue of a task's events. Progress events are dropped when it falls behind."""

    def __init__(self, bus: EventBus, task_id: str, max_queued: int):
        self.task_id = task_id
        self.queue: asyncio.Queue[TaskEvent] = asyncio.Queue(max_queued)
        self._loop = asyncio.get_running_loop()
        self._bus = bus

    def offer(self, event: TaskEvent) -> None:
        """Queue `event` from any thread."""
        self._loop.call_soon_threadsafe(self._put, event)

    def _put(self, event: TaskEvent) -> None:
        if self.queue.full():
            if event.kind == "progress":
                return
            self.queue.get_nowait()  # a status change matters more than the oldest event
        self.queue.put_nowait(event)

    async def next(self, timeout_s: float) -> TaskEvent | None:
        """The next event, or None when none came within `timeout_s`."""
        try:
            return await asyncio.wait_for(self.queue.get(), timeout=max(0.0, timeout_s))
        except TimeoutError:
            return None

    def close(self) -> None:
        self._bus._unsubscribe(self)


class EventBus:
    """Task events within this process, by task id. A dispatcher observer (`TaskObserver`)."""

    def __init__(self, max_queued: int = 256):
        self.max_queued = max_queued
        self._subscribers: dict[str, set[Subscription]] = {}

    def subscribe(self, task_id: str) -> Subscription:
        """Listen to `task_id`'s events (call on the event loop that will read them); `close()` after."""
        subscription = Subscription(self, task_id, self.max_queued)
        self._subscribers.setdefault(task_id, set()).add(subscription)
        return subscription

    def _unsubscribe(self, subscription: Subscription) -> None:
        listeners = self._subscribers.get(subscription.task_id)
        if listeners is not None:
            listeners.discard(subscription)
            if not listeners:
                del self._subscribers[subscription.task_id]

    def listeners(self, task_id: str) -> int:
        return len(self._subscribers.get(task_id, ()))

    def _publish(self, task_id: str, event: TaskEvent) -> None:
        for subscription in list(self._subscribers.get(task_id, ())):
            subscription.offer(event)

    # --- TaskObserver ---
    def task_changed(self, task: Task) -> None:
        self._publish(task.id, TaskEvent("status", task=task))

    def task_progress(self, task_id: str, progress: dict[str, Any]) -> None:
        self._publish(task_id, TaskEvent("progress", progress=progress))


def sse(event: str, data: Any) -> str:
    """One server-sent event."""
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n"


def _task_json(task: Task) -> dict[str, Any]:
    return task.model_dump(mode="json")


async def task_events(
    task: Task,
    subscription: Subscription | None,
    get_task: Callable[[str], Awaitable[Task]],
    *,
    poll_s: float = 1.0,
    keepalive_s: float = 15.0,
    timeout_s: float = 3600.0,
) -> AsyncIterator[str]:
    """The SSE stream of `task` (as just read), from `subscription` (subscribed before it was read, so
    nothing is missed) and by reading the row every `poll_s`; ends at a final status or after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    try:
        yield sse("status", _task_json(task))
        status, row_message = task.status, task.progress_message
        last_sent = last_poll = time.monotonic()
        pushed_progress = False  # this process runs the task: its bus progress is finer than the row's
        while not status.is_final:
            now = time.monotonic()
            if now >= deadline:
                yield sse("timeout", {"task_id": task.id, "timeout_s": timeout_s})
                return
            wait = min(last_poll + poll_s, deadline) - now
            event = await subscription.next(wait) if subscription is not None else None
            if event is None and subscription is None:
                await asyncio.sleep(max(0.0, wait))
            out: list[str] = []
            if event is not None and event.kind == "progress":
                pushed_progress = True
                out.append(sse("progress", event.progress))
            elif event is not None and event.task is not None and event.task.status != status:
                task, status = event.task, event.task.status
                if not status.is_final:
                    out.append(sse("status", _task_json(task)))
            if not status.is_final and time.monotonic() - last_poll >= poll_s:
                last_poll = time.monotonic()
                task = await get_task(task.id)
                if task.status != status:
                    status = task.status
                    if not status.is_final:
                        out.append(sse("status", _task_json(task)))
                elif task.progress_message != row_message and task.progress_message and not pushed_progress:
                    out.append(sse("progress", {"progress": task.progress, "message": task.progress_message}))
                row_message = task.progress_message
            for block in out:
                yield block
            if out:
                last_sent = time.monotonic()
            elif time.monotonic() - last_sent >= keepalive_s:
                yield ": keepalive\n\n"
                last_sent = time.monotonic()
        yield sse(FINAL_EVENTS[status], _task_json(task))
    finally:
        if subscription is not None:
            subscription.close()
