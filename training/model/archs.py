"""The model families the engine knows: one entry per family, read by generic code.

Each entry holds the facts other tools use to name the family: the ``modelspec.architecture``
string (Stability's model spec), kohya's ``ss_base_model_version``, the text encoders' kohya
components (so ``lora_te_`` for SD1/SD2, ``lora_te1_`` + ``lora_te2_`` for SDXL) and the layer
widths that tell the families apart in a LoRA file (see ``lora.formats.detect_arch``).

Two kinds of denoiser: ``"unet"`` (SD1/SD2/SDXL, named by ``keys.UNetLayout``) and ``"dit"``, the
flow-matching transformers, described by a :class:`DiTSpec`: block counts, the Linear modules of one
block, the modules outside the blocks, the LoRA target presets and the diffusers names of each module,
all as the module paths of the reference model that ComfyUI loads: Black Forest Labs' layout for Flux.1
dev/schnell and Chroma (``double_blocks.0.img_attn.qkv``, as kohya's ``networks/lora_flux.py`` and
Civitai's Flux LoRAs name them), Stability's MMDiT for SD3.5 (``joint_blocks.0.x_block.attn.qkv``, as
sd3.5's reference code, ComfyUI and kohya's ``networks/lora_sd3.py`` name them).

Sources of the names: kohya sd-scripts ``library/sai_model_spec.py`` (``ARCH_FLUX_1_DEV`` =
"flux-1-dev", ``ARCH_FLUX_1_SCHNELL``, ``ARCH_FLUX_1_CHROMA`` = "chroma", ``IMPL_FLUX``, ``IMPL_CHROMA``)
and ``library/flux_utils.py`` (``MODEL_VERSION_FLUX_V1`` = "flux1", ``MODEL_VERSION_CHROMA`` = "chroma",
written as ``ss_base_model_version`` by ``flux_train_network.py``); SD3: ``ARCH_SD3_M`` = "stable-diffusion-3"
followed by kohya's ``sd3_utils`` model type ("-medium", "-5-medium", "-5-large").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

UNKNOWN = "unknown"  # a LoRA whose keys and widths match no family here (e.g. a tiny test model)
OTHER_DIT = "other_flow"  # the entry for flow-matching models without one of their own


@dataclass(frozen=True)
class DiTSpec:
    """A BFL-layout transformer (Flux.1 and its relatives): what generic code needs to name, select and
    group its modules. Every path is a module path in the BFL/ComfyUI model (no ``diffusion_model.``).

    double_modules / single_modules: the Linear children of one ``double_blocks.N`` / ``single_blocks.N``.
    outer_modules: the Linear modules outside the blocks that a LoRA file may carry (read, never trained
        by a preset: see ``presets``). not_trained: path prefixes no preset selects (Chroma's
        ``distilled_guidance_layer``).
    presets: engine preset name -> glob patterns (``fnmatch``) over BFL paths; ``"*"`` is one path segment
        or more, so ``double_blocks.*.img_attn.qkv`` matches every double block.
    """

    depth: int  # double-stream blocks (double_blocks.N)
    depth_single: int  # single-stream blocks (single_blocks.N)
    hidden: int  # width of the token stream (3072 on Flux.1)
    mlp_ratio: float
    double_modules: tuple[str, ...]
    single_modules: tuple[str, ...]
    outer_modules: tuple[str, ...]
    presets: Mapping[str, tuple[str, ...]] = field(hash=False)  # a dict: kept out of the hash
    not_trained: tuple[str, ...] = ()
    double_prefix: str = "double_blocks"
    single_prefix: str = "single_blocks"
    # diffusers' module names (its ``<Family>Transformer2DModel``): block child -> parts, each with its
    # output rows as a multiple of the hidden width (``"mlp"``: hidden * mlp_ratio), in row order; one part
    # is a rename, several split one fused module (q / k / v). outer: path -> diffusers path. swapped:
    # diffusers modules whose output halves (shift, scale) come in the other order (ComfyUI's
    # ``swap_scale_shift``): path -> diffusers path; "{last}" is the last double block's index, found by
    # the module's rows (2 x hidden: a pre-only block's modulation) where the depth is unknown.
    diffusers_blocks: tuple[str, str] = ("transformer_blocks", "single_transformer_blocks")
    diffusers_double: Mapping[str, tuple[tuple[str, float | str], ...]] = field(default_factory=dict, hash=False)
    diffusers_single: Mapping[str, tuple[tuple[str, float | str], ...]] = field(default_factory=dict, hash=False)
    diffusers_outer: Mapping[str, str] = field(default_factory=dict, hash=False)
    diffusers_swapped: Mapping[str, str] = field(default_factory=dict, hash=False)
    pre_only_last: tuple[str, ...] = ()  # children the last double block lacks (SD3's pre-only context block)
    # Further block lists (Z-Image's refiners): (prefix, depth, Linear children); diffusers names them alike and
    # their children as ``diffusers_double`` names the double blocks' children.
    extra_blocks: tuple[tuple[str, int, tuple[str, ...]], ...] = ()
    # What a written file puts before each diffusers module path (``file_format`` "diffusers")
    diffusers_head: str = "transformer."
    # How the family trains and samples (each host's backend reads these):
    # timestep_sampling: the default per variant ("" for all) - see ``train.schedules.sample_flow_sigmas``.
    #   Flux dev / Chroma: "flux_shift" (logit-normal shifted by image size, kohya's flux_shift, which is how
    #   BFL and ComfyUI's ModelSamplingFlux sample them); schnell: "logit_normal" (it samples unshifted).
    # train_guidance: the distilled-guidance input while training (kohya's --guidance_scale 1.0 for dev);
    #   models without a guidance embedding ignore it. sample_guidance: that input when sampling (Flux's
    #   FluxGuidance default 3.5; None: the model's own default). sample_cfg: classifier-free guidance scale
    #   of previews (1.0: no negative pass).
    timestep_sampling: Mapping[str, str] = field(default_factory=lambda: {"": "logit_normal"}, hash=False)
    train_guidance: float | None = None
    sample_guidance: float | None = None
    sample_cfg: float = 1.0
    context_tokens: int = 512  # T5 tokens of a caption, for the memory estimate

    def timestep_sampling_for(self, variant: str = "") -> str:
        """The default timestep sampling of ``variant`` (the family's when it has none of its own)."""
        return self.timestep_sampling.get(variant, self.timestep_sampling.get("", "logit_normal"))

    def module_paths(self) -> tuple[str, ...]:
        """Every Linear module path of the full-size model (blocks in order, then the outer modules)."""
        out = [f"{self.double_prefix}.{i}.{m}" for i in range(self.depth) for m in self.double_modules
               if not (i == self.depth - 1 and m in self.pre_only_last)]
        out += [f"{self.single_prefix}.{i}.{m}" for i in range(self.depth_single) for m in self.single_modules]
        out += [f"{prefix}.{i}.{m}" for prefix, depth, mods in self.extra_blocks for i in range(depth) for m in mods]
        return (*out, *self.outer_modules)

    @property
    def block_prefixes(self) -> tuple[str, ...]:
        """The block lists' names (``double_blocks``, ``single_blocks``; ``joint_blocks`` alone for SD3; Z-Image's
        ``layers`` and its refiners)."""
        main = (self.double_prefix, self.single_prefix) if self.depth_single else (self.double_prefix,)
        return (*main, *(prefix for prefix, _, _ in self.extra_blocks))

    def children_of(self, prefix: str) -> tuple[str, ...]:
        """The Linear children of one block of the list ``prefix``."""
        if prefix == self.double_prefix:
            return self.double_modules
        if prefix == self.single_prefix:
            return self.single_modules
        return next((mods for p, _, mods in self.extra_blocks if p == prefix), ())


@dataclass(frozen=True)
class Arch:
    """One model family. ``name`` is the engine's name for it ("sd1", "sd2", "sdxl", "flux", "chroma")."""

    name: str
    label: str  # for people: "SD1.x"
    modelspec: str  # modelspec.architecture of a checkpoint (a LoRA adds "/lora")
    base_version: str  # kohya's ss_base_model_version
    implementation: str  # modelspec.implementation
    te_components: tuple[str, ...]  # kohya components of its text encoders, first = CLIP-L
    context_dim: int  # cross-attention width: input of the UNet's attn2.to_k / to_v
    te_width: int  # hidden size of its widest text encoder: input of self_attn.q_proj
    unet_layout: str  # UNet module layout (``keys.LAYOUTS``; block weights follow it): SD2 is named like SD1
    modelspec_v: str | None = None  # modelspec.architecture of its v-prediction variant, if it differs
    kind: str = "unet"  # "unet" (keys.UNetLayout names) or "dit" (BFL transformer, see ``dit``)
    dit: DiTSpec | None = None  # the transformer's shape and module names, for kind "dit"
    # modelspec.architecture of each named variant (Flux.1 "dev" / "schnell" share one LoRA family)
    variants: Mapping[str, str] = field(default_factory=dict, hash=False)
    # Families whose models take this family's LoRAs without a "made for another model" error: the same
    # blocks, possibly without some modules (a Flux LoRA's img_mod / modulation layers do not exist in
    # Chroma; the rest applies). Symmetric in the table.
    compatible: tuple[str, ...] = ()
    network_module: str = "networks.lora"  # kohya's ss_network_module for a LoRA of this family
    # ComfyUI ``comfy.model_base`` class names of this family's MODEL, matched exactly (Chroma subclasses
    # Flux, and so do Flux2 / LongCatImage, which are other families). Filled for the DiTs so far.
    comfy_models: tuple[str, ...] = ()
    # The key format its LoRA files are written in: "kohya" (lora_unet_*.lora_down.weight + alpha) or
    # "diffusers" (transformer.<diffusers path>.lora_A.weight, alpha folded into lora_B; for families whose
    # diffusers pipeline reads no other format).
    file_format: str = "kohya"

    @property
    def kohya_prefixes(self) -> tuple[str, ...]:
        """The kohya LoRA key prefixes of this family: ``lora_unet_`` and one per text encoder."""
        return ("lora_unet_", *(f"lora_{c}_" for c in self.te_components))


# Flux.1 (BFL ``flux/model.py``, ComfyUI ``comfy/ldm/flux``): 19 double + 38 single blocks at 3072.
_FLUX_DOUBLE = ("img_mod.lin", "img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2",
                "txt_mod.lin", "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2")
_FLUX_SINGLE = ("linear1", "linear2", "modulation.lin")
_DIT_ATTN = ("double_blocks.*.img_attn.qkv", "double_blocks.*.img_attn.proj",
             "double_blocks.*.txt_attn.qkv", "double_blocks.*.txt_attn.proj",
             "single_blocks.*.linear1", "single_blocks.*.linear2")
_DIT_PRESETS = {
    "attn": _DIT_ATTN,
    "attn_ff": (*_DIT_ATTN, "double_blocks.*.img_mlp.0", "double_blocks.*.img_mlp.2",
                "double_blocks.*.txt_mlp.0", "double_blocks.*.txt_mlp.2"),
    # Every Linear in the blocks (on Flux incl. img_mod/txt_mod/modulation), as kohya's lora_flux trains
    # by default. Not the outer modules: diffusers' kohya-Flux converter drops img_in/txt_in/time_in/...
    # (it names them without "transformer.") and kohya's loader never creates final_layer.
    "all": ("double_blocks.*", "single_blocks.*"),
}
# diffusers ``FluxTransformer2DModel`` names (ComfyUI ``comfy.utils.flux_to_diffusers`` is the map).
_FLUX_DIFFUSERS_DOUBLE = {
    "img_attn.qkv": (("attn.to_q", 1), ("attn.to_k", 1), ("attn.to_v", 1)),
    "txt_attn.qkv": (("attn.add_q_proj", 1), ("attn.add_k_proj", 1), ("attn.add_v_proj", 1)),
    "img_attn.proj": (("attn.to_out.0", 1),),
    "txt_attn.proj": (("attn.to_add_out", 1),),
    "img_mlp.0": (("ff.net.0.proj", "mlp"),),
    "img_mlp.2": (("ff.net.2", 1),),
    "txt_mlp.0": (("ff_context.net.0.proj", "mlp"),),
    "txt_mlp.2": (("ff_context.net.2", 1),),
    "img_mod.lin": (("norm1.linear", 6),),
    "txt_mod.lin": (("norm1_context.linear", 6),),
}
_FLUX_DIFFUSERS_SINGLE = {
    "linear1": (("attn.to_q", 1), ("attn.to_k", 1), ("attn.to_v", 1), ("proj_mlp", "mlp")),
    "linear2": (("proj_out", 1),),
    "modulation.lin": (("norm.linear", 3),),
}
_FLUX_DIFFUSERS_OUTER = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
_FLUX_DIFFUSERS = dict(diffusers_double=_FLUX_DIFFUSERS_DOUBLE, diffusers_single=_FLUX_DIFFUSERS_SINGLE,
                       diffusers_outer=_FLUX_DIFFUSERS_OUTER,
                       diffusers_swapped={"final_layer.adaLN_modulation.1": "norm_out.linear"})
FLUX = DiTSpec(
    depth=19, depth_single=38, hidden=3072, mlp_ratio=4.0,
    double_modules=_FLUX_DOUBLE, single_modules=_FLUX_SINGLE,
    outer_modules=("img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer",
                   "vector_in.out_layer", "guidance_in.in_layer", "guidance_in.out_layer",
                   "final_layer.linear", "final_layer.adaLN_modulation.1"),
    presets=_DIT_PRESETS,
    timestep_sampling={"dev": "flux_shift", "schnell": "logit_normal", "": "flux_shift"},
    train_guidance=1.0, sample_guidance=3.5, sample_cfg=1.0, context_tokens=256, **_FLUX_DIFFUSERS,
)
# Chroma (ComfyUI ``comfy/ldm/chroma``): Flux's blocks without their modulation layers (one
# ``distilled_guidance_layer`` computes all modulations), no vector_in/guidance_in, final_layer w/o adaLN.
CHROMA = DiTSpec(
    depth=19, depth_single=38, hidden=3072, mlp_ratio=4.0,
    double_modules=tuple(m for m in _FLUX_DOUBLE if not m.endswith("_mod.lin")),
    single_modules=("linear1", "linear2"),
    outer_modules=("img_in", "txt_in", "final_layer.linear"),
    presets=_DIT_PRESETS,
    not_trained=("distilled_guidance_layer",),
    timestep_sampling={"": "flux_shift"}, sample_cfg=4.0, **_FLUX_DIFFUSERS,
)
# SD3 / SD3.5 (Stability's MMDiT, ComfyUI ``comfy/ldm/modules/diffusionmodules/mmdit.py``): ``joint_blocks.N``
# each hold an image stream (``x_block``) and a text stream (``context_block``); the last block's text
# stream is pre-only (q/k/v and its modulation, no output projection or MLP). SD3.5 medium (MMDiT-X)
# adds a second image self-attention (``x_block.attn2``) to its first 13 blocks. Large: 38 blocks at
# 2432, medium: 24 at 1536 (hidden = 64 x depth). diffusers ``SD3Transformer2DModel`` names follow
# ComfyUI's ``comfy.utils.mmdit_to_diffusers``.
_SD3_X = ("x_block.attn.qkv", "x_block.attn.proj", "x_block.attn2.qkv", "x_block.attn2.proj",
          "x_block.mlp.fc1", "x_block.mlp.fc2", "x_block.adaLN_modulation.1")
_SD3_CONTEXT = ("context_block.attn.qkv", "context_block.attn.proj", "context_block.mlp.fc1",
                "context_block.mlp.fc2", "context_block.adaLN_modulation.1")
_SD3_ATTN = ("joint_blocks.*.x_block.attn.qkv", "joint_blocks.*.x_block.attn.proj",
             "joint_blocks.*.x_block.attn2.qkv", "joint_blocks.*.x_block.attn2.proj",
             "joint_blocks.*.context_block.attn.qkv", "joint_blocks.*.context_block.attn.proj")
SD3 = DiTSpec(
    depth=24, depth_single=0, hidden=1536, mlp_ratio=4.0,
    double_modules=(*_SD3_X, *_SD3_CONTEXT), single_modules=(),
    outer_modules=("context_embedder", "t_embedder.mlp.0", "t_embedder.mlp.2", "y_embedder.mlp.0",
                   "y_embedder.mlp.2", "final_layer.linear", "final_layer.adaLN_modulation.1"),
    presets={
        "attn": _SD3_ATTN,
        "attn_ff": (*_SD3_ATTN, "joint_blocks.*.x_block.mlp.*", "joint_blocks.*.context_block.mlp.*"),
        # every Linear of the blocks, modulations included (as "all" on Flux)
        "all": ("joint_blocks.*",),
    },
    double_prefix="joint_blocks", single_prefix="",
    # SD3's training practice (its paper, diffusers' train_dreambooth_lora_sd3 "logit_normal" 0/1,
    # kohya's sd3 --weighting_scheme default) samples sigma logit-normally, with the model's shift 3.0
    # applied by sampling only.
    timestep_sampling={"": "logit_normal"}, sample_cfg=4.5, context_tokens=77 * 2 + 256,
    diffusers_double={
        "x_block.attn.qkv": (("attn.to_q", 1), ("attn.to_k", 1), ("attn.to_v", 1)),
        "x_block.attn.proj": (("attn.to_out.0", 1),),
        "x_block.attn2.qkv": (("attn2.to_q", 1), ("attn2.to_k", 1), ("attn2.to_v", 1)),
        "x_block.attn2.proj": (("attn2.to_out.0", 1),),
        "x_block.mlp.fc1": (("ff.net.0.proj", "mlp"),),
        "x_block.mlp.fc2": (("ff.net.2", 1),),
        "x_block.adaLN_modulation.1": (("norm1.linear", 6),),  # 9 on MMDiT-X blocks: a rename, rows unused
        "context_block.attn.qkv": (("attn.add_q_proj", 1), ("attn.add_k_proj", 1), ("attn.add_v_proj", 1)),
        "context_block.attn.proj": (("attn.to_add_out", 1),),
        "context_block.mlp.fc1": (("ff_context.net.0.proj", "mlp"),),
        "context_block.mlp.fc2": (("ff_context.net.2", 1),),
        "context_block.adaLN_modulation.1": (("norm1_context.linear", 6),),
    },
    diffusers_outer={
        "context_embedder": "context_embedder",
        "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
        "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
        "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
        "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
        "final_layer.linear": "proj_out",
    },
    diffusers_swapped={"final_layer.adaLN_modulation.1": "norm_out.linear",
                       "joint_blocks.{last}.context_block.adaLN_modulation.1": "transformer_blocks.{last}.norm1_context.linear"},
    pre_only_last=("context_block.attn.proj", "context_block.mlp.fc1", "context_block.mlp.fc2"),
)
SD3_LARGE_DEPTH = 38  # SD3.5 large's joint blocks (hidden 2432); block weights cover both sizes
# Z-Image (Tongyi's single-stream DiT; ComfyUI ``comfy/ldm/lumina/model.py`` NextDiT at width 3840): 30 main
# ``layers`` over the joined image and text tokens, plus 2 ``noise_refiner`` blocks (image tokens) and 2
# ``context_refiner`` blocks (text tokens, no modulation) before them. Attention is one fused ``qkv`` in
# ComfyUI, ``to_q`` / ``to_k`` / ``to_v`` in diffusers' ZImageTransformer2DModel (``comfy.utils.z_image_to_diffusers``
# is the map); the feed-forward is SwiGLU (w1, w3 in, w2 out).
_ZI_BLOCK = ("attention.qkv", "attention.out", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
             "adaLN_modulation.0")
_ZI_ATTN = ("layers.*.attention.*", "noise_refiner.*.attention.*", "context_refiner.*.attention.*")
ZIMAGE = DiTSpec(
    depth=30, depth_single=0, hidden=3840, mlp_ratio=10240 / 3840,
    double_modules=_ZI_BLOCK, single_modules=(),
    outer_modules=("x_embedder", "cap_embedder.1", "t_embedder.mlp.0", "t_embedder.mlp.2", "final_layer.linear",
                   "final_layer.adaLN_modulation.1"),
    presets={"attn": _ZI_ATTN,
             "attn_ff": (*_ZI_ATTN, "layers.*.feed_forward.*", "noise_refiner.*.feed_forward.*",
                         "context_refiner.*.feed_forward.*"),
             "all": ("layers.*", "noise_refiner.*", "context_refiner.*")},
    double_prefix="layers", single_prefix="",
    extra_blocks=(("noise_refiner", 2, _ZI_BLOCK), ("context_refiner", 2, _ZI_BLOCK[:-1])),
    # Trained as SD3 is (logit-normal sigmas; ComfyUI samples it with shift 3.0)
    timestep_sampling={"": "logit_normal"}, sample_cfg=4.0, context_tokens=512,
    diffusers_blocks=("layers", ""),
    diffusers_double={
        "attention.qkv": (("attention.to_q", 1), ("attention.to_k", 1), ("attention.to_v", 1)),
        "attention.out": (("attention.to_out.0", 1),),
        "feed_forward.w1": (("feed_forward.w1", "mlp"),),
        "feed_forward.w2": (("feed_forward.w2", 1),),
        "feed_forward.w3": (("feed_forward.w3", "mlp"),),
        "adaLN_modulation.0": (("adaLN_modulation.0", 4),),
    },
    diffusers_outer={"x_embedder": "all_x_embedder.2-1", "cap_embedder.1": "cap_embedder.1",
                     "t_embedder.mlp.0": "t_embedder.mlp.0", "t_embedder.mlp.2": "t_embedder.mlp.2",
                     "final_layer.linear": "all_final_layer.2-1.linear",
                     "final_layer.adaLN_modulation.1": "all_final_layer.2-1.adaLN_modulation.1"},
    # ai-toolkit's Z-Image files (diffusers names under ComfyUI's prefix): ComfyUI and diffusers both read them
    diffusers_head="diffusion_model.",
)

# FLUX.2 (Black Forest Labs' ``flux2``, ComfyUI ``comfy/ldm/flux`` with ``image_model="flux2"``): Flux.1's block
# layout without per-block modulation (three shared Linears outside the blocks modulate every double / single
# block), a SwiGLU MLP (``img_mlp.0`` gives 2 x 3 x hidden rows), no biases, 128 latent channels at patch size 1.
# klein 4B: 5 double + 20 single blocks at 3072, Qwen3-4B's three tapped layers (7680 wide) as context; klein 9B:
# 8 + 24 at 4096 with Qwen3-8B (12288). diffusers ``Flux2Transformer2DModel`` names (its
# ``convert_flux2_transformer_checkpoint_to_diffusers`` and ``_convert_non_diffusers_flux2_lora_to_diffusers``): the
# single blocks' linear1 stays fused (``attn.to_qkv_mlp_proj``).
_FLUX2_DOUBLE = tuple(m for m in _FLUX_DOUBLE if not m.endswith("_mod.lin"))
FLUX2 = DiTSpec(
    depth=8, depth_single=24, hidden=4096, mlp_ratio=3.0,  # klein 9B's counts: block weights cover both sizes
    double_modules=_FLUX2_DOUBLE, single_modules=("linear1", "linear2"),
    outer_modules=("img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "guidance_in.in_layer",
                   "guidance_in.out_layer", "double_stream_modulation_img.lin", "double_stream_modulation_txt.lin",
                   "single_stream_modulation.lin", "final_layer.linear", "final_layer.adaLN_modulation.1"),
    presets=_DIT_PRESETS,
    # musubi-tuner's flux2_shift: Flux's resolution shift over FLUX.2's tokens (one per latent pixel), which is
    # what flux_shift computes here from the backend's patch size
    timestep_sampling={"": "flux_shift"}, sample_cfg=4.0, context_tokens=512,
    diffusers_double={
        **{k: v for k, v in _FLUX_DIFFUSERS_DOUBLE.items() if not k.endswith("_mod.lin") and "_mlp." not in k},
        "img_mlp.0": (("ff.linear_in", 6),), "img_mlp.2": (("ff.linear_out", 1),),
        "txt_mlp.0": (("ff_context.linear_in", 6),), "txt_mlp.2": (("ff_context.linear_out", 1),),
    },
    diffusers_single={"linear1": (("attn.to_qkv_mlp_proj", 9),), "linear2": (("attn.to_out", 1),)},
    diffusers_outer={
        "img_in": "x_embedder", "txt_in": "context_embedder",
        "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
        "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
        "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
        "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
        "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
        "single_stream_modulation.lin": "single_stream_modulation.linear",
        "final_layer.linear": "proj_out",
    },
    diffusers_swapped={"final_layer.adaLN_modulation.1": "norm_out.linear"},
)

# Qwen-Image (Alibaba's MMDiT, ComfyUI ``comfy/ldm/qwen_image``): 60 two-stream ``transformer_blocks`` at 3072 whose
# modules already carry diffusers' ``QwenImageTransformer2DModel`` names (ComfyUI loads diffusers' weights as they
# are): separate q / k / v for the image (``to_*``) and text (``add_*_proj``) streams, GELU MLPs, one modulation
# Linear per stream (``img_mod.1``, ``txt_mod.1``: 6 x hidden rows).
_QWEN_BLOCK = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
               "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
               "txt_mlp.net.2", "img_mod.1", "txt_mod.1")
