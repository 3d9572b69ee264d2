"""Per-block LoRA strengths, with the semantics of A1111's LoRA Block Weight extension (LBW,
hako-mikan/sd-webui-lora-block-weight), so ``lbw=`` weights give the same result here as there.

Blocks are the LDM UNet's ``input_blocks.N`` (``IN00``..), ``middle_block`` (``MID``, LBW's ``M00``)
and ``output_blocks.N`` (``OUT00``..), plus ``BASE`` for every text-encoder module. SD1/SD2 have
IN00-IN11 and OUT00-OUT11 (26 blocks with BASE and MID), SDXL IN00-IN08 and OUT00-OUT08 (20).

A weight list names either all of them (LBW's LyCORIS forms, 26 / 20 values) or only the blocks a
plain LoRA touches (its attention blocks, 17 / 12 values):

* SD1/SD2, 17: BASE, IN01, IN02, IN04, IN05, IN07, IN08, MID, OUT03 .. OUT11
* SDXL, 12:    BASE, IN04, IN05, IN07, IN08, MID, OUT00 .. OUT05

As in LBW, blocks a short list does not name get weight 0 (they only hold conv / LoCon modules), and
modules outside every block (``time_embed``, ``label_emb``, ``out``; block ``OTHER``) keep weight 1.

Flux and Chroma (one block family, "flux") follow the ComfyUI Inspire pack's LoraLoaderBlockWeight, the
loader that defines a Flux vector (``inspire/lora_block_weight.py`` ``load_lbw``, presets in
``resources/lbw-preset.txt``): 58 values, ``BASE, D00..D18, S00..S37``, where ``Dnn`` is
``double_blocks.nn`` and ``Snn`` is ``single_blocks.nn``. As there, ``BASE`` weighs everything outside
the blocks: the text encoders and the transformer's outer layers (``img_in``, ``txt_in``, ``time_in``,
``final_layer`` ...). Presets: ALL, NONE, ALL0.5, DOUBLE (BASE + double blocks), SINGLE (BASE + single
blocks) and Inspire's FLUX-* names. Inspire fills the blocks after a short (20-value) vector with its
last value, so its FLUX-DBL-ALL and FLUX-DBL-TAIL6 also keep every single block; here the DBL presets
keep the double blocks they name and zero the single blocks, as their names say.

Z-Image: ``BASE, L00..L29`` (31 values), ``Lnn`` its main ``layers.nn``; the refiner blocks and the layers
outside the blocks are BASE. Presets ALL, NONE, ALL0.5.

FLUX.2 klein ("flux2"): ``BASE, D00..D07, S00..S23`` (33 values, klein 9B's 8 double and 24 single blocks) or
``BASE, D00..D04, S00..S19`` (26, klein 4B's 5 + 20); BASE as for Flux. Presets ALL, NONE, ALL0.5, DOUBLE, SINGLE.

Qwen-Image: ``BASE, B00..B59`` (61 values), ``Bnn`` its ``transformer_blocks.nn``; presets ALL, NONE, ALL0.5.

SD3.x ("sd3"): ``BASE, J00..J37``, where ``Jnn`` is ``joint_blocks.nn`` (39 values, SD3.5 large's 38 blocks)
or ``BASE, J00..J23`` (25 values, SD3/3.5 medium's 24); ``BASE`` weighs the text encoders and the layers
outside the blocks, as for Flux. Presets: ALL, NONE, ALL0.5, and FRONT / MID / BACK (BASE plus the first,
middle or last third of the blocks a 38-block model has).

Presets are LBW's (17 values, for SD1). For SDXL they are mapped by block name as LBW does, with one
deliberate difference: LBW's presets do not name OUT00-OUT02, so LBW zeroes them and ``lbw=ALL``
silently drops SDXL's three deepest output blocks; here those take the preset's OUT03 value, so ALL
is all ones and OUTD/MIDD/OUTALL include them (see :data:`SDXL_PRESETS`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Sequence

from ..errors import LoraWorkbenchError
from ..model import dit_keys as dk
from ..model import keys as uk
from ..model.archs import ARCH_TABLE, SD3_LARGE_DEPTH
from .files import LoraModule, LoraWeights, LycorisModule

OTHER = "OTHER"  # modules outside LBW's blocks: always weight 1

SD1_BLOCKS = ("BASE", *(f"IN{i:02d}" for i in range(12)), "MID", *(f"OUT{i:02d}" for i in range(12)))
SDXL_BLOCKS = ("BASE", *(f"IN{i:02d}" for i in range(9)), "MID", *(f"OUT{i:02d}" for i in range(9)))
SD1_LORA_BLOCKS = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID",
                   *(f"OUT{i:02d}" for i in range(3, 12)))
SDXL_LORA_BLOCKS = ("BASE", "IN04", "IN05", "IN07", "IN08", "MID", *(f"OUT{i:02d}" for i in range(6)))

# LBW's DEF_WEIGHT_PRESET, in SD1_LORA_BLOCKS order.
SD1_PRESETS: dict[str, tuple[float, ...]] = {
    "NONE": (0,) * 17,
    "ALL": (1,) * 17,
    "INS": (1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "IND": (1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "INALL": (1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "MIDD": (1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0),
    "OUTD": (1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0),
    "OUTS": (1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1),
    "OUTALL": (1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1),
    "ALL0.5": (0.5,) * 17,
}
_SDXL_STAND_IN = {"OUT00": "OUT03", "OUT01": "OUT03", "OUT02": "OUT03"}


def _sdxl_preset(sd1: tuple[float, ...]) -> tuple[float, ...]:
    by_name = dict(zip(SD1_LORA_BLOCKS, sd1))
    return tuple(float(by_name[_SDXL_STAND_IN.get(b, b)]) for b in SDXL_LORA_BLOCKS)


# In SDXL_LORA_BLOCKS order.
SDXL_PRESETS: dict[str, tuple[float, ...]] = {k: _sdxl_preset(v) for k, v in SD1_PRESETS.items()}

# Flux / Chroma: Inspire's order. The counts come from the table (both families: 19 + 38 blocks).
_FLUX_DIT = ARCH_TABLE["flux"].dit
DOUBLE_BLOCKS = tuple(f"D{i:02d}" for i in range(_FLUX_DIT.depth))
SINGLE_BLOCKS = tuple(f"S{i:02d}" for i in range(_FLUX_DIT.depth_single))
FLUX_BLOCKS = ("BASE", *DOUBLE_BLOCKS, *SINGLE_BLOCKS)


def _flux_preset(double: set[str] | str, single: set[str] | str, base: float = 1.0, value: float = 1.0):
    on = {*(DOUBLE_BLOCKS if double == "all" else double), *(SINGLE_BLOCKS if single == "all" else single)}
    return (base, *(value if b in on else 0.0 for b in FLUX_BLOCKS[1:]))


def _singles(lo: int, hi: int) -> set[str]:  # S<lo>..S<hi>, inclusive
    return {f"S{i:02d}" for i in range(lo, hi + 1)}


def _doubles(lo: int, hi: int) -> set[str]:
    return {f"D{i:02d}" for i in range(lo, hi + 1)}


# In FLUX_BLOCKS order.
FLUX_PRESETS: dict[str, tuple[float, ...]] = {
    "NONE": (0.0,) * len(FLUX_BLOCKS),
    "ALL": (1.0,) * len(FLUX_BLOCKS),
    "ALL0.5": (0.5,) * len(FLUX_BLOCKS),
    "DOUBLE": _flux_preset("all", set()),
    "SINGLE": _flux_preset(set(), "all"),
    "FLUX-ALL": (1.0,) * len(FLUX_BLOCKS),
    "FLUX-DBL-ALL": _flux_preset("all", set()),
    "FLUX-DBL-FRONT7": _flux_preset(_doubles(0, 6), set()),
    "FLUX-DBL-MID6": _flux_preset(_doubles(7, 12), set()),
    "FLUX-DBL-TAIL6": _flux_preset(_doubles(13, 18), set()),
    "FLUX-SINGLE-ALL": _flux_preset(set(), "all"),
    "FLUX-SINGLE-1to10": _flux_preset(set(), _singles(0, 9)),
    "FLUX-SINGLE-11to20": _flux_preset(set(), _singles(10, 19)),
    "FLUX-SINGLE-21to30": _flux_preset(set(), _singles(20, 29)),
    "FLUX-SINGLE-31to37": _flux_preset(set(), _singles(30, 37)),
}

# SD3.x: joint blocks of the largest (3.5 large); the medium ones take the short list.
JOINT_BLOCKS = tuple(f"J{i:02d}" for i in range(SD3_LARGE_DEPTH))
SD3_BLOCKS = ("BASE", *JOINT_BLOCKS)
SD3_MEDIUM_BLOCKS = SD3_BLOCKS[: 1 + ARCH_TABLE["sd3"].dit.depth]


def _sd3_preset(lo: int, hi: int) -> tuple[float, ...]:  # BASE + J<lo>..J<hi>, inclusive
    return (1.0, *(1.0 if lo <= i <= hi else 0.0 for i in range(SD3_LARGE_DEPTH)))


SD3_PRESETS: dict[str, tuple[float, ...]] = {
    "NONE": (0.0,) * len(SD3_BLOCKS),
    "ALL": (1.0,) * len(SD3_BLOCKS),
    "ALL0.5": (0.5,) * len(SD3_BLOCKS),
    "FRONT": _sd3_preset(0, 12),
    "MID": _sd3_preset(13, 25),
    "BACK": _sd3_preset(26, SD3_LARGE_DEPTH - 1),
}

# Z-Image: its 30 main layers; the refiners and outer layers are BASE.
ZIMAGE_BLOCKS = ("BASE", *(f"L{i:02d}" for i in range(ARCH_TABLE["zimage"].dit.depth)))
ZIMAGE_PRESETS: dict[str, tuple[float, ...]] = {
    "NONE": (0.0,) * len(ZIMAGE_BLOCKS), "ALL": (1.0,) * len(ZIMAGE_BLOCKS), "ALL0.5": (0.5,) * len(ZIMAGE_BLOCKS),
}

# FLUX.2 klein: 9B's 8 double + 24 single blocks (the full list), 4B's 5 + 20 (the short one), Inspire's order.
_FLUX2_DIT = ARCH_TABLE["flux2"].dit
FLUX2_BLOCKS = ("BASE", *(f"D{i:02d}" for i in range(_FLUX2_DIT.depth)),
                *(f"S{i:02d}" for i in range(_FLUX2_DIT.depth_single)))
FLUX2_KLEIN_4B_BLOCKS = ("BASE", *(f"D{i:02d}" for i in range(5)), *(f"S{i:02d}" for i in range(20)))
FLUX2_PRESETS: dict[str, tuple[float, ...]] = {
    "NONE": (0.0,) * len(FLUX2_BLOCKS), "ALL": (1.0,) * len(FLUX2_BLOCKS), "ALL0.5": (0.5,) * len(FLUX2_BLOCKS),
    "DOUBLE": tuple(1.0 if b[0] in "BD" else 0.0 for b in FLUX2_BLOCKS),
    "SINGLE": tuple(1.0 if b[0] in "BS" else 0.0 for b in FLUX2_BLOCKS),
}

# Qwen-Image: its 60 transformer blocks; the layers outside them are BASE.
QWEN_IMAGE_BLOCKS = ("BASE", *(f"B{i:02d}" for i in range(ARCH_TABLE["qwen_image"].dit.depth)))
QWEN_IMAGE_PRESETS: dict[str, tuple[float, ...]] = {
    "NONE": (0.0,) * len(QWEN_IMAGE_BLOCKS), "ALL": (1.0,) * len(QWEN_IMAGE_BLOCKS),
    "ALL0.5": (0.5,) * len(QWEN_IMAGE_BLOCKS),
}

# Block family of each arch: the UNet's layout, "flux" for the Flux.1-layout DiTs (Chroma has Flux's blocks),
# "flux2" for FLUX.2, "sd3" for the MMDiT, "zimage" for Z-Image, "qwen_image" for Qwen-Image.
_OWN_BLOCKS = ("sd3", "zimage", "flux2", "qwen_image")
_SIZED = ("sd3", "flux2")  # families whose short and full lists are two model sizes (not LBW's zero-filled short form)
_FAMILY = {a.name: (a.unet_layout if a.kind == "unet" else a.name if a.name in _OWN_BLOCKS else "flux")
           for a in ARCH_TABLE.values()}
_FULL = {"sd1": SD1_BLOCKS, "sdxl": SDXL_BLOCKS, "flux": FLUX_BLOCKS, "sd3": SD3_BLOCKS, "zimage": ZIMAGE_BLOCKS,
         "flux2": FLUX2_BLOCKS, "qwen_image": QWEN_IMAGE_BLOCKS}
_SHORT = {"sd1": SD1_LORA_BLOCKS, "sdxl": SDXL_LORA_BLOCKS, "flux": FLUX_BLOCKS, "sd3": SD3_MEDIUM_BLOCKS,
          "zimage": ZIMAGE_BLOCKS, "flux2": FLUX2_KLEIN_4B_BLOCKS, "qwen_image": QWEN_IMAGE_BLOCKS}
_PRESETS = {"sd1": SD1_PRESETS, "sdxl": SDXL_PRESETS, "flux": FLUX_PRESETS, "sd3": SD3_PRESETS,
            "zimage": ZIMAGE_PRESETS, "flux2": FLUX2_PRESETS, "qwen_image": QWEN_IMAGE_PRESETS}
_LDM_BLOCK = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.|middle_block\.")
_DIT_BLOCK = re.compile(r"(double_blocks|single_blocks|joint_blocks|layers|transformer_blocks)\.(\d+)\.")
_DIT_LETTER = {"double_blocks": "D", "single_blocks": "S", "joint_blocks": "J", "layers": "L", "transformer_blocks": "B"}


class BlockWeightError(LoraWorkbenchError, ValueError):
    """A block-weight spec or module that does not fit the architecture (names the value and the fix)."""


def _family(arch: str) -> str:
    try:
        return _FAMILY[arch]
    except KeyError:
        raise BlockWeightError(
            f"block weights need the base architecture, got {arch!r}; use one of {sorted(_FAMILY)}"
        ) from None


@dataclass(frozen=True)
class BlockWeights:
    """One weight per block of ``arch``'s family ("sd1" covers SD2); ``spec`` is what the user wrote."""

    arch: str
    values: dict[str, float]
    spec: str
    named: tuple[str, ...] = ()  # the blocks the spec gave values for (a short list names fewer than ``values``)

    def weight_of(self, block: str) -> float:
        """The weight of ``block``; 1.0 for :data:`OTHER`, ``KeyError`` for a block not of this family."""
        return 1.0 if block == OTHER else self.values[block]


