"""The engine's view of a model: a small interface any host implements.

The training loop only ever calls these methods, so the ComfyUI backend (built on ComfyUI's own
MODEL/CLIP/VAE objects) and the diffusers backend here plug into the same loop.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import LoraWorkbenchError
from . import keys as uk
from ..lora.network import LoraTarget, kohya_name_fn, select_text_encoder_targets, select_unet_targets

if TYPE_CHECKING:
    from ..lora.files import LoraWeights
    from ..train.memory import ModelShape

log = logging.getLogger(__name__)


class ModelLoadError(LoraWorkbenchError, ValueError):
    """A base model could not be loaded; the message says which file is wrong and what to pass."""


class Backend(ABC):
    """What the training loop needs from a model."""

    arch: str = "sd1"  # "sd1", "sd2", "sdxl": decides file naming and metadata
    prediction_type: str = "epsilon"  # "epsilon" | "v_prediction" (DDPM) | "flow" (rectified flow)
    device: torch.device = torch.device("cpu")
    model_name: str = ""  # shown in the LoRA's metadata (ss_sd_model_name)
    latent_factor: int = 8  # pixels per latent pixel
    latent_channels: int = 4
    # ---- flow models (prediction_type "flow": x_t = (1 - s) x0 + s noise, target noise - x0) ----------
    timestep_sampling_default: str = "uniform"  # what TrainConfig.timestep_sampling "default" means here
    flow_shift: float = 1.0  # the model's sampling shift; timestep_sampling "shift" uses it unless cfg.flow_shift
    patch_size: int = 1  # latent pixels per token side: image tokens = (h // patch) * (w // patch)
    preview_guidance: float = 7.0  # classifier-free guidance scale of previews (1.0: no negative pass)

    @abstractmethod
    def roots(self) -> dict[str, nn.Module]:
        """The trainable component roots by name: {"unet": ..., "te": ...}."""

    @abstractmethod
    def lora_targets(self, preset: str, text_encoder: bool) -> list[LoraTarget]:
        """The modules a preset trains, with their kohya names."""

    @abstractmethod
    def alphas_cumprod(self) -> torch.Tensor:
        """The training noise schedule, shape [num_train_timesteps], float32 on ``device``.

        Called for DDPM models only (epsilon, v_prediction); a flow backend may raise ``NotImplementedError``."""

    @abstractmethod
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [-1,1] -> scaled latents [B,C,h,w] (no grad)."""

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> Any:
        """Captions -> conditioning the denoiser takes (grad flows when the text encoder trains)."""

    @abstractmethod
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """The denoiser's output for noisy latents ``x_t``.

        DDPM models: ``t`` holds integer timesteps [B]. Flow models: ``t`` is sigma, float32 [B] in [0, 1],
        and the backend maps it to its model's timestep itself (ComfyUI ``model_sampling.timestep``;
        diffusers' Flux transformer takes ``timestep=sigma``); the output is the velocity noise - x0."""

    def compute_devices(self) -> dict[str, torch.device]:
        """Where each root computes: LoRA weights are put there."""
        return {name: self.device for name in self.roots()}

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images [B, H, W, 3] in 0..1 (for previews)."""
        raise NotImplementedError(f"{type(self).__name__} cannot decode previews")

    def enable_gradient_checkpointing(self) -> None:
        """Trade compute for memory in the trainable roots; this default raises ``NotImplementedError``."""
        raise NotImplementedError(f"{type(self).__name__} has no gradient checkpointing")

    def sampling_cond(self, cond: Any) -> Any:
        """The conditioning as a sampler uses it (previews); this default returns ``cond`` unchanged.

        Flux dev: the same text with distilled guidance 3.5 in place of the training value 1.0."""
        return cond

    def flow_sigmas(self, steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """A flow model's sampling schedule for previews: ``steps + 1`` sigmas from ~1 down to 0 (float32, CPU).

        ComfyUI: ``calculate_sigmas(model_sampling, "simple", steps)``; diffusers: FlowMatchEulerDiscreteScheduler
        with the model's shift / mu for ``latent_shape``. This default raises ``NotImplementedError``."""
        raise NotImplementedError(f"{type(self).__name__} has no flow sampling schedule")

    def memory_shape(self) -> ModelShape | None:
        """The model's shape for the memory estimate (a ``memory.ModelShape``), or None if unknown."""
        return None

    # Whether :meth:`release_text_encoders` gives memory back (a host with its own model management).
    releases_text_encoders = False

    def release_text_encoders(self) -> bool:
        """Give the text encoders' memory back once every prompt the run needs is encoded (cached); True if
        something was released. A later encode must still work (the host reloads them). Default: nothing."""
        return False

    def finalize_lora(self, lora: LoraWeights) -> LoraWeights:
        """The LoRA as read out of the trained modules, in the file's modules; this default is ``lora``.

        A backend whose model splits layers the file format keeps whole (diffusers Flux's q/k/v) joins them here."""
        return lora

    def split_lora(self, lora: LoraWeights) -> LoraWeights:
        """The inverse of :meth:`finalize_lora`, for a resume; this default is ``lora``."""
        return lora

    def joins_split_layers(self) -> bool:
        """Whether :meth:`finalize_lora` joins layers trained apart into one module of the file (only a LoRA
        joins exactly; a trainer refuses LoHa / LoKr then); this default is False."""
        return False

    def cat_cond(self, conds: list[Any]) -> Any:
        """Several batches' conditioning (from :meth:`encode_prompts`) as one; this default is ``torch.cat``."""
        return torch.cat(conds)

    def add_size_conditioning(self, cond: Any, sizes: list[dict]) -> Any:
        """``cond`` with each sample's image geometry (SDXL's size and crop conditioning).

        ``sizes`` has one dict per sample, as :func:`dataset.size_conditioning` gives: ``original_size``
        (h, w), ``crop_top_left`` (top, left), ``target_size`` (h, w). Models without such
        conditioning (SD1/SD2) ignore it.
        """
        return cond


