"""UNet and text-encoder module names: LDM (CompVis/sgm, ComfyUI ``diffusion_model.``) <-> diffusers,
and the kohya ``lora_unet_*`` / ``lora_te*_*`` LoRA names built from them.

The LDM <-> diffusers map is derived from a structural description of the UNet (:class:`UNetLayout`)
instead of a hand-written list, so the SD1/SD2 and SDXL presets and tiny test models built from a
diffusers config all come out of the same few loops. Names are MODULE paths (no ``.weight``).

kohya conventions (what A1111, ComfyUI and Forge expect in a LoRA file):

* SD1/SD2 UNet: ``lora_unet_`` + diffusers path with ``.`` -> ``_``
  (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``);
* SDXL UNet: ``lora_unet_`` + LDM path with ``.`` -> ``_``
  (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``);
* text encoders: ``lora_te_`` (SD1/SD2), ``lora_te1_`` (SDXL CLIP-L), ``lora_te2_`` (SDXL CLIP-G) +
  the Hugging Face ``CLIPTextModel``/``CLIPTextModelWithProjection`` path.

``_`` is ambiguous (``transformer_blocks`` vs ``transformer.blocks``), so kohya names are parsed back by
looking them up among the known module names, never by guessing where the dots were.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Mapping, Union

from ..errors import LoraWorkbenchError
from .archs import ARCH_TABLE, UNET_ARCHS

# LDM ResBlock child -> diffusers ResnetBlock2D child.
RESNET_NAMES = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
                ("out_layers.0", "norm2"), ("out_layers.3", "conv2"))
RESNET_SKIP = ("skip_connection", "conv_shortcut")  # only when in_channels != out_channels

# Children of a SpatialTransformer / Transformer2DModel (same names on both sides).
TRANSFORMER_OUTER = ("norm", "proj_in", "proj_out")
TRANSFORMER_BLOCK = (
    "norm1", "norm2", "norm3",
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ff.net.0.proj", "ff.net.2",
)

# Children of one Hugging Face CLIP encoder layer, and the modules outside the layers.
CLIP_LAYER = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
    "mlp.fc1", "mlp.fc2", "layer_norm1", "layer_norm2",
)
CLIP_OTHER = (
    "text_model.embeddings.token_embedding", "text_model.embeddings.position_embedding",
    "text_model.final_layer_norm", "text_projection",
)
TE_COMPONENTS = ("te", "te1", "te2")
# Longest prefix first: "lora_te_" must not swallow "lora_te1_".
KOHYA_PREFIXES = (("lora_unet_", "unet"), ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te_", "te"))


class ModuleNameError(LoraWorkbenchError, ValueError):
    """A module name that is not part of the known UNet / text-encoder layout."""


@dataclass(frozen=True)
class UNetLayout:
    """The shape of an SD-style UNet, enough to name every module on both sides.

    channel_mult: width of each level; only ratios matter, so diffusers' ``block_out_channels`` works.
    num_res_blocks: ResBlocks per level on the way down (one more on the way up).
    transformer_depth: transformer blocks per attention layer, one entry per level (ignored where
        the level has no attention).
    attention_levels: indices of the levels with cross-attention transformers.
    transformer_depth_middle: transformer blocks in the middle attention layer.
    has_middle_block: False for ``mid_block_type=None`` UNets.
    has_label_emb: SDXL's ``label_emb`` (diffusers ``add_embedding``) for the size/crop conditioning.
    """

    channel_mult: tuple[int, ...]
    num_res_blocks: int
    transformer_depth: tuple[int, ...]
    attention_levels: tuple[int, ...]
    transformer_depth_middle: int = 1
    has_middle_block: bool = True
    has_label_emb: bool = False

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "transformer_depth", tuple(self.transformer_depth))
        object.__setattr__(self, "attention_levels", tuple(sorted(self.attention_levels)))
        n = len(self.channel_mult)
        if len(self.transformer_depth) != n:
            raise ValueError(
                f"transformer_depth {self.transformer_depth} has {len(self.transformer_depth)} entries but "
                f"channel_mult {self.channel_mult} has {n} levels; give one depth per level"
            )
        bad = [lvl for lvl in self.attention_levels if not 0 <= lvl < n or self.transformer_depth[lvl] < 1]
        if bad:
            raise ValueError(
                f"attention_levels {self.attention_levels}: levels {bad} are out of range 0..{n - 1} or have "
                f"transformer_depth < 1; fix the level list or the depths {self.transformer_depth}"
            )
        if self.has_middle_block and self.transformer_depth_middle < 1:
            raise ValueError(
                f"transformer_depth_middle={self.transformer_depth_middle}: a middle block without attention "
                "is not supported; use a depth >= 1 or has_middle_block=False"
            )


SD1 = UNetLayout(channel_mult=(1, 2, 4, 4), num_res_blocks=2, transformer_depth=(1, 1, 1, 0),
                 attention_levels=(0, 1, 2), transformer_depth_middle=1)
SDXL = UNetLayout(channel_mult=(1, 2, 4), num_res_blocks=2, transformer_depth=(0, 2, 10),
                  attention_levels=(1, 2), transformer_depth_middle=10, has_label_emb=True)
LAYOUTS = {"sd1": SD1, "sdxl": SDXL}
# SD2: SD1's names, other widths. DiT families (Flux, Chroma) are named in dit_keys.
PRESETS = {a.name: LAYOUTS[a.unet_layout] for a in ARCH_TABLE.values() if a.kind == "unet"}

ArchOrLayout = Union[str, UNetLayout]


def get_layout(arch: ArchOrLayout) -> UNetLayout:
    """The layout for ``"sd1"`` / ``"sd2"`` / ``"sdxl"``, or ``arch`` itself if it is a layout."""
    if isinstance(arch, UNetLayout):
        return arch
    try:
        return PRESETS[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; use one of {tuple(PRESETS)} or pass a UNetLayout") from None


def layout_from_diffusers_config(config: Mapping) -> UNetLayout:
    """Read a :class:`UNetLayout` from a diffusers ``UNet2DConditionModel`` config dict."""
    boc = tuple(config.get("block_out_channels", (320, 640, 1280, 1280)))
    n = len(boc)
    down = tuple(config.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
    if len(down) != n:
        raise ValueError(f"down_block_types {down} and block_out_channels {boc} differ in length")
    unsupported = [t for t in down if t not in ("CrossAttnDownBlock2D", "DownBlock2D")]
    if unsupported:
        raise ValueError(f"down block types {unsupported} are not supported; only CrossAttnDownBlock2D/DownBlock2D")
    lpb = config.get("layers_per_block", 2)
    if not isinstance(lpb, int):
        if len(set(lpb)) != 1:
            raise ValueError(f"layers_per_block={lpb}: only the same number of ResBlocks on every level is supported")
        lpb = lpb[0]
    depth = config.get("transformer_layers_per_block", 1)
    depth = (depth,) * n if isinstance(depth, int) else tuple(depth)
    if any(not isinstance(d, int) for d in depth):
        raise ValueError(f"transformer_layers_per_block={depth}: per-block depths are not supported")
    rev = config.get("reverse_transformer_layers_per_block")
    if rev is not None and tuple(rev) != tuple(reversed(depth)):
        raise ValueError(f"reverse_transformer_layers_per_block={rev}: asymmetric UNets are not supported")
    attention = tuple(i for i, t in enumerate(down) if t.startswith("CrossAttn"))
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid not in (None, "UNetMidBlock2DCrossAttn"):
        raise ValueError(f"mid_block_type={mid!r} is not supported; use UNetMidBlock2DCrossAttn or None")
    # Relative widths when they are whole multiples (so the SD presets compare equal), else absolute.
    mult = tuple(c // boc[0] for c in boc) if all(c % boc[0] == 0 for c in boc) else boc
    return UNetLayout(
        channel_mult=mult,
        num_res_blocks=lpb,
        transformer_depth=tuple(d if i in attention else 0 for i, d in enumerate(depth)),
        attention_levels=attention,
        transformer_depth_middle=depth[-1],
        has_middle_block=mid is not None,
        has_label_emb=config.get("addition_embed_type") == "text_time",
    )


def _add_resnet(out: dict, ldm: str, diff: str, skip: bool) -> None:
    for a, b in RESNET_NAMES:
        out[f"{ldm}.{a}"] = f"{diff}.{b}"
    if skip:
        out[f"{ldm}.{RESNET_SKIP[0]}"] = f"{diff}.{RESNET_SKIP[1]}"


def _add_transformer(out: dict, ldm: str, diff: str, depth: int) -> None:
    for a in TRANSFORMER_OUTER:
        out[f"{ldm}.{a}"] = f"{diff}.{a}"
    for n in range(depth):
        for a in TRANSFORMER_BLOCK:
            out[f"{ldm}.transformer_blocks.{n}.{a}"] = f"{diff}.transformer_blocks.{n}.{a}"


@lru_cache(maxsize=None)
def _ldm_to_diffusers(layout: UNetLayout) -> dict[str, str]:
    out = {
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "input_blocks.0.0": "conv_in",
        "out.0": "conv_norm_out",
        "out.2": "conv_out",
    }
    if layout.has_label_emb:
        out["label_emb.0.0"] = "add_embedding.linear_1"
        out["label_emb.0.2"] = "add_embedding.linear_2"
    mult, nres, levels = layout.channel_mult, layout.num_res_blocks, len(layout.channel_mult)

    # Way down: input_blocks.0 is conv_in, then per level nres x [ResBlock, (transformer)], then a
    # downsampler block on every level but the last. Channels are tracked for the skip convs.
    ch = mult[0]
    skip_chans = [ch]
    k = 1
    for lvl in range(levels):
        for j in range(nres):
            _add_resnet(out, f"input_blocks.{k}.0", f"down_blocks.{lvl}.resnets.{j}", skip=ch != mult[lvl])
            ch = mult[lvl]
            if lvl in layout.attention_levels:
                _add_transformer(out, f"input_blocks.{k}.1", f"down_blocks.{lvl}.attentions.{j}",
                                 layout.transformer_depth[lvl])
            skip_chans.append(ch)
            k += 1
        if lvl != levels - 1:
            out[f"input_blocks.{k}.0.op"] = f"down_blocks.{lvl}.downsamplers.0.conv"
            skip_chans.append(ch)
            k += 1

    if layout.has_middle_block:
        _add_resnet(out, "middle_block.0", "mid_block.resnets.0", skip=False)
        _add_transformer(out, "middle_block.1", "mid_block.attentions.0", layout.transformer_depth_middle)
        _add_resnet(out, "middle_block.2", "mid_block.resnets.1", skip=False)

    # Way up: levels in reverse (diffusers up_blocks.0 is the deepest level), nres + 1 blocks each,
    # every ResBlock sees the concatenated skip so its channels change; upsampler after the last
    # block of every level but level 0, at child index 1 (no attention) or 2.
    k = 0
    for lvl in reversed(range(levels)):
        up = levels - 1 - lvl
        for j in range(nres + 1):
            skip_in = ch + skip_chans.pop()
            _add_resnet(out, f"output_blocks.{k}.0", f"up_blocks.{up}.resnets.{j}", skip=skip_in != mult[lvl])
            ch = mult[lvl]
            child = 1
            if lvl in layout.attention_levels:
                _add_transformer(out, f"output_blocks.{k}.1", f"up_blocks.{up}.attentions.{j}",
                                 layout.transformer_depth[lvl])
                child = 2
            if lvl != 0 and j == nres:
                out[f"output_blocks.{k}.{child}.conv"] = f"up_blocks.{up}.upsamplers.0.conv"
            k += 1
    return out


def unet_ldm_to_diffusers(arch: ArchOrLayout) -> dict[str, str]:
    """LDM module path -> diffusers module path for ``arch`` ("sd1"/"sd2"/"sdxl" or a UNetLayout)."""
    return dict(_ldm_to_diffusers(get_layout(arch)))


@lru_cache(maxsize=None)
def _diffusers_to_ldm(layout: UNetLayout) -> dict[str, str]:
    return {v: k for k, v in _ldm_to_diffusers(layout).items()}


def to_diffusers_path(ldm_path: str, arch: ArchOrLayout) -> str | None:
    """One LDM module path in diffusers naming (None if ``arch``'s UNet has no such module)."""
    return _ldm_to_diffusers(get_layout(arch)).get(ldm_path)


def to_ldm_path(diffusers_path: str, arch: ArchOrLayout) -> str | None:
    """One diffusers module path in LDM naming (None if ``arch``'s UNet has no such module)."""
    return _diffusers_to_ldm(get_layout(arch)).get(diffusers_path)


def _underscored(path: str) -> str:
    return path.replace(".", "_")


def kohya_unet_name(diffusers_module_path: str, arch: str, layout: UNetLayout | None = None) -> str:
    """The kohya LoRA name of a UNet module given by its diffusers path.

    SD1/SD2 use the diffusers path, SDXL the LDM path (kohya's sdxl network is built on LDM names).
    ``layout`` overrides the SDXL preset for non-standard (e.g. tiny test) UNets named the SDXL way.
    """
    if arch in ("sd1", "sd2"):
        return "lora_unet_" + _underscored(diffusers_module_path)
    if arch != "sdxl":
        raise ValueError(f"unknown architecture {arch!r} for kohya UNet names; use one of {UNET_ARCHS} "
                         "(DiT families: model.dit_keys)")
    ldm = _diffusers_to_ldm(layout or SDXL).get(diffusers_module_path)
    if ldm is None:
        raise ModuleNameError(
            f"{diffusers_module_path!r} is not a module of the SDXL UNet; pass a diffusers module path such as "
            "'down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q' (or the layout of your UNet)"
        )
    return "lora_unet_" + _underscored(ldm)


# Children of a Hugging Face CLIP ``text_model``: transformers >= 5.6 flattened ``CLIPTextModel`` to these
# (no ``text_model.`` level), while ``CLIPTextModelWithProjection`` and ComfyUI keep the level.
_CLIP_TEXT_MODEL_CHILDREN = ("embeddings.", "encoder.", "final_layer_norm")


def canonical_clip_path(hf_module_path: str) -> str:
    """A CLIP text-model module path with the ``text_model.`` level kohya names are built on, whichever
    transformers version (or host) built the model: ``encoder.layers.0.mlp.fc1`` ->
    ``text_model.encoder.layers.0.mlp.fc1``."""
    if hf_module_path.startswith(_CLIP_TEXT_MODEL_CHILDREN):
        return "text_model." + hf_module_path
    return hf_module_path


def kohya_te_name(hf_module_path: str, component: str = "te") -> str:
    """The kohya LoRA name of a text-encoder module: ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` + path
    (``text_model.encoder.layers...``, also for a flattened transformers ``CLIPTextModel``)."""
    if component not in TE_COMPONENTS:
        raise ValueError(f"text-encoder component {component!r} unknown; use one of {TE_COMPONENTS}")
    return f"lora_{component}_" + _underscored(canonical_clip_path(hf_module_path))


def kohya_name(component: str, module_path: str, arch: str, layout: UNetLayout | None = None) -> str:
    """kohya name for ``component`` ("unet"/"te"/"te1"/"te2") and its diffusers / HF module path."""
    if component == "unet":
        return kohya_unet_name(module_path, arch, layout)
    return kohya_te_name(module_path, component)


_CLIP_LAYER_RE = re.compile(r"text_model_encoder_layers_(\d+)_(.+)")
_CLIP_LAYER_PARTS = {_underscored(p): p for p in CLIP_LAYER}
_CLIP_OTHER_PARTS = {_underscored(p): p for p in CLIP_OTHER}


def _parse_te_path(rest: str) -> str | None:
    """HF CLIP path for an underscored one, matched against the CLIP module names (any depth)."""
    m = _CLIP_LAYER_RE.fullmatch(rest)
    if m and m.group(2) in _CLIP_LAYER_PARTS:
        return f"text_model.encoder.layers.{m.group(1)}.{_CLIP_LAYER_PARTS[m.group(2)]}"
    return _CLIP_OTHER_PARTS.get(rest)


@lru_cache(maxsize=None)
def _unet_table(layout: UNetLayout) -> dict[str, str]:
    """underscored diffusers AND underscored LDM path -> diffusers path."""
    table = {}
    for ldm, diff in _ldm_to_diffusers(layout).items():
        table[_underscored(diff)] = diff
        table[_underscored(ldm)] = diff
    return table


class KohyaNameResolver:
    """Parses kohya LoRA names back to (component, module path) by lookup among known names.

    ``arch`` selects the UNet layout(s) to search ("sd1"/"sd2"/"sdxl", a UNetLayout, or None for all
    presets, in which case a name that means different modules in different presets is an error).
    ``known_modules`` adds module paths of your own model (diffusers paths for the UNet, or LDM paths of
    ``arch``'s layout; HF paths for text encoders), e.g. ``[n for n, _ in unet.named_modules()]``.
    """

    def __init__(self, arch: ArchOrLayout | None = None, known_modules: Iterable[str] | None = None):
        layouts = [get_layout(arch)] if arch is not None else [SD1, SDXL]
        self._tables = [_unet_table(lay) for lay in layouts]
        self._extra: dict[str, str] = {}
        ldm_map = _ldm_to_diffusers(layouts[0]) if arch is not None else {}
        for name in known_modules or ():
            self._extra[_underscored(name)] = ldm_map.get(name, name)

    def parse(self, name: str) -> tuple[str, str]:
        """``(component, module path)`` of a kohya LoRA name; raises ``ModuleNameError`` for an unknown name."""
        for prefix, component in KOHYA_PREFIXES:
            if name.startswith(prefix):
                rest = name[len(prefix):]
                break
        else:
            raise ModuleNameError(
                f"{name!r} is not a kohya LoRA name; expected a prefix among "
                f"{[p for p, _ in KOHYA_PREFIXES]}"
            )
        if rest in self._extra:
            return component, self._extra[rest]
        if component != "unet":
            path = _parse_te_path(rest)
            if path is None:
                raise ModuleNameError(
                    f"{name!r}: {rest!r} is not a CLIP text-encoder module; pass known_modules with your "
                    "text encoder's module names if it is not a Hugging Face CLIP model"
                )
            return component, path
        found = {t[rest] for t in self._tables if rest in t}
        if len(found) > 1:
            raise ModuleNameError(f"{name!r} names different modules in SD1 and SDXL ({sorted(found)}); pass arch")
        if not found:
            raise ModuleNameError(
                f"{name!r}: {rest!r} is not a module of the known UNet layouts; pass the right arch or "
                "known_modules with your UNet's module names"
            )
        return component, found.pop()


@lru_cache(maxsize=8)
def _resolver(arch: ArchOrLayout | None) -> KohyaNameResolver:
    return KohyaNameResolver(arch)


def parse_kohya_name(name: str, arch: ArchOrLayout | None = None,
                     known_modules: Iterable[str] | None = None) -> tuple[str, str]:
    """Inverse of the kohya naming: ``(component, module path)``.

    component is "unet", "te", "te1" or "te2"; the path is in diffusers naming for the UNet (whether
    the kohya name used diffusers or LDM names) and Hugging Face naming for text encoders.
    For many names, build one :class:`KohyaNameResolver` instead of passing ``known_modules`` each time.
    """
    if known_modules is not None:
        return KohyaNameResolver(arch, known_modules).parse(name)
    return _resolver(arch).parse(name)
