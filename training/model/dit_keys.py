"""Module names of the flow-matching transformers in the family table (Flux.1, Chroma in BFL's layout,
SD3.x in Stability's MMDiT layout): kohya LoRA names, target presets, and the diffusers names that split
one reference module into several. "BFL path" below means the module path in the reference model
ComfyUI loads (``double_blocks.0.img_attn.qkv``, ``joint_blocks.0.x_block.attn.qkv``).

* kohya (sd-scripts ``networks/lora_flux.py``, ``LORA_PREFIX_FLUX = "lora_unet"``): the LoRA name is
  ``"lora_unet_" + path.replace(".", "_")`` where ``path`` is the module in the BFL/ComfyUI model
  (``double_blocks.0.img_attn.qkv`` -> ``lora_unet_double_blocks_0_img_attn_qkv``). ComfyUI's
  ``model_lora_keys_unet`` builds the same name from every ``diffusion_model.*.weight`` key.
* diffusers (``FluxTransformer2DModel`` / ``SD3Transformer2DModel``; ComfyUI's ``flux_to_diffusers`` /
  ``mmdit_to_diffusers`` are the maps, kept per family in ``archs.DiTSpec.diffusers_*``): the fused
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
        raise ValueError(f"{a.label} is not a DiT family; transformer module names apply to {list(_dit_names())}")
    return a.dit


def _dit_names() -> tuple[str, ...]:
    from .archs import ARCH_TABLE

    return tuple(a.name for a in ARCH_TABLE.values() if a.dit is not None)


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


@lru_cache(maxsize=16)
def _block_re(spec: DiTSpec, sep: str) -> re.Pattern:
    """``<block list><sep><index><sep><child>`` for the family's block lists (``_`` in kohya names)."""
    names = "|".join(re.escape(p) for p in spec.block_prefixes)
    return re.compile(rf"({names}){re.escape(sep)}(\d+){re.escape(sep)}(.+)")


def block_of_path(path: str, arch: str | DiTSpec) -> tuple[str, int] | None:
    """(block list, index) of a BFL path (``("joint_blocks", 3)``), None for a module outside the blocks."""
    m = _block_re(_spec(arch), ".").fullmatch(strip_host_prefix(path))
    return (m.group(1), int(m.group(2))) if m else None


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
    m = _block_re(spec, "_").fullmatch(rest)
    if m:
        children = spec.children_of(m.group(1))
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
            f"select_dit_targets expects the family's own BFL-layout modules ({' / '.join(p + '.N' for p in spec.block_prefixes)})"
        )
    return out


def diffusers_parts(arch: str | DiTSpec, depth: int | None = None, depth_single: int | None = None,
                    hidden: int | None = None) -> dict[str, tuple[tuple[str, int], ...]]:
    """BFL module path -> its diffusers module(s), each with its output rows, in row order. One part = a
    rename; several = a fused BFL module (``qkv``, ``linear1``).

    ``depth`` / ``depth_single`` / ``hidden`` override the family's (tiny test models). Rows follow the family's
    ``DiTSpec.diffusers_*`` tables (q, k, v = hidden each, MLP = hidden * mlp_ratio). Modules without a
    diffusers counterpart in this family, and the swapped ones (see :func:`diffusers_swapped`), are absent.
    """
    spec = _spec(arch)
    nd = spec.depth if depth is None else depth
    ns = spec.depth_single if depth_single is None else depth_single
    h = spec.hidden if hidden is None else hidden

    def rows(r) -> int:
        return int(h * spec.mlp_ratio) if r == "mlp" else int(r * h)

    double_head, single_head = spec.diffusers_blocks
    out: dict[str, tuple[tuple[str, int], ...]] = {}
    for i in range(nd):
        for child, parts in spec.diffusers_double.items():
            if child in spec.double_modules and not (i == nd - 1 and child in spec.pre_only_last):
                out[f"{spec.double_prefix}.{i}.{child}"] = tuple(
                    (f"{double_head}.{i}.{p}", rows(r)) for p, r in parts)
    for i in range(ns):
        for child, parts in spec.diffusers_single.items():
            if child in spec.single_modules:
                out[f"{spec.single_prefix}.{i}.{child}"] = tuple((f"{single_head}.{i}.{p}", rows(r)) for p, r in parts)
    for prefix, depth_extra, children in spec.extra_blocks:
        for i in range(depth_extra):
            for child, parts in spec.diffusers_double.items():
                if child in children:
                    out[f"{prefix}.{i}.{child}"] = tuple((f"{prefix}.{i}.{p}", rows(r)) for p, r in parts)
    for bfl, diff in spec.diffusers_outer.items():
        if bfl in spec.outer_modules:
            out[bfl] = ((diff, -1),)  # rows unknown without the model's channels; a rename needs none
    return out


def diffusers_swapped(arch: str | DiTSpec) -> dict[str, str]:
    """BFL path -> diffusers path of the modules whose two output halves diffusers stores the other way
    round (shift/scale: ComfyUI's ``swap_scale_shift``); ``{last}`` stands for the last double block."""
    return dict(_spec(arch).diffusers_swapped)


def is_pre_only_modulation(path: str, up_rows: int, in_features: int, arch: str | DiTSpec) -> bool:
    """Whether ``path`` is the modulation of a pre-only block (SD3's last context block), told by its rows: 2
    (shift, scale) per hidden unit instead of 6. Such a module is one of :func:`diffusers_swapped`'s."""
    spec = _spec(arch)
    last = [k for k in spec.diffusers_swapped if "{last}" in k]
    if not last:
        return False
    found = block_of_path(path, spec)
    if found is None:
        return False
    child = strip_host_prefix(path).split(".", 2)[2]
    return any(k.split(".", 2)[2] == child for k in last) and up_rows == 2 * in_features


@lru_cache(maxsize=16)
def _diff_block_re(spec: DiTSpec) -> re.Pattern:
    heads = spec.diffusers_blocks[:2] if spec.depth_single else spec.diffusers_blocks[:1]
    names = "|".join(re.escape(p) for p in (*heads, *(prefix for prefix, _, _ in spec.extra_blocks)))
    return re.compile(rf"({names})\.(\d+)\.(.+)")


def diffusers_to_bfl(path: str, arch: str | DiTSpec) -> tuple[str, int, int] | None:
    """``(BFL path, part index, number of parts)`` of a diffusers module path (any block index), or None
    if this family's model has no such module: Flux's ``transformer_blocks.3.attn.to_k`` ->
    ``("double_blocks.3.img_attn.qkv", 1, 3)``."""
    spec = _spec(arch)
    m = _diff_block_re(spec).fullmatch(path)
    if m:  # look the child up in block 0 of a one-block model, then put the index back
        i, child = int(m.group(2)), m.group(3)
        parts = diffusers_parts(spec, depth=2, depth_single=1, hidden=1)  # block 0 of 2: not a pre-only one
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
