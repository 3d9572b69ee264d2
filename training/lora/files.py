"""LoRA files: one in-memory form in kohya naming, and the file formats around it.

* :class:`LoraWeights` holds :class:`LoraModule` (down, up, alpha[, dora_scale]) keyed by kohya name
  (``lora_unet_*``, ``lora_te_*``, ``lora_te1_*``, ``lora_te2_*``; see ``unet_keys``).
* :func:`save_lora` writes the kohya safetensors format that A1111, ComfyUI, Forge and Civitai read,
  with the ``sshs_*`` hashes kohya precomputes and ``modelspec.*`` keys.
* :func:`load_lora` reads kohya, diffusers/peft (new and old key styles) and ComfyUI/LDM files and
  normalises them into the same kohya names, so the deltas are comparable whatever wrote the file.

Conventions: ``alpha`` is stored as an fp32 scalar whatever the save dtype (so 0.3 stays 0.3);
``scale = alpha / rank``; a missing alpha means ``alpha = rank`` (scale 1), as in kohya and peft.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field, is_dataclass, asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import Tensor

from ..model import keys as uk
from ..fsutil import FileExistsNoOverwrite, atomic_write

logger = logging.getLogger(__name__)

ARCHS = ("sd1", "sd2", "sdxl", "unknown")
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")


class LoraFormatError(ValueError):
    """A state dict or file that is not a LoRA this module can read (names the offending keys)."""


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return SAVE_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} unknown; use one of {sorted(SAVE_DTYPES)}") from None


@dataclass
class LoraModule:
    """One LoRA pair: ``delta W = up @ down * alpha / rank``.

    down: ``[r, in]`` (Linear) or ``[r, in, kh, kw]`` (Conv2d); up: ``[out, r]`` or ``[out, r, 1, 1]``.
    dora_scale: DoRA magnitude, ``[out, 1]`` / ``[out, 1, 1, 1]`` (kohya/ComfyUI layout), or None.
    """

    down: Tensor
    up: Tensor
    alpha: float
    dora_scale: Tensor | None = None

    def __post_init__(self):
        d, u = tuple(self.down.shape), tuple(self.up.shape)
        ok = (self.down.dim() == 2 and self.up.dim() == 2) or (
            self.down.dim() == 4 and self.up.dim() == 4 and u[2:] == (1, 1))
        if not ok or d[0] != u[1]:
            raise LoraFormatError(
                f"LoRA shapes down {d} / up {u} do not pair: expected down [r, in] with up [out, r], or "
                "down [r, in, kh, kw] with up [out, r, 1, 1]"
            )
        self.alpha = float(self.alpha)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def is_conv(self) -> bool:
        """A conv LoRA with a kernel larger than 1x1 (kohya's conv_dim / LoCon layers)."""
        return self.down.dim() == 4 and tuple(self.down.shape[2:]) != (1, 1)

    def delta(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight change, shaped like the base weight. DoRA's magnitude needs the base weight, so
        ``dora_scale`` is not applied here."""
        down, up = self.down.to(dtype), self.up.to(dtype)
        if down.dim() == 2:
            return (up @ down) * self.scale
        return torch.einsum("or,rihw->oihw", up[:, :, 0, 0], down) * self.scale


@dataclass
class LoraWeights:
    """A whole LoRA in kohya naming, with its safetensors metadata and base architecture."""

    modules: dict[str, LoraModule]
    metadata: dict[str, str] = field(default_factory=dict)
    arch: str = "unknown"

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch {self.arch!r} unknown; use one of {ARCHS}")

    @staticmethod
    def component_of(name: str) -> str:
        """"unet", "te", "te1" or "te2" from a kohya name's prefix ("other" if it has none of them)."""
        for prefix, component in uk.KOHYA_PREFIXES:
            if name.startswith(prefix):
                return component
        return "other"

    def ranks(self) -> dict[str, int]:
        return {name: m.rank for name, m in self.modules.items()}

    def to(self, dtype: str | torch.dtype) -> LoraWeights:
        dt = _torch_dtype(dtype)
        mods = {
            n: LoraModule(m.down.to(dt), m.up.to(dt), m.alpha, None if m.dora_scale is None else m.dora_scale.to(dt))
            for n, m in self.modules.items()
        }
        return LoraWeights(mods, dict(self.metadata), self.arch)


# ----------------------------------------------------------------------------- saving

def lora_state_dict(lora: LoraWeights, dtype: str | torch.dtype | None = None) -> dict[str, Tensor]:
    """The kohya state dict: ``<name>.lora_down.weight``, ``.lora_up.weight``, ``.alpha`` (fp32 scalar),
    optional ``.dora_scale``; contiguous CPU tensors in ``dtype`` (default: as stored)."""
    dt = None if dtype is None else _torch_dtype(dtype)

    def ready(t: Tensor) -> Tensor:
        return t.detach().to("cpu", dt or t.dtype).contiguous()

    out: dict[str, Tensor] = {}
    for name, m in sorted(lora.modules.items()):
        out[f"{name}.lora_down.weight"] = ready(m.down)
        out[f"{name}.lora_up.weight"] = ready(m.up)
        out[f"{name}.alpha"] = torch.tensor(m.alpha, dtype=torch.float32)
        if m.dora_scale is not None:
            out[f"{name}.dora_scale"] = ready(m.dora_scale)
    return out


def _metadata_strings(metadata: Mapping) -> dict[str, str]:
    out = {}
    for k, v in metadata.items():
        if v is None:
            continue
        if isinstance(v, str):
            out[k] = v
        elif isinstance(v, (dict, list, tuple)):
            out[k] = json.dumps(v)
        elif isinstance(v, (bool, int, float)):
            out[k] = str(v)
        else:
            raise ValueError(f"metadata {k!r} has a {type(v).__name__} value; give a str, number, bool, list or dict")
    return out


def _data_offset(blob: bytes) -> int:
    return 8 + int.from_bytes(blob[:8], "little")


def _kohya_hashes(tensors: dict[str, Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """kohya's precalculated hashes: serialise with only the ``ss_*`` metadata (user edits of other keys
    must not change the hash); model hash = sha256 of everything after the header, legacy hash =
    sd-webui-additional-networks' sha256 of 64 KiB at offset 1 MiB, first 8 hex digits."""
    import safetensors.torch

    blob = safetensors.torch.save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    model = hashlib.sha256(blob[_data_offset(blob):]).hexdigest()
    legacy = hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    return model, legacy


def save_lora(path: str | os.PathLike, lora: LoraWeights, dtype: str | torch.dtype = "fp16",
              overwrite: bool = False) -> Path:
    """Write ``lora`` as a kohya-format ``.safetensors`` file, atomically; returns the path.

    Adds ``sshs_model_hash``/``sshs_legacy_hash`` (kohya) and ``modelspec.hash_sha256`` ("0x" + sha256 of
    the tensor data, i.e. the same digest as sshs_model_hash). Refuses to replace an existing file
    unless ``overwrite`` is true.
    """
    import safetensors.torch

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA files are written as safetensors; name {path} with a .safetensors extension")
    if path.exists() and not overwrite:
        raise FileExistsNoOverwrite(f"{path} already exists; choose another name or pass overwrite=True to replace it")
    if not lora.modules:
        raise ValueError(f"refusing to write {path}: the LoRA has no modules")
    tensors = lora_state_dict(lora, dtype)
    metadata = {k: v for k, v in _metadata_strings(lora.metadata).items() if k not in HASH_KEYS}
    model, legacy = _kohya_hashes(tensors, metadata)
    metadata.update({"sshs_model_hash": model, "sshs_legacy_hash": legacy, "modelspec.hash_sha256": "0x" + model})
    atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata), overwrite=overwrite)
    logger.info("saved LoRA %s (%d modules, %s)", path, len(lora.modules), dtype)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A ``.safetensors`` file's metadata, from its header only; {} for anything unreadable."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        return {}


def written_by(path: str | os.PathLike, run_id: str | None) -> bool:
    """True if ``path`` is a LoRA that the training run ``run_id`` wrote (its ``lw_run_id``)."""
    return bool(run_id) and read_metadata(path).get("lw_run_id") == run_id


def model_hash(path: str | os.PathLike) -> str:
    """sshs_model_hash recomputed from a file: sha256 of the bytes after the safetensors header."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def legacy_hash(path: str | os.PathLike) -> str:
    """sshs_legacy_hash recomputed the kohya way (re-serialised with only the file's ``ss_*`` metadata)."""
    sd, meta = _read_file(Path(path))
    return _kohya_hashes(sd, meta)[1]


# ----------------------------------------------------------------------------- loading

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
)
_LYCORIS = re.compile(r"\.(hada_|lokr_|lora_mid\.|oft_|a1\.weight$|[wb]_norm$|diff$|diff_b$)")
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
    te = "te1" if arch == "sdxl" else "te"
    if prefix.startswith("lora_"):
        component = LoraWeights.component_of(prefix)
        if component == "other":
            raise uk.ModuleNameError(prefix)
        if arch == "unknown":
            return component, None
        try:
            component, path = resolver.parse(prefix)
        except uk.ModuleNameError:
            logger.warning("LoRA module %s is not in the %s layout; keeping its name as is", prefix, arch)
            return component, None
        return (te if component == "te" else component), path
    if prefix.startswith("diffusion_model."):
        if arch == "unknown":
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
    if component == "unet" and arch == "unknown":
        return "lora_unet_" + path.replace(".", "_")  # kohya's SD1 convention: diffusers names
    return uk.kohya_name(component, path, arch)


def _down_in_dims(sd: Mapping[str, Tensor], needle) -> set[int]:
    dims = set()
    for k, v in sd.items():
        split = _split_key(k)
        if split and split[1] == "down" and needle(split[0].replace(".", "_")) and v.dim() >= 2:
            dims.add(int(v.shape[1]))
    return dims


def detect_arch(state_dict: Mapping[str, Tensor]) -> str:
    """"sdxl", "sd2", "sd1" or "unknown" from key names and the cross-attention / CLIP widths."""
    keys = list(state_dict)
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.", "text_encoders.clip_g.")) for k in keys):
        return "sdxl"
    if any("label_emb" in k or "add_embedding" in k for k in keys):
        return "sdxl"
    ctx = _down_in_dims(state_dict, lambda p: re.search(r"attn2_(processor_)?to_[kv]", p) is not None)
    for dim, arch in ((2048, "sdxl"), (1024, "sd2"), (768, "sd1")):
        if dim in ctx:
            return arch
    te = _down_in_dims(state_dict, lambda p: re.search(r"self_attn_(q_proj|to_q)", p) is not None)
    for dim, arch in ((1280, "sdxl"), (1024, "sd2"), (768, "sd1")):
        if dim in te:
            return arch
    if ctx or te:  # widths seen, none of SD's: a custom (e.g. tiny test) model, whatever its names say
        return "unknown"
    joined = "\n".join(k.replace(".", "_") for k in keys)
    if re.search(r"transformer_blocks_[1-9]", joined):  # depth > 1 exists only in SDXL
        return "sdxl"
    if re.search(r"input_blocks_(1|2)_1_|input_blocks_1[01]_|output_blocks_(9|1[01])_|down_blocks_(0_attentions|3_)"
                 r"|up_blocks_3_", joined):  # attention at full resolution / a 4th level: SD1-family
        return "sd1"
    return "unknown"


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
        if head not in ("unet", "text_encoder", "text_encoder_2"):  # peft's own save: no component prefix
            head, key = "", k
        out.setdefault(head, {})[key] = v
    return out


def _peft_alpha(prefix: str, rank: int, configs: dict[str, dict]) -> float | None:
    head = next((h for h in ("text_encoder_2", "text_encoder", "unet") if prefix.startswith(h + ".")), "")
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


def unpickling_reason(e: BaseException) -> str:
    """The cause in a ``torch.load(weights_only=True)`` error, without PyTorch's advice to retry with
    ``weights_only=False`` (which runs whatever code the file holds)."""
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", str(e), re.S)
    text = m.group(1) if m else str(e)
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__


def _read_file(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except SafetensorError as e:
            raise LoraFormatError(f"{path} is not a readable .safetensors file ({e}): it is damaged, incomplete "
                                  "or not a safetensors file; download or copy it again") from e
    if path.suffix in (".bin", ".pt", ".ckpt", ".pth"):
        import pickle
        import zipfile

        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "Unsupported global" not in str(e):  # random bytes, a truncated file: not "objects"
                raise LoraFormatError(f"{path} is not a readable {path.suffix} file ({unpickling_reason(e)}): "
                                      "it is damaged or not a checkpoint") from e
            # Not PyTorch's own hint (weights_only=False), which would run whatever code the pickle holds.
            raise LoraFormatError(f"{path} holds Python objects besides tensors; pickle files are only read "
                                  "as plain tensors because a pickle can run code. Use the .safetensors "
                                  "version of this LoRA") from e
        except (RuntimeError, EOFError, zipfile.BadZipFile) as e:
            raise LoraFormatError(f"{path} is not a readable {path.suffix} file ({e}): it is damaged or "
                                  "not a checkpoint") from e
        if not isinstance(sd, dict):
            raise LoraFormatError(f"{path} holds a {type(sd).__name__}, not a dictionary of tensors")
        return dict(sd.get("state_dict", sd)), {}
    raise LoraFormatError(f"{path}: unknown LoRA file type {path.suffix!r}; use .safetensors (or .bin/.pt)")


def load_lora(path_or_state_dict: str | os.PathLike | Mapping[str, Tensor], metadata: Mapping[str, str] | None = None,
              known_modules: Iterable[str] | None = None) -> LoraWeights:
    """Read a LoRA (file or state dict) in kohya, diffusers/peft or ComfyUI/LDM format into kohya names.

    ``metadata`` adds to (and overrides) a file's metadata. ``known_modules`` lists extra module paths
    (diffusers UNet / HF text encoder) for UNets that are not SD1/SD2/SDXL, e.g. tiny test models.
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        sd, meta = _read_file(Path(path_or_state_dict))
    else:
        sd, meta = dict(path_or_state_dict), {}
    meta.update(metadata or {})
    arch = detect_arch(sd)
    resolver = uk.KohyaNameResolver(None if arch == "unknown" else arch, known_modules)
    peft_cfg = _peft_alpha_config(meta)

    parts: dict[str, dict[str, Tensor]] = {}
    raw_prefix: dict[str, str] = {}
    unknown: list[str] = []
    reasons: list[str] = []
    for key, tensor in sd.items():
        split = _split_key(key)
        if split is None:
            unknown.append(key)
            continue
        prefix, role, style = split
        try:
            name = _canonical(prefix, style, arch, resolver)
        except uk.ModuleNameError as e:
            unknown.append(key)
            reasons.append(str(e))
            continue
        slot = parts.setdefault(name, {})
        if role in slot:
            raise LoraFormatError(f"two keys give the {role} of module {name}, the second is {key!r}")
        slot[role] = tensor
        raw_prefix.setdefault(name, prefix)
    if unknown:
        hint = " (LyCORIS LoHa/LoKr/Tucker/OFT weights are not plain LoRA)" if any(
            _LYCORIS.search(k) for k in unknown) else ""
        why = f" First problem: {reasons[0]}." if reasons else ""
        raise LoraFormatError(
            f"{len(unknown)} of {len(sd)} keys are not LoRA weights this loader knows{hint}, e.g. {unknown[:5]}; "
            "expected kohya (lora_unet_*.lora_down.weight), diffusers/peft (unet.*.lora_A.weight) or ComfyUI "
            f"(diffusion_model.*.lora_down.weight) keys.{why}"
        )

    modules: dict[str, LoraModule] = {}
    for name in sorted(parts):
        slot = parts[name]
        if "down" not in slot or "up" not in slot:
            if set(slot) <= {"alpha"}:
                logger.warning("LoRA has an alpha for %s but no weights; ignored", name)
                continue
            raise LoraFormatError(f"module {name} has {sorted(slot)} but needs both down and up weights")
        down, up = slot["down"], slot["up"]
        if down.dim() == 4 and up.dim() == 2:  # some writers squeeze the 1x1 up conv
            up = up[:, :, None, None]
        if "alpha" in slot:
            alpha = _alpha_value(slot["alpha"])
        else:
            alpha = _peft_alpha(raw_prefix[name], int(down.shape[0]), peft_cfg)
            alpha = float(down.shape[0]) if alpha is None else alpha
        dora = slot.get("dora")
        if dora is not None and dora.dim() == 1:  # peft magnitude [out] -> kohya [out, 1, ...]
            dora = dora.reshape(-1, *([1] * (down.dim() - 1)))
        try:
            modules[name] = LoraModule(down, up, alpha, dora)
        except LoraFormatError as e:
            raise LoraFormatError(f"module {name}: {e}") from e
    if not modules:
        raise LoraFormatError("no LoRA modules found (the state dict is empty or has only alphas)")
    logger.debug("loaded LoRA: %d modules, arch %s", len(modules), arch)
    return LoraWeights(modules, meta, arch)


# ----------------------------------------------------------------------------- metadata

_BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
_MODELSPEC_ARCH = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512",
                   "sdxl": "stable-diffusion-xl-v1-base"}
_IMPLEMENTATION = {"sd1": "diffusers", "sd2": "diffusers", "sdxl": "https://github.com/Stability-AI/generative-models"}


def _resolution_pair(resolution) -> tuple[int, int]:
    if isinstance(resolution, int):
        return resolution, resolution
    if isinstance(resolution, str):
        resolution = [int(x) for x in re.split(r"[,x ]+", resolution.strip("() ")) if x]
    w, h = (list(resolution) * 2)[:2] if len(resolution) == 1 else resolution
    return int(w), int(h)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds")


def _package_version() -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("lora-workbench")
    except PackageNotFoundError:
        return None


def kohya_metadata(*, arch: str, network_dim: int | None = None, network_alpha: float | None = None,
                   conv_dim: int | None = None, conv_alpha: float | None = None, network_args: dict | None = None,
                   network_module: str = "networks.lora", output_name: str | None = None, title: str | None = None,
                   tag_frequency: dict | None = None, dataset_dirs: dict | None = None, resolution=None,
                   num_train_images: int | None = None, learning_rate: float | None = None,
                   unet_lr: float | None = None, text_encoder_lr: float | None = None,
                   max_train_steps: int | None = None, num_epochs: int | None = None,
                   lr_scheduler: str | None = None, optimizer: str | None = None, mixed_precision: str | None = None,
                   seed: int | None = None, training_started_at: float | None = None,
                   training_finished_at: float | None = None, sd_model_name: str | None = None,
                   sd_model_hash: str | None = None, prediction_type: str = "epsilon",
                   training_comment: str | None = None, trigger_phrase: str | None = None,
                   description: str | None = None, date: str | datetime | None = None,
                   lw_version: str | None = None, lw_config=None, lw_extra: dict | None = None) -> dict[str, str]:
    """The ``ss_*`` / ``modelspec.*`` / ``lw_*`` metadata A1111, Civitai and rgthree read. Optional
    values left None are omitted; an unknown keyword is a TypeError (no silent typos).

    tag_frequency: {concept: {tag: count}}; dataset_dirs: {concept: {"n_repeats": r, "img_count": n}};
    resolution: int, (width, height) or "512,512"; times are unix seconds; lw_config: dict or dataclass
    (JSON-encoded); lw_extra: more facts, each stored as ``lw_<key>``.
    """
    if arch not in _BASE_VERSION:
        raise ValueError(f"arch {arch!r} unknown; use one of {sorted(_BASE_VERSION)}")
    if prediction_type not in ("epsilon", "v"):
        raise ValueError(f"prediction_type {prediction_type!r} unknown; use 'epsilon' or 'v'")
    args = dict(network_args or {})
    if conv_dim is not None:
        args.setdefault("conv_dim", conv_dim)
        args.setdefault("conv_alpha", conv_alpha if conv_alpha is not None else conv_dim)
    w_h = _resolution_pair(resolution) if resolution is not None else None
    if date is None and (training_finished_at or training_started_at):
        date = _iso(training_finished_at or training_started_at)
    elif isinstance(date, datetime):
        date = date.isoformat(timespec="seconds")
    if is_dataclass(lw_config) and not isinstance(lw_config, type):
        lw_config = asdict(lw_config)
    sd_arch = _MODELSPEC_ARCH[arch]
    if arch == "sd2" and prediction_type == "v":
        sd_arch = "stable-diffusion-v2-768-v"
    values = {
        "ss_base_model_version": _BASE_VERSION[arch],
        "ss_network_module": network_module,
        "ss_network_dim": network_dim,
        "ss_network_alpha": network_alpha,
        "ss_network_args": json.dumps(args) if args else None,
        "ss_output_name": output_name,
        "ss_tag_frequency": json.dumps(tag_frequency) if tag_frequency is not None else None,
        "ss_dataset_dirs": json.dumps(dataset_dirs) if dataset_dirs is not None else None,
        "ss_resolution": f"({w_h[0]}, {w_h[1]})" if w_h else None,
        "ss_num_train_images": num_train_images,
        "ss_learning_rate": learning_rate,
        "ss_unet_lr": unet_lr,
        "ss_text_encoder_lr": text_encoder_lr,
        "ss_max_train_steps": max_train_steps,
        "ss_num_epochs": num_epochs,
        "ss_lr_scheduler": lr_scheduler,
        "ss_optimizer": optimizer,
        "ss_mixed_precision": mixed_precision,
        "ss_seed": seed,
        "ss_training_started_at": training_started_at,
        "ss_training_finished_at": training_finished_at,
        "ss_sd_model_name": sd_model_name,
        "ss_new_sd_model_hash": sd_model_hash,
        "ss_v2": arch == "sd2",
        "ss_training_comment": training_comment,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": sd_arch + "/lora",
        "modelspec.implementation": _IMPLEMENTATION[arch],
        "modelspec.title": title or output_name or "LoRA",
        "modelspec.date": date,
        "modelspec.resolution": f"{w_h[0]}x{w_h[1]}" if w_h else None,
        "modelspec.trigger_phrase": trigger_phrase,
        "modelspec.prediction_type": prediction_type,
        "modelspec.description": description,
        "lw_version": lw_version or _package_version(),
        "lw_config": json.dumps(lw_config, default=str) if lw_config is not None else None,
    }
    for k, v in (lw_extra or {}).items():
        values[k if k.startswith("lw_") else f"lw_{k}"] = v
    return _metadata_strings(values)


# ----------------------------------------------------------------------------- describe

def _abbrev(value: str, limit: int = 120) -> str:
    value = value.replace("\n", " ")
    return value if len(value) <= limit else f"{value[:limit]}... ({len(value)} chars)"


def _top_tags(meta: Mapping[str, str], n: int = 10) -> str | None:
    try:
        freq = json.loads(meta["ss_tag_frequency"])
    except (KeyError, json.JSONDecodeError):
        return None
    total: Counter = Counter()
    for tags in freq.values():
        if isinstance(tags, dict):
            total.update({t: int(c) for t, c in tags.items()})
    return ", ".join(f"{t} ({c})" for t, c in total.most_common(n)) or None


def _summary(values: Iterable) -> str:
    counts = Counter(values)
    return ", ".join(f"{v:g} x{c}" if isinstance(v, float) else f"{v} x{c}" for v, c in sorted(counts.items()))


def _row(label: str, value) -> str:
    return f"{label + ':':<18}{value}"


# Key prefixes of whole-model files (LDM single-file checkpoints, diffusers folders' weights).
_CHECKPOINT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.",
                        "down_blocks.", "text_model.", "encoder.down")


def _arch_from_metadata(meta: Mapping[str, str]) -> str | None:
    """sd1/sd2/sdxl from ``modelspec.architecture`` or ``ss_base_model_version``, as kohya_metadata writes them."""
    spec = meta.get("modelspec.architecture", "").split("/")[0]
    for arch, name in _MODELSPEC_ARCH.items():
        if spec == name or (arch == "sd2" and spec.startswith("stable-diffusion-v2")):
            return arch
    version = meta.get("ss_base_model_version", "")
    return next((a for a, v in _BASE_VERSION.items() if version == v), None)


def describe_lora(path: str | os.PathLike) -> str:
    """Human summary of a LoRA file (``lora-workbench inspect``): structure, training facts, hashes, metadata.

    Raises LoraFormatError for a file that cannot be read or is not a LoRA (e.g. a full checkpoint)."""
    path = Path(path)
    sd, meta = _read_file(path)
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
        dtypes = sorted({str(m.down.dtype).replace("torch.", "") for m in mods})
        conv = sum(m.is_conv for m in mods)
        arch = lora.arch
        if arch not in _MODELSPEC_ARCH:  # keys of an unknown model: the file's own metadata may say
            arch = _arch_from_metadata(meta) or arch
        lines += [
            _row("architecture", arch),
            _row("modules", ", ".join(f"{c} {n}" for c, n in sorted(per.items())) + f" (total {len(lora.modules)})"),
            _row("ranks", _summary(m.rank for m in mods)),
            _row("alphas", _summary(m.alpha for m in mods)),
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
