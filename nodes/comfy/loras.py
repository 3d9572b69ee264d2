"""LoRA files and their application to ComfyUI's MODEL/CLIP, shared by the nodes that use LoRAs.

Every LoRA is applied by ComfyUI itself (``comfy.sd.load_lora_for_models``, what its LoraLoader does),
so a stack gives exactly the image a chain of LoraLoader nodes gives. What this adds around it:

* ``LORA_STACK`` is the de-facto type other packs (Efficiency, Comfyroll ...) pass around: a list of
  ``(lora name, model strength, clip strength)`` tuples, names relative to ``models/loras``.
* A LoRA made for another model family fails with an error naming the file and both families,
  before anything is patched (ComfyUI alone only logs "lora key not loaded" and samples the base).
* Optional per-block weights (A1111 LBW presets or lists, ``training.block_weights``).
* Trigger words from each file's metadata: ``modelspec.trigger_phrase``, else its most frequent
  ``ss_tag_frequency`` tags.
* The LoRAs applied are recorded on the MODEL (a ModelPatcher attachment), so Merge LoRAs into
  Checkpoint can write their names and strengths into the checkpoint.
* Files are read once and cached by path + size + mtime.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass

from ...training.errors import LoraWorkbenchError
from ...training.lora.block_weights import BlockWeightError, BlockWeights, apply_block_weights, parse_block_weights
from ...training.lora.files import lora_state_dict
from ...training.lora.formats import detect_arch, load_lora
from ...training.lora.metadata import trigger_words
from ...training.lora.prompt_syntax import resolve_lora_name
from ...training.model.archs import ARCH_TABLE, UNKNOWN, is_compatible
from .families import model_family

log = logging.getLogger(__name__)

NONE = "None"
APPLIED_KEY = "lw_applied_loras"  # ModelPatcher attachment: tuple of AppliedLora dicts
CACHE_SIZE = 8  # LoRA files kept in memory (a 6-row SDXL stack is ~1 GB)
FAMILY_LABELS = {**{a.name: a.label for a in ARCH_TABLE.values()}, UNKNOWN: "an unknown model"}


class LoraArchMismatchError(LoraWorkbenchError, ValueError):
    """A LoRA made for another model family than the MODEL it is applied to."""


@dataclass(frozen=True)
class LoraUse:
    """One LoRA to apply: a name under models/loras (or an absolute path) and its strengths."""

    name: str
    model_strength: float = 1.0
    clip_strength: float = 1.0
    block_weights: str | None = None  # LBW spec for this LoRA only (a prompt tag's lbw=)


@dataclass(frozen=True)
class LoraFile:
    path: str
    state_dict: dict
    metadata: dict
    arch: str  # lora.formats.detect_arch: "sd1", "sd2", "sdxl" or "unknown"


# ---- files -----------------------------------------------------------------------------------------
_FILES: OrderedDict[tuple, LoraFile] = OrderedDict()


def lora_names() -> list[str]:
    import folder_paths

    return folder_paths.get_filename_list("loras")


def lora_path(name: str) -> str:
    """Full path of a LoRA: an exact name from the loras list, an absolute path, or a close-enough
    name (``training.prompt_syntax.resolve_lora_name``: without folder / extension, any case).
    Unknown names raise ``LoraNotFoundError`` listing close matches."""
    import folder_paths

    name = name.strip()
    if os.path.isabs(name) and os.path.isfile(name):
        return name
    path = folder_paths.get_full_path("loras", name)
    if path is not None:
        return path
    where = ", ".join(folder_paths.get_folder_paths("loras"))
    return folder_paths.get_full_path_or_raise("loras", resolve_lora_name(name, lora_names(), where))


def load_lora_file(path: str) -> LoraFile:
    """The file as ComfyUI's LoraLoader reads it (+ metadata and arch), cached by path + size + mtime."""
    import comfy.utils

    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    hit = _FILES.get(key)
    if hit is not None:
        _FILES.move_to_end(key)
        return hit
    sd, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
    loaded = LoraFile(path, sd, dict(metadata or {}), detect_arch(sd, metadata or {}))
    _FILES[key] = loaded
    while len(_FILES) > CACHE_SIZE:
        _FILES.popitem(last=False)
    return loaded


