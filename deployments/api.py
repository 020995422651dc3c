"""The HTTP API: FastAPI routes over the tasks table (no Ray).

`create_app` builds it from what it serves: the store, the output storage, routing (to check a task
before it is written), a read-only view of the dispatcher (health, waking it, stopping a cancelled
task), the thread pool for blocking calls and the API keys (`deployments.auth`; None: auth is off).
Domain errors become responses in one place, `_domain_error`: `TaskNotFound` -> 404, `TaskConflict`
-> 409, `InvalidTask` -> 422 naming the field, `StoreUnavailable` -> 503 with Retry-After.

With keys, every route but `/healthz` (a bare liveness answer unless the caller holds a "*" key) and
the static `/ui` page needs `Authorization: Bearer KEY`: 401 without a known key, 403 creating a task
in a project the key lacks, 404 for another project's task, and lists show only the key's projects.
`BodySizeLimit` counts the bytes of a request body actually received (413 past the limit).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Protocol

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi import params as fastapi_params
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from db.errors import StoreUnavailable, TaskForbidden
from db.models import Task, TaskStatus
from db.store import TaskStore, new_task
from deployments.auth import EVERYONE, ApiKeys, Principal
from deployments.dispatcher import BlockingPool, DispatcherStatus
from deployments.errors import InvalidParams, InvalidTask, TaskConflict, TaskNotFound, TaskStoreError
from deployments.events import EventBus, task_events
from deployments.routing import Routing
from deployments.webhooks import WebhookSender
from storage import OutputStorage

UI_PAGE = Path(__file__).with_name("ui") / "index.html"
# Offsets past this are refused (422) before they reach a database that would overflow on them.
MAX_OFFSET = 2**31 - 1

logger = logging.getLogger("ray.serve")


class CreateTaskRequest(BaseModel):
    """POST /tasks body. Unknown keys inside `params` are kept; known ones are validated."""

    task_type: str = Field(examples=["t2v"])
    params: dict[str, Any] = Field(default_factory=dict, examples=[{"prompt": "a cat", "model": "tiny-t2v"}])
    dependant_on: str | None = None
    project_id: str | None = None
    priority: int = Field(default=0, ge=-1_000_000, le=1_000_000)
    task_id: str | None = Field(default=None, description="Client-chosen id (a UUID); generated when absent.")
    webhook_url: str | None = Field(
        default=None,
        description="POSTed (signed) when the task completes or fails; stored as params.webhook_url.",
    )


class DispatcherView(Protocol):
    """What the api may see and do of the dispatcher."""

    def status(self) -> DispatcherStatus: ...
    def wake(self) -> None: ...
    def stop_task(self, task_id: str) -> bool: ...


class BodySizeLimit:
    """Refuse a request body over `max_bytes` (413) before anything parses it.

    Counts the bytes actually received, so a chunked body (no Content-Length) or one that lies about
    its length is caught too; the body read is replayed to the app.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(scope, int(length), send)
            return
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(scope, size, send, at_least=True)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, size: int, send: Send, at_least: bool = False) -> None:
        amount = f"over {self.max_bytes}" if at_least else str(size)
        response = JSONResponse(
            {
                "detail": [
                    {"loc": ["body"], "msg": f"request body is {amount} bytes; the limit is {self.max_bytes}"}
                ]
            },
            status_code=413,
        )
        await response(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def _domain_error(_: Request, error: Exception) -> JSONResponse:
    """The one place domain errors become HTTP responses."""
    if isinstance(error, TaskNotFound):
        return JSONResponse({"detail": str(error)}, status_code=404)
    if isinstance(error, InvalidParams):
        detail = [{"loc": ["body", "params", *loc], "msg": msg} for loc, msg in error.errors]
        return JSONResponse({"detail": detail}, status_code=422)
    if isinstance(error, InvalidTask):
        loc = error.field.split(".")
        if loc[0] not in ("query", "path"):  # fields are named within the body unless they say otherwise
            loc = ["body", *loc]
        return JSONResponse({"detail": [{"loc": loc, "msg": error.problem}]}, status_code=422)
    if isinstance(error, TaskConflict):
        return JSONResponse({"detail": str(error)}, status_code=409)
    if isinstance(error, TaskForbidden):
        return JSONResponse({"detail": str(error)}, status_code=403)
    if isinstance(error, StoreUnavailable):
        logger.warning("database unavailable: %s", error)
        return JSONResponse(
            {"detail": "the task database is unavailable (it did not answer in time); retry later"},
            status_code=503,
            headers={"Retry-After": str(error.retry_after_s)},
        )
    logger.error("unexpected store error: %s: %s", type(error).__name__, error)
    return JSONResponse({"detail": "internal error (the service log has the details)"}, status_code=500)


def _request_error(_: Request, error: Exception) -> JSONResponse:
    """FastAPI's 422 without echoing the input back: the input may not be JSON-encodable (NaN,
    Infinity: a 500), may be megabytes long, and the client has it anyway."""
    assert isinstance(error, RequestValidationError)
    detail = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type")}
              for e in error.errors()]  # fmt: skip
    return JSONResponse({"detail": detail}, status_code=422)