def _clamped(tokenizer, text_encoder, where):
    """The tokenizer with ``model_max_length`` at most the text encoder's position count.

    Some tokenizer folders declare absurd lengths (ComfyUI's sd1_tokenizer says 8192): padding to
    that breaks the text encoder, which has 77 positions."""
    positions = text_encoder.config.max_position_embeddings
    if tokenizer.model_max_length > positions:
        log.warning("%s declares model_max_length %d but the text encoder has %d positions; using %d",
                    where, tokenizer.model_max_length, positions, positions)
        tokenizer.model_max_length = positions
    return tokenizer


class DiffusersBackend(Backend):
    """SD1.x/SD2.x in diffusers classes: UNet2DConditionModel + CLIPTextModel + AutoencoderKL/Tiny."""

    def __init__(self, unet, text_encoder, tokenizer, vae, scheduler, device: str | torch.device = "cpu",
                 weight_dtype: torch.dtype = torch.float32, model_name: str = ""):
        self.unet, self.text_encoder, self.tokenizer, self.vae = unet, text_encoder, tokenizer, vae
        self.device = torch.device(device)
        self.weight_dtype = weight_dtype
        self.model_name = model_name
        self.prediction_type = scheduler.config.prediction_type
        self._alphas = scheduler.alphas_cumprod.detach().clone().float()
        blocks = getattr(vae.config, "block_out_channels", None)
        self.latent_factor = 2 ** (len(blocks) - 1) if blocks and hasattr(vae, "quant_conv") else 8
        self.latent_channels = unet.config.in_channels
        cross = unet.config.cross_attention_dim
        self.arch = "sd2" if cross == 1024 else "sd1"
        for m in (unet, text_encoder, vae):
            m.requires_grad_(False)
            m.eval()
            m.to(self.device)
            if any(p.dtype != weight_dtype for p in m.parameters()):
                m.to(dtype=weight_dtype)
        # The VAE runs in fp32 where it can: fp16 SD VAEs overflow to NaN on large images.
        if weight_dtype == torch.float16 and self.device.type != "cpu":
            vae.to(dtype=torch.float32)

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        weight_dtype: torch.dtype = torch.float32) -> "DiffusersBackend":
        """A diffusers folder (model_index.json + unet/ text_encoder/ tokenizer/ vae/ scheduler/), offline.

        A folder with text_encoder_2/ gives an :class:`SDXLDiffusersBackend`; a bad folder raises ``ModelLoadError``.
        """
        from diffusers import AutoencoderKL, AutoencoderTiny, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        path = Path(path)
        missing = [d for d in ("unet", "text_encoder", "tokenizer", "vae", "scheduler") if not (path / d).is_dir()]
        if not (path / "model_index.json").is_file() or missing:
            raise ModelLoadError(
                f"{path} is not a diffusers model folder (needs model_index.json and sub-folders "
                f"unet/ text_encoder/ tokenizer/ vae/ scheduler/; missing: {missing or ['model_index.json']}). "
                "Pass a diffusers folder or a single-file .safetensors checkpoint."
            )
        kw = dict(local_files_only=True)
        # Loaded in the dtype asked for: an SDXL UNet read in fp32 and cast afterwards peaks at ~10 GB.
        mkw = dict(kw, torch_dtype=weight_dtype)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **mkw)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **mkw)
        tokenizer = _clamped(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw), text_encoder,
                             path / "tokenizer")
        vae_cfg = (path / "vae" / "config.json").read_text()
        vae_cls = AutoencoderTiny if '"AutoencoderTiny"' in vae_cfg else AutoencoderKL
        vae = vae_cls.from_pretrained(path, subfolder="vae", **mkw)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
        if (path / "text_encoder_2").is_dir():  # SDXL: a second (CLIP-G) encoder and tokenizer
            from transformers import CLIPTextModelWithProjection

            if not (path / "tokenizer_2").is_dir():
                raise ModelLoadError(f"{path} has text_encoder_2/ (SDXL) but no tokenizer_2/; copy the model's "
                                     "tokenizer_2 folder there")
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **mkw)
            tokenizer_2 = _clamped(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **kw), text_encoder_2,
                                   path / "tokenizer_2")
            return SDXLDiffusersBackend(unet, text_encoder, text_encoder_2, tokenizer, tokenizer_2, vae, scheduler,
                                        device=device, weight_dtype=weight_dtype, model_name=path.name)
        return cls(unet, text_encoder, tokenizer, vae, scheduler, device=device, weight_dtype=weight_dtype,
                   model_name=path.name)

    # ---- Backend -----------------------------------------------------------------------------
    def roots(self) -> dict[str, nn.Module]:
        """``{"unet": UNet, "te": CLIP text encoder}``."""
        return {"unet": self.unet, "te": self.text_encoder}

    def lora_targets(self, preset: str, text_encoder: bool) -> list[LoraTarget]:
        """The preset's UNet modules (kohya SD1 names), plus the text encoder's (``te``) when asked."""
        unet_name = kohya_name_fn("lora_unet_")
        out = [LoraTarget("unet", p, unet_name(p), conv)
               for p, conv in select_unet_targets(self.unet.named_modules(), preset)]
        if text_encoder:
            out += [LoraTarget("te", p, uk.kohya_te_name(p, "te"), False)
                    for p in select_text_encoder_targets(self.text_encoder.named_modules())]
        return out

    def alphas_cumprod(self) -> torch.Tensor:
        """The scheduler's ``alphas_cumprod`` as float32 on ``device`` (a copy taken at construction)."""
        return self._alphas.to(self.device)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Float32 latents from the VAE's mode (no sampling: cached and fresh latents match), shifted and scaled."""
        vae_dtype = next(self.vae.parameters()).dtype
        x = pixels.to(self.device, dtype=vae_dtype)
        out = self.vae.encode(x)
        if hasattr(out, "latent_dist"):
            # The mode, not a sample: cached latents then equal uncached ones exactly.
            lat = out.latent_dist.mode()
        else:  # AutoencoderTiny returns latents directly
            lat = out.latents
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((lat - shift) * self.vae.config.scaling_factor).float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B, H, W, 3] in 0..1, float32 on the CPU, decoded by the VAE without grad."""
        vae_dtype = next(self.vae.parameters()).dtype
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        z = latents.to(self.device, dtype=vae_dtype) / self.vae.config.scaling_factor + shift
        img = self.vae.decode(z).sample.float()
        return ((img + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu()

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """The text encoder's last hidden states [B, tokens, width], prompts padded/cut to ``model_max_length``."""
        tok = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        ids = tok.input_ids.to(self.device)
        return self.text_encoder(ids)[0]

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The UNet's output for ``x_t`` at ``t``, inputs cast to ``weight_dtype``."""
        return self.unet(x_t.to(self.weight_dtype), t, encoder_hidden_states=cond.to(self.weight_dtype)).sample

    def enable_gradient_checkpointing(self) -> None:
        """Turn on gradient checkpointing in the UNet, and in the text encoder where it supports it."""
        self.unet.enable_gradient_checkpointing()
        if hasattr(self.text_encoder, "gradient_checkpointing_enable"):
            self.text_encoder.gradient_checkpointing_enable()

    def memory_shape(self) -> ModelShape:
        """The shape read from the loaded UNet, text encoder(s) and VAE, for the memory estimate."""
        from ..train.memory import shape_from_diffusers

        encoders = [self.text_encoder] + ([self.text_encoder_2] if hasattr(self, "text_encoder_2") else [])
        return shape_from_diffusers(self.unet, encoders, self.vae, self.model_name or self.arch.upper())


