"""Reading LoRA state dicts in any common key format into kohya names (:func:`load_lora`).

Formats: kohya (``lora_unet_*.lora_down.weight``), diffusers/peft in the new (``unet.*.lora_A.weight``)
and old attention-processor styles (``attn1.processor.to_q_lora.down.weight``), and ComfyUI/LDM
(``diffusion_model.*``, ``text_encoders.clip_l.transformer.*``). Every format comes out in the same
kohya names (see ``model.keys``), so the deltas are comparable whatever wrote the file.
:func:`detect_arch` names the model family from key names and layer widths (``model.archs``).

Flux / Chroma (BFL-layout DiTs, ``model.dit_keys``): kohya (``lora_unet_double_blocks_0_img_attn_qkv``),
ComfyUI/BFL-native (``diffusion_model.double_blocks.0.img_attn.qkv``, or without ``diffusion_model.``),
OneTrainer (``lora_transformer_*``) and diffusers/peft/ai-toolkit (``transformer.transformer_blocks.0.attn.to_q``).
diffusers splits the fused ``qkv`` / ``linear1`` into q, k, v (+ mlp); those parts are fused back into the
BFL module exactly (``lora.fuse``), so every format comes out as the kohya file ComfyUI and kohya read.
SD3.x (MMDiT, ``joint_blocks.N``) reads the same four forms; its files are written in diffusers' form
(``lora.diffusers_format``), the only one diffusers' SD3 pipeline loads.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import Tensor

from ..model import dit_keys as dk
from ..model import keys as uk
from ..model.archs import ARCH_TABLE, DIT_ARCHS, UNKNOWN, arch_from_metadata
from .files import LOHA_KEYS, LOKR_KEYS, LoraFormatError, LoraModule, LoraWeights, LycorisModule, read_lora_file
from .fuse import fuse_modules

log = logging.getLogger(__name__)

# Key suffix -> role, tried in order. "processor" marks diffusers' old attention-processor style
# (``attn1.processor.to_q_lora.down.weight``), whose module names need rewriting.
_SUFFIXES = (
    (".lora_down.weight", "down", ""), (".lora_up.weight", "up", ""),
    (".lora_A.weight", "down", ""), (".lora_B.weight", "up", ""),
    (".lora_A.default.weight", "down", ""), (".lora_B.default.weight", "up", ""),
    (".lora_linear_layer.down.weight", "down", ""), (".lora_linear_layer.up.weight", "up", ""),
    (".lora.down.weight", "down", ""), (".lora.up.weight", "up", ""),
    ("_lora.down.weight", "down", "processor"), ("_lora.up.weight", "up", "processor"),
    (".lora_magnitude_vector.weight", "dora", ""), (".lora_magnitude_vector", "dora", ""),
    (".dora_scale", "dora", ""), (".alpha", "alpha", ""),
    *((f".{k}", k, "") for k in (*LOHA_KEYS, *LOKR_KEYS)),  # LyCORIS LoHa / LoKr (kohya-LyCORIS, ComfyUI, A1111)
)
# LyCORIS modules this loader does not read (LoCon Tucker, OFT/BOFT, GLoRA, IA3, full diff, norms).
_LYCORIS = re.compile(r"\.(lora_mid\.|oft_|a1\.weight$|[wb]_norm$|diff$|diff_b$)")
_UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "conv_norm_out",
               "time_embedding.", "add_embedding.")
_COMFY_TE = {"clip_l": "te", "clip_h": "te", "clip_g": "te2"}


def _split_key(key: str) -> tuple[str, str, str] | None:
    for suffix, role, style in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role, style
    return None


def _rewrite_processor(path: str) -> str:
    """Old diffusers attention-processor names -> module names."""
    path = path.replace(".processor.to_out", ".to_out.0").replace(".processor.to_", ".to_")
    m = re.fullmatch(r"(.*\.self_attn)\.to_(q|k|v|out)", path)
    if m:  # old text-encoder style: self_attn.to_q_lora -> self_attn.q_proj
        path = f"{m.group(1)}.{m.group(2)}_proj"
    return path


def _locate(prefix: str, style: str, arch: str, resolver: uk.KohyaNameResolver) -> tuple[str, str | None]:
    """(component, module path) of a raw module prefix; path None = keep the kohya name verbatim."""
    te = (ARCH_TABLE[arch].te_components or ("te",))[0] if arch in ARCH_TABLE else "te"
    if prefix.startswith("lora_"):
        component = LoraWeights.component_of(prefix)
        if component == "other":
            raise uk.ModuleNameError(prefix)
        if arch == UNKNOWN:
            return component, None
        try:
            component, path = resolver.parse(prefix)
        except uk.ModuleNameError:
            log.warning("LoRA module %s is not in the %s layout; keeping its name as is", prefix, arch)
            return component, None
        return (te if component == "te" else component), path
    if prefix.startswith("diffusion_model."):
        if arch == UNKNOWN:
            raise uk.ModuleNameError(f"{prefix}: LDM names need a known architecture (sd1/sd2/sdxl)")
        ldm = prefix[len("diffusion_model."):]
        path = uk.to_diffusers_path(ldm, arch)
        if path is None:
            raise uk.ModuleNameError(f"{prefix}: not a module of the {arch} UNet")
        return "unet", path
    m = re.match(r"text_encoders\.(clip_[lgh])\.transformer\.(.+)", prefix)
    if m:
        component = _COMFY_TE[m.group(1)]
        return (te if component == "te" else component), m.group(2)
    for head, component in (("text_encoder_2.", "te2"), ("text_encoder.", te)):
        if prefix.startswith(head):
            path = prefix[len(head):]
            return component, _rewrite_processor(path) if style else path
    for head in ("unet.", "base_model.model.", ""):
        if prefix.startswith(head) and prefix[len(head):].startswith(_UNET_ROOTS):
            path = prefix[len(head):]
            return "unet", _rewrite_processor(path) if style else path
    raise uk.ModuleNameError(prefix)


def _canonical(prefix: str, style: str, arch: str, resolver: uk.KohyaNameResolver) -> str:
    component, path = _locate(prefix, style, arch, resolver)
    if path is None:
        return prefix
    if component == "unet" and arch == UNKNOWN:
        return "lora_unet_" + path.replace(".", "_")  # kohya's SD1 convention: diffusers names
    return uk.kohya_name(component, path, arch)


_BFL_ROOTS = ("double_blocks.", "single_blocks.", "img_in", "txt_in", "time_in.", "vector_in.", "guidance_in.",
              "final_layer.", "distilled_guidance_layer.", "joint_blocks.", "context_embedder", "t_embedder.",
              "y_embedder.", "layers.", "noise_refiner.", "context_refiner.", "x_embedder", "cap_embedder.",
              "all_x_embedder.", "all_final_layer.")
_DIFFUSERS_HEADS = ("transformer.", "base_model.model.", "")
# diffusers' norm_out.linear is BFL's final_layer.adaLN_modulation.1 with the (shift, scale) halves of its
# output swapped (ComfyUI flux_to_diffusers / mmdit_to_diffusers: swap_scale_shift); a LoRA's up rows swap
# the same way. SD3's last context block (pre-only) has such a modulation too, told apart by its rows.
SWAP_IF_PRE_ONLY = 2  # _locate_dit's swap value for a module that swaps only if it is a pre-only modulation


def _swapped(arch: str) -> dict[str, str]:
    """diffusers path -> BFL path of the always-swapped modules (the outer ones) of ``arch``."""
    return {d: b for b, d in dk.diffusers_swapped(arch).items() if "{last}" not in b}


def _onetrainer_path(rest: str, arch: str) -> str | None:
    """diffusers path of OneTrainer's ``lora_transformer_<diffusers path with _>`` (lookup, not guessing)."""
    tail = rest[len("lora_transformer_"):]
    return _underscored_diffusers_path(tail, arch) or {k.replace(".", "_"): k for k in _swapped(arch)}.get(tail)