_QWEN_ROWS = {"img_mlp.net.0.proj": "mlp", "txt_mlp.net.0.proj": "mlp", "img_mod.1": 6, "txt_mod.1": 6}
_QWEN_OUTER = ("img_in", "txt_in", "time_text_embed.timestep_embedder.linear_1",
               "time_text_embed.timestep_embedder.linear_2", "norm_out.linear", "proj_out")
QWEN_IMAGE = DiTSpec(
    depth=60, depth_single=0, hidden=3072, mlp_ratio=4.0,
    double_modules=_QWEN_BLOCK, single_modules=(), outer_modules=_QWEN_OUTER,
    presets={"attn": ("transformer_blocks.*.attn.*",),
             "attn_ff": ("transformer_blocks.*.attn.*", "transformer_blocks.*.img_mlp.*",
                         "transformer_blocks.*.txt_mlp.*"),
             "all": ("transformer_blocks.*",)},
    double_prefix="transformer_blocks", single_prefix="",
    # musubi-tuner's qwen_shift: logit-normal shifted by the image's tokens (mu 0.5 at 256 .. 0.9 at 8192 tokens),
    # the shift diffusers' QwenImagePipeline samples with
    timestep_sampling={"": "qwen_shift"}, sample_cfg=4.0, context_tokens=256,
    diffusers_blocks=("transformer_blocks", ""),
    diffusers_double={m: ((m, _QWEN_ROWS.get(m, 1)),) for m in _QWEN_BLOCK},
    diffusers_outer={m: m for m in _QWEN_OUTER},
    # ai-toolkit's Qwen-Image files (diffusers names under ComfyUI's prefix): ComfyUI, diffusers and musubi read them
    diffusers_head="diffusion_model.",
)

