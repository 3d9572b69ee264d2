"""Load an SD1.x / SD2.x single-file checkpoint (``.safetensors``, or ``.ckpt``) into the diffusers backend.

A single file in the CompVis/LDM layout (what A1111, ComfyUI and Civitai share) holds the UNet under
``model.diffusion_model.``, the text encoder under ``cond_stage_model.`` (Hugging Face CLIP-L for SD1,
OpenCLIP ViT-H for SD2) and the VAE under ``first_stage_model.``. It carries weights only, so:

* the architecture comes from small diffusers config folders shipped in ``configs/sd15`` and
  ``configs/sd2`` (``config_dir`` replaces them, e.g. for the tiny test model);
* the renaming is diffusers' own (``diffusers.loaders.single_file_utils`` converters), applied to
  models built empty on the meta device and filled in place, strictly: a missing or misshapen
  weight is an error that names it, never a silently random layer;
* the CLIP BPE vocabulary (1.6 MB) is not shipped: :func:`find_tokenizer` looks for it in the folder
  the caller names, then in a ComfyUI install (``comfy/sd1_tokenizer`` holds the same two files, which
  are read, never imported), then in the Hugging Face cache.

Nothing here downloads anything. The architecture is read from the tensor names and shapes (the
safetensors header alone) before anything large is read, so SDXL, inpainting or foreign files fail
at once with a message saying what they are.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Mapping

import torch

from .backend import DiffusersBackend, ModelLoadError
from .tokenizers import find_tokenizer, load_tokenizer

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).with_name("configs")
SHIPPED_CONFIGS = {"sd1": CONFIGS / "sd15", "sd2": CONFIGS / "sd2"}
CONFIG_FILES = ("unet/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD1: Hugging Face CLIPTextModel names
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD2: OpenCLIP names (fused q/k/v, resblocks)
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")

CONTEXT_WIDTH = {"sd1": 768, "sd2": 1024}


# ---- reading the file ---------------------------------------------------------------------------
def _check_file(path: Path) -> None:
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist; pass a .safetensors/.ckpt file or a diffusers folder")
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise ModelLoadError(
            f"{path}: unknown checkpoint type {path.suffix!r}; pass a .safetensors (or .ckpt) single-file "
            "checkpoint or a diffusers model folder"
        )


def _unreadable(path: Path, e: BaseException) -> ModelLoadError:
    return ModelLoadError(
        f"cannot read model file {path}: {e}. If the file is damaged or incomplete (an interrupted "
        "download?), download or copy it again"
    )


def read_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]] | None:
    """Tensor name -> shape from a safetensors header (nothing else is read); None for other formats."""
    path = Path(path)
    _check_file(path)
    if path.suffix.lower() != ".safetensors":
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise _unreadable(path, e) from e


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a single-file checkpoint on the CPU (``.ckpt`` only through ``weights_only``)."""
    path = Path(path)
    _check_file(path)
    if path.suffix.lower() == ".safetensors":
        import safetensors.torch
        from safetensors import SafetensorError

        try:
            return safetensors.torch.load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise _unreadable(path, e) from e
    try:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = torch.load(str(path), map_location="cpu", weights_only=True)  # pre-1.6 (non-zip) format
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # random bytes, a truncated file: damaged, not "objects"
            from ..lora.files import unpickling_reason

            raise _unreadable(path, unpickling_reason(e)) from e
        raise ModelLoadError(
            f"{path} holds Python objects besides tensors, and .ckpt files are only loaded with "
            "torch.load(weights_only=True) because a pickle can run code. Convert it to .safetensors "
            "with a tool you trust, or use the .safetensors version of this model"
        ) from e
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise _unreadable(path, e) from e
    while isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):  # Lightning wraps the weights
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ModelLoadError(f"{path} holds a {type(sd).__name__}, not a state dict of tensors")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