def block_of(kohya_name: str, arch: str) -> str:
    """The LBW block of one LoRA module: ``BASE`` (text encoders), ``IN00``.., ``MID``, ``OUT00``.., or
    :data:`OTHER` for UNet modules outside the blocks (time/label embedding, final conv).

    Flux / Chroma: ``D00``.. (``double_blocks.N``), ``S00``.. (``single_blocks.N``), and ``BASE`` for the
    text encoders and the layers outside the blocks (Inspire's convention)."""
    fam = _family(arch)
    component = LoraWeights.component_of(kohya_name)
    if component in uk.TE_COMPONENTS:
        return "BASE"
    if component != "unet":
        raise BlockWeightError(
            f"{kohya_name!r} is not a kohya LoRA module name (lora_unet_* / lora_te*_*); block weights "
            "apply to kohya-named modules"
        )
    if fam in ("flux", *_OWN_BLOCKS):
        return _dit_block(kohya_name, arch)
    try:
        _, diffusers_path = uk.parse_kohya_name(kohya_name, arch)
    except uk.ModuleNameError as e:
        raise BlockWeightError(f"cannot place {kohya_name!r} in a {arch} UNet block: {e}") from e
    ldm = uk.to_ldm_path(diffusers_path, arch)
    m = _LDM_BLOCK.match(ldm or "")
    if m is None:
        return OTHER
    if m.group(1) is None:
        return "MID"
    block = f"{'IN' if m.group(1) == 'input_blocks' else 'OUT'}{int(m.group(2)):02d}"
    if block not in _FULL[fam]:  # cannot happen with the presets' layouts; guards custom ones
        raise BlockWeightError(f"{kohya_name!r} lies in {block}, which {arch} does not have")
    return block