def _underscored_diffusers_path(rest: str, arch: str) -> str | None:
    """The diffusers path written with "_" for "." (musubi's ``lora_unet_layers_0_attention_to_q`` without its
    ``lora_unet_``), looked up among the family's diffusers names: never guessed."""
    spec = dk._spec(arch)
    heads = spec.diffusers_blocks[:2] if spec.depth_single else spec.diffusers_blocks[:1]
    names = [h for h in (*heads, *(p for p, _, _ in spec.extra_blocks)) if h]
    m = re.fullmatch(rf"({'|'.join(re.escape(n) for n in names)})_(\d+)_(.+)", rest) if names else None
    if m:
        head = f"{m.group(1)}.0."
        for ps in dk.diffusers_parts(arch, depth=2, depth_single=1, hidden=1).values():
            for part, _ in ps:
                if part.startswith(head) and part[len(head):].replace(".", "_") == m.group(3):
                    return f"{m.group(1)}.{m.group(2)}.{part[len(head):]}"
        return None
    return next((ps[0][0] for ps in dk.diffusers_parts(arch, depth=0, depth_single=0, hidden=1).values()
                 if ps[0][0].replace(".", "_") == rest), None)


def _locate_dit(prefix: str, style: str, arch: str, resolver: uk.KohyaNameResolver,
                known: tuple[str, ...]) -> tuple[str, int, int, bool]:
    """(kohya name, part index, number of parts, swap halves) of a raw module prefix of a DiT LoRA.

    Several parts = one diffusers piece of a fused BFL module (fused again by the caller); swap = diffusers'
    ``norm_out.linear``, whose up rows come in the other order. Text-encoder names go the SD way."""
    if prefix.startswith("lora_unet_"):
        try:
            return dk.kohya_dit_name(dk.parse_kohya_dit_name(prefix, arch, known)), 0, 1, False
        except uk.ModuleNameError:
            # musubi-tuner's names: kohya's prefix before diffusers' (split) module path
            diff = _underscored_diffusers_path(prefix[len("lora_unet_"):], arch)
            found = dk.diffusers_to_bfl(diff, arch) if diff else None
            if found is None:
                raise
            return dk.kohya_dit_name(found[0]), found[1], found[2], False
    bfl = dk.strip_host_prefix(prefix)
    spec = ARCH_TABLE[arch].dit if arch in ARCH_TABLE else None
    own = (*(f"{p}." for p in spec.block_prefixes), *spec.outer_modules) if spec else ()
    if bfl.startswith(_BFL_ROOTS + own) or bfl in known:  # ComfyUI / BFL-native: the model's own path
        if bfl.startswith("distilled_guidance_layer."):
            raise uk.ModuleNameError(f"{prefix}: Chroma's distilled_guidance_layer takes no LoRA here")
        try:
            return dk.kohya_dit_name(dk.parse_kohya_dit_name(dk.kohya_dit_name(bfl), arch, known)), 0, 1, False
        except uk.ModuleNameError:
            # diffusers' names under ComfyUI's prefix (ai-toolkit's Z-Image files): a split part of a fused module
            found = dk.diffusers_to_bfl(bfl, arch)
            if found is None:
                raise
            return dk.kohya_dit_name(found[0]), found[1], found[2], False
    if bfl != prefix:
        raise uk.ModuleNameError(f"{prefix}: not a module of the {arch} transformer")
    diff = _onetrainer_path(prefix, arch) if prefix.startswith("lora_transformer_") else None
    for head in _DIFFUSERS_HEADS if diff is None else ():
        if prefix.startswith(head) and not prefix.startswith(("text_encoder", "lora_te")):
            diff = prefix[len(head):]
            break
    if diff is not None:
        swapped = _swapped(arch)
        if diff in swapped:
            return dk.kohya_dit_name(swapped[diff]), 0, 1, True
        found = dk.diffusers_to_bfl(diff, arch)
        if found is not None:
            bfl, part, n = found
            maybe = any(k.split(".", 2)[2] == bfl.split(".", 2)[-1] for k in dk.diffusers_swapped(arch) if "{last}" in k)
            return dk.kohya_dit_name(bfl), part, n, SWAP_IF_PRE_ONLY if maybe else False
    component, path = _locate(prefix, style, arch, resolver)
    if component == "unet":
        raise uk.ModuleNameError(f"{prefix}: not a module of the {arch} transformer")
    return (prefix if path is None else uk.kohya_name(component, path, arch)), 0, 1, False


