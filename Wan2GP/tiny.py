"""Tiny random-weight models of every family, built locally with the real classes, for tests and the CPU demo.

Each model is saved in diffusers format (``model_index.json`` plus one folder per component, tokenizers
included), so the engine loads it with ``from_pretrained(folder)`` exactly as it loads real weights. Nothing
here touches the network: tokenizers are built from a small vocabulary written below.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from Wan2GP.loras import LORA_PRESETS

# Bump when the tiny architectures change, so stale caches are rebuilt instead of reused.
TINY_VERSION = "6"
TINY_MODELS = (
    "t2v",
    "i2v",
    "flf2v",
    "vace",
    "flux",
    "flux_kontext",
    "t2v_22",
    "i2v_22",
    "ti2v_22",
    "vace_22",
)
# LoRA files the tiny builder writes into ``<cache>/loras``; the preset names match the real file names so
# ``use_causvid_lora`` / ``use_lighti2x_lora`` / ``in_scene`` work on tiny models with the same code path.
TINY_WAN_LORA = "tiny-wan-lora.safetensors"
TINY_FLUX_LORA = "tiny-flux-lora.safetensors"
# Two LoRAs of the tiny Wan 2.2 experts, like the Lightning high-noise / low-noise pair.
TINY_WAN22_LORAS = ("tiny-wan22-high.safetensors", "tiny-wan22-low.safetensors")
# Wan 2.2 A14B experts switch at these timesteps / 1000 (diffusers' boundary_ratio of the real repos).
T2V_22_BOUNDARY = 0.875
I2V_22_BOUNDARY = 0.9

_WORD_TEXT = """
a an the and or of in on at to with from by for is are was be it its this that as into over under up down
man woman person people child dog cat bird horse fish car boat train city street road house room tree forest
mountain river lake sea ocean beach sky cloud sun moon star night day morning evening rain snow fire water
light dark red green blue yellow white black orange purple pink brown grey gold silver bright soft
walking running flying dancing sitting standing jumping swimming smiling looking turning moving camera pan zoom
slow fast close wide shot view scene portrait landscape cinematic photo painting style detailed realistic
blurry low quality bad ugly worst noisy static frame video image picture background foreground
big small tall short old young happy sad calm beautiful monkey squirrel burger hat dress car flower garden
"""
_WORDS = _WORD_TEXT.split()


def default_tiny_dir() -> Path:
    """``$HWGP_TINY_DIR`` or ``~/.cache/hwgp/tiny``."""
    env = os.environ.get("HWGP_TINY_DIR")
    return Path(env) if env else Path.home() / ".cache" / "hwgp" / "tiny"


def _vocab(specials: list[str]) -> dict[str, int]:
    tokens = specials + [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    tokens += [w for w in dict.fromkeys(_WORDS) if w not in tokens]
    tokens += [",", ".", "!", "?", "-", "'"]
    return {token: index for index, token in enumerate(tokens)}


def build_t5_tokenizer(model_max_length: int = 512):
    """A T5-style fast tokenizer (pad 0, eos 1, unk 2) over a fixed word-level vocabulary."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = _vocab(["<pad>", "</s>", "<unk>"])
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )


def build_clip_tokenizer():
    """A CLIP-style fast tokenizer (bos, eos = pad) over the same fixed vocabulary, 77 tokens long."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = _vocab(["<|startoftext|>", "<|endoftext|>", "<unk>"])
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        model_max_length=77,
    )


def _wan_shared(seed: int = 0) -> dict:
    """Text encoder, tokenizer, VAE and scheduler shared by every tiny Wan model (same weights)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=256,
            d_model=16,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    # The scheduler real Wan2.1 diffusers repos ship: UniPC on flow sigmas.
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
    )
    return {
        "text_encoder": text_encoder,
        "tokenizer": build_t5_tokenizer(),
        "vae": vae,
        "scheduler": scheduler,
    }


def _wan_transformer_kwargs() -> dict:
    return dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        out_channels=16,
        text_dim=16,
        freq_dim=32,
        ffn_dim=32,
        rope_max_seq_len=1024,  # positions, not weights: as the real models, so any size the API takes runs
    )


def _build_t2v():
    from diffusers import WanPipeline, WanTransformer3DModel

    components = _wan_shared()
    torch.manual_seed(1)
    transformer = WanTransformer3DModel(in_channels=16, num_layers=1, **_wan_transformer_kwargs())
    return WanPipeline(transformer=transformer, **components)