ARCH_TABLE: dict[str, Arch] = {a.name: a for a in (
    Arch("sd1", "SD1.x", "stable-diffusion-v1", "sd_v1", "diffusers", ("te",), 768, 768, "sd1"),
    Arch("sd2", "SD2.x", "stable-diffusion-v2-512", "sd_v2", "diffusers", ("te",), 1024, 1024, "sd1",
         modelspec_v="stable-diffusion-v2-768-v"),
    Arch("sdxl", "SDXL", "stable-diffusion-xl-v1-base", "sdxl_base_v1-0",
         "https://github.com/Stability-AI/generative-models", ("te1", "te2"), 2048, 1280, "sdxl"),
    # DiTs: context_dim = T5-XXL width (txt_in's input); te_width = CLIP-L (Flux) / T5 (Chroma), whose
    # LoRAs we do not train. kohya's lora_flux names CLIP-L "lora_te1_" (T5 would be "lora_te3_").
    Arch("flux", "Flux.1", "flux-1-dev", "flux1", "https://github.com/black-forest-labs/flux", ("te1",), 4096, 768, "",
         kind="dit", dit=FLUX, variants={"dev": "flux-1-dev", "schnell": "flux-1-schnell"}, compatible=("chroma",),
         network_module="networks.lora_flux", comfy_models=("Flux",)),
    Arch("chroma", "Chroma", "chroma", "chroma", "https://huggingface.co/lodestones/Chroma", (), 4096, 4096, "",
         kind="dit", dit=CHROMA, compatible=("flux",), network_module="networks.lora_flux",
         comfy_models=("Chroma",)),
    # FLUX.2 klein (4B, 9B): kohya's key format (lora_unet_ + BFL names, as for Flux.1), which ComfyUI maps for any
    # model and diffusers' Flux2KleinPipeline converts (``_convert_kohya_flux2_lora_to_diffusers``); modelspec names
    # are musubi-tuner's (``ARCH_FLUX_2_KLEIN_4B`` ...). Not compatible with Flux.1: other widths and MLPs.
    Arch("flux2", "FLUX.2 klein", "Flux.2-klein-4b", "flux2", "https://github.com/black-forest-labs/flux2", (), 7680,
         2560, "", kind="dit", dit=FLUX2,
         variants={"klein-4b": "Flux.2-klein-4b", "klein-9b": "Flux.2-klein-9b"},
         network_module="networks.lora_flux_2", comfy_models=("Flux2",)),
    # SD3.x: one family for 3 medium, 3.5 medium and 3.5 large (same module names; sizes differ). Their LoRAs
    # are written in diffusers' key format: the one diffusers' StableDiffusion3Pipeline reads (it converts no
    # other), and ComfyUI's LoraLoader maps it (comfy.lora: "Diffusers lora SD3").
    Arch("sd3", "SD3.5", "stable-diffusion-3-5-large", "sd3", "https://github.com/Stability-AI/sd3.5", ("te1", "te2"),
         4096, 1280, "", kind="dit", dit=SD3,
         variants={"3-medium": "stable-diffusion-3-medium", "3.5-medium": "stable-diffusion-3-5-medium",
                   "3.5-large": "stable-diffusion-3-5-large"},
         network_module="networks.lora_sd3", comfy_models=("SD3",), file_format="diffusers"),
    # Z-Image (Base and Turbo: one family, the same weights' shapes; Turbo is step-distilled, see
    # ``distilled_notice``). Files: ai-toolkit's key format, the one ComfyUI (comfy.lora, Lumina2 branch) and
    # diffusers' ZImagePipeline both read.
    Arch("zimage", "Z-Image", "z-image", "zimage", "https://github.com/Tongyi-MAI/Z-Image", (), 2560, 2560, "",
         kind="dit", dit=ZIMAGE, network_module="networks.lora_zimage", comfy_models=("ZImage",),
         file_format="diffusers"),
    # Qwen-Image (and its Edit models' LoRAs, which share the blocks): ai-toolkit's key format, the one ComfyUI's
    # LoraLoader maps for QwenImage by name and diffusers' QwenImagePipeline converts
    # (``_convert_non_diffusers_qwen_lora_to_diffusers``); modelspec name musubi-tuner's ``ARCH_QWEN_IMAGE``.
    Arch("qwen_image", "Qwen-Image", "Qwen-Image", "qwen_image", "https://github.com/QwenLM/Qwen-Image", (), 3584,
         3584, "", kind="dit", dit=QWEN_IMAGE, network_module="networks.lora_qwen_image", comfy_models=("QwenImage",),
         file_format="diffusers"),
    # A flow-matching model a host loads that has no entry above: it still trains (every Linear, named
    # "lora_unet_" + its module path, which ComfyUI maps for any model), marked untested.
    Arch(OTHER_DIT, "a flow-matching model without a family entry (untested)", "unknown-flow", "unknown", "", (), 0, 0,
         "", kind="dit"),
)}
ARCHS = tuple(ARCH_TABLE)  # the family names, in table order
UNET_ARCHS = tuple(a.name for a in ARCH_TABLE.values() if a.kind == "unet")
DIT_ARCHS = tuple(a.name for a in ARCH_TABLE.values() if a.kind == "dit")