def _down_in_dims(sd: Mapping[str, Tensor], needle) -> set[int]:
    """The input widths of the modules whose underscored name ``needle`` accepts (LoRA downs; LoHa's
    ``hada_w1_b``; LoKr's two factors' input widths multiplied)."""
    dims = set()
    lokr: dict[str, dict[str, Tensor]] = {}
    for k, v in sd.items():
        split = _split_key(k)
        if not split or not needle(split[0].replace(".", "_")) or v.dim() < 2:
            continue
        if split[1] in ("down", "hada_w1_b"):
            dims.add(int(v.shape[1]))
        elif split[1] in ("lokr_w1", "lokr_w1_b", "lokr_w2", "lokr_w2_b"):
            lokr.setdefault(split[0], {})[split[1][:7]] = v
    dims |= {int(f["lokr_w1"].shape[1]) * int(f["lokr_w2"].shape[1]) for f in lokr.values() if len(f) == 2}
    return dims


# Key names only a BFL-layout DiT LoRA has (kohya/ComfyUI/BFL, OneTrainer, diffusers Flux), and the ones
# that tell Flux from Chroma: Chroma's blocks have no modulation layers and it has no vector/guidance input.
_DIT_KEY = re.compile(
    r"^(lora_unet_|(model\.)?diffusion_model\.)?(double|single|joint)_blocks[._]\d+[._]"
    r"|^(lora_transformer_|(transformer|base_model\.model)\.)?(single_)?transformer_blocks[._]\d+[._]"
    r"(attn[._](to_[qkv]|add_|to_add_out|to_out)|ff_context|norm1_context|proj_mlp|proj_out|norm[._]linear)"
    r"|^(lora_unet_|(model\.)?diffusion_model\.|transformer\.)?(layers|noise_refiner|context_refiner)[._]\d+[._]"
    r"(attention|feed_forward|adaLN)")
