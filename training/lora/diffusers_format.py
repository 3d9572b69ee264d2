"""Writing a transformer LoRA in diffusers' key format, for families whose diffusers pipeline reads no other
(``archs.Arch.file_format == "diffusers"``: SD3.x, whose ``SD3LoraLoaderMixin`` converts nothing).

Keys are ``transformer.<diffusers module>.lora_A.weight`` / ``.lora_B.weight``, as diffusers'
``train_dreambooth_lora_sd3.py`` writes them and ComfyUI's LoraLoader maps them ("Diffusers lora SD3" in
``comfy/lora.py``); Z-Image's are ``diffusion_model.<diffusers module>...``, as ai-toolkit writes them and
both ComfyUI (its Lumina2 branch) and diffusers' ``ZImagePipeline`` read them. A module diffusers splits (the fused ``qkv``) is written as its parts: a LoRA trained on
the fused layer as parts that keep the whole ``lora_A`` and take their rows of ``lora_B``
(``lora.fuse.split_module``), one trained on diffusers' split layers as those parts again
(``lora.fuse.split_block_diagonal``); both exact. The
scale ``alpha / rank`` is folded into ``lora_B`` and no ``.alpha`` key is written, so that every reader
applies ``B @ A`` at strength 1: diffusers takes peft's ``lora_alpha = r`` when a file says nothing, and
ComfyUI applies a LoRA without alpha at scale 1. Modules diffusers stores with their (shift, scale) halves
the other way round (``norm_out.linear``, SD3's pre-only ``norm1_context.linear``) get their rows swapped.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..model import dit_keys as dk
from .files import LoraFormatError, LoraModule, LoraWeights, torch_dtype
from .fuse import split_block_diagonal, split_module



def _rows(parts: tuple[tuple[str, int], ...], module: LoraModule) -> list[int]:
    """Each part's rows of ``module``'s up weight: the table's multiples of the hidden width, read from the
    module (its total rows)."""
    total = sum(r for _, r in parts)
    per_unit = int(module.up.shape[0]) // total
    if per_unit * total != module.up.shape[0]:
        raise LoraFormatError(f"a module of {module.up.shape[0]} rows cannot split into {[r for _, r in parts]} parts")
    return [r * per_unit for _, r in parts]


def diffusers_modules(lora: LoraWeights) -> dict[str, LoraModule]:
    """diffusers module path -> its LoRA (scale folded into ``up``, alpha = rank) of a DiT LoRA in kohya names.

    Raises ``LoraFormatError`` naming a module diffusers has no name for (e.g. a text-encoder module)."""
    arch = lora.arch
    parts_of = dk.diffusers_parts(arch, depth=2, depth_single=1, hidden=1)
    swapped = dk.diffusers_swapped(arch)
    out: dict[str, LoraModule] = {}
    for name, m in sorted(lora.modules.items()):
        if m.dora_scale is not None:
            raise LoraFormatError(f"module {name} is DoRA; diffusers' {arch} LoRA format has no DoRA magnitude")
        try:
            path = dk.parse_kohya_dit_name(name, arch)
        except Exception as e:  # a text-encoder or foreign name
            raise LoraFormatError(f"module {name} has no diffusers name in a {arch} transformer LoRA: {e}") from e
        folded = LoraModule(m.down, (m.up.float() * m.scale).to(m.up.dtype), float(m.rank))
        block = dk.block_of_path(path, arch)
        child = path.split(".", 2)[2] if block else path
        template = f"{block[0]}.0.{child}" if block else path
        swap_to = swapped.get(path) or next(
            (d for b, d in swapped.items() if "{last}" in b and block and b.split(".", 2)[2] == child
             and dk.is_pre_only_modulation(path, m.up.shape[0], m.down.shape[1], arch)), None)
        if swap_to is not None:
            up = torch.cat(folded.up.chunk(2, dim=0)[::-1])
            target = swap_to.replace("{last}", str(block[1])) if block else swap_to
            out[target] = LoraModule(folded.down, up, folded.alpha)
            continue
        parts = parts_of.get(template)
        if parts is None:
            raise LoraFormatError(f"module {name} ({path}) has no diffusers counterpart in {arch}")
        names = [p.replace(".0.", f".{block[1]}.", 1) if block else p for p, _ in parts]
        if len(parts) == 1:
            out[names[0]] = folded
            continue
        rows = _rows(parts, folded)
        # parts trained apart (diffusers' own split layers) go back at their own rank; a LoRA trained on the
        # fused layer (ComfyUI's qkv) shares its lora_A among the parts
        pieces = split_block_diagonal(folded, rows) or split_module(folded, rows)
        for part_name, piece in zip(names, pieces):
            out[part_name] = LoraModule(piece.down, piece.up, float(piece.rank))
    return out


def diffusers_state_dict(lora: LoraWeights, dtype: str | torch.dtype | None = None) -> dict[str, Tensor]:
    """The file's tensors: ``<head><path>.lora_A.weight`` / ``.lora_B.weight`` (head ``transformer.`` for SD3,
    ``diffusion_model.`` for Z-Image: ``DiTSpec.diffusers_head``), contiguous, on the CPU."""
    dt = None if dtype is None else torch_dtype(dtype)
    head = dk._spec(lora.arch).diffusers_head
    out: dict[str, Tensor] = {}
    for path, m in diffusers_modules(lora).items():
        # parts of a split module share one lora_A: each key gets its own copy (safetensors stores no aliases)
        out[f"{head}{path}.lora_A.weight"] = m.down.detach().to("cpu", dt or m.down.dtype).clone()
        out[f"{head}{path}.lora_B.weight"] = m.up.detach().to("cpu", dt or m.up.dtype).contiguous()
    return out
