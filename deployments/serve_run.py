"""`serve run` that stops gracefully on SIGTERM as well as SIGINT: `python -m deployments.serve_run CONFIG`.

Why not plain `serve run`: `ray.init` (which `serve run` calls) installs a SIGTERM handler that calls
`sys.exit`. That `SystemExit` passes by `serve run`'s `except KeyboardInterrupt` (which would call
`serve.shutdown()`), and the exit's `ray.shutdown()` then tears down the local cluster `serve run`
started: every replica dies at once, the ingress never runs its `__del__`, and in-flight tasks stay
`In Progress` until their heartbeat goes stale. On SIGINT `serve run` does call `serve.shutdown()`, but
gives it only 30 s before exiting (and killing the cluster) anyway.

This launcher runs `serve run`'s own code for everything except the stop. It connects to Ray first
(so it can replace Ray's SIGTERM handler afterwards), then on the first SIGTERM or SIGINT deletes each
application and waits for it: each ingress replica's `__del__` lets in-flight work finish within
`shutdown_grace_s`, then hands the rest back (`Queued`, attempt refunded); `build_app` gives every
deployment a `graceful_shutdown_timeout_s` long enough for that. A second signal stops at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

import ray
from ray import serve
from ray.serve._private.constants import SERVE_NAMESPACE
from ray.serve.scripts import run as serve_run_command

logger = logging.getLogger("ray.serve")


class StopRequested(BaseException):
    """SIGTERM or SIGINT arrived. A BaseException, so `serve run`'s own handlers let it through."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _request_stop(signum: int, frame: object) -> None:
    # A second signal during the graceful stop takes the default action: stop at once.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    raise StopRequested(signum)


def stop_gracefully() -> None:
    """Delete every application, waiting for its replicas' graceful shutdown, then stop Serve."""
    for name in serve.status().applications:
        logger.info("deleting application %s (in-flight tasks are handed back)", name)
        serve.delete(name, _blocking=True)
    serve.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deployments.serve_run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("config", help="a Serve config file, e.g. serve_config.yaml")
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster to join ('local' or unset: start one here; default $RAY_ADDRESS)",
    )
    args = parser.parse_args(argv)
    if not os.path.isfile(args.config):
        parser.error(f"config: {args.config} is not a file")

    ray.init(address=args.address, namespace=SERVE_NAMESPACE)
    # After ray.init, which installs its own SIGTERM handler (sys.exit).
    signal.signal(signal.SIGTERM, _request_stop)
    signal.signal(signal.SIGINT, _request_stop)
    try:
        serve_run_command.main([args.config], prog_name="serve run", standalone_mode=False)
    except StopRequested as stop:
        logger.warning("%s received: stopping gracefully", stop)
        stop_gracefully()
    return 0


if __name__ == "__main__":
    sys.exit(main())
