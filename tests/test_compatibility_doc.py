"""docs/compatibility.md lists every key the code refuses or ignores by name."""

from __future__ import annotations

from pathlib import Path

from dag.travel_plan import _TRAVEL_IGNORED
from Wan2GP.params import IGNORED_KEYS, PREPROCESSOR_LETTERS, PROMPT_TYPE_LETTERS, REFUSED_KEYS
from Wan2GP.solvers import SOLVERS

DOC = (Path(__file__).parent.parent / "docs" / "compatibility.md").read_text()


def test_every_refused_and_ignored_key_is_documented():
    keys = set(REFUSED_KEYS) | set(IGNORED_KEYS) | set(_TRAVEL_IGNORED)
    missing = sorted(key for key in keys if f"`{key}`" not in DOC)
    assert missing == []


def test_solvers_and_prompt_type_letters_are_documented():
    assert all(f"`{solver}`" in DOC for solver in SOLVERS)
    assert all(f"`{letter}`" in DOC for letter in (*PROMPT_TYPE_LETTERS, *PREPROCESSOR_LETTERS))
