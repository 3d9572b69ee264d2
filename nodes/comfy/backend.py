"""The engine's ``Backend`` over ComfyUI's own MODEL (ModelPatcher), CLIP and VAE objects.

Training runs on the modules ComfyUI already loaded - no second copy of the model. Everything
goes through ComfyUI's model management, so its device, dtype and lowvram/offload choices hold:

* ``training_context()`` loads MODEL + CLIP + VAE with ``load_models_gpu`` (what a sampler does),
  leaves inference mode, and on exit puts every patched module back, also when the run raises.
* The denoiser is the raw UNet at integer DDPM timesteps. ComfyUI samples in the form
  ``x = x0 + sigma * eps`` with ``sigma_t = sqrt((1 - a_t) / a_t)`` and feeds the UNet
  ``x / sqrt(sigma^2 + 1)`` at timestep ``t`` (``model_sampling.calculate_input`` / ``timestep``).
  Since ``1 / sqrt(sigma^2 + 1) = sqrt(a_t)``, that input is exactly the engine's
  ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``: the UNet sees the same tensor, so ``predict`` calls
  it directly on ``x_t`` (the host test checks this against ``BaseModel.apply_model``).
* ``alphas_cumprod`` comes back from ComfyUI's sigmas: ``a_t = 1 / (1 + sigma_t^2)``.
* LoRA targets use ComfyUI's LDM module paths; their kohya names are the SD1 diffusers names or
  SDXL's LDM names, through the ``UNetLayout`` read from the model's ``unet_config``.
* SDXL (and SSD-1B, Segmind Vega, KOALA): the conditioning is ComfyUI's own CLIP-L + CLIP-G
  encoding (hidden states + pooled output), and the UNet's ``y`` is built by the model's own
  ``encode_adm`` from the pooled output and each image's original size, crop and target size.

SD1.x (ComfyUI's ``SD15``) and the SDXL family are accepted here; flow-matching transformers (Flux,
Chroma ...) go to ``dit_backend.ComfyDiTBackend`` (``comfy_backend`` picks), and other families get an
``UnsupportedModelError``. ``ComfyModels`` holds what both share: devices, dtype, the VAE and the training
context.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Iterator

import torch
from torch import nn

import comfy.model_management as mm
import comfy.model_sampling
import comfy.sdxl_clip

from ...training.errors import LoraWorkbenchError
from ...training.lora import network
from ...training.lora.network import LoraTarget
from ...training.model import keys as unet_keys
from ...training.model.backend import Backend, SDXLCond
from . import host as comfy_host
from .autograd import checkpointed, clone_input, leave_inference_mode, plain
from .families import trainable_family

log = logging.getLogger(__name__)

TE_ROOTS = {"sd1": {"te": "clip_l"}, "sdxl": {"te1": "clip_l", "te2": "clip_g"}}  # component -> ComfyUI encoder
PREDICTIONS = {comfy.model_sampling.EPS: "epsilon", comfy.model_sampling.V_PREDICTION: "v_prediction"}


class UnsupportedModelError(LoraWorkbenchError, ValueError):
    """The MODEL/CLIP given is not one this backend can train; the message names it and what to use."""


# ---- reading the model ---------------------------------------------------------------------------
def check_supported(model, model_name: str = "") -> str:
    """The arch ("sd1") of a ComfyUI MODEL, or an error naming the model and what is supported
    (``families.MODEL_CONFIGS``: exact classes, so InstructPix2Pix subclasses are refused)."""
    arch = trainable_family(model)
    if arch not in TE_ROOTS:
        family = type(model.model.model_config).__name__
        shown = f"{model_name!r} ({family})" if model_name else f"this {family} model"
        raise UnsupportedModelError(
            f"{shown} cannot be trained yet: LoRA Workbench trains SD1.x models (ComfyUI's SD15), SDXL "
            "models (SDXL, SSD-1B, Segmind Vega, KOALA; Pony and Illustrious are SDXL) and flow-matching "
            "transformers (Flux.1 dev / schnell, Chroma, SD3.5; other flow models untested); other UNet families "
            "come later. Load an SD1.5-, SDXL-, Flux-, Chroma- or SD3.5-based model."
        )
    return arch


def prediction_type(model_sampling) -> str:
    """"epsilon" or "v_prediction" for a discrete 1000-step DDPM ``model_sampling``, else an error.

    ``model_sampling`` is ComfyUI's ``ModelSampling(sampling, prediction)`` class; the first base of
    each kind in its MRO says which it is (so a ModelSamplingDiscrete node patch is honoured).
    """
    mro = type(model_sampling).__mro__[1:]
    sampling = next((c for c in mro if issubclass(c, comfy.model_sampling.ModelSamplingDiscrete)), None)
    prediction = next((c for c in mro if issubclass(c, comfy.model_sampling.EPS)), None)
    if sampling is not comfy.model_sampling.ModelSamplingDiscrete or prediction not in PREDICTIONS:
        raise UnsupportedModelError(
            f"the model samples with {getattr(sampling, '__name__', type(model_sampling).__name__)} / "
            f"{getattr(prediction, '__name__', 'unknown')}; training needs discrete DDPM sampling with eps or "
            "v-prediction. Remove the ModelSampling* node (or pick 'eps' / 'v_prediction' in it) before training."
        )
    return PREDICTIONS[prediction]


def layout_from_unet_config(unet_config: dict) -> unet_keys.UNetLayout:
    """A ``UNetLayout`` from ComfyUI's ``unet_config`` (per-block depth lists, middle-block code).

    ComfyUI lists transformer depths per ResBlock (``transformer_depth``: way down,
    ``transformer_depth_output``: way up) and codes the middle block as ``transformer_depth_middle``
    (-2: none, -1: ResBlocks only, >= 0: with attention). The layout holds one depth per level, the
    same down and up, and a middle block only with attention; anything else is refused here.
    """
    mult = tuple(unet_config["channel_mult"])
    levels = len(mult)
    nres = unet_config["num_res_blocks"]
    nres = [nres] * levels if isinstance(nres, int) else list(nres)
    down = list(unet_config.get("transformer_depth") or [0] * sum(nres))
    up = list(unet_config.get("transformer_depth_output") or [0] * sum(n + 1 for n in nres))
    problems = []
    if len(set(nres)) != 1:
        problems.append(f"num_res_blocks={nres} differs between levels")
    depth = []
    for lvl in range(levels):
        d = down[sum(nres[:lvl]): sum(nres[: lvl + 1])]
        u = up[sum(n + 1 for n in nres[:lvl]): sum(n + 1 for n in nres[: lvl + 1])]
        if len(set(d) | set(u)) != 1:
            problems.append(f"level {lvl} has transformer depths {d} down and {u} up")
        depth.append(d[0] if d else 0)
    mid = unet_config.get("transformer_depth_middle", 1)
    if mid is None:
        mid = depth[-1]
    if mid in (-1, 0):
        problems.append(f"transformer_depth_middle={mid} (a middle block without attention)")
    for key in ("use_temporal_resblock", "use_temporal_attention"):
        if unet_config.get(key):
            problems.append(f"{key}=True")
    if problems:
        raise UnsupportedModelError(
            "this UNet's shape cannot be named for a LoRA file: " + "; ".join(problems)
            + ". Only SD-style UNets with the same blocks on the way down and up are supported."
        )
    return unet_keys.UNetLayout(
        channel_mult=mult,
        num_res_blocks=nres[0],
        transformer_depth=tuple(depth),
        attention_levels=tuple(i for i, d in enumerate(depth) if d > 0),
        transformer_depth_middle=max(mid, 1),
        has_middle_block=mid >= 1,
        has_label_emb=unet_config.get("adm_in_channels") is not None,
    )


# ---- the backend ---------------------------------------------------------------------------------
class ComfyModels(Backend):
    """What every backend over ComfyUI's MODEL / CLIP / VAE shares: the devices and dtype ComfyUI chose,
    the VAE, and the training context. Use inside ``training_context()``."""

    def __init__(self, model, clip, vae, model_name: str = ""):
        if clip is None or vae is None:
            raise ValueError("training needs the checkpoint's CLIP and VAE as well as its MODEL; connect all three")
        self.model, self.clip, self.vae = model, clip, vae
        self.model_name = model_name
        base = model.model
        self.device = mm.get_torch_device()
        self.unet_device = model.load_device  # where ComfyUI runs this MODEL (get_torch_device() unless overridden)
        self.te_device = clip.patcher.load_device
        # The dtype ComfyUI computes in: the manual-cast dtype when weights are stored in another one.
        self.dtype = base.manual_cast_dtype or base.get_dtype()
        self.storage_dtype = base.get_dtype()  # what the weights are kept in (fp8 for a *_fp8 load)
        self._checkpointed: list[nn.Module] = []
        self._active = False  # inside training_context()

    def text_encoder_layers(self) -> list[nn.Module]:
        """The CLIP layers of the trainable text encoders (gradient checkpointing units)."""
        return []

    def norms_to_copy(self) -> list[nn.Module]:
        """Normalisation layers that get a copy of their input while training: ComfyUI's model code adds
        residuals in place (``x += attn(norm(x))``) into the very tensor such a norm saved for backward."""
        return [norm for layer in self.text_encoder_layers() for norm in (layer.layer_norm1, layer.layer_norm2)]

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        # The engine's [-1, 1] BCHW as ComfyUI's IMAGE (BHWC in [0, 1]), then what VAEEncode + a
        # sampler do: vae.encode, then the model's latent scaling.
        images = ((pixels.float() + 1.0) / 2.0).clamp(0.0, 1.0).movedim(1, -1)
        latents = self.vae.encode(images)
        return self.model.model.process_latent_in(latents).float().to(self.device)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        # Previews: what a sampler + VAEDecode do, the other way round: the model's latent scaling
        # undone, then vae.decode, which gives ComfyUI's IMAGE (BHWC in [0, 1]).
        if latents.dim() == 4 and getattr(self.model.model.latent_format, "latent_dimensions", 2) == 3:
            latents = latents.unsqueeze(2)  # one frame of a video-VAE family (Qwen-Image's Wan 2.1 latents)
        images = self.vae.decode(self.model.model.process_latent_out(latents.float()))
        return images.reshape(-1, *images.shape[-3:]).float().clamp(0.0, 1.0).cpu()

    # ---- host glue ---------------------------------------------------------------------------
    @property
    def releases_text_encoders(self) -> bool:
        """Whether the CLIP can leave once the captions are encoded: not when this ComfyUI could not load it again
        (``host.reloads_after_unload``); the memory estimate then counts it as resident."""
        return comfy_host.reloads_after_unload(self.clip.patcher)

    def release_text_encoders(self) -> bool:
        """The CLIP unloaded through ComfyUI's model management (``free_memory`` with every other loaded model
        kept), as ComfyUI frees a model it needs the room of: its weights go to the offload device and it leaves
        ``current_loaded_models``. A later CLIPTextEncode loads it again. False if it was not loaded."""
        patcher = self.clip.patcher
        loaded = [m for m in mm.current_loaded_models if m.model is patcher]
        if not loaded:
            return False
        if not comfy_host.reloads_after_unload(patcher):
            log.info("the text encoder stays loaded: its quantized weights left inference mode, and this ComfyUI "
                     "could not load them again after an unload (a later CLIPTextEncode would fail)")
            return False
        others = [m for m in mm.current_loaded_models if m.model is not patcher]
        with torch.inference_mode():  # as ComfyUI's own nodes manage models (host.reloads_after_unload)
            for device in {m.device for m in loaded}:
                mm.free_memory(1e30, device, keep_loaded=others)
        self.text_encoders_resident = False
        return not any(m.model is patcher for m in mm.current_loaded_models)

    @contextlib.contextmanager
    def training_context(self, memory_required: int = 0) -> Iterator["ComfyModels"]:
        """Load the models the ComfyUI way, leave inference mode, restore everything on exit.

        ``memory_required``: bytes to keep free for training activations; ComfyUI loads the
        weights partially (lowvram) when they do not fit beside it.
        On exit (normal or not): LoRA layers removed, gradient checkpointing off, ``requires_grad``
        and train/eval modes as they were. Weights keep their values (tensors made under inference
        mode are replaced by equal normal ones, see ``leave_inference_mode``).
        """
        # Loaded in inference mode, as ComfyUI's own nodes load models: a quantized (scaled-fp8) CLIP loaded or
        # unloaded outside it would get normal weights that ComfyUI's next load in a node cannot take
        # (host.reloads_after_unload). Leaving inference mode afterwards swaps what we train (leave_inference_mode).
        with torch.inference_mode():
            mm.load_models_gpu([self.model, self.clip.patcher, self.vae.patcher], memory_required=memory_required)
        with torch.inference_mode(False), torch.enable_grad(), comfy_host.in_training():
            roots = self.roots()
            swapped = sum(leave_inference_mode(r) for r in roots.values())
            log.debug("moved %d inference-mode tensors out of inference mode", swapped)
            grad_flags = [(p, p.requires_grad) for r in roots.values() for p in r.parameters()]
            modes = [(m, m.training) for r in roots.values() for m in r.modules()]
            hooks = []
            try:
                for r in roots.values():
                    r.requires_grad_(False)  # frozen base: only LoRA parameters get gradients
                # ComfyUI's CLIPLayer and Flux blocks add their residuals in place (x += attn(norm(x))),
                # into the very tensor their LayerNorms saved for backward; the norms get a copy so the
                # model can be differentiated.
                hooks += [norm.register_forward_pre_hook(clone_input) for norm in self.norms_to_copy()]
                self._active = True
                yield self
            finally:
                self._active = False
                removed = network.remove(roots)
                for hook in hooks:
                    hook.remove()
                for m in self._checkpointed:
                    del m.forward
                self._checkpointed.clear()
                for p, flag in grad_flags:
                    p.requires_grad_(flag)
                for m, mode in modes:
                    m.training = mode
                log.debug("training context closed; %d LoRA wrappers were still in place", removed)

    def _require_context(self) -> None:
        if not self._active:
            raise RuntimeError(
                "a ComfyUI backend used outside its training_context(): ComfyUI's models are not loaded for "
                "training there (inference mode, devices). Wrap the Trainer run in "
                "`with backend.training_context():`"
            )


class ComfyBackend(ComfyModels):
    """SD1.x / SDXL training on ComfyUI's loaded MODEL / CLIP / VAE. Use inside ``training_context()``."""

    def __init__(self, model, clip, vae, model_name: str = ""):
        super().__init__(model, clip, vae, model_name)
        self.arch = check_supported(model, model_name)
        encoder = clip.cond_stage_model
        if self.arch == "sdxl":
            fits = type(encoder) is comfy.sdxl_clip.SDXLClipModel
            wanted = "SDXL CLIP-L + CLIP-G text encoders"
        else:
            fits = getattr(encoder, "clip", None) == "clip_l" and len(list(encoder.children())) == 1
            wanted = "SD1.x CLIP-L text encoder"
        if not fits:
            raise UnsupportedModelError(
                f"the CLIP given is a {type(encoder).__name__}, not the {wanted} of this "
                "model; connect the CLIP output of the same checkpoint loader"
            )
        base = model.model
        self.prediction_type = prediction_type(model.get_model_object("model_sampling"))
        self.layout = layout_from_unet_config(base.model_config.unet_config)
        self._to_diffusers = unet_keys.unet_ldm_to_diffusers(self.layout)
        unnamed = [p for p, m in base.diffusion_model.named_modules()
                   if isinstance(m, (nn.Linear, nn.Conv2d)) and p not in self._to_diffusers]
        if unnamed:
            raise UnsupportedModelError(
                f"{len(unnamed)} UNet layers have no {self.arch.upper()} name for the layout read from the model "
                f"config ({self.layout}), e.g. {unnamed[:3]}; this UNet is not {self.arch.upper()}-shaped"
            )

    def text_encoder_layers(self) -> list[nn.Module]:
        roots = self.roots()
        return [layer for comp in TE_ROOTS[self.arch] for layer in roots[comp].text_model.encoder.layers]

    # ---- Backend -----------------------------------------------------------------------------
    def roots(self) -> dict[str, nn.Module]:
        encoder = self.clip.cond_stage_model
        tes = {comp: getattr(encoder, name).transformer for comp, name in TE_ROOTS[self.arch].items()}
        return {"unet": self.model.model.diffusion_model, **tes}

    def lora_targets(self, preset: str, text_encoder: bool) -> list[LoraTarget]:
        roots = self.roots()
        # Presets select on diffusers names, exactly as for a diffusers UNet, then map back to LDM paths.
        named = [(self._to_diffusers[p], m) for p, m in roots["unet"].named_modules() if p in self._to_diffusers]
        to_ldm = {d: p for p, d in self._to_diffusers.items()}
        out = [LoraTarget("unet", to_ldm[d], unet_keys.kohya_unet_name(d, self.arch, self.layout), conv)
               for d, conv in network.select_unet_targets(named, preset)]
        for comp in TE_ROOTS[self.arch] if text_encoder else ():
            out += [LoraTarget(comp, p, unet_keys.kohya_te_name(p, comp), False)
                    for p in network.select_text_encoder_targets(roots[comp].named_modules())]
        return out

    def compute_devices(self) -> dict[str, torch.device]:
        """Where ComfyUI runs the UNet and the text encoders: the trainer creates LoRA weights there.

        Not the wrapped weight's device: under lowvram that may be the offload device (ComfyUI casts
        the weight to the GPU per call), and LoRA weights must be on the compute device before the
        first optimizer step. ComfyUI never moves them later: a partial unload moves only the modules
        it patched at load time, and the LoRA layers were made after it.
        """
        return {"unet": self.unet_device, **{comp: self.te_device for comp in TE_ROOTS[self.arch]}}

    def alphas_cumprod(self) -> torch.Tensor:
        sigmas = self.model.get_model_object("model_sampling").sigmas.detach().double()
        return (1.0 / (1.0 + sigmas**2)).float().to(self.device)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor | SDXLCond:
        self._require_context()
        if self.arch == "sdxl":
            conds = [SDXLCond(*self._encode_prompt(p, pooled=True)) for p in prompts]
            return self.cat_cond(conds).to(self.device)
        return self.cat_cond([self._encode_prompt(p) for p in prompts]).to(self.device)

    def _encode_prompt(self, text: str, pooled: bool = False):
        # What CLIP.encode_from_tokens does, minus its load_model(): the CLIP is loaded once for the
        # whole run, and reloading would re-walk modules LoRA layers now wrap. Captions are taken
        # literally, as kohya does: "(word:1.2)" weighting is off (disable_weights).
        tokens = self.clip.tokenize(text, disable_weights=True)
        encoder = self.clip.cond_stage_model
        encoder.reset_clip_options()
        if self.clip.layer_idx is not None:  # CLIPSetLastLayer ("clip skip")
            encoder.set_clip_options({"layer": self.clip.layer_idx})
        out = comfy_host.encode_token_weights(self.clip, tokens)
        return (out[0], out[1]) if pooled else out[0]  # SDXL: hidden states (L and G side by side), G's pooled

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        self._require_context()
        unet = self.model.model.diffusion_model
        dev = self.unet_device
        x = plain(x_t).to(dev, self.dtype)
        extra = {}
        if isinstance(cond, SDXLCond):
            extra["y"] = self._adm(cond, x_t.shape).to(dev, self.dtype)
            cond = cond.context
        context = plain(cond).to(dev, self.dtype)
        # A fresh transformer_options: the UNet writes into it, and the default {} is shared.
        return unet(x, timesteps=plain(t).to(dev).float(), context=context, transformer_options={}, **extra)

    def _adm(self, cond: SDXLCond, latent_shape) -> torch.Tensor:
        """SDXL's ``y``: ComfyUI's own ``encode_adm`` (pooled CLIP-G output + the embedded original size,
        crop and target size), one sample at a time since each image has its own sizes."""
        if cond.time_ids is None:  # a fresh image (previews): uncropped, at the latent's size
            h, w = latent_shape[-2] * self.latent_factor, latent_shape[-1] * self.latent_factor
            rows = [(h, w, 0, 0, h, w)] * len(cond)
        else:
            rows = [tuple(int(v) for v in row) for row in cond.time_ids.tolist()]
        base = self.model.model
        pooled = plain(cond.pooled)
        return torch.cat([
            base.encode_adm(pooled_output=pooled[i:i + 1], height=oh, width=ow, crop_h=top, crop_w=left,
                            target_height=th, target_width=tw)
            for i, (oh, ow, top, left, th, tw) in enumerate(rows)])

    def add_size_conditioning(self, cond, sizes: list[dict]):
        if not isinstance(cond, SDXLCond):
            return cond
        rows = [[*s["original_size"], *s["crop_top_left"], *s["target_size"]] for s in sizes]
        return SDXLCond(cond.context, cond.pooled, torch.tensor(rows, dtype=torch.float32))

    def cat_cond(self, conds: list) -> torch.Tensor | SDXLCond:
        # Prompts over 75 tokens encode to 154, 231 ... tokens; like ComfyUI's CONDCrossAttn, a batch
        # repeats each to the least common multiple (attention over a repeated context is unchanged).
        if isinstance(conds[0], SDXLCond):
            times = [c.time_ids for c in conds]
            return SDXLCond(self.cat_cond([c.context for c in conds]), torch.cat([c.pooled for c in conds]),
                            None if any(t is None for t in times) else torch.cat(times))
        n = math.lcm(*(c.shape[1] for c in conds))
        return torch.cat([c if c.shape[1] == n else c.repeat(1, n // c.shape[1], 1) for c in conds])

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each UNet ResBlock/transformer and each CLIP layer in backward.

        ComfyUI's own LDM checkpoint flag cannot differentiate frozen weights, so, as ComfyUI's
        TrainLoraNode does, these module instances get a checkpointing ``forward``; the
        ``training_context`` removes it again on exit.
        """
        from comfy.ldm.modules.attention import SpatialTransformer
        from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

        roots = self.roots()
        unet_units = [m for m in roots["unet"].modules() if isinstance(m, (ResBlock, SpatialTransformer))]
        # A CLIPLayer overwrites its input in place; recomputing it needs the input as it came in.
        te_units = self.text_encoder_layers()
        for units, copy_input in ((unet_units, False), (te_units, True)):
            for m in units:
                if "forward" not in m.__dict__:
                    m.forward = checkpointed(m.forward, copy_input)
                    self._checkpointed.append(m)

    def memory_shape(self):
        """The model's shape for the memory estimate, read from ComfyUI's ``unet_config`` and modules."""
        from ...training.train import memory

        cfg = self.model.model.model_config.unet_config
        lay = self.layout
        channels = tuple(cfg["model_channels"] * m for m in cfg["channel_mult"])
        head_width = cfg.get("num_head_channels", -1)
        heads = tuple(c // head_width if head_width and head_width > 0 else cfg.get("num_heads", 8) for c in channels)
        unet = memory.UNetShape(channels, lay.num_res_blocks, lay.transformer_depth,
                                lay.transformer_depth_middle if lay.has_middle_block else 0, heads,
                                cfg["context_dim"], linear_proj=bool(cfg.get("use_linear_in_transformer")),
                                latent_channels=cfg.get("in_channels", 4))
        roots = self.roots()
        tes, te_params = [], []
        for comp in TE_ROOTS[self.arch]:
            layers = roots[comp].text_model.encoder.layers
            attn, mlp = layers[0].self_attn, layers[0].mlp
            tes.append(memory.TextEncoderShape(attn.q_proj.in_features, len(layers), getattr(attn, "heads", 12),
                                               mlp.fc1.out_features))
            te_params.append(sum(p.numel() for p in roots[comp].parameters()))
        return memory.ModelShape(
            self.arch.upper(), unet, tuple(tes), unet_params=sum(p.numel() for p in roots["unet"].parameters()),
            te_params=tuple(te_params), vae_params=sum(p.numel() for p in self.vae.first_stage_model.parameters()),
            latent_factor=self.latent_factor, latent_channels=unet.latent_channels)


def comfy_backend(model, clip, vae, model_name: str = "") -> ComfyModels:
    """The backend for this MODEL: the UNet path for SD1.x / SDXL, the flow-transformer path for any model
    ComfyUI samples with a flow-matching objective (Flux, Chroma ...), else ``UnsupportedModelError``."""
    from .dit_backend import ComfyDiTBackend, is_flow_model

    if trainable_family(model) not in TE_ROOTS and is_flow_model(model):
        return ComfyDiTBackend(model, clip, vae, model_name)
    return ComfyBackend(model, clip, vae, model_name)