# ---- what is it? ----------------------------------------------------------------------------------
def checkpoint_arch(shapes: Mapping[str, tuple[int, ...]], source: str = "checkpoint") -> str:
    """``"sd1"`` or ``"sd2"`` from tensor names and shapes; a ModelLoadError naming anything else."""
    keys = list(shapes)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if any(k.endswith("double_blocks.0.img_attn.qkv.weight") for k in keys):
        raise ModelLoadError(
            f"{source} is a Flux/Chroma single-file checkpoint (BFL layout). The CLI trains Flux and Chroma from a "
            "diffusers folder: pass the model's diffusers folder (e.g. black-forest-labs/FLUX.1-dev as downloaded "
            "with `huggingface-cli download`, with model_index.json), or train this file in ComfyUI's Train LoRA "
            "node, which loads it as it is"
        )

    if has("conditioner.embedders."):  # the sgm layout: SDXL (two encoders, or a label_emb UNet) or SD2
        if has("conditioner.embedders.1.") or UNET_PREFIX + "label_emb.0.0.weight" in shapes:
            raise ModelLoadError(
                f"{source} is an SDXL checkpoint (it has conditioner.embedders.* text encoders). SDXL checkpoints "
                "are not supported by the CLI yet; pass the model as an SDXL diffusers folder (with "
                "text_encoder_2/ and tokenizer_2/), or train it in ComfyUI's Train LoRA node"
            )
        raise ModelLoadError(
            f"{source} stores its text encoder in the sgm layout (conditioner.embedders.0.*), which is not "
            f"supported; re-save it with {CLIP_PREFIX}* or {OPEN_CLIP_PREFIX}* names (ComfyUI's Save Checkpoint does)"
        )
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        if sum(k.startswith("model_ema.") for k in keys) > 100:
            raise ModelLoadError(
                f"{source} holds only EMA weights (model_ema.*) and no model.diffusion_model.* UNet; "
                "use the -emaonly or pruned .safetensors release of this model, which stores the EMA "
                "weights under the usual names"
            )
        if has("down_blocks.") or has("unet.") or has("lora_"):
            raise ModelLoadError(
                f"{source} is not a full single-file checkpoint (its keys look like a diffusers component "
                f"or a LoRA: {sorted(keys)[:3]}); pass an SD1.x/SD2.x .safetensors checkpoint or a "
                "diffusers model folder"
            )
        raise ModelLoadError(
            f"{source} is not an SD1.x/SD2.x checkpoint: it has no UNet under '{UNET_PREFIX}'. "
            f"Its first keys are {sorted(keys)[:5]}"
        )
    if len(conv_in) != 4 or conv_in[1] != 4:
        channels = conv_in[1] if len(conv_in) > 1 else "?"
        kind = {9: "an inpainting model", 8: "an InstructPix2Pix-style model"}.get(
            channels, "not a text-to-image model")
        raise ModelLoadError(
            f"{source} is {kind}: its UNet takes {channels} input channels, and LoRA training needs a "
            "standard text-to-image UNet with 4. Train on the matching base checkpoint instead (a LoRA "
            "trained on the base usually works with its inpainting version too)"
        )
    if UNET_PREFIX + "label_emb.0.0.weight" in shapes:
        raise ModelLoadError(
            f"{source} has a class-conditioned UNet (label_emb: SD2 unCLIP or similar), which is not supported; "
            "use a plain SD1.x/SD2.x checkpoint"
        )
    if not has(VAE_PREFIX):
        raise ModelLoadError(
            f"{source} has no VAE ({VAE_PREFIX}*): it is a UNet/text-encoder-only file; use a full checkpoint "
            "or a diffusers folder"
        )
    if has(OPEN_CLIP_PREFIX):
        return "sd2"
    if has(CLIP_PREFIX):
        return "sd1"
    raise ModelLoadError(
        f"{source} has no text encoder ({CLIP_PREFIX}* for SD1 or {OPEN_CLIP_PREFIX}* for SD2); "
        "use a full checkpoint or a diffusers folder"
    )


