"""Task types and model families of the image models (Qwen-Image, Qwen-Image-Edit, Z-Image Turbo).

Plain data with no imports, so :mod:`Wan2GP.catalog` can merge it into its own tables. The task types are the
original's (source/task_conversion.py), routed as it routes them: every Qwen task runs on the edit model
(``qwen_image_edit_20B``), text-to-image included; the Z-Image tasks on ``z_image``.
"""

from __future__ import annotations

IMAGE_FAMILIES: tuple[str, ...] = ("qwen_image", "qwen_image_edit", "z_image")

# Task type -> task family.
IMAGE_TASK_FAMILIES: dict[str, str] = {
    "qwen_image": "qwen_image",
    "qwen_image_edit": "qwen_image_edit",
    "qwen_image_style": "qwen_image_edit",
    "image_inpaint": "qwen_image_edit",
    "annotated_image_edit": "qwen_image_edit",
    "z_image_turbo": "z_image",
    "z_image_turbo_i2i": "z_image",
}

# Task family -> the model families that can run it. Qwen-Image-Edit shares Qwen-Image's architecture and also
# generates from text alone (the original's qwen_image runs on it); Qwen-Image cannot edit.
IMAGE_COMPATIBLE_FAMILIES: dict[str, frozenset[str]] = {
    "qwen_image": frozenset({"qwen_image", "qwen_image_edit"}),
    "qwen_image_edit": frozenset({"qwen_image_edit"}),
    "z_image": frozenset({"z_image"}),
}
