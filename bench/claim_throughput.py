"""Claims per second for 1, 2 and 8 concurrent claimers on each backend.

    python -m bench.claim_throughput [--tasks 2000] [--pg postgresql://postgres@127.0.0.1:5432/test]

Each claimer is a separate process with its own connection, claiming one task per transaction until
the table is empty (the worst case for contention). Not a test: numbers go in notes and docs.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor

import psycopg

from db.store import open_store


def _claim_all(url: str, worker: str, start_at: float) -> tuple[int, float]:
    with open_store(url, migrate=False) as store:
        while time.time() < start_at:  # all processes start claiming together
            time.sleep(0.001)
        claimed = 0
        while store.claim_next(worker, limit=1):
            claimed += 1
        return claimed, time.time()


def measure(url: str, tasks: int, claimers: int) -> float:
    with open_store(url) as store:
        for i in range(tasks):
            store.add("t2v", {"i": i})
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(claimers, mp_context=ctx) as pool:
        start_at = time.time() + 2.0  # leave time for the processes to import and connect
        results = list(
            pool.map(_claim_all, [url] * claimers, [f"w{i}" for i in range(claimers)], [start_at] * claimers)
        )
    total = sum(n for n, _ in results)
    assert total == tasks, f"claimed {total} of {tasks}"
    return tasks / (max(end for _, end in results) - start_at)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument(
        "--pg", default=os.environ.get("HWGP_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
    )
    args = parser.parse_args()

    print(
        f"# claim throughput: {args.tasks} tasks, one claim per transaction; {platform.node()}, {os.cpu_count()} cores"
    )
    print(f"{'backend':10} {'claimers':>8} {'claims/s':>10}")
    for claimers in (1, 2, 8):
        with tempfile.TemporaryDirectory() as tmp:
            rate = measure(f"sqlite:///{tmp}/bench.db", args.tasks, claimers)
        print(f"{'sqlite':10} {claimers:>8} {rate:>10.0f}", flush=True)
    for claimers in (1, 2, 8):
        schema = f"hwgp_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(args.pg, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        try:
            rate = measure(f"{args.pg}?options=-csearch_path%3D{schema}", args.tasks, claimers)
        finally:
            with psycopg.connect(args.pg, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA {schema} CASCADE")
        print(f"{'postgres':10} {claimers:>8} {rate:>10.0f}", flush=True)


if __name__ == "__main__":
    main()
