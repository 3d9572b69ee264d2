"""LoRA files: one in-memory form in kohya naming, saving it, and the hashes other tools check.

* :class:`LoraWeights` holds :class:`LoraModule` (down, up, alpha[, dora_scale]) keyed by kohya name
  (``lora_unet_*``, ``lora_te_*``, ``lora_te1_*``, ``lora_te2_*``; see ``model.keys``), or
  :class:`LycorisModule` (LyCORIS LoHa / LoKr factors under their LyCORIS key names, and alpha).
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
    def dtype(self) -> torch.dtype:
        """The dtype the weights are stored in."""
        return self.down.dtype

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


LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
ALGOS = {"loha": LOHA_KEYS, "lokr": LOKR_KEYS}


def _cp(t: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """LyCORIS's Tucker (CP) rebuild of a conv factor: ``t [r, r, kh, kw]``, ``wa [r, out]``, ``wb [r, in]``."""
    return torch.einsum("i j k l, j r, i p -> p r k l", t, wb, wa)


@dataclass
class LycorisModule:
    """One LyCORIS module as LyCORIS, kohya, ComfyUI and A1111/Forge store it: ``weights`` by key suffix.

    LoHa (``hada_w1_a [out, r]``, ``hada_w1_b [r, in*kh*kw]``, ``hada_w2_a``, ``hada_w2_b``; Tucker convs add
    ``hada_t1``/``hada_t2``): ``delta = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r``.
    LoKr (``lokr_w1`` or ``lokr_w1_a @ lokr_w1_b``, ``lokr_w2`` or ``lokr_w2_a @ lokr_w2_b`` [or Tucker
    ``lokr_t2``]): ``delta = kron(w1, w2) * alpha / r``, where ``r`` is the rank of a low-rank factor; a LoKr
    with both factors full has no rank and every loader (ComfyUI, A1111, LyCORIS) applies scale 1.
    ``shape`` is the base weight's shape when known (a trained module; a file does not record it): conv
    factors are flat, so only the layer knows its kernel. ``dora_scale`` is always None (no DoRA here).
    """

    algo: str
    weights: dict[str, Tensor]
    alpha: float | None
    shape: tuple[int, ...] | None = None
    dora_scale = None  # the LoraModule attribute callers test; LyCORIS modules carry no DoRA magnitude

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise LoraFormatError(f"LyCORIS algo {self.algo!r} unknown; use one of {sorted(ALGOS)}")
        extra = sorted(set(self.weights) - set(ALGOS[self.algo]))
        w = self.weights
        if self.algo == "loha":
            need = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
        else:
            need = [k for k in ("lokr_w1", "lokr_w1_a") if k in w][:1] or ["lokr_w1 or lokr_w1_a/_b"]
            need += [k for k in ("lokr_w2", "lokr_w2_a") if k in w][:1] or ["lokr_w2 or lokr_w2_a/_b"]
            need += [k[:-1] + "b" for k in need if k.endswith("_a")]
        missing = [k for k in need if k not in w]
        if extra or missing:
            raise LoraFormatError(f"LyCORIS {self.algo} module with {sorted(w)} is incomplete or mixed: "
                                  f"{'missing ' + str(missing) if missing else ''}"
                                  f"{'; not ' + self.algo + ' weights: ' + str(extra) if extra else ''}")
        self.alpha = None if self.alpha is None else float(self.alpha)
        self.shape = None if self.shape is None else tuple(int(d) for d in self.shape)

    @property
    def rank(self) -> int:
        """The rank ``r`` the alpha divides by: LoHa's, or the rank of LoKr's low-rank factor; 0 for a LoKr with
        both factors full (no rank: scale 1)."""
        w = self.weights
        if self.algo == "loha":
            return int(w["hada_w1_b"].shape[0])
        low = w.get("lokr_w2_b", w.get("lokr_w1_b"))
        return 0 if low is None else int(low.shape[0])

    @property
    def scale(self) -> float:
        """The factor on the factors' product, as ComfyUI's, A1111's and LyCORIS's loaders compute it:
        ``alpha / rank``; 1 without an alpha, or for a LoKr without a low-rank factor."""
        return 1.0 if self.alpha is None or self.rank == 0 else self.alpha / self.rank

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the factors are stored in."""
        return next(iter(self.weights.values())).dtype

    @property
    def is_conv(self) -> bool:
        """A conv module with a kernel larger than 1x1 (known from ``shape``, or from a 4D factor)."""
        if self.shape is not None:
            return len(self.shape) == 4 and self.shape[2:] != (1, 1)
        return any(t.dim() == 4 and tuple(t.shape[2:]) != (1, 1) for t in self.weights.values())

    @property
    def out_features(self) -> int:
        w = self.weights
        if self.algo == "loha":
            return int(w["hada_w1_a"].shape[1 if "hada_t1" in w else 0])
        w1 = w.get("lokr_w1", w.get("lokr_w1_a"))
        w2 = w.get("lokr_w2", w.get("lokr_w2_a"))
        return int(w1.shape[0]) * int(w2.shape[1 if "lokr_t2" in w else 0])

    def delta(self, dtype: torch.dtype = torch.float32, shape: tuple[int, ...] | None = None) -> Tensor:
        """The weight change, exactly as peft's ``get_delta_weight`` and ComfyUI's loader compute it, reshaped
        to ``shape`` (default: the module's own ``shape``; else the factors' natural shape, [out, in*kh*kw]
        for a flat conv factor). Computed in ``dtype`` (fp32 by default: fp16 products lose small updates)."""
        w = {k: v.to(dtype) for k, v in self.weights.items()}
        if self.algo == "loha":
            if "hada_t1" in w:
                d = (_cp(w["hada_t1"], w["hada_w1_a"], w["hada_w1_b"])
                     * _cp(w["hada_t2"], w["hada_w2_a"], w["hada_w2_b"]))
            else:
                d = (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"])
        else:
            w1 = w["lokr_w1"] if "lokr_w1" in w else w["lokr_w1_a"] @ w["lokr_w1_b"]
            if "lokr_w2" in w:
                w2 = w["lokr_w2"]
            elif "lokr_t2" in w:
                w2 = _cp(w["lokr_t2"], w["lokr_w2_a"], w["lokr_w2_b"])
            else:
                w2 = w["lokr_w2_a"] @ w["lokr_w2_b"]
            if w2.dim() == 4:
                w1 = w1[:, :, None, None]
            d = torch.kron(w1, w2.contiguous())
        d = d * self.scale
        shape = shape or self.shape
        return d if shape is None else d.reshape(shape)

    def delta_2d(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """:meth:`delta` as a matrix ``[out, in*kh*kw]`` (what SVD merges and resizes factor)."""
        d = self.delta(dtype)
        return d.reshape(d.shape[0], -1)

    def scaled(self, factor: float) -> LycorisModule:
        """A copy whose delta is ``factor`` times this one's: the first factor scaled (the product is linear in it)."""
        first = {"loha": "hada_w1_a"}.get(self.algo) or ("lokr_w1" if "lokr_w1" in self.weights else "lokr_w1_a")
        weights = dict(self.weights)
        weights[first] = (weights[first].float() * factor).to(weights[first].dtype)
        return LycorisModule(self.algo, weights, self.alpha, self.shape)

    def to(self, dtype: torch.dtype) -> LycorisModule:
        return LycorisModule(self.algo, {k: v.to(dtype) for k, v in self.weights.items()}, self.alpha, self.shape)