# Qwen-Image: its per-stream modulation and MLP names, or diffusers' block names under ComfyUI's / kohya's prefixes
# (Flux's and SD3's files there use BFL / MMDiT names), or a block index past SD3.5 large's 38; never with single
# blocks (a Flux-layout file in diffusers' names).
_QWEN_ONLY = re.compile(r"(img|txt)_mod[._]1([._]|$)|(img|txt)_mlp[._]net|txt_norm"
                        r"|^(lora_unet_|(model\.)?diffusion_model\.)transformer_blocks[._]\d+"
                        r"|transformer_blocks[._]([4-9]\d|3[89])[._]")
# Z-Image: its refiner blocks, or single-stream layers with "attention" / "feed_forward" children
_ZIMAGE_ONLY = re.compile(r"noise_refiner|context_refiner|(^|[._])layers[._]\d+[._](attention|feed_forward)")
_FLUX_ONLY = re.compile(r"(img|txt)_mod[._]lin|modulation[._]lin|guidance_in|vector_in|norm1(_context)?[._]linear"
                        r"|single_transformer_blocks[._]\d+[._]norm[._]linear|guidance_embedder|text_embedder"
                        r"|adaLN_modulation|norm_out")
_CHROMA_ONLY = re.compile(r"distilled_guidance_layer")
# FLUX.2: its shared modulation Linears and diffusers' names for its fused single-block input, SwiGLU MLP and
# single-block output (Flux.1's is proj_out there).
_FLUX2_ONLY = re.compile(r"stream_modulation|to_qkv_mlp_proj|ff(_context)?[._]linear_(in|out)|time_guidance_embed"
                         r"|single_transformer_blocks[._]\d+[._]attn[._]to_out")
