"""A real small filesystem that fills up: a 1 MiB tmpfs (the test machines run as root), and helpers to
fill it and list what a failed write left behind. Used by the storage and dispatcher fault tests."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

TMPFS_BYTES = 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs, unmounted afterwards."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(mount_point)],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.fail(f"mounting a tmpfs needs root (this project's test machines run as root): {error}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill_disk(disk: Path, leave_free: int) -> Path:
    """A filler file that leaves about `leave_free` bytes of `disk` free."""
    stats = os.statvfs(disk)
    filler = disk / "filler.bin"
    filler.write_bytes(b"\0" * max(0, stats.f_bavail * stats.f_frsize - leave_free))
    return filler


def files_under(folder: Path) -> list[str]:
    """Every file under `folder`, relative, hidden ones (temp files, receipts) included."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