def context_width(shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """The width of the text conditioning the UNet's cross-attention reads (768 SD1, 1024 SD2)."""
    for k, s in shapes.items():
        if k.startswith(UNET_PREFIX) and k.endswith(".attn2.to_k.weight") and len(s) == 2:
            return s[1]
    return None


def detect_prediction_type(state_dict: Mapping[str, torch.Tensor], arch: str) -> str | None:
    """``"v_prediction"``/``"epsilon"`` when the weights tell, else None (the config decides).

    A ``v_pred`` marker key (kohya, ComfyUI saves) is explicit. SD2 768-v and SD2-base share every
    shape, so SD2 uses ComfyUI's heuristic (``supported_models.SD20.model_type``): the v models' last
    transformer norm has a much larger bias spread. ``--prediction-type`` overrides either way.
    """
    if "v_pred" in state_dict:
        return "v_prediction"
    if arch == "sd2":
        bias = state_dict.get(UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias")
        if bias is not None and not bias.is_meta:
            return "v_prediction" if torch.std(bias.float(), unbiased=False) > 0.09 else "epsilon"
    return None


# ---- building the models --------------------------------------------------------------------------
def _check_config_dir(config_dir: Path) -> None:
    missing = [f for f in CONFIG_FILES if not (config_dir / f).is_file()]
    if missing:
        raise ModelLoadError(
            f"model config folder {config_dir} lacks {missing}; pass a diffusers-style folder with "
            f"{', '.join(CONFIG_FILES)} (tokenizer and weights are not needed)"
        )


def _fill(model: torch.nn.Module, weights: Mapping[str, torch.Tensor], what: str, source: str,
          config_dir: Path, dtype: torch.dtype | None) -> None:
    """Load ``weights`` into a meta-built ``model`` in place: every parameter present with its shape.

    ``dtype`` casts tensor by tensor (None keeps the file's), so a file mixing fp16 and fp32 still
    gives a model of one dtype, and no second full copy of the model is ever made.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    if missing:
        raise ModelLoadError(
            f"{source}: {len(missing)} {what} weights are missing for the config in {config_dir}, e.g. "
            f"{missing[:3]}. The checkpoint is incomplete or of another architecture"
        )
    wrong = [(k, tuple(weights[k].shape), tuple(v.shape)) for k, v in expected.items() if weights[k].shape != v.shape]
    if wrong:
        k, got, want = wrong[0]
        raise ModelLoadError(
            f"{source}: {len(wrong)} {what} weights have other shapes than the config in {config_dir} "
            f"(e.g. {k}: {got} in the file, {want} in the config). Pass a matching config folder"
        )
    extra = [k for k in weights if k not in expected]
    if extra:
        log.debug("%s: %d %s weights not used by the config, e.g. %s", source, len(extra), what, extra[:3])
    model.load_state_dict({k: weights[k].to(dtype=dtype or weights[k].dtype).contiguous() for k in expected},
                          strict=True, assign=True)


def _clip_names(weights: Mapping[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """Converter output (``text_model.*``) in the names of this transformers version's CLIPTextModel.

    transformers >= 5.6 flattened ``CLIPTextModel`` (no ``text_model.`` level); older versions and
    very old checkpoints differ the other way. ``position_ids`` is a buffer some files carry.
    """
    prefix = "text_model." if hasattr(model, "text_model") else ""
    out = {}
    for k, v in weights.items():
        k = k.removeprefix("text_model.")
        if k != "embeddings.position_ids":
            out[prefix + k] = v
    return out


def build_components(state_dict: Mapping[str, torch.Tensor], arch: str, config_dir: str | os.PathLike,
                     source: str = "checkpoint", dtype: torch.dtype | None = None) -> dict:
    """UNet, text encoder, VAE and scheduler from an LDM state dict and a diffusers config folder.

    The models are built empty (accelerate's ``init_empty_weights``) and take the converted tensors
    in place (copied only to change dtype); a state dict of meta tensors yields meta models.
    """
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    config_dir = Path(config_dir)
    _check_config_dir(config_dir)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(config_dir / "unet")))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(config_dir / "vae")))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(str(config_dir / "text_encoder")))

    width = context_width({k: tuple(v.shape) for k, v in state_dict.items() if k.endswith(".attn2.to_k.weight")})
    if width != unet.config.cross_attention_dim:
        raise ModelLoadError(
            f"{source}: its UNet reads text of width {width}, but the config in {config_dir} has "
            f"cross_attention_dim {unet.config.cross_attention_dim} (SD1.x: 768, SD2.x: 1024). This is not a "
            "standard SD1.x/SD2.x checkpoint; pass a matching config folder (--model-config)"
        )

    def part(prefix: str) -> dict[str, torch.Tensor]:
        # Only this component's keys: the converters scan every key, and warn about EMA keys they skip.
        return {k: v for k, v in state_dict.items() if k.startswith(prefix)}

    _fill(unet, convert_ldm_unet_checkpoint(part(UNET_PREFIX), unet.config), "UNet", source, config_dir, dtype)
    _fill(vae, convert_ldm_vae_checkpoint(part(VAE_PREFIX), vae.config), "VAE", source, config_dir, dtype)
    if arch == "sd2":
        te = convert_open_clip_checkpoint(text_encoder, part(OPEN_CLIP_PREFIX), prefix=OPEN_CLIP_PREFIX)
    else:
        te = convert_ldm_clip_checkpoint(part(CLIP_PREFIX))
    _fill(text_encoder, _clip_names(te, text_encoder), "text encoder", source, config_dir, dtype)

    sched_config = DDPMScheduler.load_config(str(config_dir / "scheduler"))
    prediction = detect_prediction_type(state_dict, arch)
    if prediction is not None:
        sched_config["prediction_type"] = prediction
    scheduler = DDPMScheduler.from_config(sched_config)
    return dict(unet=unet.eval(), text_encoder=text_encoder.eval(), vae=vae.eval(), scheduler=scheduler)


# ---- the entry points -----------------------------------------------------------------------------
def load_single_file(path: str | os.PathLike, device: str | torch.device = "cpu",
                     weight_dtype: torch.dtype = torch.float32, tokenizer: str | os.PathLike | None = None,
                     config_dir: str | os.PathLike | None = None) -> DiffusersBackend:
    """A :class:`DiffusersBackend` from an SD1.x/SD2.x single-file checkpoint, fully offline.

    tokenizer: folder with the CLIP vocab.json + merges.txt, or a diffusers model folder (default:
        searched, see :func:`find_tokenizer`).
    config_dir: diffusers config folder for the architecture (default: the shipped SD1.5 or SD2
        configs, chosen from the checkpoint).
    """
    path = Path(path)
    source = str(path)
    shapes = read_shapes(path)  # safetensors: the header only, so a wrong file fails in milliseconds
    arch = checkpoint_arch(shapes, source) if shapes is not None else None
    tok_dir = find_tokenizer(tokenizer)
    state_dict = read_state_dict(path)
    if arch is None:  # .ckpt: the whole file had to be read to see its names
        arch = checkpoint_arch({k: tuple(v.shape) for k, v in state_dict.items()}, source)
    config_dir = Path(config_dir) if config_dir is not None else SHIPPED_CONFIGS[arch]
    log.info("loading %s checkpoint %s (configs %s, tokenizer %s)", arch.upper(), path.name, config_dir, tok_dir)
    parts = build_components(state_dict, arch, config_dir, source, dtype=weight_dtype)
    del state_dict
    tok = load_tokenizer(tok_dir, arch, parts["text_encoder"].config.max_position_embeddings)
    if len(tok) > parts["text_encoder"].config.vocab_size:
        raise ModelLoadError(
            f"the tokenizer in {tok_dir} has {len(tok)} tokens but the text encoder of {source} knows "
            f"{parts['text_encoder'].config.vocab_size}; pass the CLIP tokenizer that belongs to this model"
        )
    backend = DiffusersBackend(parts["unet"], parts["text_encoder"], tok, parts["vae"], parts["scheduler"],
                               device=device, weight_dtype=weight_dtype, model_name=path.name)
    log.info("loaded %s (%s, %s)", path.name, arch.upper(), backend.prediction_type)
    return backend


def load_model(model: str | os.PathLike, device: str | torch.device = "cpu",
               weight_dtype: torch.dtype = torch.float32, tokenizer: str | os.PathLike | None = None,
               config_dir: str | os.PathLike | None = None) -> DiffusersBackend:
    """A diffusers folder or a single-file checkpoint, whichever ``model`` is."""
    from .flux import FP8, DiffusersFluxBackend, pipeline_family

    model = Path(model)
    if model.is_dir():
        if tokenizer is not None or config_dir is not None:
            log.warning("%s is a diffusers folder: its own tokenizer and configs are used, "
                        "not --tokenizer/--model-config", model)
        if pipeline_family(model) is not None:  # FluxPipeline / ChromaPipeline
            return DiffusersFluxBackend.from_pretrained(model, device, weight_dtype)
        from .sd3 import DiffusersSD3Backend, is_sd3_pipeline

        if is_sd3_pipeline(model):
            return DiffusersSD3Backend.from_pretrained(model, device, weight_dtype)
        from .zimage import DiffusersZImageBackend, is_zimage_pipeline

        if is_zimage_pipeline(model):
            return DiffusersZImageBackend.from_pretrained(model, device, weight_dtype)
        from .flux2 import DiffusersFlux2Backend, is_flux2_pipeline

        if is_flux2_pipeline(model):
            return DiffusersFlux2Backend.from_pretrained(model, device, weight_dtype)
        from .qwen_image import DiffusersQwenImageBackend, is_qwen_image_pipeline

        if is_qwen_image_pipeline(model):
            return DiffusersQwenImageBackend.from_pretrained(model, device, weight_dtype)
    if weight_dtype == FP8:
        raise ModelLoadError(f"fp8 base weights are supported for Flux, Chroma, SD3, Z-Image, FLUX.2 klein and "
                             f"Qwen-Image diffusers folders only, and {model} is not one; use --weight-dtype fp16, "
                             "bf16 or fp32")
    if model.is_dir():
        return DiffusersBackend.from_pretrained(model, device, weight_dtype)
    return load_single_file(model, device, weight_dtype, tokenizer=tokenizer, config_dir=config_dir)