def _check_text(value: Any, field: str) -> None:
    """Refuse strings JSON can carry but the store cannot (unpaired surrogates such as "\\ud800", NUL):
    stored, they would fail every later answer that includes the row."""
    if isinstance(value, str):
        if "\x00" in value:  # PostgreSQL text and jsonb cannot hold it
            raise InvalidTask(field, "contains a NUL character (\\u0000)")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidTask(
                field, "contains an unpaired surrogate (\\ud800-\\udfff): not valid Unicode text"
            ) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, field)
            _check_text(item, f"{field}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_text(item, f"{field}[{i}]")


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, detail=message, headers={"WWW-Authenticate": "Bearer"})


async def caller(request: Request) -> Principal:
    """Who is calling (401 without a known key); everyone when auth is off (`app.state.keys` is None)."""
    keys: ApiKeys | None = request.app.state.keys
    if keys is None:
        return EVERYONE
    token = _bearer(request)
    if token is None:
        raise _unauthorized("an API key is needed: send Authorization: Bearer KEY")
    principal = keys.authenticate(token)
    if principal is None:
        raise _unauthorized("unknown API key")
    return principal


Caller = Annotated[Principal, Depends(caller)]


def create_app(
    *,
    store: TaskStore,
    storage: OutputStorage,
    routing: Routing,
    dispatcher: DispatcherView,
    pool: BlockingPool,
    max_request_bytes: int,
    replica_stats: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    keys: ApiKeys | None = None,
    dependencies: Sequence[fastapi_params.Depends] = (),
    events: EventBus | None = None,
    webhooks: WebhookSender | None = None,
    events_poll_s: float = 1.0,
    events_keepalive_s: float = 15.0,
) -> FastAPI:
    """`events`: the dispatcher's event bus, for live `/tasks/{id}/events` (without it they poll the row);
    `webhooks`: checks a task's `webhook_url` at POST (without it a `webhook_url` is refused)."""
    app = FastAPI(
        title="Headless-Wan2GP Serve",
        description="Queue video and image generation tasks; the tasks table is the source of truth.",
        version="0.1.0",
        dependencies=list(dependencies),
    )
    app.state.keys = keys
    app.add_middleware(BodySizeLimit, max_bytes=max_request_bytes)
    app.add_exception_handler(TaskStoreError, _domain_error)
    app.add_exception_handler(RequestValidationError, _request_error)

    async def visible_task(task_id: str, principal: Principal) -> Task:
        """The task when the caller may see it; another project's task is as unknown as a missing one."""
        task = await pool.run(store.get, task_id)
        if not principal.may_see(task.project_id):
            raise TaskNotFound(task_id)
        return task

    async def check_task_reference(field: str, task_id: Any, principal: Principal) -> None:
        """A task named in a new task (`dependant_on`, `input_video_task_id`) must be one the caller sees."""
        if principal.sees_everything or not isinstance(task_id, str):
            return
        try:
            await visible_task(task_id, principal)
        except TaskNotFound:
            raise InvalidTask(field, f"no task with id {task_id!r}") from None

    async def checked_webhook(body: CreateTaskRequest) -> dict[str, Any]:
        """The params to store: `webhook_url` (top-level or in params) checked and moved into them."""
        in_params = body.params.get("webhook_url")
        field = "webhook_url" if body.webhook_url is not None else "params.webhook_url"
        url = body.webhook_url if body.webhook_url is not None else in_params
        if url is None:
            return body.params
        if body.webhook_url is not None and in_params is not None and in_params != body.webhook_url:
            raise InvalidTask("webhook_url", "given twice (top level and in params) with different values")
        if not isinstance(url, str) or not url:
            raise InvalidTask(field, "must be an http(s) URL")
        if webhooks is None:
            raise InvalidTask(field, "this service does not send webhooks")
        try:
            await pool.run(webhooks.check_url, url)
        except ValueError as error:
            raise InvalidTask(field, str(error).removeprefix("webhook_url: ")) from None
        return {**body.params, "webhook_url": url}

    @app.post("/tasks", status_code=201, response_model=Task)
    async def create_task(body: CreateTaskRequest, principal: Caller) -> Task:
        """Queue a task. 422 names the field that is wrong; nothing is written then."""
        for name, value in body:
            _check_text(value, name)
        project_id = body.project_id or principal.only_project
        if not principal.sees_everything:
            if project_id is None:
                raise InvalidTask(
                    "project_id", f"required: this key may use {', '.join(sorted(principal.projects or ()))}"
                )
            if not principal.may_see(project_id):
                raise HTTPException(
                    403, detail=f"this API key may not create tasks in project {project_id!r}"
                )
        params = await checked_webhook(body)
        new = new_task(
            task_type=body.task_type,
            params=params,
            dependant_on=body.dependant_on,
            project_id=project_id,
            priority=body.priority,
            id=body.task_id,
        )
        engine_params = {k: v for k, v in new.params.items() if k != "webhook_url"}  # not the engine's
        route = await pool.run(routing.route, new.task_type, engine_params)
        await routing.check(route, engine_params)
        await check_task_reference("dependant_on", new.dependant_on, principal)
        await check_task_reference(
            "params.input_video_task_id", new.params.get("input_video_task_id"), principal
        )
        task = await pool.run(store.create, new)
        dispatcher.wake()
        return task

    @app.get("/tasks/{task_id}", response_model=Task)
    async def get_task(task_id: str, principal: Caller) -> Task:
        return await visible_task(task_id, principal)

    @app.get("/tasks", response_model=list[Task])
    async def list_tasks(
        principal: Caller,
        status: str | None = None,
        task_type: str | None = None,
        project_id: str | None = None,
        limit: int = Query(default=100, ge=1, le=1000),
        offset: int = Query(default=0, ge=0, le=MAX_OFFSET),
    ) -> list[Task]:
        """Newest first; only the caller's projects (a project it lacks lists nothing)."""
        try:
            parsed = TaskStatus.parse(status) if status else None
        except ValueError as error:
            raise InvalidTask("query.status", str(error)) from None
        query = {"status": parsed, "task_type": task_type, "limit": limit}
        if principal.projects is None or project_id is not None:
            if not principal.may_see(project_id) and project_id is not None:
                return []
            return await pool.run(store.list, project_id=project_id, offset=offset, **query)
        # Several projects: the newest `offset + limit` of each, merged.
        merged: list[Task] = []
        for project in sorted(principal.projects):
            merged += await pool.run(
                store.list, project_id=project, offset=0, **{**query, "limit": offset + limit}
            )
        merged.sort(key=lambda t: t.created_at, reverse=True)
        return merged[offset : offset + limit]

    @app.post("/tasks/{task_id}/cancel", response_model=Task)
    async def cancel_task(task_id: str, principal: Caller) -> Task:
        """Cancel a queued or running task; a running one stops at its next denoising step."""
        await visible_task(task_id, principal)
        task = await pool.run(store.cancel, task_id)
        dispatcher.stop_task(task_id)
        if events is not None:
            events.task_changed(task)
        return task

    @app.get("/tasks/{task_id}/events")
    async def task_event_stream(
        task_id: str, principal: Caller, timeout_s: float = Query(default=3600.0, gt=0, le=86_400)
    ) -> StreamingResponse:
        """Server-sent events: status changes, step progress with ETA, then done / failed / cancelled with
        the task (and its result); the stream ends there, or with `timeout` after `timeout_s`."""
        subscription = events.subscribe(task_id) if events is not None else None
        try:
            task = await visible_task(task_id, principal)  # 404 (also another project's) before streaming
        except BaseException:
            if subscription is not None:
                subscription.close()
            raise

        async def get(wanted: str) -> Task:
            return await pool.run(store.get, wanted)

        stream = task_events(
            task,
            subscription,
            get,
            poll_s=events_poll_s,
            keepalive_s=events_keepalive_s,
            timeout_s=timeout_s,
        )
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)

    @app.get("/tasks/{task_id}/output")
    async def get_output(task_id: str, principal: Caller):
        """The stored output: the file itself when it is on this node, else a redirect to its URL."""
        task = await visible_task(task_id, principal)
        if task.status != TaskStatus.COMPLETE or not task.output_location:
            raise TaskConflict(f"task {task_id} is {task.status.value}; it has no output")
        local = storage.resolve_local(task.output_location)
        if local is not None and local.is_file():
            return FileResponse(local, filename=local.name)
        if task.output_location.startswith(("http://", "https://")):
            return RedirectResponse(task.output_location, status_code=307)
        raise HTTPException(404, detail=f"the output of task {task_id} is not stored on this node")

    @app.get("/healthz")
    async def healthz(request: Request) -> JSONResponse:
        """200 while the dispatcher's loops tick and the database answers; 503 naming what is wrong
        otherwise. The details (worker, database, queue, loops, unserved task types) only for a "*"
        key, or anyone when auth is off."""
        status = dispatcher.status()
        problems = list(status.problems)
        try:
            counts = await pool.run(store.count_by_status)
        except Exception as error:  # the database is what we report on, whatever broke
            counts = {}
            problems.append(f"database: {type(error).__name__}: {error}")
        code = 200 if not problems else 503
        verdict = "ok" if not problems else "unhealthy"
        token = _bearer(request)
        principal = EVERYONE if keys is None else (keys.authenticate(token) if token else None)
        if principal is None or not principal.sees_everything:
            return JSONResponse({"status": verdict}, status_code=code)
        body = {
            "status": verdict,
            "problems": problems,
            "worker_id": status.worker_id,
            "database": store.url.split("@")[-1],
            "in_flight": status.in_flight,
            "capacity": status.capacity,
            "tasks": {s.value: n for s, n in counts.items()},
            "loops": status.loops,
            "unserved_task_types": status.unserved,
        }
        return JSONResponse(body, status_code=code)

    @app.get("/ui", include_in_schema=False)
    async def ui() -> FileResponse:
        """The gallery page: the queue live, outputs playable, a form to submit tasks."""
        return FileResponse(UI_PAGE, media_type="text/html")

    if replica_stats is not None:

        @app.get("/replicas")
        async def replicas(principal: Caller) -> dict[str, Any]:
            """Each family deployment's counters (loads, resident model) as one of its replicas reports
            them, every replica's under `replicas`, and under `scheduling` each family with a split pool:
            its pools, their busy/idle slots, its queue and the policy's last decision with its reason.
            For "*" keys only (they name hosts and processes)."""
            if not principal.sees_everything:
                raise HTTPException(403, detail='/replicas needs a key with projects "*"')
            return await replica_stats()

    return app