def get_arch(name: str) -> Arch:
    """The table entry for ``name``; ValueError naming the known families for anything else."""
    try:
        return ARCH_TABLE[name]
    except KeyError:
        raise ValueError(f"arch {name!r} unknown; use one of {list(ARCHS)}") from None


def is_compatible(lora_arch: str, model_arch: str) -> bool:
    """True when a LoRA of ``lora_arch`` applies to a model of ``model_arch``: the same family, or one the
    table lists as compatible (a Flux LoRA on Chroma: same blocks; modules Chroma lacks are skipped)."""
    if lora_arch == model_arch:
        return True
    a = ARCH_TABLE.get(lora_arch)
    return a is not None and model_arch in a.compatible


def modelspec_architecture(arch: str, variant: str | None = None, prediction: str = "epsilon") -> str:
    """The ``modelspec.architecture`` of a checkpoint of ``arch`` (a LoRA adds "/lora"): ``variant`` picks a
    named variant ("dev" / "schnell" for Flux); v-prediction picks ``modelspec_v`` where the family has one."""
    a = get_arch(arch)
    if variant is not None:
        if variant not in a.variants:
            raise ValueError(f"{a.label} has no variant {variant!r}; use one of {sorted(a.variants) or [None]}")
        return a.variants[variant]
    return a.modelspec_v if prediction == "v" and a.modelspec_v else a.modelspec


