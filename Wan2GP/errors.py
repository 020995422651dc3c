"""Errors the engine raises on purpose, so callers can tell a bad request from a crash."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of the engine's own errors; the message is meant for the task's ``error_message``."""


class Cancelled(EngineError):  # noqa: N818 - the public name the Serve layer imports
    """Raised at the next denoising step after ``should_cancel()`` returned True."""


class UnknownModel(EngineError, KeyError):  # noqa: N818
    """A model id or alias that no catalog entry defines."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnsupportedTaskType(EngineError, ValueError):  # noqa: N818
    """A task type this engine does not generate (e.g. ``hunyuan``), or a model of the wrong family."""


class WeightsNotFound(EngineError, FileNotFoundError):  # noqa: N818
    """The weights of a model (or a LoRA file) are in none of the places the engine looks."""
