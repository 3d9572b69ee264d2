"""Fusing LoRAs on the parts of a split layer into one LoRA on the fused layer, and splitting it back.

diffusers' Flux names the fused BFL ``qkv`` as three Linear layers (``to_q``, ``to_k``, ``to_v``) and a
single block's ``linear1`` as four (+ ``proj_mlp``); kohya, ComfyUI and Civitai files use the fused layer.
The fused weight is the parts stacked by rows, so a LoRA per part is exactly one LoRA on the fused layer:

    delta_fused = [s_1 B_1 A_1; ...; s_n B_n A_n] = blockdiag(s_1 B_1, ..., s_n B_n) @ cat(A_1, ..., A_n)

with rank ``sum r_i`` (parts that share one ``A``, as :func:`split_module` makes them, fuse back at rank
``r``: ``[B_1; ...; B_n] A``). The fused module keeps one scale ``s = alpha / rank``; when the parts' scales
differ, the ratio ``s_i / s`` goes into that part's rows of ``up`` (exact in fp32, one rounding in fp16).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .files import LoraFormatError, LoraModule, LycorisModule


def fuse_modules(parts: Sequence[LoraModule | None], rows: Sequence[int] | None = None) -> LoraModule:
    """One LoRA on the row-stacked layer whose delta equals the parts' deltas stacked in order.

    ``parts`` are Linear LoRAs with the same input width; ``None`` is a part without a LoRA (its rows of
    the delta are zero), which needs its output rows in ``rows`` (one entry per part; ignored for the
    others). The fused ``alpha / rank`` is the first non-zero part scale, ``down`` = ``cat(A_i)`` and
    ``up`` = ``blockdiag(B_i)``: rank ``sum r_i``. Raises LoraFormatError for conv or DoRA parts, different
    input widths, or a missing part without its row count.
    """
    present = [(i, p) for i, p in enumerate(parts) if p is not None]
    if not present:
        raise LoraFormatError("fuse_modules needs at least one LoRA part; all parts are None")
    for i, p in present:
        if isinstance(p, LycorisModule):
            raise LoraFormatError(f"part {i} is a {p.algo}: a Hadamard / Kronecker product per part joins into no "
                                  f"{p.algo} of the fused layer; only plain LoRA parts fuse")
        if p.down.dim() != 2:
            raise LoraFormatError(f"part {i} is a conv LoRA (down {tuple(p.down.shape)}); only Linear LoRAs fuse")
        if p.dora_scale is not None:
            raise LoraFormatError(f"part {i} is DoRA: its magnitude belongs to the part's own weight, so DoRA parts "
                                  "cannot fuse; merge it into the base model instead")
    widths = {int(p.down.shape[1]) for _, p in present}
    if len(widths) != 1:
        raise LoraFormatError(f"parts take different input widths {sorted(widths)}; only parts of one layer fuse")
    if len(present) == 1 and len(parts) == 1:
        return present[0][1]
    first = present[0][1]
    if len(present) == len(parts) and all(
            p.scale == first.scale and p.down.shape == first.down.shape and torch.equal(p.down, first.down)
            for _, p in present):
        # parts that share one down (a split_module output, e.g. a diffusers SD3 file we wrote): stacking
        # their ups is the same delta at the parts' rank, not their sum
        return LoraModule(first.down, torch.cat([p.up.to(first.up.dtype) for _, p in present]), first.alpha)
    dtype = present[0][1].up.dtype
    scale = next((p.scale for _, p in present if p.scale != 0), 1.0)
    downs, ups = [], []
    for i, p in enumerate(parts):
        if p is None:
            if rows is None or rows[i] is None or rows[i] < 0:
                raise LoraFormatError(f"part {i} has no LoRA; give its output rows in rows=[...] so its delta is zero")
            ups.append(torch.zeros(rows[i], 0, dtype=dtype))
            continue
        up = p.up.to(dtype)
        if p.scale != scale:  # fold the part's own scale into its rows, in fp32 (see the module note)
            up = (up.float() * (p.scale / scale)).to(dtype)
        downs.append(p.down.to(dtype))
        ups.append(up)
    down = torch.cat(downs, dim=0)
    up = torch.block_diag(*ups)
    return LoraModule(down, up, scale * down.shape[0])


def split_module(module: LoraModule, rows: Sequence[int]) -> list[LoraModule]:
    """The inverse view: one LoRA per row block of a fused layer (``rows`` must add up to its output rows).

    Exact without any decomposition: every part shares ``down`` and takes its rows of ``up``, with the
    module's alpha (so the same rank and scale). A block-diagonal ``up`` from :func:`fuse_modules` gives
    parts whose extra columns are zero; that is the same delta, at the fused rank.
    """
    out_rows = int(module.up.shape[0])
    if sum(rows) != out_rows or any(r <= 0 for r in rows):
        raise LoraFormatError(
            f"rows {list(rows)} do not split {out_rows} output rows; give positive rows adding up to it")
    if module.dora_scale is not None:
        raise LoraFormatError("a DoRA module cannot be split: its magnitude is per row of the fused weight")
    ups = torch.split(module.up, list(rows), dim=0)
    return [LoraModule(module.down, u.contiguous(), module.alpha) for u in ups]


def split_block_diagonal(module: LoraModule, rows: Sequence[int]) -> list[LoraModule] | None:
    """The parts a :func:`fuse_modules` of equal-rank parts came from, each at its own rank (``down`` rows and
    ``up`` columns of its block), or None when ``module`` is not block-diagonal in that way (then
    :func:`split_module` is the exact split)."""
    n = len(rows)
    if n < 2 or module.rank % n or int(module.up.shape[0]) != sum(rows) or module.dora_scale is not None:
        return None
    r = module.rank // n
    out, o = [], 0
    for i, d in enumerate(rows):
        block = module.up[o:o + d]
        if torch.cat([block[:, :i * r], block[:, (i + 1) * r:]], dim=1).count_nonzero():
            return None
        # the part's own scale equals the fused one: alpha / rank with both divided by n
        out.append(LoraModule(module.down[i * r:(i + 1) * r].clone(), block[:, i * r:(i + 1) * r].clone(),
                              module.alpha / n))
        o += d
    return out