def _dit_block(kohya_name: str, arch: str) -> str:
    try:
        path = dk.parse_kohya_dit_name(kohya_name, arch)
    except uk.ModuleNameError as e:
        raise BlockWeightError(f"cannot place {kohya_name!r} in a {arch} block: {e}") from e
    m = _DIT_BLOCK.match(path)
    if m is None:
        return "BASE"
    block = f"{_DIT_LETTER[m.group(1)]}{int(m.group(2)):02d}"
    blocks = _FULL[_family(arch)]
    if block not in blocks:
        raise BlockWeightError(f"{kohya_name!r} lies in {block}, which {arch} does not have ({', '.join(blocks[1:3])}"
                               f" .. {blocks[-1]})")
    return block


def _usage(fam: str) -> str:
    short, full = _SHORT[fam], _FULL[fam]
    if fam == "sd3":
        return (f"sd3 takes {len(full)} values (BASE, {full[1]}..{full[-1]}: SD3.5 large) or {len(short)} (BASE, "
                f"{short[1]}..{short[-1]}: SD3/3.5 medium), or a preset: {', '.join(_PRESETS[fam])}")
    if fam == "flux2":
        return (f"flux2 takes {len(full)} values (BASE, D00..D07, S00..S23: FLUX.2 klein 9B) or {len(short)} (BASE, "
                f"D00..D04, S00..S19: klein 4B), or a preset: {', '.join(_PRESETS[fam])}")
    if fam in ("zimage", "qwen_image"):
        return f"{fam} takes {len(full)} values (BASE, {full[1]}..{full[-1]}) or a preset: {', '.join(_PRESETS[fam])}"
    if short == full:
        return (f"{fam} takes {len(full)} values (BASE, {full[1]}..{DOUBLE_BLOCKS[-1]}, {SINGLE_BLOCKS[0]}.."
                f"{full[-1]}) or a preset: {', '.join(_PRESETS[fam])}")
    return (f"{fam} takes {len(short)} values ({', '.join(short)}) or {len(full)} values ({', '.join(full)}), "
            f"or a preset: {', '.join(_PRESETS[fam])}")


