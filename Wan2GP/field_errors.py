"""One way to raise a validation error that names the field as the client spelled it.

Checks that span several keys (or need the machine's state, like "is a depth model installed") cannot live
in a single pydantic field validator; they raise through ``field_error`` so the Serve layer still answers
422 with a ``loc`` pointing at the key to fix.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from pydantic_core import PydanticCustomError


def field_error(
    loc: tuple[str | int, ...], message: str, value: Any = None, title: str = "Params"
) -> ValidationError:
    """A ValidationError whose single error has ``loc`` and the readable ``message``."""
    return ValidationError.from_exception_data(
        title,
        [
            {
                "type": PydanticCustomError("invalid_param", "{problem}", {"problem": message}),
                "loc": loc,
                "input": value,
            }
        ],
    )
