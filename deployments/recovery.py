"""A restarted ingress takes back at once the tasks its previous incarnation held.

A worker id is ``{stable identity}/{incarnation}``: the stable part names the ingress of one application
on one host (``ingress-{hostname}-{app}``), the incarnation is new on every start. When the service died
without handing its tasks back (SIGKILL, a power cut, plain `serve run` on SIGTERM), its rows stay
`In Progress` under the old worker id until their heartbeat is `stale_after_s` old (60 s by default).
The new incarnation does not wait: at start it releases every `In Progress` row of an earlier incarnation
of the same identity whose heartbeat has been silent for a few heartbeat intervals (an incarnation still
draining, e.g. during a rolling `serve deploy`, keeps heartbeating and is left alone). Released rows go
back to `Queued` with their attempt refunded, as a graceful stop would have left them.
"""

from __future__ import annotations

import logging
import socket
import uuid
from datetime import UTC, datetime, timedelta

from db.models import Task, TaskStatus
from db.store import TaskStore

logger = logging.getLogger("ray.serve")

INCARNATION_SEPARATOR = "/"


def stable_identity(app_name: str, host: str | None = None) -> str:
    """The part of an ingress's worker id that survives restarts: one per application per host."""
    return f"ingress-{host or socket.gethostname()}-{app_name}"


def new_worker_id(identity: str) -> str:
    """A worker id for this incarnation of ``identity``."""
    return f"{identity}{INCARNATION_SEPARATOR}{uuid.uuid4().hex[:8]}"


def identity_of(worker_id: str) -> str | None:
    """The stable identity inside a worker id, or None for ids of another form (other workers)."""
    identity, separator, incarnation = worker_id.rpartition(INCARNATION_SEPARATOR)
    return identity if separator and identity and incarnation else None


def requeue_predecessors(
    store: TaskStore, worker_id: str, silent_for_s: float, *, scan_limit: int = 1000
) -> list[Task]:
    """Release the `In Progress` rows of earlier incarnations of ``worker_id``'s identity whose heartbeat
    is older than ``silent_for_s``. Returns the rows released (now `Queued`)."""
    identity = identity_of(worker_id)
    if identity is None:
        raise ValueError(f"worker id {worker_id!r} has no stable identity (expected IDENTITY/INCARNATION)")
    cutoff = datetime.now(UTC) - timedelta(seconds=silent_for_s)
    released = []
    for task in store.list(status=TaskStatus.IN_PROGRESS, limit=scan_limit):
        previous = task.worker_id
        if previous is None or previous == worker_id or identity_of(previous) != identity:
            continue
        last_sign_of_life = task.heartbeat_at or task.updated_at
        if last_sign_of_life is not None and last_sign_of_life > cutoff:
            continue  # that incarnation is still alive (draining): its own shutdown hands the task back
        reason = f"requeued: {previous} stopped without handing it back; {worker_id} took over"
        if store.release(task.id, previous, reason):
            logger.warning("task %s: %s", task.id, reason)
            released.append(store.get(task.id))
    return released