def _build_i2v(last_frame: bool = False):
    from diffusers import WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    components = _wan_shared()
    torch.manual_seed(6 if last_frame else 2)
    # in_channels 36 = 16 noise + 4 mask + 16 image latents; image_dim = the CLIP hidden size. FLF2V models
    # embed the first and last image tokens together: 2 x 17 CLIP tokens (16 patches + class token).
    transformer = WanTransformer3DModel(
        in_channels=36,
        num_layers=1,
        image_dim=8,
        pos_embed_seq_len=34 if last_frame else None,
        **_wan_transformer_kwargs(),
    )
    torch.manual_seed(2)  # the image encoder is shared by the i2v and flf2v models
    image_encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=8,
            projection_dim=8,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            intermediate_size=16,
            patch_size=8,
        )
    )
    image_processor = CLIPImageProcessor(crop_size=32, size=32)
    return WanImageToVideoPipeline(
        transformer=transformer, image_encoder=image_encoder, image_processor=image_processor, **components
    )


def _build_vace():
    from diffusers import WanVACEPipeline, WanVACETransformer3DModel

    components = _wan_shared()
    torch.manual_seed(3)
    transformer = WanVACETransformer3DModel(
        in_channels=16, num_layers=2, vace_layers=[0], vace_in_channels=96, **_wan_transformer_kwargs()
    )
    return WanVACEPipeline(transformer=transformer, **components)


def _build_t2v_22():
    """Wan 2.2 T2V-A14B: two experts, ``transformer`` above the boundary timestep and ``transformer_2`` below."""
    from diffusers import WanPipeline, WanTransformer3DModel

    components = _wan_shared()
    experts = []
    for seed in (20, 21):
        torch.manual_seed(seed)
        experts.append(WanTransformer3DModel(in_channels=16, num_layers=1, **_wan_transformer_kwargs()))
    return WanPipeline(
        transformer=experts[0], transformer_2=experts[1], boundary_ratio=T2V_22_BOUNDARY, **components
    )


def _build_i2v_22():
    """Wan 2.2 I2V-A14B: two experts conditioned on the image latents only (no CLIP image encoder)."""
    from diffusers import WanImageToVideoPipeline, WanTransformer3DModel

    components = _wan_shared()
    experts = []
    for seed in (22, 23):
        torch.manual_seed(seed)
        experts.append(WanTransformer3DModel(in_channels=36, num_layers=1, **_wan_transformer_kwargs()))
    return WanImageToVideoPipeline(
        transformer=experts[0],
        transformer_2=experts[1],
        boundary_ratio=I2V_22_BOUNDARY,
        image_encoder=None,
        image_processor=None,
        **components,
    )


def _build_ti2v_22():
    """Wan 2.2 TI2V-5B: one transformer on the Wan 2.2 VAE (z_dim 48, 16x spatial), per-token timesteps."""
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel

    components = _wan_shared()
    torch.manual_seed(24)
    components["vae"] = AutoencoderKLWan(
        base_dim=8,
        decoder_base_dim=8,
        z_dim=48,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        scale_factor_temporal=4,
        scale_factor_spatial=16,
        latents_mean=[0.0] * 48,
        latents_std=[1.0] * 48,
    )
    kwargs = {**_wan_transformer_kwargs(), "out_channels": 48}
    torch.manual_seed(25)
    transformer = WanTransformer3DModel(in_channels=48, num_layers=1, **kwargs)
    return WanPipeline(transformer=transformer, expand_timesteps=True, **components)


def _build_vace_22():
    """VACE on the Wan 2.2 T2V experts (the original's vace_14B_2_2 / vace_fun_14B_2_2)."""
    from diffusers import WanVACEPipeline, WanVACETransformer3DModel

    components = _wan_shared()
    experts = []
    for seed in (26, 27):
        torch.manual_seed(seed)
        experts.append(
            WanVACETransformer3DModel(
                in_channels=16,
                num_layers=2,
                vace_layers=[0],
                vace_in_channels=96,
                **_wan_transformer_kwargs(),
            )
        )
    return WanVACEPipeline(
        transformer=experts[0], transformer_2=experts[1], boundary_ratio=T2V_22_BOUNDARY, **components
    )


