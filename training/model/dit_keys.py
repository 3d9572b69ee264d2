"""Module names of BFL-layout transformers (Flux.1, Chroma): kohya LoRA names, target presets, and
the diffusers names that split one BFL module into several.

* kohya (sd-scripts ``networks/lora_flux.py``, ``LORA_PREFIX_FLUX = "lora_unet"``): the LoRA name is
  ``"lora_unet_" + path.replace(".", "_")`` where ``path`` is the module in the BFL/ComfyUI model
  (``double_blocks.0.img_attn.qkv`` -> ``lora_unet_double_blocks_0_img_attn_qkv``). ComfyUI's
  ``model_lora_keys_unet`` builds the same name from every ``diffusion_model.*.weight`` key.
* diffusers (``FluxTransformer2DModel``; ComfyUI ``comfy.utils.flux_to_diffusers`` is the map): the fused
  ``img_attn.qkv`` is ``attn.to_q`` / ``to_k`` / ``to_v``, ``txt_attn.qkv`` is ``attn.add_q_proj`` /
  ``add_k_proj`` / ``add_v_proj``, a single block's ``linear1`` is ``attn.to_q`` / ``to_k`` / ``to_v`` +
  ``proj_mlp``. :func:`diffusers_parts` gives each BFL module's parts with their output rows, so a
  LoRA on the parts can be fused into one on the BFL module (``lora.fuse``) and split back.

``_`` is ambiguous (``img_attn_qkv``), so kohya names are parsed back by lookup among the family's module
paths (built from its block counts, ``archs.DiTSpec``), never by guessing where the dots were.
"""

from __future__ import annotations

import fnmatch
import re
from functools import lru_cache
from typing import Iterable

from torch import nn

from .archs import DiTSpec, get_arch
from .keys import ModuleNameError

KOHYA_PREFIX = "lora_unet_"
# What hosts and trainers put in front of a BFL path: ComfyUI's model, BFL/ComfyUI-native LoRAs.
_HOST_PREFIXES = ("diffusion_model.", "model.diffusion_model.")


def _spec(arch: str | DiTSpec) -> DiTSpec:
    if isinstance(arch, DiTSpec):
        return arch
    a = get_arch(arch)
    if a.dit is None:
        raise ValueError(f"{a.label} is not a DiT family; BFL module names apply to flux/chroma")
    return a.dit


def strip_host_prefix(path: str) -> str:
    """A BFL path without ComfyUI's ``diffusion_model.`` (or a checkpoint's ``model.diffusion_model.``)."""
    for p in _HOST_PREFIXES:
        if path.startswith(p):
            return path[len(p):]
    return path


def kohya_dit_name(path: str) -> str:
    """The kohya LoRA name of a BFL module path: ``double_blocks.0.img_attn.qkv`` ->
    ``lora_unet_double_blocks_0_img_attn_qkv`` (a leading ``diffusion_model.`` is dropped)."""
    return KOHYA_PREFIX + strip_host_prefix(path).replace(".", "_")


@lru_cache(maxsize=16)
def _table(spec: DiTSpec) -> dict[str, str]:
    return {p.replace(".", "_"): p for p in spec.module_paths()}


_BLOCK = re.compile(r"(double_blocks|single_blocks)_(\d+)_(.+)")


def parse_kohya_dit_name(name: str, arch: str | DiTSpec, known_modules: Iterable[str] | None = None) -> str:
    """The BFL module path of a kohya name (inverse of :func:`kohya_dit_name`).

    Any block index is accepted (tiny test models and the full 19 + 38 alike); ``known_modules`` adds
    paths of a model with other modules. Raises ``ModuleNameError`` naming the name for anything else.
    """
    if not name.startswith(KOHYA_PREFIX):
        raise ModuleNameError(f"{name!r} is not a kohya DiT LoRA name; expected the prefix {KOHYA_PREFIX!r}")
    rest = name[len(KOHYA_PREFIX):]
    spec = _spec(arch)
    for p in known_modules or ():
        p = strip_host_prefix(p)
        if p.replace(".", "_") == rest:
            return p
    m = _BLOCK.fullmatch(rest)
    if m:
        children = spec.double_modules if m.group(1) == "double_blocks" else spec.single_modules
        child = {c.replace(".", "_"): c for c in children}.get(m.group(3))
        if child is not None:
            return f"{m.group(1)}.{int(m.group(2))}.{child}"
    path = _table(spec).get(rest)
    if path is None:
        raise ModuleNameError(
            f"{name!r} is not a module of the {'/'.join(_families(spec)) or 'given'} transformer; "
            "pass known_modules with your model's module names if it has other modules"
        )
    return path


def _families(spec: DiTSpec) -> list[str]:
    from .archs import ARCH_TABLE

    return [a.name for a in ARCH_TABLE.values() if a.dit == spec]


def preset_patterns(preset: str, arch: str | DiTSpec) -> tuple[str, ...]:
    """The glob patterns of a target preset ("attn", "attn_ff", "all") over BFL paths."""
    spec = _spec(arch)
    try:
        return tuple(spec.presets[preset])
    except KeyError:
        raise ValueError(f"target preset {preset!r} unknown for this family; use one of {sorted(spec.presets)}") from None


def matches_preset(path: str, preset: str, arch: str | DiTSpec) -> bool:
    """Whether the BFL module ``path`` (a leading ``diffusion_model.`` is ignored) is a target of ``preset``."""
    spec = _spec(arch)
    path = strip_host_prefix(path)
    if path.startswith(spec.not_trained):
        return False
    return any(fnmatch.fnmatchcase(path, pat) for pat in preset_patterns(preset, spec))