def arch_from_metadata(meta: Mapping[str, str]) -> str | None:
    """The family a file's ``modelspec.architecture`` or ``ss_base_model_version`` names (None if neither does)."""
    spec = meta.get("modelspec.architecture", "").split("/")[0]
    for a in ARCH_TABLE.values():
        if spec in (a.modelspec, a.modelspec_v, *a.variants.values()):
            return a.name
    if spec.startswith("stable-diffusion-v2"):  # the other SD2 variants (768, unCLIP ...)
        return "sd2"
    if spec == "flux-1" or spec.startswith("flux-1-"):  # sd-scripts' ARCH_FLUX_1_UNKNOWN and other Flux.1 kinds
        return "flux"
    if spec.startswith(("stable-diffusion-3", "stable-diffusion-v3")):  # kohya's and SwarmUI's SD3.x names
        return "sd3"
    if spec.lower().startswith(("flux.2-", "flux-2-")):
        return "flux2"
    if spec.lower().startswith(("qwen-image", "qwen_image")):  # musubi's Qwen-Image-Edit* names too
        return "qwen_image"
    if spec.startswith(("z-image", "z_image", "zimage")):
        return "zimage"
    version = meta.get("ss_base_model_version", "")
    return next((a.name for a in ARCH_TABLE.values() if version == a.base_version), None)