# ---- SDXL ----------------------------------------------------------------------------------------
@dataclass
class SDXLCond:
    """SDXL's conditioning for a batch.

    context: both encoders' penultimate hidden states side by side, [B, 77, 768 + 1280].
    pooled: CLIP-G's pooled, projected output, [B, 1280] (with the size ids, the UNet's ``y``).
    time_ids: per sample original (h, w), crop (top, left), target (h, w), [B, 6]; None until
        :meth:`Backend.add_size_conditioning` sets them (the prediction then assumes an uncropped
        image of the latent's size, as a pipeline does for a new image).
    """

    context: torch.Tensor
    pooled: torch.Tensor
    time_ids: torch.Tensor | None = None

    def _map(self, fn) -> "SDXLCond":
        return SDXLCond(fn(self.context), fn(self.pooled), None if self.time_ids is None else fn(self.time_ids))

    def __getitem__(self, index) -> "SDXLCond":
        return self._map(lambda t: t[index])

    def __len__(self) -> int:
        return self.context.shape[0]

    def detach(self) -> "SDXLCond":
        """A copy with every tensor detached from the graph."""
        return self._map(torch.Tensor.detach)

    def to(self, *args: Any, **kwargs: Any) -> "SDXLCond":
        """A copy with ``Tensor.to(*args, **kwargs)`` applied to every tensor (device and/or dtype)."""
        return self._map(lambda t: t.to(*args, **kwargs))

    @staticmethod
    def cat(conds: list["SDXLCond"]) -> "SDXLCond":
        """The batches joined along dim 0; ``time_ids`` is None if any of them lacks it."""
        times = [c.time_ids for c in conds]
        return SDXLCond(torch.cat([c.context for c in conds]), torch.cat([c.pooled for c in conds]),
                        None if any(t is None for t in times) else torch.cat(times))