def select_dit_targets(named_modules: Iterable[tuple[str, nn.Module]], preset: str,
                       arch: str | DiTSpec) -> list[str]:
    """The names of the Linear modules ``preset`` trains, in model order, from ``model.named_modules()`` of
    a BFL-layout transformer (ComfyUI's ``diffusion_model`` or its parent; the names come back as given).

    Any ``nn.Linear`` subclass counts (ComfyUI's ``ops`` Linear layers are). ValueError when nothing
    matches, naming the preset and a few of the model's modules (e.g. a diffusers-layout model).
    """
    spec = _spec(arch)
    patterns = preset_patterns(preset, spec)
    out, seen = [], []
    for name, module in named_modules:
        if not isinstance(module, nn.Linear):
            continue
        seen.append(name)
        path = strip_host_prefix(name)
        if path.startswith(spec.not_trained):
            continue
        if any(fnmatch.fnmatchcase(path, pat) for pat in patterns):
            out.append(name)
    if not out:
        raise ValueError(
            f"preset {preset!r} selects none of the model's {len(seen)} Linear modules (e.g. {seen[:3]}); "
            "select_dit_targets expects a BFL-layout transformer (double_blocks.N / single_blocks.N)"
        )
    return out


def diffusers_parts(arch: str | DiTSpec, depth: int | None = None, depth_single: int | None = None,
                    hidden: int | None = None) -> dict[str, tuple[tuple[str, int], ...]]:
    """BFL module path -> its diffusers ``FluxTransformer2DModel`` module(s), each with its output rows, in
    row order. One part = a rename; several = a fused BFL module (``qkv``, ``linear1``).

    ``depth`` / ``depth_single`` / ``hidden`` override the family's (tiny test models). Output rows follow
    ComfyUI's ``flux_to_diffusers``: q, k, v = hidden each, single-block ``proj_mlp`` = hidden * mlp_ratio.
    Modules without a diffusers counterpart in this family are absent.
    """
    spec = _spec(arch)
    nd = spec.depth if depth is None else depth
    ns = spec.depth_single if depth_single is None else depth_single
    h = spec.hidden if hidden is None else hidden
    mlp = int(h * spec.mlp_ratio)
    double = {
        "img_attn.qkv": (("attn.to_q", h), ("attn.to_k", h), ("attn.to_v", h)),
        "txt_attn.qkv": (("attn.add_q_proj", h), ("attn.add_k_proj", h), ("attn.add_v_proj", h)),
        "img_attn.proj": (("attn.to_out.0", h),),
        "txt_attn.proj": (("attn.to_add_out", h),),
        "img_mlp.0": (("ff.net.0.proj", mlp),),
        "img_mlp.2": (("ff.net.2", h),),
        "txt_mlp.0": (("ff_context.net.0.proj", mlp),),
        "txt_mlp.2": (("ff_context.net.2", h),),
        "img_mod.lin": (("norm1.linear", 6 * h),),
        "txt_mod.lin": (("norm1_context.linear", 6 * h),),
    }
    single = {
        "linear1": (("attn.to_q", h), ("attn.to_k", h), ("attn.to_v", h), ("proj_mlp", mlp)),
        "linear2": (("proj_out", h),),
        "modulation.lin": (("norm.linear", 3 * h),),
    }
    outer = {
        "img_in": "x_embedder", "txt_in": "context_embedder",
        "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
        "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
        "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
        "final_layer.linear": "proj_out",
        # final_layer.adaLN_modulation.1 <-> norm_out.linear swaps its scale/shift halves: not a rename.
    }
    out: dict[str, tuple[tuple[str, int], ...]] = {}
    for i in range(nd):
        for child, parts in double.items():
            if child in spec.double_modules:
                out[f"{spec.double_prefix}.{i}.{child}"] = tuple((f"transformer_blocks.{i}.{p}", r) for p, r in parts)
    for i in range(ns):
        for child, parts in single.items():
            if child in spec.single_modules:
                out[f"{spec.single_prefix}.{i}.{child}"] = tuple(
                    (f"single_transformer_blocks.{i}.{p}", r) for p, r in parts)
    for bfl, diff in outer.items():
        if bfl in spec.outer_modules:
            out[bfl] = ((diff, -1),)  # rows unknown without the model's channels; a rename needs none
    return out


_DIFF_BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)")


def diffusers_to_bfl(path: str, arch: str | DiTSpec) -> tuple[str, int, int] | None:
    """``(BFL path, part index, number of parts)`` of a diffusers Flux module path (any block index), or None
    if this family's BFL model has no such module: ``transformer_blocks.3.attn.to_k`` ->
    ``("double_blocks.3.img_attn.qkv", 1, 3)``."""
    spec = _spec(arch)
    m = _DIFF_BLOCK.fullmatch(path)
    if m:  # look the child up in block 0 of a one-block model, then put the index back
        i, child = int(m.group(2)), m.group(3)
        parts = diffusers_parts(spec, depth=1, depth_single=1, hidden=1)
        head = f"{m.group(1)}.0.{child}"
        for bfl, ps in parts.items():
            for k, (p, _) in enumerate(ps):
                if p == head:
                    block, _, rest = bfl.split(".", 2)
                    return f"{block}.{i}.{rest}", k, len(ps)
        return None
    for bfl, ps in diffusers_parts(spec, depth=0, depth_single=0, hidden=1).items():
        if ps[0][0] == path:
            return bfl, 0, 1
    return None