def parse_block_weights(spec: str | Sequence[float], arch: str) -> BlockWeights:
    """A preset name (``"OUTD"``, case-insensitive) or a comma list of numbers, for ``arch``.

    Short lists (17 for SD1/SD2, 12 for SDXL) give 0 to the blocks they do not name, as LBW does.
    Flux / Chroma take 58 values (BASE, D00..D18, S00..S37) and no short form; SD3.x 39 (large) or 25 (medium);
    FLUX.2 klein 33 (9B) or 26 (4B).
    A wrong count raises :class:`BlockWeightError` naming the expected counts and blocks.
    """
    fam = _family(arch)
    if isinstance(spec, str):
        text = spec.strip()
        preset = {k.upper(): v for k, v in _PRESETS[fam].items()}.get(text.upper())
        if preset is not None:
            values = list(preset)
        else:
            items = [p.strip() for p in text.split(",")]
            values = []
            for item in items:
                try:
                    values.append(float(item))
                except ValueError:
                    raise BlockWeightError(
                        f"block weights {spec!r}: {item!r} is neither a number nor a preset; {_usage(fam)}"
                    ) from None
    else:
        text = ",".join(f"{float(v):g}" for v in spec)
        values = [float(v) for v in spec]
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise BlockWeightError(f"block weights {spec!r} contain {bad[0]}; use finite numbers")
    names = {len(_SHORT[fam]): _SHORT[fam], len(_FULL[fam]): _FULL[fam]}.get(len(values))
    if names is None:
        raise BlockWeightError(f"block weights {spec!r} have {len(values)} values; {_usage(fam)}")
    full = dict.fromkeys(_FULL[fam], 0.0)
    full.update(zip(names, values))
    return BlockWeights(fam, full, text, tuple(names))