def network_of(lora: "LoraWeights") -> str:
    """"lora", "loha" or "lokr": the LyCORIS algo of a LoRA's modules ("lora" when it has none; "mixed" when
    several kinds are mixed)."""
    kinds = {m.algo if isinstance(m, LycorisModule) else "lora" for m in lora.modules.values()}
    return kinds.pop() if len(kinds) == 1 else ("lora" if not kinds else "mixed")


@dataclass
class LoraWeights:
    """A whole LoRA in kohya naming, with its safetensors metadata and base architecture."""

    modules: dict[str, LoraModule | LycorisModule]
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
            n: m.to(dt) if isinstance(m, LycorisModule) else
            LoraModule(m.down.to(dt), m.up.to(dt), m.alpha, None if m.dora_scale is None else m.dora_scale.to(dt))
            for n, m in self.modules.items()
        }
        return LoraWeights(mods, dict(self.metadata), self.arch)


# ----------------------------------------------------------------------------- saving

def lora_state_dict(lora: LoraWeights, dtype: str | torch.dtype | None = None) -> dict[str, Tensor]:
    """The kohya state dict: ``<name>.lora_down.weight``, ``.lora_up.weight``, ``.alpha`` (fp32 scalar),
    optional ``.dora_scale``; LyCORIS modules as LyCORIS writes them (``<name>.hada_w1_a`` ... or
    ``<name>.lokr_w1`` ..., and ``.alpha``); contiguous CPU tensors in ``dtype`` (default: as stored)."""
    dt = None if dtype is None else torch_dtype(dtype)

    def ready(t: Tensor) -> Tensor:
        return t.detach().to("cpu", dt or t.dtype).contiguous()

    out: dict[str, Tensor] = {}
    for name, m in sorted(lora.modules.items()):
        if isinstance(m, LycorisModule):
            out.update({f"{name}.{key}": ready(t) for key, t in m.weights.items()})
            if m.alpha is not None:
                out[f"{name}.alpha"] = torch.tensor(m.alpha, dtype=torch.float32)
            continue
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

        if network_of(lora) != "lora":
            raise LoraFormatError(f"{lora.arch} LoRAs are written in diffusers' format, which has no LyCORIS "
                                  f"({network_of(lora)}) keys; train a plain LoRA (network 'lora') for this model")

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

