"""The engine's ``Backend`` for flow-matching diffusion transformers (Flux.1, Chroma ...) on ComfyUI's
own MODEL / CLIP / VAE: the generic path for any model ComfyUI samples with a CONST (rectified-flow)
objective.

Everything comes from the model as ComfyUI samples it, so training always matches sampling:

* The objective is ComfyUI's ``model_sampling``: ``noise_scaling`` gives ``x_t = s * noise + (1 - s) * x0``
  and ``calculate_denoised`` gives ``x0 = x_t - s * out``, so the raw output's target is ``noise - x0``
  (the engine's "flow" prediction). The diffusion model gets ``calculate_input(s, x_t)`` at
  ``model_sampling.timestep(s)``, as ``BaseModel._apply_model`` feeds it; a ModelSampling* node in the
  graph (e.g. ModelSamplingFlux's resolution shift) is honoured for the default timestep sampling
  and the preview schedule.
* The conditioning is the model's CLIP encode (``encode_token_weights``: T5 hidden states, CLIP-L's
  pooled output for Flux, T5's attention mask for Chroma) turned into the diffusion model's keyword
  arguments by the model's own ``extra_conds`` (Flux: ``y`` = pooled, ``guidance``).
* ``comfy.model_management.in_training`` is set by ``ComfyModels.training_context`` (``host.in_training``),
  so DiT kernels keep gradients.
* Family facts (target presets, file names, guidance while training and sampling, the default timestep
  sampling, the memory shape) come from the family's entry in ``training.model.archs``; a CONST model with
  no entry trains too, every Linear layer named ``lora_unet_<module path>`` (the key form ComfyUI's
  LoraLoader maps for any model), and the node says that family is untested.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

import comfy.model_sampling
import comfy.samplers

from ...training.lora.network import LoraTarget
from ...training.model import archs, dit_keys
from . import host as comfy_host
from .autograd import checkpointed, plain
from .backend import ComfyModels, UnsupportedModelError
from .families import family_variant, model_family

log = logging.getLogger(__name__)

PRESET_WORDS = {  # a family without a table entry: Linear layers whose path has one of these words
    "attn": ("attn", "attention", "qkv", "to_q", "to_k", "to_v", "to_out", "linear1", "linear2"),
    "attn_ff": ("attn", "attention", "qkv", "to_q", "to_k", "to_v", "to_out", "linear1", "linear2", "mlp", "ff"),
}


@dataclass
class DiTCond:
    """A batch's conditioning: per sample the text encoder's hidden states [1, L, D] (lengths may
    differ: Chroma's T5 is not padded), the pooled output [1, P] or None, and the extra outputs of the
    encoder (e.g. ``attention_mask``), handed to the model's ``extra_conds``; ``guidance`` is the
    distilled-guidance value (Flux dev) or None for the family's default."""

    contexts: list[torch.Tensor]
    pooled: list[torch.Tensor | None]
    extras: list[dict] = field(default_factory=list)
    guidance: float | None = None

    def __getitem__(self, index) -> "DiTCond":
        """Samples by an int, a slice or a list of positions."""
        if isinstance(index, (list, tuple)):
            idx = [range(len(self))[i] for i in index]
        else:
            idx = range(len(self))[index]
            idx = [idx] if isinstance(idx, int) else list(idx)
        return DiTCond([self.contexts[i] for i in idx], [self.pooled[i] for i in idx],
                       [self.extras[i] for i in idx], self.guidance)

    def __len__(self) -> int:
        return len(self.contexts)

    def _map(self, fn) -> "DiTCond":
        return DiTCond([fn(c) for c in self.contexts], [None if p is None else fn(p) for p in self.pooled],
                       [{k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in e.items()} for e in self.extras],
                       self.guidance)

    def detach(self) -> "DiTCond":
        return self._map(torch.Tensor.detach)

    def to(self, *args, **kwargs) -> "DiTCond":
        return self._map(lambda t: t.to(*args, **kwargs))


def _tokenize_plain(clip, text: str):
    """The CLIP's tokens of ``text`` with ComfyUI's ``(word:1.2)`` weighting off (captions are plain text).
    Tokenizers that always turn it off themselves (Z-Image's, which passes ``disable_weights`` on) refuse a
    second one: they get the text alone."""
    try:
        return clip.tokenize(text, disable_weights=True)
    except TypeError as e:
        if "disable_weights" not in str(e):
            raise
        return clip.tokenize(text)


def is_flow_model(model) -> bool:
    """True when ComfyUI samples this MODEL with the rectified-flow (CONST) objective."""
    return isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.CONST)


