"""Flux.1 (dev, schnell) and Chroma in diffusers classes, for the CLI: rectified-flow DiTs.

The model is diffusers' ``FluxTransformer2DModel`` (or ``ChromaTransformer2DModel``) with CLIP-L
(pooled, Flux only), T5 and a 16-channel ``AutoencoderKL``, used exactly as ``FluxPipeline`` /
``ChromaPipeline`` use them: latents packed into 2x2 patches, ``timestep=sigma`` (the transformer
multiplies by 1000), position ids for text and image tokens, the distilled guidance embedding of
Flux dev at 1.0 while training (3.5 for samples), VAE latents shifted and scaled.

LoRA files are kohya's Flux format, over the BFL (ComfyUI) modules: one module per fused layer
(``double_blocks.N.img_attn.qkv``, ``single_blocks.N.linear1`` ...). diffusers splits some of those
layers (``attn.to_q``/``to_k``/``to_v``; single blocks' q, k, v and MLP-in), so each split part is
trained as its own peft LoRA and :meth:`DiffusersFluxBackend.finalize_lora` joins the parts into
one module exactly: ``down`` stacked, ``up`` block-diagonal, rank and alpha times the part count
(the same ``delta W`` row block by row block). diffusers' own kohya Flux reader
(``lora_conversion_utils._convert_kohya_flux_lora_to_diffusers``) recognises that block-diagonal
layout and splits it back; :meth:`split_lora` does the same for a resume.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..lora.files import LoraModule, LoraWeights
from ..lora.fuse import fuse_modules
from ..lora.network import LoraTarget
from .backend import Backend, ModelLoadError, _clamped
from .dit_keys import diffusers_to_bfl, kohya_dit_name, matches_preset

log = logging.getLogger(__name__)

PIPELINES = {"FluxPipeline": "flux", "ChromaPipeline": "chroma"}
FP8 = torch.float8_e4m3fn


def _part_name(kohya: str, part: int) -> str:
    return f"{kohya}.part{part}"  # a dot never occurs in a kohya name: these never reach a file


def split_targets(transformer: nn.Module, arch: str, preset: str
                  ) -> tuple[list[LoraTarget], dict[str, list[tuple[str, int]]]]:
    """The preset's Linears of a diffusers transformer of family ``arch`` as LoRA targets named by the family's
    modules, each part of a fused module (q / k / v of a BFL ``qkv``) its own target; and, per fused module, its
    parts' (target name, rows) in row order, for joining them back (``finalize_lora``)."""
    out, parts = [], {}
    for path, m in transformer.named_modules():
        hit = diffusers_to_bfl(path, arch) if isinstance(m, nn.Linear) else None
        if hit is None or not matches_preset(hit[0], preset, arch):
            continue
        bfl, part, n = hit
        name = kohya_dit_name(bfl)
        if n > 1:
            parts.setdefault(name, [None] * n)[part] = (_part_name(name, part), m.out_features)
            name = _part_name(name, part)
        out.append(LoraTarget("unet", path, name, False))
    broken = [k for k, v in parts.items() if None in v]
    if broken:
        raise ValueError(f"the transformer lacks parts of the fused layers {broken[:3]}; it is not a {arch} layout")
    return out, parts


def split_fused(m: LoraModule, out_dims: list[int], name: str) -> list[LoraModule]:
    """The inverse of ``lora.fuse.fuse_modules`` for parts of equal rank, at the parts' rank (what a resume
    injects; ``fuse.split_module`` keeps the fused rank): a ValueError when ``m`` is not block-diagonal
    (a LoRA trained on the fused layer, whose parts share one down projection)."""
    n = len(out_dims)
    if m.rank % n or m.up.shape[0] != sum(out_dims):
        raise ValueError(f"{name}: rank {m.rank} / {m.up.shape[0]} rows cannot be split into {n} parts of "
                         f"{out_dims} rows")
    r = m.rank // n
    out, o = [], 0
    for i, d in enumerate(out_dims):
        block = m.up[o:o + d]
        off = torch.cat([block[:, :i * r], block[:, (i + 1) * r:]], dim=1)
        if off.count_nonzero():
            raise ValueError(f"{name} is not block-diagonal (its parts share a down projection), so it cannot be "
                             "loaded into diffusers' split layers at the same rank; resume only from states this "
                             "trainer wrote")
        out.append(LoraModule(down=m.down[i * r:(i + 1) * r].clone(), up=block[:, i * r:(i + 1) * r].clone(),
                              alpha=m.alpha / n))
        o += d
    return out