# ---- the model -------------------------------------------------------------------------------------
def check_lora_fits(name: str, lora: LoraFile, model, clip) -> None:
    """Raise ``LoraArchMismatchError`` when the LoRA cannot patch this model (instead of ComfyUI's
    "lora key not loaded" warnings and an unchanged image)."""
    family, config_name = model_family(model)
    if family is not None and lora.arch in ARCH_TABLE:
        if lora.arch != family and is_compatible(lora.arch, family):
            log.info("LoRA %r is a %s LoRA on a %s model: the blocks they share are patched", name,
                     FAMILY_LABELS[lora.arch], FAMILY_LABELS[family])
            return
        if lora.arch != family:
            raise LoraArchMismatchError(
                f"LoRA {name!r} was made for {FAMILY_LABELS[lora.arch]} (read from its keys and layer widths) but "
                f"the model is {FAMILY_LABELS[family]} (ComfyUI's {config_name}); none of its weights would load. "
                f"Use a LoRA trained on an {FAMILY_LABELS[family]} model, or load an "
                f"{FAMILY_LABELS[lora.arch]} checkpoint for this LoRA."
            )
        return
    # A family or a LoRA we cannot name: ask ComfyUI's own key map whether anything would load.
    import comfy.lora
    import comfy.lora_convert

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    loaded = comfy.lora.load_lora(comfy.lora_convert.convert_lora(lora.state_dict), key_map, log_missing=False)
    if not loaded:
        raise LoraArchMismatchError(
            f"LoRA {name!r} ({FAMILY_LABELS.get(lora.arch, lora.arch)}) has no weight that fits this model "
            f"(ComfyUI's {config_name}): none of its {len(lora.state_dict)} keys matches a layer. Use a LoRA "
            "made for this model family."
        )


def parse_spec(spec: str | None, model) -> BlockWeights | None:
    """A block-weight spec parsed for the MODEL's family (None for an empty spec)."""
    spec = (spec or "").strip()
    if not spec:
        return None
    family, config_name = model_family(model)
    if family is None:
        raise BlockWeightError(
            f"block weights {spec!r} need a model of a family in the table (SD1.x, SD2.x, SDXL, Flux.1, Chroma, "
            f"SD3.x, Z-Image, FLUX.2 klein, Qwen-Image); this one is ComfyUI's "
            f"{config_name}. Leave block_weights empty for it."
        )
    return parse_block_weights(spec, family)


def _weighted_state_dict(name: str, lora: LoraFile, weights: BlockWeights) -> dict:
    try:
        return lora_state_dict(apply_block_weights(load_lora(lora.state_dict, lora.metadata), weights))
    except BlockWeightError as e:
        raise BlockWeightError(f"LoRA {name!r}: {e}") from e


def apply_loras(model, clip, uses: list[LoraUse], block_weights: str = "") -> tuple[object, object, list[str]]:
    """Apply ``uses`` in order, as a chain of ComfyUI LoraLoaders would; returns (model, clip, trigger
    words). Names and block-weight specs are all checked before the first file is read."""
    import comfy.sd

    default = parse_spec(block_weights, model)
    plan = []
    for use in uses:
        if use.model_strength == 0 and use.clip_strength == 0:  # LoraLoader skips these too
            continue
        own = parse_spec(use.block_weights, model) if use.block_weights else None
        plan.append((use, lora_path(use.name), own or default))
    if not plan:
        return model, clip, []
    applied = list(model.get_attachment(APPLIED_KEY) or ())
    triggers: list[str] = []
    for use, path, weights in plan:
        lora = load_lora_file(path)
        check_lora_fits(use.name, lora, model, clip)
        # A shallow copy: ComfyUI's key conversion may rename keys in the dict it is given (the cache's).
        sd = dict(lora.state_dict) if weights is None else _weighted_state_dict(use.name, lora, weights)
        model, clip = comfy.sd.load_lora_for_models(model, clip, sd, use.model_strength, use.clip_strength)
        triggers += [t for t in trigger_words(lora.metadata) if t not in triggers]
        applied.append({**asdict(use), "block_weights": weights.spec if weights else None,
                        "file": os.path.basename(path), "hash": lora.metadata.get("sshs_model_hash")})
    model.set_attachments(APPLIED_KEY, tuple(applied))  # model is a fresh clone here
    log.debug("applied %d LoRAs", len(plan))
    return model, clip, triggers


def stack_uses(stack) -> list[LoraUse]:
    """LORA_STACK entries (tuples of name, model strength, clip strength[, ...]) as LoraUse."""
    uses = []
    for i, entry in enumerate(stack or ()):
        if not isinstance(entry, (tuple, list)) or len(entry) < 3:
            raise ValueError(
                f"LORA_STACK entry {i + 1} is {entry!r}; expected (lora name, model strength, clip strength)"
            )
        name, ms, cs = entry[0], entry[1], entry[2]
        if name in (None, "", NONE):
            continue
        uses.append(LoraUse(str(name), float(ms), float(cs)))
    return uses
