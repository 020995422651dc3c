"""Tiny random-weight image models (Qwen-Image, Qwen-Image-Edit, Z-Image Turbo), built locally with the real
diffusers and transformers classes, for tests and the CPU demo.

Like :mod:`Wan2GP.tiny`, each model is saved in diffusers format (tokenizers and the Qwen2-VL processor
included) and loaded with ``from_pretrained(folder)`` exactly as real weights are. Nothing touches the network.

The Qwen tokenizers split text with the Qwen2 pre-tokenizer pattern and map each piece to one id (unknown
pieces to one ``<unk>``), so the pipelines' fixed prompt templates take exactly as many tokens as with the real
vocabulary: the pipelines drop that many leading hidden states (34 for text-to-image, 64 for edits).
"""

from __future__ import annotations

import fcntl
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import ProcessorMixin, Qwen2VLProcessor  # noqa: F401 - ProcessorMixin: diffusers' loader looks it up here

from Wan2GP.tiny import _WORDS, default_tiny_dir, make_tiny_lora

# Bump when the tiny architectures change, so stale caches are rebuilt instead of reused.
TINY_IMAGE_VERSION = "3"
TINY_IMAGE_MODELS = ("qwen_image", "qwen_image_edit", "z_image")

# The Qwen2 / Qwen3 pre-tokenizer pattern (tokenizer.json of the real models).
_QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<unk>",
]
# Words of the pipelines' prompt templates, so they tokenize as they do with the real vocabulary.
_TEMPLATE_TEXT = """
Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships of the
objects and background: key features of input (color, objects, background), then explain how user's instruction
should alter or modify image. Generate new that meets requirements while maintaining consistency with original
where appropriate. system user assistant Picture In style this make an Make scene green areas
"""
# Z-Image's tokenizer formats each prompt as one chat turn (``apply_chat_template``), as Qwen3's template does.
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# LoRA files the original's Qwen tasks add by name (source/model_handlers/qwen_handler.py). The tiny builder
# writes random stand-ins under the same names, so the task code paths run unchanged on tiny models.
QWEN_LORA_FILES = (
    "Qwen-Image-Edit-Lightning-8steps-V1.0-bf16.safetensors",
    "Qwen-Image-Lightning-4steps-V2.0-bf16.safetensors",
    "qwen_image_edit_inpainting.safetensors",
    "in_scene_pure_squares_flipped_450_lr_000006700.safetensors",
    "style_transfer_qwen_edit_2_000011250.safetensors",
    "in_subject_qwen_edit_2_000006750.safetensors",
    "in_scene_different_object_000010500.safetensors",
)
TINY_Z_IMAGE_LORA = "tiny-z-image-lora.safetensors"


def build_qwen_tokenizer():
    """A Qwen-style fast tokenizer: Qwen2 pre-tokenizer pattern, one id per piece, Qwen's special tokens."""
    import regex
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces: dict[str, None] = {}
    for word in regex.findall(_QWEN_PATTERN, _TEMPLATE_TEXT + " " + " ".join(_WORDS)):
        for piece in (word.strip(), " " + word.strip(), word):
            if piece.strip():
                pieces[piece] = None
    pieces.update(dict.fromkeys(["\n", ",", ".", ":", "),", " (", "'s", "!", "?", "-"]))
    vocab = {token: index for index, token in enumerate(_QWEN_SPECIALS + list(pieces))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(_QWEN_PATTERN), behavior="isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        additional_special_tokens=[
            t for t in _QWEN_SPECIALS if t not in ("<|endoftext|>", "<|im_end|>", "<unk>")
        ],
        model_max_length=4096,
    )
    fast.chat_template = _CHAT_TEMPLATE
    return fast