@dataclass
class FluxCond:
    """Flux/Chroma conditioning for a batch.

    context: T5's last hidden states [B, L, 4096]. pooled: CLIP-L's pooled output [B, 768] (Flux;
    None for Chroma). mask: T5 token mask [B, L] (Chroma: text tokens up to and including the first
    padding token; None for Flux). guidance: the distilled guidance value (Flux dev: 1.0 training).
    """

    context: torch.Tensor
    pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    guidance: float = 1.0

    def _map(self, fn) -> "FluxCond":
        opt = (lambda t: None if t is None else fn(t))
        return FluxCond(fn(self.context), opt(self.pooled), opt(self.mask), self.guidance)

    def __getitem__(self, index) -> "FluxCond":
        return self._map(lambda t: t[index])

    def __len__(self) -> int:
        return self.context.shape[0]

    def detach(self) -> "FluxCond":
        """A copy with every tensor detached from the graph."""
        return self._map(torch.Tensor.detach)

    def to(self, *args: Any, **kwargs: Any) -> "FluxCond":
        """A copy with ``Tensor.to(*args, **kwargs)`` applied to every tensor."""
        return self._map(lambda t: t.to(*args, **kwargs))

    @staticmethod
    def cat(conds: list["FluxCond"]) -> "FluxCond":
        """The batches joined along dim 0 (the first one's guidance)."""
        def join(ts):
            return None if ts[0] is None else torch.cat(ts)

        return FluxCond(torch.cat([c.context for c in conds]), join([c.pooled for c in conds]),
                        join([c.mask for c in conds]), conds[0].guidance)


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C]: FluxPipeline._pack_latents."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for latents of height ``h`` and width ``w``."""
    b, _, ch = x.shape
    return x.view(b, h // 2, w // 2, ch // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, ch // 4, h, w)


def image_ids(h2: int, w2: int, device, dtype) -> torch.Tensor:
    """Position ids [h2 * w2, 3] of the packed image tokens: FluxPipeline._prepare_latent_image_ids."""
    ids = torch.zeros(h2, w2, 3)
    ids[..., 1] += torch.arange(h2)[:, None]
    ids[..., 2] += torch.arange(w2)[None, :]
    return ids.reshape(h2 * w2, 3).to(device=device, dtype=dtype)


@torch.no_grad()
def encode_shifted(vae, pixels: torch.Tensor, device) -> torch.Tensor:
    """Latents from a 16-channel VAE's mode as Flux's and SD3's pipelines make them:
    ``(z - shift_factor) * scaling_factor``, float32."""
    vae_dtype = next(vae.parameters()).dtype
    lat = vae.encode(pixels.to(device, dtype=vae_dtype)).latent_dist.mode()
    shift = vae.config.get("shift_factor") or 0.0
    return ((lat - shift) * vae.config.scaling_factor).float()


@torch.no_grad()
def decode_shifted(vae, latents: torch.Tensor, device) -> torch.Tensor:
    """The inverse of :func:`encode_shifted`, decoded: images [B, H, W, 3] in 0..1, float32 on the CPU."""
    vae_dtype = next(vae.parameters()).dtype
    shift = vae.config.get("shift_factor") or 0.0
    img = vae.decode(latents.to(device, dtype=vae_dtype) / vae.config.scaling_factor + shift).sample.float()
    return ((img + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu()


class DiffusersFluxBackend(Backend):
    """Flux.1 dev/schnell (``FluxTransformer2DModel`` + CLIP-L + T5) or Chroma (``ChromaTransformer2DModel``
    + T5) with a 16-channel VAE and ``FlowMatchEulerDiscreteScheduler``; prediction type "flow".

    weight_dtype: the base weights' dtype; ``torch.float8_e4m3fn`` stores the transformer and T5 in
    fp8 and computes in bf16 (diffusers' layerwise casting), as ComfyUI's ``fp8_e4m3fn`` weight dtype.
    """

    prediction_type = "flow"
    patch_size = 2

    def __init__(self, transformer, vae, scheduler, t5, t5_tokenizer, clip=None, clip_tokenizer=None,
                 device: str | torch.device = "cpu", weight_dtype: torch.dtype = torch.float32, model_name: str = "",
                 max_sequence_length: int | None = None):
        self.transformer, self.vae, self.scheduler = transformer, vae, scheduler
        self.t5, self.t5_tokenizer, self.clip, self.clip_tokenizer = t5, t5_tokenizer, clip, clip_tokenizer
        self.device = torch.device(device)
        self.model_name = model_name
        chroma = type(transformer).__name__.startswith("Chroma")
        self.arch = "chroma" if chroma else "flux"
        if not chroma and (clip is None or clip_tokenizer is None):
            raise ModelLoadError("Flux needs its CLIP-L text encoder and tokenizer (text_encoder/, tokenizer/) for "
                                 "the pooled text embedding; pass them")
        self.guidance_embeds = bool(transformer.config.get("guidance_embeds", False))
        # The checkpoint within the family, for modelspec.architecture: Flux.1 "dev" (guidance-distilled) or
        # "schnell"; Chroma has one.
        self.variant = None if chroma else ("dev" if self.guidance_embeds else "schnell")
        self.fp8 = weight_dtype == FP8
        self.weight_dtype = torch.bfloat16 if self.fp8 else weight_dtype  # the compute dtype
        self.dtype = weight_dtype  # the stored base weights' dtype (fp8 in the memory estimate)
        self.latent_channels = transformer.config.in_channels // 4
        blocks = getattr(vae.config, "block_out_channels", None)
        self.latent_factor = 2 ** (len(blocks) - 1) if blocks else 8
        # kohya trains dev with 512 T5 tokens and schnell with 256; a tokenizer may allow fewer.
        default_len = 256 if self.variant == "schnell" else 512
        self.max_sequence_length = max_sequence_length or min(default_len, t5_tokenizer.model_max_length)
        sc = scheduler.config
        self.timestep_sampling_default = "logit_normal" if self.variant == "schnell" else "flux_shift"
        self.flow_shift = float(sc.get("shift", 1.0))
        self.preview_guidance = 4.0 if chroma else 1.0
        for m in (transformer, vae, t5, clip):
            if m is None:
                continue
            m.requires_grad_(False)
            m.eval()
            m.to(self.device)
            if any(p.dtype != self.weight_dtype for p in m.parameters()):
                m.to(dtype=self.weight_dtype)
        if weight_dtype == torch.float16 and self.device.type != "cpu":
            vae.to(dtype=torch.float32)  # fp16 VAEs overflow on large images
        if self.fp8:
            from diffusers.hooks import apply_layerwise_casting
            from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

            # Stored in fp8, each layer's weights cast to bf16 just for its forward (norms and
            # embeddings stay bf16: diffusers' default skip list). T5's feed-forward output layers stay
            # bf16 too: T5 casts its activations to their weight dtype before calling them.
            transformer.enable_layerwise_casting(storage_dtype=FP8, compute_dtype=torch.bfloat16)
            apply_layerwise_casting(t5, storage_dtype=FP8, compute_dtype=torch.bfloat16,
                                    skip_modules_pattern=(*DEFAULT_SKIP_MODULES_PATTERN, r"\.wo$"))
        self._parts: dict[str, list[tuple[str, int]]] = {}  # fused kohya name -> [(part name, out rows)]

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        weight_dtype: torch.dtype = torch.float32) -> "DiffusersFluxBackend":
        """A diffusers FluxPipeline / ChromaPipeline folder, offline; ``ModelLoadError`` naming what is missing."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

        path = Path(path)
        family = pipeline_family(path)
        if family is None:
            raise ModelLoadError(f"{path} is not a diffusers Flux or Chroma folder (its model_index.json names no "
                                 f"{' or '.join(PIPELINES)})")
        t5_dir, t5_tok = ("text_encoder_2", "tokenizer_2") if family == "flux" else ("text_encoder", "tokenizer")
        need = ["transformer", "vae", "scheduler", t5_dir, t5_tok] + (
            ["text_encoder", "tokenizer"] if family == "flux" else [])
        missing = [d for d in need if not (path / d).is_dir()]
        if missing:
            raise ModelLoadError(f"{path} ({family}) lacks the sub-folders {missing}; download the complete "
                                 "diffusers model folder")
        kw = dict(local_files_only=True)
        load_dtype = torch.bfloat16 if weight_dtype == FP8 else weight_dtype
        mkw = dict(kw, torch_dtype=load_dtype)
        if family == "flux":
            from diffusers import FluxTransformer2DModel as Transformer
        else:
            from diffusers import ChromaTransformer2DModel as Transformer
        transformer = Transformer.from_pretrained(path, subfolder="transformer", **mkw)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **mkw)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", **kw)
        t5 = T5EncoderModel.from_pretrained(path, subfolder=t5_dir, **mkw)
        t5_tokenizer = AutoTokenizer.from_pretrained(path, subfolder=t5_tok, **kw)
        clip = clip_tokenizer = None
        if family == "flux":
            clip = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **mkw)
            clip_tokenizer = _clamped(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw), clip,
                                      path / "tokenizer")
        return cls(transformer, vae, scheduler, t5, t5_tokenizer, clip, clip_tokenizer, device=device,
                   weight_dtype=weight_dtype, model_name=path.name)

    # ---- Backend -----------------------------------------------------------------------------
    def roots(self) -> dict[str, nn.Module]:
        """``{"unet": transformer}``: the only trainable root (its kohya prefix is ``lora_unet_``)."""
        return {"unet": self.transformer}

    def lora_targets(self, preset: str, text_encoder: bool) -> list[LoraTarget]:
        """The preset's transformer Linears, each split part of a fused BFL layer as its own target."""
        if text_encoder:
            raise ValueError(f"text-encoder training is not supported for {self.arch} (its LoRA files and kohya's "
                             "Flux trainer train the transformer only); turn off train_text_encoder "
                             "(--no-train-text-encoder)")
        out, self._parts = split_targets(self.transformer, self.arch, preset)
        return out

    def finalize_lora(self, lora: LoraWeights) -> LoraWeights:
        """The trained split parts joined into kohya's fused Flux modules, exactly (``lora.fuse.fuse_modules``)."""
        mods = dict(lora.modules)
        for name, parts in self._parts.items():
            if any(p in mods for p, _ in parts):
                mods[name] = fuse_modules([mods.pop(p) for p, _ in parts])
        return dataclasses.replace(lora, modules=mods)

    def joins_split_layers(self) -> bool:
        """True once the targets include parts of a fused layer (q / k / v of ``qkv``), which the file joins."""
        return bool(self._parts)

    def split_lora(self, lora: LoraWeights) -> LoraWeights:
        """The inverse of :meth:`finalize_lora` (for a resume): fused modules back into the trained parts."""
        mods = dict(lora.modules)
        for name, parts in self._parts.items():
            if name in mods:
                mods.update(zip([p for p, _ in parts], split_fused(mods.pop(name), [d for _, d in parts], name)))
        return dataclasses.replace(lora, modules=mods)

    def alphas_cumprod(self) -> torch.Tensor:
        """Not defined: a flow model has no DDPM schedule."""
        raise NotImplementedError(f"{self.arch} is a flow-matching model: it has no alphas_cumprod")

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents [B, 16, h, w], as FluxPipeline makes them (:func:`encode_shifted`)."""
        return encode_shifted(self.vae, pixels, self.device)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B, H, W, 3] in 0..1, float32 on the CPU (:func:`decode_shifted`)."""
        return decode_shifted(self.vae, latents, self.device)

    def encode_prompts(self, prompts: list[str]) -> FluxCond:
        """T5's last hidden states, and CLIP-L's pooled output (Flux) or the token mask (Chroma), as the pipelines."""
        tok = self.t5_tokenizer(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                                return_tensors="pt")
        ids = tok.input_ids.to(self.device)
        if self.arch == "chroma":
            # ChromaPipeline: T5 reads its mask; the transformer sees the text up to the first pad token.
            tmask = tok.attention_mask.to(self.device)
            context = self.t5(ids, attention_mask=tmask)[0]
            keep = torch.arange(tmask.shape[1], device=self.device)[None] <= tmask.sum(1, keepdim=True)
            return FluxCond(context, None, keep.float())
        context = self.t5(ids)[0]
        clip_ids = self.clip_tokenizer(prompts, padding="max_length", max_length=self.clip_tokenizer.model_max_length,
                                       truncation=True, return_tensors="pt").input_ids.to(self.device)
        pooled = self.clip(clip_ids).pooler_output
        return FluxCond(context, pooled)

    def predict(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: FluxCond) -> torch.Tensor:
        """The velocity ``noise - x0`` predicted for latents ``x_t`` [B, C, h, w] at ``sigma`` [B] in [0, 1]."""
        b, _, h, w = x_t.shape
        dt = self.weight_dtype
        hidden = pack_latents(x_t.to(dt))
        img_ids = image_ids(h // 2, w // 2, x_t.device, dt)
        txt_ids = torch.zeros(cond.context.shape[1], 3, device=x_t.device, dtype=dt)
        kw = dict(hidden_states=hidden, timestep=sigma.to(x_t.device, dt), encoder_hidden_states=cond.context.to(dt),
                  txt_ids=txt_ids, img_ids=img_ids, return_dict=False)
        if self.arch == "chroma":
            if cond.mask is not None:
                kw["attention_mask"] = torch.cat([cond.mask.to(x_t.device, dt),
                                                  torch.ones(b, hidden.shape[1], device=x_t.device, dtype=dt)], 1)
        else:
            kw["pooled_projections"] = cond.pooled.to(dt)
            if self.guidance_embeds:
                kw["guidance"] = torch.full((b,), cond.guidance, device=x_t.device, dtype=torch.float32)
        return unpack_latents(self.transformer(**kw)[0], h, w)

    def cat_cond(self, conds: list[FluxCond]) -> FluxCond:
        """The batches joined with :meth:`FluxCond.cat`."""
        return FluxCond.cat(conds)

    def sampling_cond(self, cond: FluxCond) -> FluxCond:
        """Flux dev samples with distilled guidance 3.5 (FluxPipeline's default), trained at 1.0."""
        return dataclasses.replace(cond, guidance=3.5) if self.guidance_embeds else cond

    def flow_sigmas(self, steps: int, latent_shape) -> torch.Tensor:
        """FluxPipeline's schedule: ``linspace(1, 1/steps)`` through the scheduler's shift (mu from the image's
        token count when ``use_dynamic_shifting``), then 0; float32 [steps + 1]."""
        import numpy as np
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        h, w = latent_shape[-2:]
        sc = sched.config
        mu = None
        if sc.get("use_dynamic_shifting"):
            tokens = (h // self.patch_size) * (w // self.patch_size)
            lo, hi = sc.get("base_image_seq_len", 256), sc.get("max_image_seq_len", 4096)
            base, top = sc.get("base_shift", 0.5), sc.get("max_shift", 1.15)
            mu = base + (top - base) * (tokens - lo) / (hi - lo)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        return sched.sigmas.float().cpu()

    def enable_gradient_checkpointing(self) -> None:
        """diffusers' gradient checkpointing over the transformer blocks."""
        self.transformer.enable_gradient_checkpointing()

    def memory_shape(self):
        """The transformer, text encoders and VAE as a DiT ``memory.ModelShape``, for the memory estimate."""
        from ..train.memory import shape_from_diffusers_dit

        encoders = [e for e in (self.clip, self.t5) if e is not None]
        return shape_from_diffusers_dit(self.transformer, encoders, self.vae, self.model_name or self.arch,
                                        context_tokens=self.max_sequence_length)


def pipeline_family(folder: str | os.PathLike) -> str | None:
    """"flux" / "chroma" for a diffusers folder whose model_index.json names FluxPipeline / ChromaPipeline
    (None for anything else)."""
    index = Path(folder) / "model_index.json"
    try:
        name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError):
        return None
    return PIPELINES.get(name)