def apply_block_weights(lora: LoraWeights, weights: BlockWeights | str | Sequence[float]) -> LoraWeights:
    """A new LoRA whose modules' ``up`` are scaled by their block's weight (LBW scales ``up`` too; a LoHa / LoKr
    module its first factor, which scales its delta the same way).

    ``weights`` may be a spec, parsed for ``lora.arch``. The source LoRA is left untouched.
    """
    if not isinstance(weights, BlockWeights):
        weights = parse_block_weights(weights, lora.arch)
    if lora.arch != "unknown" and _family(lora.arch) != weights.arch:
        raise BlockWeightError(
            f"block weights are for {weights.arch} but the LoRA is {lora.arch}; parse them for {lora.arch}"
        )
    arch = lora.arch if lora.arch != "unknown" else weights.arch
    modules = {}
    for name, m in lora.modules.items():
        block = block_of(name, arch)
        if weights.arch in _SIZED and weights.named and block not in weights.named and block != OTHER:
            # SD3.x's and FLUX.2's two lists are two model sizes: the smaller one's on the larger model would
            # silently switch its extra blocks off
            raise BlockWeightError(f"block weights {weights.spec!r} give {len(weights.named)} values, the list of the "
                                   f"smaller model, but this LoRA has block {block} ({name}); "
                                   f"{_usage(weights.arch)}")
        w = weights.weight_of(block)
        if isinstance(m, LycorisModule):  # LoHa / LoKr: the delta is linear in its first factor
            modules[name] = m.scaled(w)
            continue
        up = (m.up.float() * w).to(m.up.dtype)
        modules[name] = LoraModule(m.down, up, m.alpha, m.dora_scale)
    metadata = dict(lora.metadata)
    metadata["lw_block_weights"] = json.dumps({"spec": weights.spec, "arch": weights.arch})
    return LoraWeights(modules, metadata, lora.arch)