# BFL names shared with Flux.1, told apart by output rows per input width: FLUX.2's SwiGLU MLP makes img_mlp.0
# 6 x hidden (Flux.1: 4) and linear1 9 x hidden (Flux.1: 7).
_FLUX2_ROWS = ((re.compile(r"(img|txt)_mlp[._]0$"), 6), (re.compile(r"single_blocks[._]\d+[._]linear1$"), 9))
# SD3's MMDiT: its native names, diffusers' second image attention (SD3.5 medium), or diffusers' block
# modules at SD3's widths (1536 medium, 2432 large; Flux's are 3072).
_SD3_ONLY = re.compile(r"joint_blocks|x_block|context_block|transformer_blocks[._]\d+[._]attn2[._]")
_SD3_WIDTHS = (1536, 2432)


def _flux2_rows(sd: Mapping[str, Tensor]) -> bool:
    """True when a BFL-named up weight has FLUX.2's rows per input width (see ``_FLUX2_ROWS``)."""
    downs = {}
    for k, v in sd.items():
        split = _split_key(k)
        if split and split[1] == "down" and v.dim() >= 2:
            downs[split[0]] = int(v.shape[1])
    for k, v in sd.items():
        split = _split_key(k)
        if not split or split[1] != "up" or v.dim() < 2 or split[0] not in downs:
            continue
        for pattern, ratio in _FLUX2_ROWS:
            if pattern.search(split[0]) and int(v.shape[0]) == ratio * downs[split[0]]:
                return True
    return False


def _dit_family(keys: list[str], metadata: Mapping[str, str] | None,
                state_dict: Mapping[str, Tensor] | None = None) -> str | None:
    """"flux" / "chroma" / "flux2" / "sd3" / "zimage" / "qwen_image" for a DiT LoRA, None for any other. Keys (and FLUX.2's MLP
    rows) decide when they can; else the file's metadata; else "flux" (a LoRA of the shared blocks applies to Flux
    and Chroma, see ``Arch.compatible``)."""
    named = arch_from_metadata(metadata or {})
    qwen = any(_QWEN_ONLY.search(k) for k in keys) and not any("single_" in k for k in keys)
    if not qwen and not any(_DIT_KEY.search(k) for k in keys):
        return None
    if named == "zimage" or any(_ZIMAGE_ONLY.search(k) for k in keys):
        return "zimage"
    if named == "sd3" or any(_SD3_ONLY.search(k) for k in keys):
        return "sd3"
    if named == "qwen_image" or qwen:
        return "qwen_image"
    if named == "flux2" or any(_FLUX2_ONLY.search(k) for k in keys) or (
            state_dict is not None and _flux2_rows(state_dict)):
        return "flux2"
    if any(_CHROMA_ONLY.search(k) for k in keys):
        return "chroma"
    if any(_FLUX_ONLY.search(k) for k in keys):
        return "flux"
    return named if named in DIT_ARCHS else "flux"


