"""The model families the engine knows: one entry per family, read by generic code.

Each entry holds the facts other tools use to name the family: the ``modelspec.architecture``
string (Stability's model spec), kohya's ``ss_base_model_version``, the text encoders' kohya
components (so ``lora_te_`` for SD1/SD2, ``lora_te1_`` + ``lora_te2_`` for SDXL) and the layer
widths that tell the families apart in a LoRA file (see ``lora.formats.detect_arch``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

UNKNOWN = "unknown"  # a LoRA whose keys and widths match no family here (e.g. a tiny test model)


@dataclass(frozen=True)
class Arch:
    """One model family. ``name`` is the engine's name for it ("sd1", "sd2", "sdxl")."""

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

    @property
    def kohya_prefixes(self) -> tuple[str, ...]:
        """The kohya LoRA key prefixes of this family: ``lora_unet_`` and one per text encoder."""
        return ("lora_unet_", *(f"lora_{c}_" for c in self.te_components))


ARCH_TABLE: dict[str, Arch] = {a.name: a for a in (
    Arch("sd1", "SD1.x", "stable-diffusion-v1", "sd_v1", "diffusers", ("te",), 768, 768, "sd1"),
    Arch("sd2", "SD2.x", "stable-diffusion-v2-512", "sd_v2", "diffusers", ("te",), 1024, 1024, "sd1",
         modelspec_v="stable-diffusion-v2-768-v"),
    Arch("sdxl", "SDXL", "stable-diffusion-xl-v1-base", "sdxl_base_v1-0",
         "https://github.com/Stability-AI/generative-models", ("te1", "te2"), 2048, 1280, "sdxl"),
)}
ARCHS = tuple(ARCH_TABLE)  # the family names, in table order


def get_arch(name: str) -> Arch:
    """The table entry for ``name``; ValueError naming the known families for anything else."""
    try:
        return ARCH_TABLE[name]
    except KeyError:
        raise ValueError(f"arch {name!r} unknown; use one of {list(ARCHS)}") from None


def arch_from_metadata(meta: Mapping[str, str]) -> str | None:
    """The family a file's ``modelspec.architecture`` or ``ss_base_model_version`` names (None if neither does)."""
    spec = meta.get("modelspec.architecture", "").split("/")[0]
    for a in ARCH_TABLE.values():
        if spec in (a.modelspec, a.modelspec_v):
            return a.name
    if spec.startswith("stable-diffusion-v2"):  # the other SD2 variants (768, unCLIP ...)
        return "sd2"
    version = meta.get("ss_base_model_version", "")
    return next((a.name for a in ARCH_TABLE.values() if version == a.base_version), None)
