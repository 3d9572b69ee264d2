"""LoRA files: one in-memory form in kohya naming, saving it, and the hashes other tools check.

* :class:`LoraWeights` holds :class:`LoraModule` (down, up, alpha[, dora_scale]) keyed by kohya name
  (``lora_unet_*``, ``lora_te_*``, ``lora_te1_*``, ``lora_te2_*``; see ``model.keys``).
* :func:`save_lora` writes the kohya safetensors format that A1111, ComfyUI, Forge and Civitai read,
  with the ``sshs_*`` hashes kohya precomputes and ``modelspec.*`` keys.
* :func:`read_lora_file` reads a file's tensors and metadata as they are; ``formats.load_lora`` turns
  any common key format into ``LoraWeights``, ``metadata`` builds the metadata, ``describe`` shows it.

Conventions: ``alpha`` is stored as an fp32 scalar whatever the save dtype (so 0.3 stays 0.3);
``scale = alpha / rank``; a missing alpha means ``alpha = rank`` (scale 1), as in kohya and peft.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from ..config import SAVE_DTYPES
from ..errors import LoraWorkbenchError
from ..fsutil import FileExistsNoOverwriteError, atomic_write
from ..model import keys as uk
from ..model.archs import ARCH_TABLE, ARCHS, UNKNOWN

log = logging.getLogger(__name__)

# The torch dtype of each name in config.SAVE_DTYPES (the allowed names are defined there).
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")


class LoraFormatError(LoraWorkbenchError, ValueError):
    """A state dict or file that is not a LoRA this module can read (names the offending keys)."""


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype of a save-dtype name ("fp16", "bf16", "fp32"); a torch dtype passes through."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"dtype {dtype!r} unknown; use one of {sorted(SAVE_DTYPES)}")
    return TORCH_DTYPES[dtype]


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
        """The LoRA rank r: rows of ``down``."""
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """``alpha / rank``, the factor on ``up @ down``."""
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
    arch: str = UNKNOWN

    def __post_init__(self):
        if self.arch not in (*ARCHS, UNKNOWN):
            raise ValueError(f"arch {self.arch!r} unknown; use one of {(*ARCHS, UNKNOWN)}")

    @staticmethod
    def component_of(name: str) -> str:
        """"unet", "te", "te1" or "te2" from a kohya name's prefix ("other" if it has none of them)."""
        for prefix, component in uk.KOHYA_PREFIXES:
            if name.startswith(prefix):
                return component
        return "other"

    def ranks(self) -> dict[str, int]:
        """kohya name -> rank of each module."""
        return {name: m.rank for name, m in self.modules.items()}

    def to(self, dtype: str | torch.dtype) -> LoraWeights:
        """A copy with the weights in ``dtype`` ("fp16"/"bf16"/"fp32" or a torch dtype); alphas stay floats."""
        dt = torch_dtype(dtype)
        mods = {
            n: LoraModule(m.down.to(dt), m.up.to(dt), m.alpha, None if m.dora_scale is None else m.dora_scale.to(dt))
            for n, m in self.modules.items()
        }
        return LoraWeights(mods, dict(self.metadata), self.arch)


# ----------------------------------------------------------------------------- saving

def lora_state_dict(lora: LoraWeights, dtype: str | torch.dtype | None = None) -> dict[str, Tensor]:
    """The kohya state dict: ``<name>.lora_down.weight``, ``.lora_up.weight``, ``.alpha`` (fp32 scalar),
    optional ``.dora_scale``; contiguous CPU tensors in ``dtype`` (default: as stored)."""
    dt = None if dtype is None else torch_dtype(dtype)

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


def metadata_strings(metadata: Mapping) -> dict[str, str]:
    """Metadata as safetensors stores it: str values (lists/dicts as JSON, numbers/bools as str); None values dropped."""
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


def key_format(arch: str) -> str:
    """The key format files of ``arch`` are written in: "kohya", or "diffusers" (``archs.Arch.file_format``)."""
    return ARCH_TABLE[arch].file_format if arch in ARCH_TABLE else "kohya"


def save_lora(path: str | os.PathLike, lora: LoraWeights, dtype: str | torch.dtype = "fp16",
              overwrite: bool = False) -> Path:
    """Write ``lora`` as a ``.safetensors`` file in its family's key format (kohya; diffusers for SD3.x, see
    ``lora.diffusers_format``), atomically; returns the path.

    Adds ``sshs_model_hash``/``sshs_legacy_hash`` (kohya) and ``modelspec.hash_sha256`` ("0x" + sha256 of
    the tensor data, i.e. the same digest as sshs_model_hash). Refuses to replace an existing file
    unless ``overwrite`` is true.
    """
    import safetensors.torch

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA files are written as safetensors; name {path} with a .safetensors extension")
    if path.exists() and not overwrite:
        raise FileExistsNoOverwriteError(f"{path} already exists; choose another name or pass overwrite=True to replace it")
    if not lora.modules:
        raise ValueError(f"refusing to write {path}: the LoRA has no modules")
    metadata = {k: v for k, v in metadata_strings(lora.metadata).items() if k not in HASH_KEYS}
    if key_format(lora.arch) == "diffusers":
        from .diffusers_format import diffusers_state_dict

        tensors = diffusers_state_dict(lora, dtype)
        # the scale is folded into lora_B: every module is at alpha = rank now
        if "ss_network_dim" in metadata:
            metadata["ss_network_alpha"] = metadata["ss_network_dim"]
        metadata["lw_key_format"] = "diffusers"
    else:
        tensors = lora_state_dict(lora, dtype)
    model, legacy = _kohya_hashes(tensors, metadata)
    metadata.update({"sshs_model_hash": model, "sshs_legacy_hash": legacy, "modelspec.hash_sha256": "0x" + model})
    atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata), overwrite=overwrite)
    log.info("saved LoRA %s (%d modules, %s)", path, len(lora.modules), dtype)
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
    sd, meta = read_lora_file(path)
    return _kohya_hashes(sd, meta)[1]


# ----------------------------------------------------------------------------- reading

def unpickling_reason(e: BaseException) -> str:
    """The cause in a ``torch.load(weights_only=True)`` error, without PyTorch's advice to retry with
    ``weights_only=False`` (which runs whatever code the file holds)."""
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", str(e), re.S)
    text = m.group(1) if m else str(e)
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a ``.safetensors`` file, or of a ``.bin``/``.pt``/``.ckpt``/``.pth`` pickle read as
    plain tensors only (``weights_only``; its metadata is {}). LoraFormatError for a damaged or foreign file."""
    path = Path(path)
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

