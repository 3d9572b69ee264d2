"""``lora-workbench inspect``: a LoRA file described for people (structure, training facts, hashes)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping

from ..model.archs import ARCH_TABLE, arch_from_metadata
from .files import LoraFormatError, legacy_hash, model_hash, network_of, read_lora_file
from .formats import load_lora
from .metadata import tag_counts


def _abbrev(value: str, limit: int = 120) -> str:
    value = value.replace("\n", " ")
    return value if len(value) <= limit else f"{value[:limit]}... ({len(value)} chars)"


def _top_tags(meta: Mapping[str, str], n: int = 10) -> str | None:
    return ", ".join(f"{t} ({c})" for t, c in tag_counts(meta).most_common(n)) or None


def _summary(values: Iterable) -> str:
    counts = Counter(values)
    return ", ".join(f"{v:g} x{c}" if isinstance(v, float) else f"{v} x{c}" for v, c in sorted(counts.items()))


def _row(label: str, value) -> str:
    return f"{label + ':':<18}{value}"


# Key prefixes of whole-model files (LDM single-file checkpoints, diffusers folders' weights).
_CHECKPOINT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.",
                        "down_blocks.", "text_model.", "encoder.down")


def describe_lora(path: str | os.PathLike) -> str:
    """Human summary of a LoRA file (``lora-workbench inspect``): structure, training facts, hashes, metadata.

    Raises LoraFormatError for a file that cannot be read or is not a LoRA (e.g. a full checkpoint)."""
    path = Path(path)
    sd, meta = read_lora_file(path)
    lines = [_row("file", f"{path} ({path.stat().st_size / 1e6:.2f} MB)")]
    try:
        lora = load_lora(sd, meta)
    except LoraFormatError as e:
        full = sorted({p for k in sd for p in _CHECKPOINT_PREFIXES if k.startswith(p)})
        if full:
            raise LoraFormatError(f"{path} is not a LoRA: it is a full model checkpoint ({len(sd)} tensors under "
                                  f"{', '.join(full)}); load it as a checkpoint, not as a LoRA") from e
        raise LoraFormatError(f"{path} is not a LoRA: {e}") from e
    if lora is not None:
        mods = lora.modules.values()
        per = Counter(lora.component_of(n) for n in lora.modules)
        dtypes = sorted({str(m.dtype).replace("torch.", "") for m in mods})
        conv = sum(m.is_conv for m in mods)
        arch = lora.arch
        if arch not in ARCH_TABLE:  # keys of an unknown model: the file's own metadata may say
            arch = arch_from_metadata(meta) or arch
        lines += [
            _row("architecture", arch),
            _row("network", {"loha": "LoHa (LyCORIS)", "lokr": "LoKr (LyCORIS)"}.get(network_of(lora), network_of(lora))
                 + (f", {meta['ss_network_module']}" if meta.get("ss_network_module") else "")),
            _row("modules", ", ".join(f"{c} {n}" for c, n in sorted(per.items())) + f" (total {len(lora.modules)})"),
            _row("ranks", _summary(m.rank for m in mods)),
            _row("alphas", _summary(m.alpha for m in mods if m.alpha is not None)),
            _row("dtype", ", ".join(dtypes)),
            _row("conv layers", f"yes, {conv} modules" if conv else "no"),
        ]
        if any(m.dora_scale is not None for m in mods):
            lines.append(_row("dora", "yes"))
    facts = (
        ("title", "modelspec.title"), ("trigger phrase", "modelspec.trigger_phrase"),
        ("base model", "ss_sd_model_name"), ("base version", "ss_base_model_version"),
        ("resolution", "modelspec.resolution"), ("steps", "ss_max_train_steps"), ("epochs", "ss_num_epochs"),
        ("images", "ss_num_train_images"),
    )
    lines += [_row(label, _abbrev(meta[key])) for label, key in facts if meta.get(key)]
    tags = _top_tags(meta)
    if tags:
        lines.append(_row("top tags", _abbrev(tags, 300)))
    if path.suffix == ".safetensors":
        for key, fn in (("sshs_model_hash", model_hash), ("sshs_legacy_hash", legacy_hash)):
            stored, actual = meta.get(key), fn(path)
            if stored:
                lines.append(_row(key, f"{stored} ({'ok' if stored == actual else 'MISMATCH, file is ' + actual})"))
            else:
                lines.append(_row(key, f"absent (file is {actual})"))
    if meta:
        lines.append(f"metadata ({len(meta)} keys):")
        lines += [f"  {k}: {_abbrev(v)}" for k, v in sorted(meta.items())]
    else:
        lines.append(_row("metadata", "none"))
    return "\n".join(lines)
