"""The HTTP API: FastAPI routes over the tasks table (no Ray).

`create_app` builds it from what it serves: the store, the output storage, routing (to check a task
before it is written), a read-only view of the dispatcher (health, waking it, stopping a cancelled
task) and the thread pool for blocking calls. Domain errors become responses in one place,
`_domain_error`: `TaskNotFound` -> 404, `TaskConflict` -> 409, `InvalidTask` -> 422 naming the field,
`StoreUnavailable` -> 503 with `Retry-After`.

Hooks for what comes next: `dependencies` (FastAPI dependencies run before every route: API keys,
per-project work budgets) and the body-size limit, `BodySizeLimit`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.params import Depends
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from db.errors import StoreUnavailable
from db.models import Task, TaskStatus
from db.store import TaskStore, new_task
from deployments.dispatcher import BlockingPool, DispatcherStatus
from deployments.errors import InvalidParams, InvalidTask, TaskConflict, TaskNotFound, TaskStoreError
from deployments.routing import Routing
from storage import OutputStorage

UI_PAGE = Path(__file__).with_name("ui") / "index.html"


class CreateTaskRequest(BaseModel):
    """POST /tasks body. Unknown keys inside `params` are kept; known ones are validated."""

    task_type: str = Field(examples=["t2v"])
    params: dict[str, Any] = Field(default_factory=dict, examples=[{"prompt": "a cat", "model": "tiny-t2v"}])
    dependant_on: str | None = None
    project_id: str | None = None
    priority: int = 0
    task_id: str | None = Field(default=None, description="Client-chosen id (a UUID); generated when absent.")


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
    if isinstance(error, StoreUnavailable):  # the database is away for now: ask the client to come back
        return JSONResponse(
            {"detail": f"the task database is unavailable, retry later: {error}"},
            status_code=503,
            headers={"Retry-After": str(error.retry_after_s)},
        )
    return JSONResponse({"detail": f"{type(error).__name__}: {error}"}, status_code=500)


def create_app(
    *,
    store: TaskStore,
    storage: OutputStorage,
    routing: Routing,
    dispatcher: DispatcherView,
    pool: BlockingPool,
    max_request_bytes: int,
    replica_stats: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    dependencies: Sequence[Depends] = (),
) -> FastAPI:
    app = FastAPI(
        title="Headless-Wan2GP Serve",
        description="Queue video and image generation tasks; the tasks table is the source of truth.",
        version="0.1.0",
        dependencies=list(dependencies),
    )
    app.add_middleware(BodySizeLimit, max_bytes=max_request_bytes)
    app.add_exception_handler(TaskStoreError, _domain_error)

    @app.post("/tasks", status_code=201, response_model=Task)
    async def create_task(body: CreateTaskRequest) -> Task:
        """Queue a task. 422 names the field that is wrong; nothing is written then."""
        new = new_task(
            task_type=body.task_type,
            params=body.params,
            dependant_on=body.dependant_on,
            project_id=body.project_id,
            priority=body.priority,
            id=body.task_id,
        )
        await pool.run(routing.check, new.task_type, new.params)
        task = await pool.run(store.create, new)
        dispatcher.wake()
        return task

    @app.get("/tasks/{task_id}", response_model=Task)
    async def get_task(task_id: str) -> Task:
        return await pool.run(store.get, task_id)

    @app.get("/tasks", response_model=list[Task])
    async def list_tasks(
        status: str | None = None,
        task_type: str | None = None,
        project_id: str | None = None,
        limit: int = Query(default=100, ge=1, le=1000),
        offset: int = Query(default=0, ge=0),
    ) -> list[Task]:
        try:
            parsed = TaskStatus.parse(status) if status else None
        except ValueError as error:
            raise InvalidTask("query.status", str(error)) from None
        return await pool.run(
            store.list, status=parsed, task_type=task_type, project_id=project_id, limit=limit, offset=offset
        )

    @app.post("/tasks/{task_id}/cancel", response_model=Task)
    async def cancel_task(task_id: str) -> Task:
        """Cancel a queued or running task; a running one stops at its next denoising step."""
        task = await pool.run(store.cancel, task_id)
        dispatcher.stop_task(task_id)
        return task

    @app.get("/tasks/{task_id}/output")
    async def get_output(task_id: str):
        """The stored output: the file itself when it is on this node, else a redirect to its URL."""
        task = await pool.run(store.get, task_id)
        if task.status != TaskStatus.COMPLETE or not task.output_location:
            raise TaskConflict(f"task {task_id} is {task.status.value}; it has no output")
        local = storage.resolve_local(task.output_location)
        if local is not None and local.is_file():
            return FileResponse(local, filename=local.name)
        if task.output_location.startswith(("http://", "https://")):
            return RedirectResponse(task.output_location, status_code=307)
        raise HTTPException(404, detail=f"output {task.output_location} is not stored on this node")

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        """200 while the dispatcher's loops tick and the database answers; 503 naming what is wrong
        otherwise. Also lists queued task types nothing here serves (informational)."""
        status = dispatcher.status()
        problems = list(status.problems)
        try:
            counts = await pool.run(store.count_by_status)
        except Exception as error:  # the database is what we report on, whatever broke
            counts = {}
            problems.append(f"database: {type(error).__name__}: {error}")
        body = {
            "status": "ok" if not problems else "unhealthy",
            "problems": problems,
            "worker_id": status.worker_id,
            "database": store.url.split("@")[-1],
            "in_flight": status.in_flight,
            "capacity": status.capacity,
            "tasks": {s.value: n for s, n in counts.items()},
            "loops": status.loops,
            "unserved_task_types": status.unserved,
        }
        return JSONResponse(body, status_code=200 if not problems else 503)

    @app.get("/ui", include_in_schema=False)
    async def ui() -> FileResponse:
        """The gallery page: the queue live, outputs playable, a form to submit tasks."""
        return FileResponse(UI_PAGE, media_type="text/html")

    if replica_stats is not None:

        @app.get("/replicas")
        async def replicas() -> dict[str, Any]:
            """Each family deployment's counters (loads, resident model) as one of its replicas reports them."""
            return await replica_stats()

    return app
