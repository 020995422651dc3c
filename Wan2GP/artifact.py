"""The result of one generation: encoded bytes plus what a caller needs to store and describe them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Artifact:
    """An encoded output file, produced by the engine and stored by the ingress.

    Deployments return artifacts instead of paths so they never touch storage or the database.
    """

    data: bytes
    filename: str
    media_type: str  # "video/mp4" or "image/png"
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.data)
