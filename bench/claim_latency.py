"""Claim latency and claims/second in Supabase mode: edge functions vs direct SQL vs the original's way.

    python -m bench.claim_latency [--tasks 10000] [--claims 300] [--workers 4]
                                  [--pg postgresql://postgres@127.0.0.1:5432/test]

Creates a scratch database set up like a Supabase project, starts the edge functions under Deno, and
fills the table with `--tasks` queued tasks where every second task depends on the one before it (so
it is blocked until that one completes, and a claimer has to skip it). Three claimers:

* edge functions — `POST /functions/v1/claim-next-task` with the service key (HTTP → Deno → one SQL
  statement, `claim_next_task`);
* direct SQL — `SupabaseTaskStore.claim_next` (one `claim_next_task` call over a direct connection);
* original style — what the original worker did: read every queued row, check each row's dependency
  with one query at a time, then UPDATE the first claimable row (no lock between read and update).
  It runs over a direct connection here, which is kinder to it than the original's HTTP round trips.

For each: latency of `--claims` claims by one client (table refilled first), then claims/second with
`--workers` processes claiming `--claims` tasks together (table refilled again), counting tasks that
two workers both believe they claimed. Not a test: the numbers go in notes and docs.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx
import psycopg

from db.supabase_store import SupabaseTaskStore
from tests.supabase_local import make_jwt, prepare_database, start_edge_functions

# Fixed, so spawned worker processes compute the same key; the scratch database lives only for the run.
JWT_SECRET = "bench-jwt-secret-for-a-scratch-database-only"
SERVICE_KEY = make_jwt({"role": "service_role"}, JWT_SECRET)
METHODS = ("edge functions", "direct SQL", "original style")

# Every even task depends on the odd one before it; created_at strictly increasing.
FILL_SQL = """
TRUNCATE tasks;
INSERT INTO tasks (id, task_type, params, status, dependant_on, created_at)
SELECT md5('task' || g)::uuid::text, 't2v', jsonb_build_object('prompt', 'task ' || g, 'i', g), 'Queued',
       CASE WHEN g % 2 = 0 THEN md5('task' || (g - 1))::uuid::text END,
       now() + g * interval '1 millisecond'
FROM generate_series(1, %(n)s) g;
ANALYZE tasks;
"""


def fill(db_url: str, tasks: int) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(FILL_SQL.replace("%(n)s", str(int(tasks))))


class OriginalStyleClaimer:
    """The original Supabase worker's claim: N+1 queries and a race between the read and the update."""

    def __init__(self, db_url: str):
        self.conn = psycopg.connect(db_url, autocommit=True)

    def claim(self, worker_id: str) -> str | None:
        rows = self.conn.execute(
            "SELECT * FROM tasks WHERE status = 'Queued' ORDER BY created_at"
        ).fetchall()  # every queued row, every column
        for row in rows:
            task_id, dependant_on = row[0], row[4]
            if dependant_on is not None:
                dep = self.conn.execute("SELECT status FROM tasks WHERE id = %s", (dependant_on,)).fetchone()
                if dep is None or dep[0] != "Complete":
                    continue
            self.conn.execute(
                "UPDATE tasks SET status = 'In Progress', worker_id = %s, generation_started_at = now() "
                "WHERE id = %s",
                (worker_id, task_id),
            )
            return task_id
        return None

    def close(self) -> None:
        self.conn.close()


class EdgeClaimer:
    def __init__(self, functions_url: str):
        self.client = httpx.Client(
            base_url=f"{functions_url}/functions/v1",
            headers={"Authorization": f"Bearer {SERVICE_KEY}"},
            timeout=60,
        )

    def claim(self, worker_id: str) -> str | None:
        answer = self.client.post("/claim-next-task", json={"worker_id": worker_id})
        if answer.status_code == 204:
            return None
        if answer.status_code != 200:
            raise RuntimeError(f"claim-next-task: HTTP {answer.status_code}: {answer.text}")
        return answer.json()["task_id"]

    def close(self) -> None:
        self.client.close()


class DirectClaimer:
    def __init__(self, db_url: str):
        self.store = SupabaseTaskStore("supabase+" + db_url)

    def claim(self, worker_id: str) -> str | None:
        tasks = self.store.claim_next(worker_id)
        return tasks[0].id if tasks else None

    def close(self) -> None:
        self.store.close()