def size_time_ids(sizes: list[dict], device: str | torch.device | None = None) -> torch.Tensor:
    """SDXL's ``add_time_ids``, [B, 6]: original (h, w) + crop top-left (top, left) + target (h, w)."""
    rows = [[*s["original_size"], *s["crop_top_left"], *s["target_size"]] for s in sizes]
    return torch.tensor(rows, dtype=torch.float32, device=device)


class SDXLDiffusersBackend(DiffusersBackend):
    """SDXL in diffusers classes: UNet2DConditionModel (text_time) + CLIPTextModel + CLIPTextModelWithProjection.

    Conditioning is what ``StableDiffusionXLPipeline.encode_prompt`` computes: the penultimate hidden
    states of both encoders concatenated, CLIP-G's pooled projection, and the six size/crop numbers of
    each training image. UNet module names are kohya's SDXL ones (LDM paths, ``lora_unet_input_blocks_*``),
    the encoders' ``lora_te1_`` (CLIP-L) and ``lora_te2_`` (CLIP-G).
    """

    def __init__(self, unet, text_encoder, text_encoder_2, tokenizer, tokenizer_2, vae, scheduler,
                 device: str | torch.device = "cpu", weight_dtype: torch.dtype = torch.float32, model_name: str = ""):
        if unet.config.get("addition_embed_type") != "text_time":
            raise ModelLoadError(
                f"this UNet has addition_embed_type={unet.config.get('addition_embed_type')!r}, not SDXL's "
                "'text_time' (pooled text + size conditioning); load it as an SD1/SD2 model instead"
            )
        width = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
        if width != unet.config.cross_attention_dim:
            raise ModelLoadError(
                f"the two text encoders give {text_encoder.config.hidden_size} + {text_encoder_2.config.hidden_size}"
                f" = {width} wide text but the UNet's cross-attention reads {unet.config.cross_attention_dim}; "
                "the encoders do not belong to this UNet"
            )
        super().__init__(unet, text_encoder, tokenizer, vae, scheduler, device=device, weight_dtype=weight_dtype,
                         model_name=model_name)
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        text_encoder_2.requires_grad_(False)
        text_encoder_2.eval()
        text_encoder_2.to(self.device, dtype=weight_dtype)
        self.arch = "sdxl"
        # kohya names SDXL UNet modules by their LDM path; the layout names them for any SDXL-shaped UNet.
        self.layout = uk.layout_from_diffusers_config(unet.config)

    def roots(self) -> dict[str, nn.Module]:
        """``{"unet": UNet, "te1": CLIP-L, "te2": CLIP-G}``."""
        return {"unet": self.unet, "te1": self.text_encoder, "te2": self.text_encoder_2}

    def lora_targets(self, preset: str, text_encoder: bool) -> list[LoraTarget]:
        """The preset's UNet modules under kohya's SDXL (LDM-path) names, plus both encoders' (te1, te2) if asked."""
        out = [LoraTarget("unet", p, uk.kohya_unet_name(p, "sdxl", self.layout), conv)
               for p, conv in select_unet_targets(self.unet.named_modules(), preset)]
        if text_encoder:
            for comp, te in (("te1", self.text_encoder), ("te2", self.text_encoder_2)):
                out += [LoraTarget(comp, p, uk.kohya_te_name(p, comp), False)
                        for p in select_text_encoder_targets(te.named_modules())]
        return out

    def encode_prompts(self, prompts: list[str]) -> SDXLCond:
        """Both encoders' penultimate hidden states side by side and CLIP-G's pooled output; ``time_ids`` unset."""
        hidden = []
        pooled = None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(self.device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # SDXL reads the penultimate layer of both encoders
            pooled = out[0]  # the last encoder's (CLIP-G's) projected pooled output
        return SDXLCond(torch.cat(hidden, dim=-1), pooled)

    def add_size_conditioning(self, cond: SDXLCond, sizes: list[dict]) -> SDXLCond:
        """``cond`` with ``time_ids`` from ``sizes`` (one per sample, else ``ValueError``)."""
        if len(sizes) != len(cond):
            raise ValueError(f"{len(sizes)} image sizes for {len(cond)} prompts; give one per sample")
        return SDXLCond(cond.context, cond.pooled, size_time_ids(sizes, cond.context.device))

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: SDXLCond) -> torch.Tensor:
        """The UNet's output with pooled text and size ids; without ``time_ids``, an uncropped latent-sized image."""
        time_ids = cond.time_ids
        if time_ids is None:  # a fresh image (previews): uncropped, at the latent's size
            h, w = x_t.shape[-2] * self.latent_factor, x_t.shape[-1] * self.latent_factor
            time_ids = size_time_ids([{"original_size": (h, w), "crop_top_left": (0, 0), "target_size": (h, w)}]
                                     * x_t.shape[0], x_t.device)
        dt = self.weight_dtype
        added = {"text_embeds": cond.pooled.to(dt), "time_ids": time_ids.to(x_t.device, dt)}
        return self.unet(x_t.to(dt), t, encoder_hidden_states=cond.context.to(dt), added_cond_kwargs=added).sample

    def cat_cond(self, conds: list[SDXLCond]) -> SDXLCond:
        """The batches joined with :meth:`SDXLCond.cat`."""
        return SDXLCond.cat(conds)

    def enable_gradient_checkpointing(self) -> None:
        """As for SD1/SD2, and in CLIP-G too where it supports it."""
        super().enable_gradient_checkpointing()
        if hasattr(self.text_encoder_2, "gradient_checkpointing_enable"):
            self.text_encoder_2.gradient_checkpointing_enable()