def _qwen_vl_text_encoder(tokenizer, seed: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "vocab_size": 1024,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": 16,
        },
        vocab_size=1024,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def _qwen_components(transformer_seed: int) -> dict:
    """Transformer, VAE, Qwen2.5-VL text encoder, tokenizer and scheduler of a tiny Qwen-Image model.

    Qwen-Image and Qwen-Image-Edit share the text encoder and VAE (same seeds), as the real models do."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    tokenizer = build_qwen_tokenizer()
    torch.manual_seed(transformer_seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=(8, 4, 4),
    )
    torch.manual_seed(20)
    # As thin as it goes: the edit pipeline encodes its input image at ~1 MP whatever the output size.
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=0,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    # The scheduler real Qwen-Image repos ship: flow matching with exponential dynamic shifting.
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
        shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True,
    )  # fmt: skip
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": _qwen_vl_text_encoder(tokenizer, seed=21),
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


class QwenImageTextProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor for images and text only (what the edit pipeline uses).

    transformers 5 cannot build a Qwen2VLProcessor without torchvision, even with no video processor: it looks
    the video processor's base class up and fails. Declaring no ``video_processor`` skips that lookup; the
    text-and-image path is Qwen2VLProcessor's own. Real Qwen-Image-Edit folders name Qwen2VLProcessor and so
    need torchvision installed (GPU installs have it).
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def build_qwen_processor(tokenizer) -> QwenImageTextProcessor:
    """The edit pipeline's processor, with an image processor making a few vision tokens."""
    from transformers import Qwen2VLImageProcessorPil

    # patch 14 x merge 2: images resized to 28..56 px a side -> at most 2 x 2 merged vision tokens.
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14, temporal_patch_size=2, merge_size=2
    )
    return QwenImageTextProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _build_qwen_image():
    from diffusers import QwenImagePipeline

    return QwenImagePipeline(**_qwen_components(transformer_seed=22))


def _build_qwen_image_edit():
    from diffusers import QwenImageEditPipeline

    components = _qwen_components(transformer_seed=23)
    return QwenImageEditPipeline(processor=build_qwen_processor(components["tokenizer"]), **components)


def _build_z_image():
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = build_qwen_tokenizer()
    torch.manual_seed(24)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=1,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=16,
        axes_dims=[8, 4, 4],
        axes_lens=[256, 32, 32],
    )
    torch.manual_seed(25)
    text_encoder = Qwen3Model(
        Qwen3Config(
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=1024,
            max_position_embeddings=1024,
        )
    )
    torch.manual_seed(26)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 4, 4, 4),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=1,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return ZImagePipeline(
        transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler
    )


_BUILDERS = {
    "qwen_image": _build_qwen_image,
    "qwen_image_edit": _build_qwen_image_edit,
    "z_image": _build_z_image,
}


def _build_all(root: Path) -> None:
    loras = root / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    for name in TINY_IMAGE_MODELS:
        pipe = _BUILDERS[name]()
        pipe.save_pretrained(str(root / name))
        if name == "qwen_image_edit":
            for seed, file in enumerate(QWEN_LORA_FILES, start=30):
                make_tiny_lora(pipe.transformer, loras / file, seed=seed, pipeline_class=type(pipe))
        elif name == "z_image":
            make_tiny_lora(pipe.transformer, loras / TINY_Z_IMAGE_LORA, seed=40, pipeline_class=type(pipe))
    (root / "VERSION").write_text(TINY_IMAGE_VERSION)


def ensure_tiny_image_models(cache_dir: Path | None = None) -> Path:
    """Build the tiny image models once into ``<cache_dir>/image`` (default under :func:`default_tiny_dir`)
    and return the folder holding one sub-folder per model plus ``loras/``.

    Safe from several processes at once: a file lock serialises the build, and the models are written to a
    temporary folder renamed into place, so a reader never sees a half-written model.
    """
    root = (Path(cache_dir) if cache_dir is not None else default_tiny_dir()).expanduser().resolve()
    current = root / "image"
    version_file = current / "VERSION"
    if version_file.is_file() and version_file.read_text() == TINY_IMAGE_VERSION:
        return current
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".image.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if version_file.is_file() and version_file.read_text() == TINY_IMAGE_VERSION:
            return current
        staging = Path(tempfile.mkdtemp(prefix="build-image-", dir=root))
        _build_all(staging)
        if current.exists():
            shutil.rmtree(current)
        staging.rename(current)
    return current