def _flux_components(seed: int) -> dict:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,  # like FLUX.1-dev: guidance is an input of the model
        axes_dims_rope=[4, 4, 8],
    )
    # Text encoders and VAE use one fixed seed: Flux and Flux Kontext share them, as the real models do.
    torch.manual_seed(4)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=1,
            vocab_size=256,
            projection_dim=32,
        )
    )
    torch.manual_seed(4)
    text_encoder_2 = T5EncoderModel(
        T5Config(vocab_size=256, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4, pad_token_id=0)
    )
    torch.manual_seed(4)
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(4, 4),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0,
        use_dynamic_shifting=True,
    )  # fmt: skip
    return {
        "transformer": transformer,
        "text_encoder": text_encoder,
        "tokenizer": build_clip_tokenizer(),
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": build_t5_tokenizer(model_max_length=512),
        "vae": vae,
        "scheduler": scheduler,
    }


def _build_flux():
    from diffusers import FluxPipeline

    return FluxPipeline(**_flux_components(seed=4))


def _build_flux_kontext():
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline(**_flux_components(seed=5))


_BUILDERS = {
    "t2v": _build_t2v,
    "i2v": _build_i2v,
    "flf2v": lambda: _build_i2v(last_frame=True),
    "vace": _build_vace,
    "flux": _build_flux,
    "flux_kontext": _build_flux_kontext,
    "t2v_22": _build_t2v_22,
    "i2v_22": _build_i2v_22,
    "ti2v_22": _build_ti2v_22,
    "vace_22": _build_vace_22,
}


def make_tiny_lora(transformer: torch.nn.Module, path: Path, seed: int, pipeline_class: type) -> Path:
    """Save a random, non-zero LoRA for ``transformer`` (attention projections) in the diffusers LoRA format."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False, lora_dropout=0.0
    )
    # Work on a copy so the saved base model stays untouched.
    model = type(transformer).from_config(transformer.config)
    model.load_state_dict(transformer.state_dict())
    model = inject_adapter_in_model(config, model, adapter_name="tiny")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)  # large enough to move outputs visibly
    state = get_peft_model_state_dict(model, adapter_name="tiny")
    pipeline_class.save_lora_weights(
        save_directory=str(path.parent),
        transformer_lora_layers=state,
        weight_name=path.name,
        safe_serialization=True,
    )
    return path


def _build_all(root: Path) -> None:
    loras = root / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    for name in TINY_MODELS:
        pipe = _BUILDERS[name]()
        pipe.save_pretrained(str(root / name))
        if name == "t2v":
            make_tiny_lora(pipe.transformer, loras / TINY_WAN_LORA, seed=10, pipeline_class=type(pipe))
            # Tiny stand-ins under the real preset file names (CausVid, LightX2V) for the flag code path.
            for preset in ("causvid", "lighti2x"):
                shutil.copyfile(loras / TINY_WAN_LORA, loras / LORA_PRESETS[preset]["file"])
        elif name == "t2v_22":
            for seed, file_name in enumerate(TINY_WAN22_LORAS, start=13):
                make_tiny_lora(pipe.transformer, loras / file_name, seed=seed, pipeline_class=type(pipe))
        elif name == "flux":
            make_tiny_lora(pipe.transformer, loras / TINY_FLUX_LORA, seed=11, pipeline_class=type(pipe))
        elif name == "flux_kontext":
            make_tiny_lora(pipe.transformer, loras / LORA_PRESETS["in_scene"]["file"], seed=12,
                           pipeline_class=type(pipe))  # fmt: skip
    (root / "VERSION").write_text(TINY_VERSION)


def ensure_tiny_models(cache_dir: Path | None = None) -> Path:
    """Build every tiny model once into ``cache_dir`` (default :func:`default_tiny_dir`) and return the folder.

    Each ``TINY_VERSION`` has its own folder (``v<N>``), so checkouts of different versions sharing one cache
    never rebuild over each other or delete a folder another process reads. Safe to call from several
    processes at once: a file lock serialises the build, and the folder is filled in a temporary directory
    renamed into place, so a reader never sees a half-written model.
    """
    root = Path(cache_dir) if cache_dir is not None else default_tiny_dir()
    root = root.expanduser().resolve()
    folder = root / f"v{TINY_VERSION}"
    version_file = folder / "VERSION"
    if version_file.is_file() and version_file.read_text() == TINY_VERSION:
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if version_file.is_file() and version_file.read_text() == TINY_VERSION:
            return folder
        staging = Path(tempfile.mkdtemp(prefix="build-", dir=root))
        try:
            _build_all(staging)
            (staging / "build.json").write_text(json.dumps({"models": list(TINY_MODELS)}))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if folder.exists():  # a folder of this version without its VERSION file: an interrupted build
            shutil.rmtree(folder)
        staging.rename(folder)
    return folder