def _claimer(
    method: str, db_url: str, functions_url: str
) -> EdgeClaimer | DirectClaimer | OriginalStyleClaimer:
    if method == "edge functions":
        return EdgeClaimer(functions_url)
    if method == "direct SQL":
        return DirectClaimer(db_url)
    return OriginalStyleClaimer(db_url)


def _claim_n(
    method: str, db_url: str, functions_url: str, worker_id: str, n: int, start_at: float
) -> tuple[list[str], list[float], float, float]:
    """Claim `n` tasks; returns (ids, per-claim seconds, start, end)."""
    claimer = _claimer(method, db_url, functions_url)
    try:
        claimer.claim("warm-up-" + worker_id)  # connections, first query plans
        while time.time() < start_at:  # all processes start together
            time.sleep(0.001)
        ids, latencies = [], []
        started = time.time()
        for _ in range(n):
            t0 = time.perf_counter()
            task_id = claimer.claim(worker_id)
            latencies.append(time.perf_counter() - t0)
            if task_id is None:
                break
            ids.append(task_id)
        return ids, latencies, started, time.time()
    finally:
        claimer.close()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run(
    db_url: str, functions_url: str, tasks: int, claims: int, workers: int, log: Callable[[str], None]
) -> list[dict]:
    results = []
    ctx = multiprocessing.get_context("spawn")
    for method in METHODS:
        fill(db_url, tasks)
        ids, latencies, started, ended = _claim_n(method, db_url, functions_url, "solo", claims, 0)
        assert len(ids) == claims, f"{method}: claimed {len(ids)} of {claims}"
        row = {
            "method": method,
            "p50_ms": statistics.median(latencies) * 1000,
            "p95_ms": _percentile(latencies, 0.95) * 1000,
            "mean_ms": statistics.fmean(latencies) * 1000,
            "solo_per_s": claims / (ended - started),
        }
        fill(db_url, tasks)
        per_worker = claims // workers
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            start_at = time.time() + 3.0  # time to import and connect
            futures = [
                pool.submit(_claim_n, method, db_url, functions_url, f"w{i}", per_worker, start_at)
                for i in range(workers)
            ]
            outcomes = [f.result() for f in futures]
        claimed = Counter(task_id for ids, *_ in outcomes for task_id in ids)
        wall = max(end for *_, end in outcomes) - start_at
        row["workers_per_s"] = sum(claimed.values()) / wall
        row["double_claims"] = sum(1 for count in claimed.values() if count > 1)
        results.append(row)
        log(f"  {method}: done")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000, help="queued tasks in the table (default 10000)")
    parser.add_argument("--claims", type=int, default=300, help="claims measured per method (default 300)")
    parser.add_argument("--workers", type=int, default=4, help="concurrent claiming processes (default 4)")
    parser.add_argument(
        "--pg", default=os.environ.get("HWGP_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
    )
    args = parser.parse_args()

    name = f"hwgp_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(args.pg, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    db_url = args.pg.rsplit("/", 1)[0] + f"/{name}"
    functions = None
    try:
        prepare_database(db_url)
        log_path = Path(tempfile.mkdtemp(prefix="hwgp-bench-")) / "edge-functions.log"
        functions = start_edge_functions(
            db_url, service_key=SERVICE_KEY, jwt_secret=JWT_SECRET, log_path=log_path
        )
        print(
            f"# claim latency: {args.tasks} queued tasks (every second one blocked by a dependency), "
            f"{args.claims} claims per method; {args.workers} workers for claims/s; "
            f"{platform.node()}, {os.cpu_count()} cores, Postgres + Deno + clients on one machine"
        )
        rows = run(db_url, functions.url, args.tasks, args.claims, args.workers, print)
    finally:
        if functions is not None:
            functions.stop()
        with psycopg.connect(args.pg, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    print()
    print(
        f"| method | p50 ms | p95 ms | mean ms | claims/s, 1 client | claims/s, {args.workers} workers "
        "| tasks claimed twice |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['method']} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['mean_ms']:.2f} | {r['solo_per_s']:.0f} "
            f"| {r['workers_per_s']:.0f} | {r['double_claims']} |"
        )


if __name__ == "__main__":
    main()
