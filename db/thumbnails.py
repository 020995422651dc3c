"""Where a task's params record its output's thumbnail: the original's complete-task rule.

The original's complete-task writes the thumbnail's public URL into the task's params as `thumbnail_url`:
under `full_orchestrator_payload` for `travel_stitch` (and sets `accelerated` false there, as it always
does for that type), under `orchestrator_details` for `wan_2_2_i2v`, at the top level for every other
type. A URL already there is replaced; every other key stays.

This function is the rule in Python (the SQLite store applies it inside the completing transaction); the
PostgreSQL and Supabase stores apply the same rule in SQL, `hwgp_params_with_thumbnail_url` in
`db/supabase/migrations/20251130000020_thumbnail_url.sql`. tests/test_store.py holds them to one result.
"""

from __future__ import annotations

import copy
from typing import Any

# task_type → the params object that holds `thumbnail_url` (top level for any other type)
THUMBNAIL_PARENT = {"travel_stitch": "full_orchestrator_payload", "wan_2_2_i2v": "orchestrator_details"}
# extra keys the original sets beside the URL
THUMBNAIL_EXTRAS: dict[str, dict[str, Any]] = {"travel_stitch": {"accelerated": False}}


def params_with_thumbnail_url(task_type: str, params: Any, thumbnail_url: str) -> dict[str, Any]:
    """A copy of a task's params with `thumbnail_url` where the original's complete-task writes it.

    Params that are not a JSON object (never written by `create`, but a row may come from elsewhere)
    become `{}`; so does a nested holder that is not an object."""
    updated = copy.deepcopy(params) if isinstance(params, dict) else {}
    parent = THUMBNAIL_PARENT.get(task_type)
    if parent is None:
        target = updated
    else:
        nested = updated.get(parent)
        target = updated[parent] = dict(nested) if isinstance(nested, dict) else {}
    target["thumbnail_url"] = thumbnail_url
    target.update(THUMBNAIL_EXTRAS.get(task_type, {}))
    return updated
