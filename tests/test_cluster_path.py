"""The README's cluster path, run as a user runs it: a real `ray start` head with token authentication
on, `serve deploy`, and a batch submitted with `ray job submit`.

The commands are read from the README's `cluster-path` block and run verbatim but for the ports, the
config file and the batch file (and a private `--temp-dir`, so this head's processes can be stopped
without touching any other Ray cluster on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def readme_cluster_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- cluster-path -->\s*```bash\n(.*?)```", text, re.S)
    assert block, "README.md lost its cluster-path block"
    return [line.split("  #")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_head(temp_dir: Path) -> None:
    """Kill the processes of this head only (every one names its session folder); never `ray stop`."""
    mine = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(temp_dir) in part for part in proc.info["cmdline"] or ()):
                mine.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for proc in mine:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(mine, timeout=10)
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_readme_cluster_path_with_token_auth(tmp_path: Path):
    head_port, dashboard_port, http_port = free_port(), free_port(), free_port()
    temp_dir = Path(f"/tmp/hwgp-{os.getpid()}-{head_port}")  # short: Ray's socket paths have a limit
    config = tmp_path / "serve_config.yaml"
    config.write_text(
        f"""
http_options: {{host: 127.0.0.1, port: {http_port}}}
applications:
  - name: hwgp
    route_prefix: /
    import_path: deployments.app:build_app
    args:
      db: sqlite:///{tmp_path / "tasks.db"}
      storage: {{root: {tmp_path / "files"}}}
      models: tiny
"""
    )
    jobs = tmp_path / "tasks.jsonl"
    jobs.write_text(
        "\n".join(
            json.dumps(line)
            for line in (
                {"task_type": "t2v", "params": {"prompt": "a cat", "model": "tiny-t2v", "resolution": "64x48",
                                                "video_length": 5, "num_inference_steps": 2}},
                {"task_type": "extract_frame", "params": {"input_video_task_id": "#1", "frame_index": -1}},
            )
        )
    )  # fmt: skip

    def localise(command: str) -> str:
        command = (
            command.replace("6380", str(head_port))
            .replace("8265", str(dashboard_port))
            .replace("127.0.0.1:8000", f"127.0.0.1:{http_port}")
            .replace("serve_config.yaml", str(config))
            .replace("tasks.jsonl", str(jobs))
        )
        if command.startswith("ray start"):
            # Other Ray clusters may run on this machine: give this head's agents ports of their own.
            agent_ports = " ".join(
                f"--{name} {free_port()}"
                for name in (
                    "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                    "metrics-export-port", "runtime-env-agent-port", "node-manager-port",
                    "object-manager-port", "ray-client-server-port",
                )
            )  # fmt: skip
            command += f" --temp-dir {temp_dir} --num-cpus 2 --disable-usage-stats {agent_ports}"
        return command

    commands = [localise(c) for c in readme_cluster_commands()]
    deploy = next(i for i, c in enumerate(commands) if c.startswith("serve deploy"))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
        "HOME": str(tmp_path / "home"),  # the token file goes here, not into the user's ~/.ray
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    (tmp_path / "home").mkdir()

    def shell(script: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", "-ec", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
        )

    try:
        setup = shell("\n".join(commands[:deploy]), timeout=120)
        assert setup.returncode == 0, setup.stderr[-3000:]
        assert (tmp_path / "home/.ray/auth_token").is_file()

        # Token auth is on: the token without RAY_AUTH_MODE is refused, as the README warns.
        token = (tmp_path / "home/.ray/auth_token").read_text().strip()
        refused = shell(f"RAY_AUTH_TOKEN={token} {commands[deploy]}", timeout=120)
        assert refused.returncode != 0 and "RAY_AUTH_MODE" in refused.stdout + refused.stderr

        exports = "\n".join(c for c in commands[:deploy] if c.startswith("export"))
        deployed = shell(f"{exports}\n{commands[deploy]}", timeout=120)
        assert deployed.returncode == 0, deployed.stderr[-3000:]
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the deployed application never became healthy"
            time.sleep(1)

        submitted = shell(f"{exports}\n" + "\n".join(commands[deploy + 1 :]), timeout=300)
        output = submitted.stdout + submitted.stderr
        assert submitted.returncode == 0, output[-4000:]
        assert "summary: 2 complete, 0 failed or cancelled" in output, output[-4000:]
        frame = re.search(r"(\S+) extract_frame\s+Complete\s+(\S+)", output)
        assert frame and frame.group(2).endswith(".png"), output[-4000:]
    finally:
        stop_head(temp_dir)