def detect_arch(state_dict: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> str:
    """The family of a LoRA state dict: "sd1", "sd2", "sdxl", "flux", "chroma", "sd3" (``model.archs``) or "unknown",
    from its key names and the cross-attention / CLIP widths its down weights take as input.

    Flux vs Chroma: keys of modulation / vector / guidance layers mean Flux (Chroma has none), Chroma's
    ``distilled_guidance_layer`` means Chroma; a LoRA of only the shared layers is what ``metadata``
    (``modelspec.architecture`` / ``ss_base_model_version``) names, else "flux".
    """
    keys = list(state_dict)
    dit = _dit_family(keys, metadata, state_dict)
    if dit == "flux" and not arch_from_metadata(metadata or {}) and not any(
            "single_" in k or k.startswith("lora_unet_") for k in keys) and (
            _down_in_dims(state_dict, lambda p: re.search(r"transformer_blocks_\d+_attn_(to_q|add_q_proj)$", p) is not None)
            & set(_SD3_WIDTHS)):
        return "sd3"  # a diffusers SD3 LoRA without SD3-only modules: its widths tell
    if dit is not None:
        return dit
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.", "text_encoders.clip_g.")) for k in keys):
        return "sdxl"
    if any("label_emb" in k or "add_embedding" in k for k in keys):
        return "sdxl"
    unets = [a for a in ARCH_TABLE.values() if a.kind == "unet"]
    ctx = _down_in_dims(state_dict, lambda p: re.search(r"attn2_(processor_)?to_[kv]", p) is not None)
    for arch in sorted(unets, key=lambda a: -a.context_dim):
        if arch.context_dim in ctx:
            return arch.name
    te = _down_in_dims(state_dict, lambda p: re.search(r"self_attn_(q_proj|to_q)", p) is not None)
    for arch in sorted(unets, key=lambda a: -a.te_width):
        if arch.te_width in te:
            return arch.name
    if ctx or te:  # widths seen, none of SD's: a custom (e.g. tiny test) model, whatever its names say
        return UNKNOWN
    joined = "\n".join(k.replace(".", "_") for k in keys)
    if re.search(r"transformer_blocks_[1-9]", joined):  # depth > 1 exists only in SDXL
        return "sdxl"
    if re.search(r"input_blocks_(1|2)_1_|input_blocks_1[01]_|output_blocks_(9|1[01])_|down_blocks_(0_attentions|3_)"
                 r"|up_blocks_3_", joined):  # attention at full resolution / a 4th level: SD1-family
        return "sd1"
    return UNKNOWN


def _lycoris_piece(name: str, slot: dict[str, Tensor], algo: str, n_parts: int, swap) -> LycorisModule:
    """A LoHa / LoKr module from its keys; LoraFormatError for one that needs joining or reordering (a diffusers
    split of a fused layer: no LoHa / LoKr of the whole layer equals its parts) or that mixes in other keys."""
    other = sorted(set(slot) - set(LOHA_KEYS if algo == "loha" else LOKR_KEYS) - {"alpha"})
    if other == ["dora"]:
        raise LoraFormatError(f"module {name} is a {algo} with DoRA's weight decomposition (dora_scale, LyCORIS's "
                              "wd_on_output), which this reader does not take: merge or resize it with LyCORIS's "
                              "tools. ComfyUI's LoraLoader (and Apply LoRA Stack) apply the file as it is")
    if other:
        raise LoraFormatError(f"module {name} mixes {algo} weights with {other}; a module is one kind")
    if n_parts > 1 or swap:
        raise LoraFormatError(f"module {name}: a {algo} on one diffusers part of a fused layer (or on diffusers' "
                              f"norm_out) cannot be turned into the fused layer's module; only plain LoRAs are "
                              "joined")
    weights = {k: v for k, v in slot.items() if k != "alpha"}
    try:
        return LycorisModule(algo, weights, _alpha_value(slot["alpha"]) if "alpha" in slot else None)
    except LoraFormatError as e:
        raise LoraFormatError(f"module {name}: {e}") from e


def _fuse_pieces(pieces: dict[tuple[str, int], LoraModule | LycorisModule], n_parts: dict[str, int],
                 arch: str) -> dict[str, LoraModule]:
    """One module per kohya name: diffusers parts of a fused BFL module fused into it (a part the file lacks
    adds zero rows, sized from the present parts: q, k, v = hidden, mlp = hidden * mlp_ratio)."""
    out: dict[str, LoraModule] = {}
    for name in sorted({n for n, _ in pieces}):
        n = n_parts[name]
        if n == 1:
            out[name] = pieces[name, 0]
            continue
        got = [pieces.get((name, i)) for i in range(n)]
        rel = _relative_rows(name, arch)
        i0 = next(i for i, p in enumerate(got) if p is not None)
        hidden = int(got[i0].up.shape[0]) // rel[i0]
        try:
            out[name] = fuse_modules(got, [r * hidden for r in rel])
        except LoraFormatError as e:
            raise LoraFormatError(f"module {name}: {e}") from e
    return out


def _relative_rows(name: str, arch: str) -> list[int]:
    """Output rows of each diffusers part of the fused BFL module ``name``, in units of the hidden width."""
    path = dk.parse_kohya_dit_name(name, arch)
    block, index, child = path.split(".", 2)
    one = dk.diffusers_parts(arch, depth=2, depth_single=1, hidden=1)[f"{block}.0.{child}"]
    return [r for _, r in one]


# diffusers' component prefixes; text_encoder_2 before text_encoder, which is its prefix.
_PEFT_HEADS = ("text_encoder_2", "text_encoder", "unet", "transformer")


def _peft_alpha_config(metadata: Mapping[str, str]) -> dict[str, dict]:
    """diffusers' ``lora_adapter_metadata`` (peft LoraConfig per component) -> {component prefix: config}."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoraFormatError(f"lora_adapter_metadata is not valid JSON: {e}") from e
    out: dict[str, dict] = {}
    for k, v in flat.items():
        head, _, key = k.partition(".")
        if head not in _PEFT_HEADS:  # peft's own save: no component prefix
            head, key = "", k
        out.setdefault(head, {})[key] = v
    return out


def _peft_alpha(prefix: str, rank: int, configs: dict[str, dict]) -> float | None:
    head = next((h for h in _PEFT_HEADS if prefix.startswith(h + ".")), "")
    cfg = configs.get(head)
    if not cfg:
        return None
    path = prefix[len(head) + 1:] if head else prefix
    alpha = cfg.get("lora_alpha")
    for pattern, a in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?{pattern}$", path):
            alpha = a
            break
    if alpha is None:
        return None
    # rsLoRA scales by alpha/sqrt(r); kohya's alpha/r gives the same scale with alpha * sqrt(r).
    return float(alpha) * rank ** 0.5 if cfg.get("use_rslora") else float(alpha)


def _alpha_value(t: Tensor) -> float:
    """The alpha a writer meant: 0.3 stored as fp32 reads back as 0.3, not 0.30000001192092896
    (shortest decimal that gives the same value in the stored dtype)."""
    import numpy as np

    t = t.detach().cpu().reshape(-1)[0]
    np_type = {torch.float16: np.float16, torch.float32: np.float32}.get(t.dtype)
    if np_type is None:
        return float(t.double().item())
    return float(str(np_type(t.item())))


def load_lora(path_or_state_dict: str | os.PathLike | Mapping[str, Tensor], metadata: Mapping[str, str] | None = None,
              known_modules: Iterable[str] | None = None) -> LoraWeights:
    """Read a LoRA (file or state dict) in kohya, diffusers/peft or ComfyUI/LDM format into kohya names.

    ``metadata`` adds to (and overrides) a file's metadata. ``known_modules`` lists extra module paths
    (diffusers UNet / HF text encoder) for UNets that are not SD1/SD2/SDXL, e.g. tiny test models.
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        sd, meta = read_lora_file(Path(path_or_state_dict))
    else:
        sd, meta = dict(path_or_state_dict), {}
    meta.update(metadata or {})
    arch = detect_arch(sd, meta)
    dit = arch in DIT_ARCHS
    known = tuple(dk.strip_host_prefix(m) for m in known_modules or ()) if dit else ()
    resolver = uk.KohyaNameResolver(None if arch == UNKNOWN or dit else arch, None if dit else known_modules)
    peft_cfg = _peft_alpha_config(meta)

    # (kohya name, part) -> role -> tensor; a module of several parts is a diffusers split of a fused
    # BFL module (q / k / v ...), fused below.
    parts: dict[tuple[str, int], dict[str, Tensor]] = {}
    n_parts: dict[str, int] = {}
    swapped: dict[str, int | bool] = {}
    raw_prefix: dict[tuple[str, int], str] = {}
    unknown: list[str] = []
    reasons: list[str] = []
    for key, tensor in sd.items():
        split = _split_key(key)
        if split is None:
            unknown.append(key)
            continue
        prefix, role, style = split
        try:
            if dit:
                name, part, n, swap = _locate_dit(prefix, style, arch, resolver, known)
            else:
                (name, part, n, swap) = (_canonical(prefix, style, arch, resolver), 0, 1, False)
        except uk.ModuleNameError as e:
            unknown.append(key)
            reasons.append(str(e))
            continue
        slot = parts.setdefault((name, part), {})
        if role in slot:
            raise LoraFormatError(f"two keys give the {role} of module {name}, the second is {key!r}")
        slot[role] = tensor
        n_parts[name] = n
        if swap:
            swapped[name] = swap
        raw_prefix.setdefault((name, part), prefix)
    if unknown:
        hint = " (LyCORIS LoCon-Tucker/OFT/GLoRA/IA3/diff weights are not read; LoRA, LoHa and LoKr are)" if any(
            _LYCORIS.search(k) for k in unknown) else ""
        why = f" First problem: {reasons[0]}." if reasons else ""
        raise LoraFormatError(
            f"{len(unknown)} of {len(sd)} keys are not LoRA weights this loader knows{hint}, e.g. {unknown[:5]}; "
            "expected kohya (lora_unet_*.lora_down.weight), diffusers/peft (unet.*.lora_A.weight / "
            f"transformer.*.lora_A.weight) or ComfyUI (diffusion_model.*.lora_down.weight) keys.{why}"
        )

    pieces: dict[tuple[str, int], LoraModule | LycorisModule] = {}
    for name, part in sorted(parts):
        slot = parts[name, part]
        algo = next((a for a, ks in (("loha", LOHA_KEYS), ("lokr", LOKR_KEYS)) if set(slot) & set(ks)), None)
        if algo is not None:
            pieces[name, part] = _lycoris_piece(name, slot, algo, n_parts[name], swapped.get(name, False))
            continue
        if "down" not in slot or "up" not in slot:
            if set(slot) <= {"alpha"}:
                log.warning("LoRA has an alpha for %s but no weights; ignored", name)
                continue
            raise LoraFormatError(f"module {name} has {sorted(slot)} but needs both down and up weights")
        down, up = slot["down"], slot["up"]
        if down.dim() == 4 and up.dim() == 2:  # some writers squeeze the 1x1 up conv
            up = up[:, :, None, None]
        if "alpha" in slot:
            alpha = _alpha_value(slot["alpha"])
        else:
            alpha = _peft_alpha(raw_prefix[name, part], int(down.shape[0]), peft_cfg)
            alpha = float(down.shape[0]) if alpha is None else alpha
        dora = slot.get("dora")
        if dora is not None and dora.dim() == 1:  # peft magnitude [out] -> kohya [out, 1, ...]
            dora = dora.reshape(-1, *([1] * (down.dim() - 1)))
        swap = swapped.get(name, False)
        if swap == SWAP_IF_PRE_ONLY:
            swap = dk.is_pre_only_modulation(dk.parse_kohya_dit_name(name, arch), up.shape[0], down.shape[1], arch)
        if swap:  # diffusers norm_out.linear: (scale, shift) rows -> BFL's (shift, scale)
            up = torch.cat(up.chunk(2, dim=0)[::-1])
        try:
            pieces[name, part] = LoraModule(down, up, alpha, dora)
        except LoraFormatError as e:
            raise LoraFormatError(f"module {name}: {e}") from e
    modules = _fuse_pieces(pieces, n_parts, arch)
    if not modules:
        raise LoraFormatError("no LoRA modules found (the state dict is empty or has only alphas)")
    log.debug("loaded LoRA: %d modules, arch %s", len(modules), arch)
    return LoraWeights(modules, meta, arch)

