"""Chaos benchmark: tiny tasks through the running service while a driver keeps breaking things.

    python -m bench.chaos --tasks 300 --duration 600 --db sqlite --faults kill,lock,disk,ingress
    python -m bench.chaos --tasks 300 --duration 600 --db postgres --faults kill,lock,disk,ingress,pgrestart

It starts the application on a local Ray cluster of its own (`hwgp_testing.running_app`, tiny models
on CPU, storage on a small tmpfs it mounts), then submits a mix of tasks through the HTTP API — t2v and
flux generations, travel_orchestrator, extract_frame utilities that depend on a t2v (`dependant_on`) —
spread over `--duration` seconds, while a fault driver repeatedly

* `kill`: `ray.kill`s a random family replica (T2V, VACE, Flux) — Serve starts a new one;
* `ingress`: `ray.kill`s the ingress replica — Serve starts a new one (the HTTP API is down meanwhile);
* `lock`: holds the database's write lock for `--lock` seconds (SQLite: `BEGIN EXCLUSIVE`; PostgreSQL:
  `LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE`);
* `disk`: fills the storage tmpfs with a big file for `--disk-hold` seconds, then deletes it;
* `pgrestart`: what the service sees of a PostgreSQL restart, without restarting the shared server (other
  people's databases live on it): the service reaches PostgreSQL through a loopback TCP proxy
  (`hwgp_testing.TcpProxy`) that drops every connection, refuses new ones for `--pg-down` seconds, then
  accepts again (only with `--db postgres`).

It only looks at the service from outside (HTTP API, the tasks table, the storage folder), so it measures
whatever the service's code is. At the end (faults stopped, `--settle` seconds to finish) it counts, per
task type: complete; failed or cancelled with a readable reason; failed without one; **lost** (accepted
but the row is gone, or Complete without its output); **double** (seen Complete and later not, the output
location changed after completion, or more than one output file); **stuck** (still Queued / In Progress);
and re-runs (attempts > 1: work thrown away and done again). Goal: 0 lost, 0 double, 0 stuck.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import re
import sqlite3
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import numpy as np

from db.store import open_store
from hwgp_testing import FINAL, TcpProxy, running_app
from Wan2GP.video import encode_png

logger = logging.getLogger("bench.chaos")

FAULT_KINDS = ("kill", "lock", "disk", "ingress", "pgrestart")
PG_ADMIN_URL = os.environ.get("HWGP_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
SMALL = {"resolution": "64x48", "num_inference_steps": 4, "seed": 5}


# --- the service under test --------------------------------------------------------------------------------


@dataclass
class Setup:
    """Where the service keeps its state, and the app config that points there."""

    root: Path
    db_url: str  # what the service uses (through the proxy on PostgreSQL)
    direct_url: str  # what the observer and the lock fault use
    files: Path
    inputs: Path
    tmpfs: bool
    config: dict
    proxy: TcpProxy | None = None


@contextlib.contextmanager
def prepared(
    db: str, stale_after_s: float, storage_mb: int, busy_timeout_s: float | None = None
) -> Iterator[Setup]:
    """A temp folder with input images, a tmpfs storage root (when mountable) and a fresh database."""
    root = Path(tempfile.mkdtemp(prefix="hwgp-chaos-"))
    files = root / "files"
    files.mkdir()
    tmpfs = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={storage_mb}m", "tmpfs", str(files)], capture_output=True
        ).returncode
        == 0
    )
    inputs = root / "inputs"
    inputs.mkdir()
    for i, colour in enumerate([(250, 20, 20), (20, 250, 20), (20, 20, 250)]):
        image = np.zeros((48, 64, 3), dtype=np.uint8)
        image[:] = colour
        image[10:30, 10 + 8 * i : 30 + 8 * i] = 255
        (inputs / f"anchor{i}.png").write_bytes(encode_png(image))
    schema = None
    proxy = None
    if db == "sqlite":
        direct_url = f"sqlite:///{root / 'tasks.db'}"
        # A busy timeout shorter than the lock fault makes each lock an outage to every write.
        db_url = direct_url + (f"?busy_timeout_s={busy_timeout_s:g}" if busy_timeout_s else "")
    else:
        import psycopg

        schema = f"chaos_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        direct_url = f"{PG_ADMIN_URL}?options=-csearch_path%3D{schema}"
        parts = urlsplit(direct_url)
        proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 5432))
        netloc = f"{parts.username}@127.0.0.1:{proxy.port}" if parts.username else f"127.0.0.1:{proxy.port}"
        db_url = urlunsplit(parts._replace(netloc=netloc)) + "&connect_timeout_s=2"
    open_store(direct_url).close()  # create the tables
    family = {"num_gpus": 0.25, "num_cpus": 0.05}
    config = {
        "db": db_url,
        "storage": {"root": str(files)},
        "input_dirs": [str(inputs)],
        "models": "tiny",
        "deployments": {"T2V": family, "VACE": family, "Flux": family},
        "ingress": {
            "heartbeat_interval_s": 1.0,
            "poll_interval_s": 0.2,
            "progress_interval_s": 0.5,
            "stale_after_s": stale_after_s,
            "shutdown_grace_s": 2.0,
            "max_attempts": 5,
        },
    }
    try:
        yield Setup(root, db_url, direct_url, files, inputs, tmpfs, config, proxy)
    finally:
        if proxy is not None:
            proxy.stop()
        if tmpfs:
            subprocess.run(["umount", "-l", str(files)], check=False)
        if schema is not None:
            import psycopg

            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA {schema} CASCADE")


# --- the tasks ---------------------------------------------------------------------------------------------


def task_mix(count: int, inputs: Path, rng: random.Random) -> list[dict]:
    """`count` task bodies: generations, travels, and extract_frame utilities chained on a t2v."""
    bodies: list[dict] = []
    while len(bodies) < count:
        kind = rng.choices(["t2v", "flux", "travel", "chain"], weights=[4, 3, 1, 2])[0]
        if kind == "t2v":
            bodies.append({"task_type": "t2v", "params": {**SMALL, "prompt": "chaos", "video_length": 9}})
        elif kind == "flux":
            bodies.append({"task_type": "flux", "params": {**SMALL, "prompt": "a red square"}})
        elif kind == "travel":
            params = {**SMALL, "images": [str(inputs / f"anchor{i}.png") for i in range(3)],
                      "prompt": "a square travels", "frames": 13, "overlap": 4}  # fmt: skip
            bodies.append({"task_type": "travel_orchestrator", "params": params})
        else:  # a t2v and a frame of it, which waits for it
            source = str(uuid.uuid4())
            bodies.append({"task_type": "t2v", "task_id": source,
                           "params": {**SMALL, "prompt": "source", "video_length": 9}})  # fmt: skip
            bodies.append({"task_type": "extract_frame", "dependant_on": source,
                           "params": {"frame_index": 4, "input_video_task_id": source}})  # fmt: skip
    for body in bodies:
        body.setdefault("task_id", str(uuid.uuid4()))
    return bodies[:count]  # a cut chain leaves its source t2v alone, which is just a t2v


def submit(client: httpx.Client, body: dict, deadline: float) -> bool:
    """POST the task, retrying while the API is down (the ingress may be restarting). True once stored."""
    while time.monotonic() < deadline:
        try:
            response = client.post("/tasks", json=body, timeout=30)
            if response.status_code == 201:
                return True
            if response.status_code == 422 and "already exists" in response.text:
                return True  # an earlier try was stored, its answer lost
            if response.status_code < 500:
                raise RuntimeError(f"task refused: {response.status_code} {response.text}")
        except httpx.HTTPError:
            pass
        time.sleep(1)
    return False


@dataclass
class Watch:
    """What the watcher saw of one task over time (to catch a completion undone or redone)."""

    completed_at: str | None = None  # output_location when first seen Complete
    double: list[str] = field(default_factory=list)


def watch(db_url: str, ids: set[str], seen: dict[str, Watch], stop: threading.Event) -> None:
    """Poll the table directly (not through the API: that may be down) and record regressions."""
    store = None
    while not stop.is_set():
        try:
            store = store or open_store(db_url)
            for task in store.list(limit=10_000):
                if task.id not in ids:
                    continue
                entry = seen.setdefault(task.id, Watch())
                if task.status.value == "Complete":
                    if entry.completed_at is None:
                        entry.completed_at = task.output_location
                    elif task.output_location != entry.completed_at:
                        entry.double.append(f"output changed: {entry.completed_at} -> {task.output_location}")
                        entry.completed_at = task.output_location
                elif entry.completed_at is not None:
                    entry.double.append(f"was Complete, then {task.status.value}")
        except Exception as error:  # the database is one of the things being broken
            logger.info("watcher: %s", error)
            with contextlib.suppress(Exception):
                store and store.close()
            store = None
        stop.wait(0.5)
    if store is not None:
        store.close()


# --- the faults --------------------------------------------------------------------------------------------


class FaultDriver(threading.Thread):
    """Injects one fault after another at random intervals until stopped; counts them by kind."""

    def __init__(self, setup: Setup, kinds: list[str], rng: random.Random, args: argparse.Namespace):
        super().__init__(daemon=True, name="fault-driver")
        self.setup, self.kinds, self.rng, self.args = setup, kinds, rng, args
        self.injected: Counter[str] = Counter()
        self.log: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        rounds: list[str] = []
        while not self.stop.wait(self.rng.uniform(*self.args.fault_every)):
            if not rounds:  # every kind once per round, in a random order
                rounds = self.rng.sample(self.kinds, len(self.kinds))
            kind = rounds.pop()
            try:
                what = getattr(self, f"_{kind}")()
                self.injected[kind] += 1
                self.log.append(f"{time.strftime('%H:%M:%S')} {kind}: {what}")
            except Exception as error:  # report and go on: one failed injection is not a result
                self.log.append(f"{time.strftime('%H:%M:%S')} {kind} FAILED: {type(error).__name__}: {error}")

    def _replicas(self, deployments: tuple[str, ...]) -> list[str]:
        import ray

        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
        return [n for n in names if n.startswith("SERVE_REPLICA::") and n.split("#")[1] in deployments]

    def _kill_one(self, deployments: tuple[str, ...]) -> str:
        import ray
        from ray.serve._private.constants import SERVE_NAMESPACE

        candidates = self._replicas(deployments)
        if not candidates:
            return "no replica to kill"
        name = self.rng.choice(candidates)
        ray.kill(ray.get_actor(name, namespace=SERVE_NAMESPACE), no_restart=True)
        return name

    def _kill(self) -> str:
        return self._kill_one(("T2V", "VACE", "Flux"))

    def _ingress(self) -> str:
        return self._kill_one(("Ingress",))

    def _lock(self) -> str:
        hold = self.rng.uniform(*self.args.lock)
        if self.setup.direct_url.startswith("sqlite"):
            conn = sqlite3.connect(
                self.setup.direct_url.removeprefix("sqlite:///"), timeout=60, isolation_level=None
            )
            conn.execute("BEGIN EXCLUSIVE")
            self.stop.wait(hold)
            conn.execute("ROLLBACK")
            conn.close()
        else:
            import psycopg

            with psycopg.connect(self.setup.direct_url) as conn:
                conn.execute("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
                self.stop.wait(hold)
                conn.rollback()
        return f"database locked for {hold:.0f} s"

    def _disk(self) -> str:
        if not self.setup.tmpfs:
            raise RuntimeError("the storage root is not a tmpfs (mount needs root): no disk faults")
        stats = os.statvfs(self.setup.files)
        filler = self.setup.files / ".chaos-filler"
        with contextlib.suppress(OSError), filler.open("wb") as out:
            chunk = b"\0" * (1 << 20)
            for _ in range(stats.f_bavail * stats.f_frsize // len(chunk) + 1):
                out.write(chunk)
        try:
            self.stop.wait(self.args.disk_hold)
        finally:
            filler.unlink(missing_ok=True)
        return f"storage full for {self.args.disk_hold:.0f} s"

    def _pgrestart(self) -> str:
        proxy = self.setup.proxy
        if proxy is None:
            raise RuntimeError("pgrestart needs --db postgres")
        proxy.stop()  # every connection dropped, new ones refused: the server is restarting
        try:
            self.stop.wait(self.args.pg_down)
        finally:
            proxy.start()
        return f"PostgreSQL unreachable for {self.args.pg_down:.0f} s (connections dropped, then refused)"


# --- the run -----------------------------------------------------------------------------------------------


@dataclass
class Result:
    rows: dict[str, Counter]  # task type -> outcome -> count
    faults: Counter
    fault_log: list[str]
    problems: list[str]  # one line per lost / double / stuck / reasonless task
    reasons: Counter  # why the tasks that did not complete failed, ids blanked out

    def total(self, outcome: str) -> int:
        return sum(counts[outcome] for counts in self.rows.values())


OUTCOMES = ("tasks", "complete", "failed", "no_reason", "lost", "double", "stuck", "reruns")


UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def reason_kind(message: str) -> str:
    """A failure message with ids and paths blanked out, so equal causes count together."""
    message = UUID_RE.sub("ID", message)
    message = re.sub(r"/\S+", "PATH", message)
    return message[:140]


def judge(
    setup: Setup, accepted: list[dict], seen: dict[str, Watch]
) -> tuple[dict[str, Counter], list[str], Counter]:
    rows: dict[str, Counter] = {}
    problems: list[str] = []
    reasons: Counter[str] = Counter()
    with open_store(setup.direct_url) as store:
        tasks = {task.id: task for task in store.list(limit=10_000)}
    for body in accepted:
        counts = rows.setdefault(body["task_type"], Counter())
        counts["tasks"] += 1
        task = tasks.get(body["task_id"])
        if task is None:
            counts["lost"] += 1
            problems.append(f"lost {body['task_id']} ({body['task_type']}): accepted, no row")
            continue
        status = task.status.value
        counts["reruns"] += task.attempts > 1
        outputs = (
            [p.name for p in (setup.files / task.id).glob("*")] if (setup.files / task.id).is_dir() else []
        )
        # Beside the output: debug guides/masks and the output's thumbnail (thumb_{id8}.jpg, issue 20).
        primary = [
            name for name in outputs
            if not name.endswith(("_guide.mp4", "_mask.mp4")) and not name.startswith("thumb_")
        ]  # fmt: skip
        doubles = seen.get(task.id, Watch()).double + (
            [f"output files {primary}"] if len(primary) > 1 else []
        )
        if doubles:
            counts["double"] += 1
            problems.append(f"double {task.id} ({task.task_type}): {'; '.join(doubles)}")
        if status == "Complete":
            local = setup.files / task.id / Path(task.output_location or "").name
            if not local.is_file():
                counts["lost"] += 1
                problems.append(
                    f"lost {task.id} ({task.task_type}): Complete, output {task.output_location} missing"
                )
            else:
                counts["complete"] += 1
        elif status in FINAL:
            counts["failed"] += 1
            reasons[reason_kind(task.error_message or "")] += 1
            if not (task.error_message or "").strip():
                counts["no_reason"] += 1
                problems.append(f"no reason {task.id} ({task.task_type}): {status} without an error_message")
        else:
            counts["stuck"] += 1
            problems.append(f"stuck {task.id} ({task.task_type}): {status}, attempts {task.attempts}, "
                            f"{task.worker_id}, {task.progress_message}")  # fmt: skip
    return rows, problems, reasons


def run_chaos(
    *,
    tasks: int,
    duration: float,
    db: str = "sqlite",
    faults: list[str],
    settle: float = 240,
    stale_after_s: float = 15,
    lock: tuple[float, float] = (20, 60),
    disk_hold: float = 20,
    pg_down: float = 10,
    fault_every: tuple[float, float] = (5, 15),
    seed: int = 0,
    storage_mb: int = 64,
    busy_timeout_s: float | None = None,
) -> Result:
    unknown = set(faults) - set(FAULT_KINDS)
    if unknown:
        raise ValueError(f"faults: unknown {sorted(unknown)}; known: {', '.join(FAULT_KINDS)}")
    if "pgrestart" in faults and db != "postgres":
        raise ValueError("faults: pgrestart needs --db postgres")
    os.environ.setdefault("RAY_ADDRESS", "local")  # a cluster of our own, never one `ray start` left running
    rng = random.Random(seed)
    args = argparse.Namespace(lock=lock, disk_hold=disk_hold, pg_down=pg_down, fault_every=fault_every)
    with (
        prepared(db, stale_after_s, storage_mb, busy_timeout_s) as setup,
        running_app(setup.config, num_gpus=1) as client,
    ):
        bodies = task_mix(tasks, setup.inputs, rng)
        ids = {body["task_id"] for body in bodies}
        seen: dict[str, Watch] = {}
        stop_watch = threading.Event()
        watcher = threading.Thread(target=watch, args=(setup.direct_url, ids, seen, stop_watch), daemon=True)
        watcher.start()
        driver = FaultDriver(setup, faults, rng, args)
        started = time.monotonic()
        if faults:
            driver.start()
        accepted = []
        for i, body in enumerate(bodies):  # spread over the first 60% of the run
            time.sleep(max(0.0, started + duration * 0.6 * i / len(bodies) - time.monotonic()))
            if submit(client, body, deadline=started + duration + settle):
                accepted.append(body)
        time.sleep(max(0.0, started + duration - time.monotonic()))
        driver.stop.set()
        if faults:
            driver.join()
        settle_deadline = time.monotonic() + settle
        while time.monotonic() < settle_deadline:
            with contextlib.suppress(Exception), open_store(setup.direct_url) as store:
                if all(store.get(body["task_id"]).status.value in FINAL for body in accepted):
                    break
            time.sleep(1)
        stop_watch.set()
        watcher.join()
        rows, problems, reasons = judge(setup, accepted, seen)
        not_accepted = len(bodies) - len(accepted)
        if not_accepted:
            problems.append(f"{not_accepted} task(s) never accepted by the API")
        return Result(rows, driver.injected, driver.log, problems, reasons)


def table(result: Result) -> str:
    lines = [" | ".join(["task type", *OUTCOMES]), " | ".join(["---"] * (len(OUTCOMES) + 1))]
    for task_type, counts in sorted(result.rows.items()):
        lines.append(" | ".join([task_type, *(str(counts[o]) for o in OUTCOMES)]))
    lines.append(" | ".join(["**all**", *(str(result.total(o)) for o in OUTCOMES)]))
    faults = ", ".join(f"{kind} {n}" for kind, n in sorted(result.faults.items())) or "none"
    why = [f"  {n} x {reason}" for reason, n in result.reasons.most_common()]
    return "\n".join([*lines, "", f"faults injected: {faults}", *(["failed because:", *why] if why else [])])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--duration", type=float, default=600, help="seconds of submissions and faults")
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument(
        "--faults", default="kill,lock,disk,ingress", help=f"comma list of {','.join(FAULT_KINDS)}"
    )
    parser.add_argument(
        "--settle", type=float, default=300, help="seconds allowed to finish after the faults"
    )
    parser.add_argument("--lock", type=float, nargs=2, default=(20, 60), metavar=("MIN", "MAX"))
    parser.add_argument("--disk-hold", type=float, default=20)
    parser.add_argument(
        "--pg-down", type=float, default=10, help="seconds PostgreSQL is unreachable per pgrestart"
    )
    parser.add_argument("--fault-every", type=float, nargs=2, default=(5, 15), metavar=("MIN", "MAX"))
    parser.add_argument("--stale-after", type=float, default=15, help="the ingress's stale_after_s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--busy-timeout", type=float, help="the service's SQLite busy_timeout_s (default the store's, 30 s)"
    )
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    if args.tasks < 2:
        parser.error("--tasks: at least 2")
    faults = [f for f in args.faults.split(",") if f]
    logging.basicConfig(level=logging.WARNING)
    result = run_chaos(
        tasks=args.tasks,
        duration=args.duration,
        db=args.db,
        faults=faults,
        settle=args.settle,
        stale_after_s=args.stale_after,
        lock=tuple(args.lock),
        disk_hold=args.disk_hold,
        pg_down=args.pg_down,
        fault_every=tuple(args.fault_every),
        seed=args.seed,
        busy_timeout_s=args.busy_timeout,
    )
    print(table(result))
    for line in result.fault_log:
        print("  ", line)
    for line in result.problems:
        print("!", line)
    if args.json:
        args.json.write_text(json.dumps({"rows": result.rows, "faults": result.faults, "reasons": result.reasons,
                                         "problems": result.problems, "fault_log": result.fault_log}, indent=1))  # fmt: skip
    bad = result.total("lost") + result.total("double") + result.total("stuck") + result.total("no_reason")
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
