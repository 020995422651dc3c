"""Fuzzing the api (issue 16 item 10): hypothesis throws malformed, oversized and hostile requests at
`POST /tasks` and the list query of the real api over a real dispatcher (SQLite, routing, limits, the
guarded fetcher; a stand-in runner for the GPUs). No answer may be a 5xx, the dispatcher's loops must
stay up, /healthz must answer within a second, and a normal task must complete afterwards.

One more test runs a sample against the real Ray Serve application listening on all interfaces with
API keys, after checking that the same application refuses to start there without keys.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_fixtures import api
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from db.models import TaskStatus
from deployments.task_types import TASK_TYPES

# Keys the params models, travel, perspective and the utilities read, plus the original's names.
PARAM_KEYS = [
    "prompt", "negative_prompt", "model", "model_name", "resolution", "video_length", "num_inference_steps",
    "seed", "guidance_scale", "flow_shift", "fps", "sample_solver", "activated_loras", "lora_names",
    "loras_multipliers", "lora_multipliers", "additional_loras", "image_start", "image_end", "video_guide",
    "video_mask", "image_refs", "image_url", "images", "frames", "overlap", "prompts", "upscale_factor",
    "chain_segments", "orchestrator_details", "input_image_paths_resolved", "segment_frames_expanded",
    "frame_overlap_expanded", "input_image_path", "target_pose", "target_image_path", "clips",
    "frame_index", "input_video_task_id", "input_video_path", "input_image_path1", "input_image_path2",
    "continue_from_video", "run_id", "control_net_weight", "video_prompt_type", "debug_mode_enabled",
]  # fmt: skip
# Input references that need no DNS (tests send traffic only to loopback): refused addresses,
# numeric spellings, other schemes, paths outside the input folder, files that are there.
REFS = [
    "a.png", "b.png", "clip.mp4", "missing.png", "../../etc/passwd", "/etc/passwd", "~/.ssh/id_rsa",
    "http://127.0.0.1:1/a.png", "http://2130706433/", "http://0x7f.1/x.png", "http://[::1]/a.png",
    "http://169.254.169.254/latest/meta-data/", "http://10.0.0.5:9000/x.mp4", "http://0.0.0.0/",
    "https://[::ffff:127.0.0.1]/a.png", "file:///etc/passwd", "ftp://1.2.3.4/a.png", "data:,x", "gopher://1.2.3.4/",
    "files/00000000-0000-0000-0000-000000000000/x.mp4", "s3://bucket/key", "http://1.2.3.4.5/", "http://a@1.2.3.4/",
    "style.safetensors", "C:\\loras\\x.ckpt", "\x00", "", "\ud800", "a\udfffb", "nul\x00inside",
]  # fmt: skip
BIG_INTS = st.one_of(
    st.integers(-(10**30), 10**30), st.sampled_from([2**31, 2**63, -(2**63) - 1, 10**20, 0, -1, 1025, 4096])
)
FLOATS = st.floats(allow_nan=True, allow_infinity=True)
SCALARS = st.one_of(
    st.none(), st.booleans(), BIG_INTS, FLOATS, st.text(max_size=30), st.sampled_from(REFS),
    st.sampled_from(["64x48", "4096x4096", "1x1", "abc", "832x480", "-5x3", "9" * 30 + "x1"]),
)  # fmt: skip
JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6),
        st.dictionaries(st.sampled_from([*PARAM_KEYS, "\ud800"]) | st.text(max_size=8), inner, max_size=6),
    ),
    max_leaves=25,
)
LONG_LISTS = st.builds(lambda n, ref: [ref] * n, st.sampled_from([65, 500, 5000]), st.sampled_from(REFS))
PARAMS = st.dictionaries(st.sampled_from(PARAM_KEYS), st.one_of(JSON, LONG_LISTS), max_size=8)
TASK_TYPE = st.one_of(st.sampled_from(sorted(TASK_TYPES)), st.text(max_size=20), BIG_INTS, st.none())
# Bodies close to valid ones, so that the fuzz also passes the checks and tasks get queued and run.
NEAR_VALID = st.fixed_dictionaries(
    {
        "task_type": st.sampled_from(["t2v", "flux", "vace", "i2v", "single_image", "travel_orchestrator"]),
        "params": st.fixed_dictionaries(
            {"prompt": st.text(max_size=20), "resolution": st.sampled_from(["64x48", "32x32", "4096x4096"])},
            optional={
                "video_length": st.integers(-2, 2000),
                "num_inference_steps": st.integers(-1, 300),
                "seed": BIG_INTS,
                "image_start": st.sampled_from(REFS),
                "video_guide": st.sampled_from(REFS),
                "image_refs": st.lists(st.sampled_from(REFS), max_size=3),
                "images": st.lists(st.sampled_from(REFS), max_size=4),
                "activated_loras": st.one_of(
                    st.lists(st.sampled_from(REFS), max_size=3), st.text(max_size=20)
                ),
                "loras_multipliers": st.one_of(FLOATS, st.lists(FLOATS, max_size=3), st.text(max_size=10)),
                "upscale_factor": FLOATS,
                "frames": st.integers(-5, 2000),
            },
        ),
    },
    optional={"priority": BIG_INTS},
)
BODIES = st.one_of(
    NEAR_VALID,
    st.fixed_dictionaries(
        {"task_type": TASK_TYPE, "params": st.one_of(PARAMS, JSON)},
        optional={
            "priority": st.one_of(BIG_INTS, FLOATS, st.text(max_size=5)),
            "project_id": st.one_of(
                st.text(max_size=10), BIG_INTS, st.none(), st.sampled_from(["\udc00", "p\x00"])
            ),
            "task_id": st.one_of(st.uuids().map(str), st.text(max_size=40), BIG_INTS),
            "dependant_on": st.one_of(st.uuids().map(str), st.text(max_size=40), BIG_INTS),
        },
    ),
    JSON,
)
QUERIES = st.dictionaries(
    st.sampled_from(["status", "task_type", "project_id", "limit", "offset"]),
    st.one_of(
        st.text(max_size=25),
        BIG_INTS.map(str),
        st.sampled_from(
            ["99999999999999999999", "-1", "1e9", "NaN", "Queued", "In Progress", "0x10", "1000", "1001"]
        ),
    ),
    max_size=5,
)


def _encode(body: Any) -> bytes:
    return json.dumps(body, allow_nan=True).encode()


def _expect_no_5xx(response: httpx.Response, request: str, figures: Counter) -> None:
    figures[f"{response.status_code // 100}xx"] += 1
    figures[response.status_code] += 1
    assert response.status_code < 500, f"{request} -> {response.status_code}: {response.text[:500]}"


def _assert_healthy_then_complete(client, store, dispatcher=None) -> float:
    started = time.monotonic()
    health = client.get("/healthz")
    took = time.monotonic() - started
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text
    assert took < 1.0, f"/healthz took {took:.2f} s"
    if dispatcher is not None:
        assert dispatcher.status().running and not dispatcher.status().problems
    created = client.post("/tasks", json={"task_type": "t2v", "params": {"prompt": "after the fuzz", "model": "tiny-t2v",
                                                                          "resolution": "64x48", "video_length": 5,
                                                                          "num_inference_steps": 2}})  # fmt: skip
    assert created.status_code == 201, created.text
    deadline = time.monotonic() + 120
    while (task := client.get(f"/tasks/{created.json()['id']}").json())["status"] not in (
        "Complete",
        "Failed",
    ):
        assert time.monotonic() < deadline, task
        time.sleep(0.05)
    assert task["status"] == "Complete", task
    return took


def test_fuzz_post_tasks_and_the_list_query(tmp_path: Path):
    (tmp_path / "inputs").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "inputs" / name).write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "inputs" / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    figures: Counter = Counter()
    with api(tmp_path) as (client, store, dispatcher):

        @settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(body=BODIES)
        def post(body: Any) -> None:
            response = client.post(
                "/tasks", content=_encode(body), headers={"content-type": "application/json"}
            )
            _expect_no_5xx(response, f"POST /tasks {_encode(body)[:300]!r}", figures)
            figures["posted"] += 1
            figures["posted 201"] += response.status_code == 201

        @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(query=QUERIES)
        def listing(query: dict[str, str]) -> None:
            response = client.get("/tasks", params=query)
            _expect_no_5xx(response, f"GET /tasks {query!r}", figures)
            figures["listed"] += 1

        started = time.monotonic()
        post()
        listing()
        for raw in [
            b"",
            b"{",
            b"[]",
            b"null",
            b'{"task_type": "t2v", "params": NaN}',
            b"\xff\xfe",
            b"1" * 5000,
            b"[" * 100_000 + b"]" * 100_000,
            b'{"task_type": "t2v", "params": {"prompt": "x", "a": ' + b"[" * 900 + b"]" * 900 + b"}}",
        ]:
            _expect_no_5xx(client.post("/tasks", content=raw, headers={"content-type": "application/json"}),
                           f"POST /tasks {raw[:40]!r}", figures)  # fmt: skip
        figures["seconds"] = math.ceil(time.monotonic() - started)
        healthz_s = _assert_healthy_then_complete(client, store, dispatcher)
        rows = store.count_by_status()
    print(f"\nfuzz figures: {dict(figures)}; rows {({s.value: n for s, n in rows.items() if n})}; "
          f"/healthz after: {healthz_s * 1000:.0f} ms")  # fmt: skip
    assert figures["5xx"] == 0
    assert figures["4xx"] > 1000 and figures["posted 201"] > 30  # the fuzz reached both sides of the checks
    assert rows[TaskStatus.COMPLETE] >= 1


def test_fuzz_with_project_keys(tmp_path: Path):
    """The same fuzz through a key with two projects: the project checks and the merged lists."""
    keys = [
        {"name": "two", "key": "two-projects-0123456789", "projects": ["p1", "p2"]},
        {"name": "ops", "key": "ops-key-0123456789abcdef", "projects": "*"},
    ]
    figures: Counter = Counter()
    with api(tmp_path, keys=keys) as (client, store, dispatcher):
        client.headers["Authorization"] = "Bearer two-projects-0123456789"

        @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(body=BODIES, project=st.sampled_from(["p1", "p2", "p3", ""]), query=QUERIES)
        def sample(body: Any, project: str, query: dict[str, str]) -> None:
            if isinstance(body, dict) and project:
                body = {**body, "project_id": project}
            response = client.post(
                "/tasks", content=_encode(body), headers={"content-type": "application/json"}
            )
            _expect_no_5xx(response, f"POST /tasks {_encode(body)[:300]!r}", figures)
            if response.status_code == 201:
                assert response.json()["project_id"] in ("p1", "p2")
            listed = client.get("/tasks", params=query)
            _expect_no_5xx(listed, f"GET /tasks {query!r}", figures)
            if listed.status_code == 200:
                assert {t["project_id"] for t in listed.json()} <= {"p1", "p2"}

        sample()
        client.headers["Authorization"] = "Bearer ops-key-0123456789abcdef"
        _assert_healthy_then_complete(client, store, dispatcher)
    print(f"\nkeyed fuzz figures: {dict(figures)}")
    assert figures["5xx"] == 0 and figures[403] > 0 and figures[201] > 0


@pytest.mark.slow
def test_the_real_service_refuses_all_interfaces_without_keys_and_survives_fuzz_with_them(tmp_path: Path):
    import ray
    from ray import serve

    from deployments.app import build_app
    from hwgp_testing import free_port, start_local_ray

    keys = tmp_path / "keys.yaml"
    keys.write_text('- {name: ops, key: "ops-key-0123456789abcdef", projects: "*"}\n')
    config = {
        "db": f"sqlite:///{tmp_path / 'tasks.db'}",
        "storage": {"root": str(tmp_path / "files")},
        "models": "tiny",
        "deployments": {"T2V": {"num_cpus": 0.25}},
        "ingress": {"num_cpus": 0.1, "poll_interval_s": 0.1},
    }
    port = free_port()
    start_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "0.0.0.0", "port": port})
        with pytest.raises(ValueError, match="refusing to start: the HTTP proxy listens on '0.0.0.0'"):
            build_app(config)
        serve.run(build_app({**config, "auth": {"api_keys_file": str(keys)}}), name="hwgp", route_prefix="/")
        figures: Counter = Counter()
        headers = {"Authorization": "Bearer ops-key-0123456789abcdef"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, headers=headers) as client:
            assert httpx.get(f"http://127.0.0.1:{port}/tasks").status_code == 401
            assert httpx.get(f"http://127.0.0.1:{port}/healthz").json() == {"status": "ok"}

            @settings(
                max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
            )
            @given(body=BODIES, query=QUERIES)
            def sample(body: Any, query: dict[str, str]) -> None:
                response = client.post(
                    "/tasks", content=_encode(body), headers={"content-type": "application/json"}
                )
                _expect_no_5xx(response, f"POST /tasks {_encode(body)[:300]!r}", figures)
                _expect_no_5xx(client.get("/tasks", params=query), f"GET /tasks {query!r}", figures)

            sample()
            print(f"\nreal-service fuzz figures: {dict(figures)}")
            assert figures["5xx"] == 0
            _assert_healthy_then_complete(client, None)
    finally:
        ray.shutdown()  # the cluster is the test's own: no graceful serve.shutdown needed