# Step-distilled ("Turbo") checkpoints: training one directly erodes its distillation (kohya, ai-toolkit and
# OneTrainer either train a de-distillation adapter or train on the Base model); what we do is warn and name
# the fix, since a user may still want it (see ``distilled_notice``).
_TURBO = re.compile(r"turbo", re.IGNORECASE)
# FLUX.2 klein ships a step-distilled model under the plain name (flux-2-klein-4b) and the undistilled one as
# "klein-base" (flux-2-klein-base-4b): BFL's guide and musubi-tuner train on the base model.
_KLEIN = re.compile(r"klein", re.IGNORECASE)
_KLEIN_BASE = re.compile(r"klein[-_ .]?base|base[-_ .]?klein", re.IGNORECASE)


def distilled_notice(model_name: str) -> str:
    """A warning for a model whose name says it is step-distilled (Z-Image Turbo, SD3.5 Large Turbo, SDXL Turbo, the
    FLUX.2 klein that is not "base"), naming the fix; "" for any other name."""
    name = str(model_name).replace("\\", "/").rsplit("/", 1)[-1]
    if _KLEIN.search(name) and not _KLEIN_BASE.search(name):
        return (f"{name!r} looks like the step-distilled FLUX.2 klein: training it directly wears off its "
                "distillation, so its 4-step images turn soft or noisy. Train the LoRA on FLUX.2 klein Base "
                "(flux-2-klein-base-4b / -9b) and apply it to the distilled klein: Apply LoRA Stack and the LoRA Grid "
                "load a Base-trained LoRA on it.")
    if not _TURBO.search(name):
        return ""
    return (f"{name!r} looks like a Turbo (step-distilled) model: training it directly wears off its distillation, "
            "so its few-step images turn soft or noisy. Train the LoRA on the Base model it was distilled from "
            "(Z-Image Base, SD3.5 Large, SDXL) and apply it to Turbo: Apply LoRA Stack and the LoRA Grid load a "
            "Base-trained LoRA on the Turbo model.")