class ComfyDiTBackend(ComfyModels):
    """LoRA training of a flow-matching diffusion transformer loaded by ComfyUI."""

    prediction_type = "flow"
    # The CLIP is loaded with the model; the trainer releases it once every caption and the preview prompt are
    # encoded (``ComfyModels.release_text_encoders``), unless it must stay (shuffled tags), and the estimate
    # counts it only then.
    text_encoders_resident = True

    def __init__(self, model, clip, vae, model_name: str = ""):
        super().__init__(model, clip, vae, model_name)
        if not is_flow_model(model):
            sampling = type(model.get_model_object("model_sampling")).__mro__[1:3]
            raise UnsupportedModelError(
                f"the model samples with {' / '.join(c.__name__ for c in sampling)}, not a flow-matching (CONST) "
                "objective; this path trains flow-matching transformers (Flux, Chroma, SD3.5). Remove the ModelSampling* "
                "node that changed it, or load the model without it."
            )
        family, self.config_name = model_family(model)
        self.family = archs.ARCH_TABLE[family] if family in archs.DIT_ARCHS else None
        self.arch = self.family.name if self.family else archs.OTHER_DIT
        self.variant = family_variant(model) if self.family else None
        self.untested = self.family is None
        dit = self.family.dit if self.family else None
        guidance_embed = bool(getattr(model.model.diffusion_model, "params", None)
                              and getattr(model.model.diffusion_model.params, "guidance_embed", False))
        self.train_guidance = dit.train_guidance if dit and guidance_embed else None
        self.preview_guidance = dit.sample_cfg if dit else 1.0
        self.sample_guidance = dit.sample_guidance if dit and guidance_embed else None
        self.timestep_sampling_default = dit.timestep_sampling_for(self.variant or "") if dit else "logit_normal"
        base = model.model
        self.patch_size = getattr(base.diffusion_model, "patch_size", 1)
        self.latent_channels = base.latent_format.latent_channels
        ratio = getattr(vae, "downscale_ratio", 8)
        self.latent_factor = ratio if isinstance(ratio, int) else 8

    # ---- reading the model -------------------------------------------------------------------
    @property
    def model_sampling(self):
        return self.model.get_model_object("model_sampling")

    @property
    def flow_shift(self) -> float:
        """The model's sampling shift as the alpha of ``alpha * s / (1 + (alpha - 1) * s)``: ModelSamplingFlux
        keeps mu (``exp(mu)`` is that alpha), ModelSamplingDiscreteFlow keeps alpha itself."""
        ms = self.model_sampling
        if isinstance(ms, comfy.model_sampling.ModelSamplingFlux):
            return math.exp(ms.shift)
        return float(getattr(ms, "shift", 1.0))

    def roots(self) -> dict[str, nn.Module]:
        return {"unet": self.model.model.diffusion_model}

    def lora_targets(self, preset: str, text_encoder: bool) -> list[LoraTarget]:
        if text_encoder:
            raise UnsupportedModelError(
                f"train_text_encoder is on, but {self._label()} LoRAs train the diffusion transformer only (its "
                "text encoders include a T5 or LLM too large to train on consumer GPUs, and LoRAs for these models "
                "rarely carry one). Turn train_text_encoder off."
            )
        named = list(self.roots()["unet"].named_modules())
        if self.family is not None:
            paths = dit_keys.select_dit_targets(named, preset, self.family.name)
        else:
            words = PRESET_WORDS.get(preset)
            paths = [p for p, m in named if isinstance(m, nn.Linear)
                     and (words is None or any(w in p.split(".")[-1] or w in p for w in words))]
        return [LoraTarget("unet", p, dit_keys.kohya_dit_name(p), False) for p in paths]

    def compute_devices(self) -> dict[str, torch.device]:
        return {"unet": self.unet_device}

    def norms_to_copy(self) -> list[nn.Module]:
        # Flux's and Chroma's blocks do ``img += ...`` / ``x += ...`` after their LayerNorms saved the tensor.
        return [m for m in self.roots()["unet"].modules() if isinstance(m, nn.LayerNorm)]

    def _label(self) -> str:
        return self.family.label if self.family else f"ComfyUI's {self.config_name}"

    # ---- conditioning ------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> DiTCond:
        self._require_context()
        contexts, pooled, extras = [], [], []
        for text in prompts:
            tokens = _tokenize_plain(self.clip, text)
            encoder = self.clip.cond_stage_model
            encoder.reset_clip_options()
            if self.clip.layer_idx is not None:
                encoder.set_clip_options({"layer": self.clip.layer_idx})
            out = comfy_host.encode_token_weights(self.clip, tokens)
            contexts.append(out[0].to(self.device))
            pooled.append(None if out[1] is None else out[1].to(self.device))
            extra = dict(out[2]) if len(out) > 2 and out[2] else {}
            extras.append({k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in extra.items()})
        return DiTCond(contexts, pooled, extras, self.train_guidance)

    def cat_cond(self, conds: list[DiTCond]) -> DiTCond:
        return DiTCond([c for d in conds for c in d.contexts], [p for d in conds for p in d.pooled],
                       [e for d in conds for e in d.extras], conds[0].guidance)

    def sampling_cond(self, cond: DiTCond) -> DiTCond:
        """The conditioning as ComfyUI samples it: the family's distilled guidance (Flux dev 3.5)."""
        return DiTCond(cond.contexts, cond.pooled, cond.extras, self.sample_guidance)

    # ---- the denoiser ------------------------------------------------------------------------
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: DiTCond) -> torch.Tensor:
        """The raw output (the flow velocity) at ``t`` = sigma in [0, 1], as ``BaseModel._apply_model``
        feeds the diffusion model. Samples whose text lengths differ run in separate groups."""
        self._require_context()
        lengths = [c.shape[1] for c in cond.contexts]
        if len(set(lengths)) == 1:
            return self._predict(x_t, t, cond)
        out = torch.empty_like(x_t, dtype=torch.float32)
        for n in sorted(set(lengths)):
            idx = [i for i, m in enumerate(lengths) if m == n]
            out[idx] = self._predict(x_t[idx], t[idx], cond[idx]).float()
        return out

    def _predict(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: DiTCond) -> torch.Tensor:
        base = self.model.model
        ms = self.model_sampling
        dev, dtype = self.unet_device, self.dtype
        x = plain(x_t).to(dev, dtype)
        if x.dim() == 4 and getattr(base.latent_format, "latent_dimensions", 2) == 3:
            # A video-VAE family (Qwen-Image's Wan 2.1 latents [B, C, 1, h, w]) given one frame without its
            # time axis (a preview's noise): the model takes the 5-D latent
            return self._predict(x_t.unsqueeze(2), sigma, cond).squeeze(2)
        s = plain(sigma).to(dev).float()
        xc = ms.calculate_input(s, x).to(dtype)
        timestep = ms.timestep(s).float()
        kwargs = {"noise": x, "device": dev, "cross_attn": torch.cat([plain(c) for c in cond.contexts])}
        if all(p is not None for p in cond.pooled):
            kwargs["pooled_output"] = torch.cat([plain(p) for p in cond.pooled])
        if cond.guidance is not None:
            kwargs["guidance"] = cond.guidance
        for key in cond.extras[0] if cond.extras else ():
            values = [e[key] for e in cond.extras]
            kwargs[key] = torch.cat(values) if isinstance(values[0], torch.Tensor) else values[0]
        extra = {}
        for name, c in base.extra_conds(**kwargs).items():
            value = c.process_cond(batch_size=x.shape[0], device=dev, area=None).cond
            if isinstance(value, torch.Tensor):
                value = value.to(dev, dtype if value.is_floating_point() else value.dtype)
            extra[name] = value
        context = extra.pop("c_crossattn")
        return base.diffusion_model(xc, timestep, context=context, control=None, transformer_options={}, **extra)

    def flow_sigmas(self, steps: int, latent_shape) -> torch.Tensor:
        """The preview schedule: what ComfyUI's "simple" scheduler gives this model (ending in 0)."""
        return comfy.samplers.calculate_sigmas(self.model_sampling, "simple", steps).float().cpu()

    def alphas_cumprod(self) -> torch.Tensor:
        raise NotImplementedError("a flow-matching model has no DDPM noise schedule")

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each transformer block in backward (as ComfyUI's TrainLoraNode does: a checkpointing
        ``forward`` on the block instances, removed again by the training context)."""
        blocks = [m for name in ("double_blocks", "single_blocks", "layers", "transformer_blocks",
                                 "single_transformer_blocks", "joint_blocks", "blocks")
                  for m in getattr(self.roots()["unet"], name, ())]
        for m in blocks:
            if "forward" not in m.__dict__:
                m.forward = checkpointed(m.forward, True)  # the blocks add residuals into their inputs
                self._checkpointed.append(m)

    def memory_shape(self):
        """The transformer's shape for the memory estimate, read from its modules."""
        from ...training.train import memory

        dm = self.roots()["unet"]
        doubles, singles = getattr(dm, "double_blocks", ()), getattr(dm, "single_blocks", ())
        joint = getattr(dm, "joint_blocks", ())  # SD3's MMDiT: two-stream blocks, as Flux's double blocks
        hidden = getattr(dm, "hidden_size", None)
        layers = getattr(dm, "layers", ()) if hasattr(dm, "noise_refiner") else ()  # Z-Image's NextDiT
        # Qwen-Image: two-stream transformer_blocks (Flux-style double blocks with per-block modulation)
        qwen = getattr(dm, "transformer_blocks", ()) if hasattr(dm, "txt_norm") else ()
        if qwen:
            hidden, doubles = dm.inner_dim, qwen
            mlp = qwen[0].img_mlp.net[0].proj.out_features
            heads = hidden // 128
        elif layers:
            # Single-stream blocks (refiners included) counted as Flux-style single blocks: no per-block
            # modulation Linear of width 3h (NextDiT modulates from a 256-wide vector), and an MLP width that
            # gives SwiGLU's three matrices the same parameters (1.5 x its hidden width).
            hidden, heads = dm.dim, dm.n_heads
            singles = [*layers, *dm.noise_refiner, *dm.context_refiner]
            mlp = 1.5 * layers[0].feed_forward.w1.out_features
        elif hidden is None or not (doubles or singles or joint):
            return None
        elif joint:
            mlp = joint[0].x_block.mlp.fc1.out_features
            heads = getattr(dm, "num_heads", None) or hidden // 64
        else:
            mlp = doubles[0].img_mlp[0].out_features if doubles else 4 * hidden
            if getattr(getattr(dm, "params", None), "mlp_silu_act", False):
                mlp *= 0.75  # FLUX.2's SwiGLU: 2m rows in, m out = the parameters of a plain MLP 1.5m wide
            heads = getattr(dm, "num_heads", hidden // 128)
        encoders = [getattr(self.clip.cond_stage_model, n)
                    for n in ("clip_l", "clip_g", "t5xxl", "qwen3_4b", "qwen3_8b", "qwen25_7b")
                    if getattr(self.clip.cond_stage_model, n, None) is not None]
        te_params = tuple(sum(p.numel() for p in te.parameters()) for te in encoders)
        te_dtypes = tuple(memory._dtype_name(_main_dtype(te)) for te in encoders)
        # ComfyUI pads Flux's T5 tokens to its tokenizer's min_length (256); Chroma's are not padded. SD3 joins
        # CLIP's 77 tokens and T5's (77 at least) in one sequence.
        t5 = getattr(self.clip.tokenizer, "t5xxl", None)
        context = getattr(t5, "min_length", None) if getattr(t5, "min_length", 1) > 1 else 512
        if joint:
            context = 77 + (context if t5 is not None and context else 0)
        shape = memory.DiTShape(hidden=hidden, double_blocks=len(doubles) or len(joint), single_blocks=len(singles),
                                heads=heads, mlp_ratio=mlp / hidden,
                                context_tokens=context, patch_size=self.patch_size,
                                latent_channels=self.latent_channels,
                                modulation=bool(joint or (doubles and hasattr(doubles[0], "img_mod"))),
                                context_dim=_context_width(dm))
        return memory.ModelShape(
            self._label(), shape, (), unet_params=sum(p.numel() for p in dm.parameters()),
            te_params=te_params, vae_params=sum(p.numel() for p in self.vae.first_stage_model.parameters()),
            latent_factor=self.latent_factor, latent_channels=self.latent_channels, te_dtypes=te_dtypes)


def _context_width(dm: nn.Module) -> int:
    """The width of the text conditioning a transformer takes (Flux's / FLUX.2's txt_in, SD3's context_embedder,
    Z-Image's cap_embedder); T5-XXL's 4096 where none is found."""
    for layer in (getattr(dm, "txt_in", None), getattr(dm, "context_embedder", None),
                  getattr(dm, "cap_embedder", [None, None])[1]):
        if isinstance(layer, nn.Linear):
            return layer.in_features
    return 4096


def _main_dtype(module: nn.Module) -> torch.dtype:
    """The dtype that holds most of ``module``'s parameters (a T5 loaded in fp8 keeps a few norms in fp32)."""
    sizes: dict[torch.dtype, int] = {}
    for p in module.parameters():
        sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
    return max(sizes, key=sizes.get)
