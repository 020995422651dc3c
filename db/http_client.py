"""The tasks table seen through the ingress's HTTP API, for `hwgp --api URL …`.

Offers the part of `TaskStore` the CLI uses (create, get, list, cancel, wait_for_work) and maps
HTTP errors back to the store's exceptions, so the CLI behaves the same over either path.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import httpx

from db.errors import TaskForbidden
from db.models import NewTask, Task, TaskStatus
from db.store import (
    InvalidTask,
    StoreUnavailable,
    TaskConflict,
    TaskNotFound,
    TaskStore,
    TaskStoreError,
    open_store,
)

API_KEY_ENV = "HWGP_API_KEY"


class HttpTasks:
    def __init__(self, base_url: str, timeout: float = 30.0, api_key: str | None = None):
        """`api_key` is sent as `Authorization: Bearer KEY` (the service's keys file names it)."""
        self.url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=self.url, timeout=timeout, headers=headers)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.TransportError as error:  # refused, timed out, dropped
            raise StoreUnavailable(f"cannot reach {self.url}: {error!r}") from None
        if response.status_code < 400:
            return response.json()
        self._raise_for(response, path)

    def _raise_for(self, response: httpx.Response, path: str) -> None:
        detail = _detail(response)
        if response.status_code == 401:
            raise TaskForbidden(f"{self.url}: {detail} (give --api-key or ${API_KEY_ENV})")
        if response.status_code == 403:
            raise TaskForbidden(f"{self.url}: {detail}")
        if response.status_code == 404:
            raise TaskNotFound(path.split("/")[2] if path.count("/") >= 2 else path)
        if response.status_code == 409:
            raise TaskConflict(detail)
        if response.status_code in (413, 422) and isinstance(response.json().get("detail"), list):
            first = response.json()["detail"][0]
            field = ".".join(str(p) for p in first.get("loc", []) if p not in ("body", "query"))
            raise InvalidTask(field or "request", first.get("msg", detail))
        if response.status_code == 503:
            raise StoreUnavailable(f"{self.url}{path}: HTTP 503: {detail}")
        raise TaskStoreError(f"{self.url}{path}: HTTP {response.status_code}: {detail}")

    def create(self, new: NewTask) -> Task:
        body = new.model_dump(exclude={"id"}) | {"task_id": new.id}
        return Task.model_validate(self._call("POST", "/tasks", json=body))

    def get(self, task_id: str) -> Task:
        return Task.model_validate(self._call("GET", f"/tasks/{task_id}"))

    def list(
        self,
        *,
        status: TaskStatus | None = None,
        task_type: str | None = None,
        project_id: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Task]:
        query = {"status": status.value if status else None, "task_type": task_type, "project_id": project_id}
        query = {k: v for k, v in query.items() if v is not None} | {"limit": limit, "offset": offset}
        return [Task.model_validate(t) for t in self._call("GET", "/tasks", params=query)]

    def cancel(self, task_id: str) -> Task:
        return Task.model_validate(self._call("POST", f"/tasks/{task_id}/cancel"))

    def wait_for_work(self, timeout_s: float) -> bool:
        time.sleep(timeout_s)  # the caller polls; `events` is the push channel
        return False

    def events(self, task_id: str, timeout_s: float | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        """The task's server-sent events (`GET /tasks/{id}/events`) as (event, data) until the stream ends:
        status, progress, then done / failed / cancelled (or timeout after `timeout_s`)."""
        params = {"timeout_s": timeout_s} if timeout_s is not None else {}
        path = f"/tasks/{task_id}/events"
        try:
            with self._client.stream("GET", path, params=params) as response:
                if response.status_code >= 400:
                    response.read()
                    self._raise_for(response, path)
                event, data = "message", ""
                for line in response.iter_lines():
                    if line.startswith("event:"):
                        event = line.removeprefix("event:").strip()
                    elif line.startswith("data:"):
                        data += line.removeprefix("data:").strip()
                    elif not line and data:
                        yield event, json.loads(data)
                        event, data = "message", ""
        except httpx.TransportError as error:
            raise StoreUnavailable(f"cannot reach {self.url}: {error!r}") from None

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> HttpTasks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        return response.text
    if isinstance(detail, list) and detail:
        return "; ".join(str(d.get("msg", d)) for d in detail)
    return str(detail)


def open_tasks(
    db_url: str | None = None, api_url: str | None = None, migrate: bool = True, api_key: str | None = None
) -> TaskStore | HttpTasks:
    """The tasks table through a running service's API when `api_url` is given (with `api_key`, else
    `$HWGP_API_KEY`), else the database."""
    if api_url:
        return HttpTasks(api_url, api_key=api_key or os.environ.get(API_KEY_ENV))
    return open_store(db_url, migrate=migrate)
