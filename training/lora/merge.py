"""Merging and resizing LoRAs, all in fp32 and all checkable against the deltas they stand for.

* :func:`concat_merge` is exact: the ranks add up and ``delta = sum_i w_i * delta_i`` to rounding.
* :func:`svd_merge` sums the weighted deltas per module and keeps the top singular directions.
* :func:`resize_lora` lowers ranks like kohya's ``resize_lora.py`` (fixed rank, Frobenius energy, or
  singular-value ratio), keeping each module's ``alpha / rank`` scale and its DoRA magnitude.

Singular values: a LoRA delta ``up @ down`` has rank <= r, so its SVD comes from a QR of each factor and a
``torch.linalg.svd`` of the small ``r x r`` core. That is the exact SVD of the delta (no randomness, no
approximation) at a fraction of the cost of decomposing the full ``out x in`` matrix. Unlike kohya, no
values are clamped at a quantile: the reported kept energy is exactly ``||delta_new||^2 / ||delta||^2``.

The factors are split evenly, ``up = U sqrt(S)``, ``down = sqrt(S) Vh`` (kohya puts all of S in up);
balanced factors keep both halves in fp16's range when the file is saved in fp16.

Conv modules (``down [r, in, k, k]``) are decomposed flattened to ``[out, in*k*k]``; the new down is
reshaped back to ``[r, in, k, k]`` and up is ``[out, r, 1, 1]``.

LyCORIS LoHa / LoKr modules have no low-rank factors: their exact delta (``LycorisModule.delta``) is formed and
decomposed with a full SVD. An SVD merge or a resize therefore turns them into plain LoRA modules at the asked
rank (the report's kept energy says what that costs); a concat merge, which must be exact, refuses them.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..errors import LoraWorkbenchError
from ..model.archs import ARCH_TABLE
from .files import HASH_KEYS, LoraModule, LoraWeights, LycorisModule, network_of

log = logging.getLogger(__name__)

METHODS = ("fixed", "energy", "ratio")
# Facts about the base model that stay true for a merge when every source agrees on them.
_SHARED_KEYS = ("ss_base_model_version", "ss_v2", "ss_sd_model_name", "ss_new_sd_model_hash",
                "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation",
                "modelspec.prediction_type", "modelspec.resolution")

Progress = Callable[[int, int], None]


class MergeError(LoraWorkbenchError, ValueError):
    """LoRAs that cannot be merged or resized as asked (names the module / source and the fix)."""


@dataclass(frozen=True)
class ModuleRank:
    """One module's ranks and energy. ``energy`` is ``||delta||_F^2`` (= sum of all S^2) and
    ``kept_energy`` the fraction the result keeps: ``sum(S_kept^2) / sum(S^2)``."""

    rank_before: int
    rank_after: int
    energy: float
    kept_energy: float


@dataclass(frozen=True)
class RankReport:
    method: str
    modules: dict[str, ModuleRank]

    @property
    def kept_energy(self) -> float:
        """Over the whole LoRA: ``sum ||delta_new||^2 / sum ||delta||^2`` (1.0 for an all-zero LoRA)."""
        total = sum(m.energy for m in self.modules.values())
        if total == 0:
            return 1.0
        return sum(m.energy * m.kept_energy for m in self.modules.values()) / total

    @property
    def min_kept_energy(self) -> float:
        """The lowest kept energy of any one module (1.0 when there are no modules)."""
        return min((m.kept_energy for m in self.modules.values()), default=1.0)

    def summary(self) -> str:
        """One line: method, module count, rank range, overall kept energy and the worst module."""
        ranks = [m.rank_after for m in self.modules.values()]
        worst = min(self.modules.items(), key=lambda kv: kv[1].kept_energy, default=None)
        text = (f"{self.method}: {len(ranks)} modules, ranks {min(ranks, default=0)}-{max(ranks, default=0)}, "
                f"kept energy {self.kept_energy:.4%} overall")
        if worst is not None:
            text += f", lowest {worst[1].kept_energy:.4%} ({worst[0]})"
        return text


# ----------------------------------------------------------------------------- helpers

def _source_names(loras: Sequence[LoraWeights], names: Sequence[str] | None) -> list[str]:
    if names is not None:
        if len(names) != len(loras):
            raise MergeError(f"got {len(names)} names for {len(loras)} LoRAs; give one name per LoRA")
        return [str(n) for n in names]
    return [lw.metadata.get("modelspec.title") or lw.metadata.get("ss_output_name") or f"LoRA #{i + 1}"
            for i, lw in enumerate(loras)]


def _check_sources(loras: Sequence[tuple[LoraWeights, float]], names: Sequence[str] | None) -> list[str]:
    if not loras:
        raise MergeError("no LoRAs to merge; give at least one (LoraWeights, weight) pair")
    labels = _source_names([lw for lw, _ in loras], names)
    for (lw, w), label in zip(loras, labels):
        if not isinstance(lw, LoraWeights):
            raise MergeError(f"{label}: expected LoraWeights, got {type(lw).__name__}; load the file with load_lora")
        if not math.isfinite(float(w)):
            raise MergeError(f"{label}: weight {w} is not a finite number; use e.g. 1.0 or 0.5")
    first, arch0 = labels[0], loras[0][0].arch
    for (lw, _), label in zip(loras[1:], labels[1:]):
        if lw.arch != arch0:
            raise MergeError(
                f"cannot merge {first} ({arch0}) with {label} ({lw.arch}): LoRAs for different base models "
                "do not share modules; merge only LoRAs trained on the same architecture"
            )
    return labels


def _factors(m: LoraModule, name: str) -> tuple[Tensor, Tensor]:
    """(up [out, r], down [r, in*k*k]) in fp32, with the module's alpha/rank folded into up."""
    if m.dora_scale is not None:
        raise MergeError(
            f"module {name} is DoRA: its magnitude renormalises the base weight, so weighted DoRA LoRAs do "
            "not add up; merge plain LoRAs (resize_lora handles DoRA)"
        )
    return m.up.float().reshape(m.up.shape[0], -1) * m.scale, m.down.float().reshape(m.rank, -1)


def _shape_of(m: LoraModule | LycorisModule) -> tuple[tuple[int], tuple[int, ...]]:
    """((out,), down's shape tail): ``(in,)`` or ``(in, kh, kw)``; a LyCORIS module read from a file does not
    know its conv kernel and gives ``(in*kh*kw,)``."""
    if isinstance(m, LycorisModule):
        if m.shape is not None:
            return (m.shape[0],), tuple(m.shape[1:])
        d = m.delta_2d()
        return (int(d.shape[0]),), (int(d.shape[1]),)
    return tuple(m.up.shape[:1]), tuple(m.down.shape[1:])


def _stacked(loras, labels, name: str, device) -> tuple[Tensor, Tensor | None, tuple[int, ...], int] | None:
    """All sources' factors for ``name``, weighted and concatenated: up [out, R], down [R, in*k*k],
    the down shape tail, and R (None if no source with a non-zero weight has the module). When a source is
    a LyCORIS module, the weighted deltas summed instead: (delta [out, in*k*k], None, tail, rank of the sum's
    bound)."""
    ups, downs, dense, ref = [], [], [], None
    for (lw, w), label in zip(loras, labels):
        m = lw.modules.get(name)
        if m is None or float(w) == 0.0:
            continue
        shape = _shape_of(m)
        if (ref is not None and shape != ref[0] and shape[0] == ref[0][0]
                and math.prod(shape[1]) == math.prod(ref[0][1])):
            shape = max(shape, ref[0], key=lambda s: len(s[1]))  # a flat LyCORIS conv and a LoRA of its kernel
            ref = (shape, ref[1])
        if ref is None:
            ref = (shape, label)
        elif shape != ref[0]:
            (out0, tail0), (out1, tail1) = ref[0], shape
            if len(tail0) == len(tail1) == 3 and tail0[1:] != tail1[1:] and tail0[0] == tail1[0]:
                raise MergeError(
                    f"module {name}: {ref[1]} has a {tail0[1]}x{tail0[2]} conv kernel but {label} has "
                    f"{tail1[1]}x{tail1[2]}; LoRAs with different conv kernels cannot be merged"
                )
            raise MergeError(
                f"module {name}: {ref[1]} changes a {list(out0 + tail0)} weight but {label} a {list(out1 + tail1)} "
                "one; these LoRAs were made for different models"
            )
        if isinstance(m, LycorisModule):
            dense.append(m.delta_2d().to(device) * float(w))
            continue
        up, down = _factors(m, name)
        ups.append(up.to(device) * float(w))
        downs.append(down.to(device))
    if ref is None:
        return None
    if dense:
        total = sum(dense) + (torch.cat(ups, 1) @ torch.cat(downs, 0) if ups else 0)
        return total, None, ref[0][1], min(total.shape)
    up, down = torch.cat(ups, 1), torch.cat(downs, 0)
    return up, down, ref[0][1], int(down.shape[0])


def _module_names(loras) -> list[str]:
    return sorted({n for lw, _ in loras for n in lw.modules})


def lowrank_svd(up: Tensor, down: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``up @ down`` (``up [out, r]``, ``down [r, in]``) without forming the product:
    ``U [out, k]``, ``S [k]`` (descending), ``Vh [k, in]``, ``k = min(r, out, in)``; fp32."""
    up, down = up.float(), down.float()
    qu, ru = torch.linalg.qr(up)  # [out, k1], [k1, r]
    qd, rd = torch.linalg.qr(down.T)  # [in, k2], [k2, r]
    uc, s, vhc = torch.linalg.svd(ru @ rd.T, full_matrices=False)
    return qu @ uc, s, vhc @ qd.T


def _svd(up: Tensor, down: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`lowrank_svd` of ``up @ down``, or the full thin SVD of ``up`` itself when ``down`` is None (a dense
    delta, e.g. a LoHa's)."""
    if down is None:
        return torch.linalg.svd(up.float(), full_matrices=False)
    return lowrank_svd(up, down)


def _module_from_svd(u: Tensor, s: Tensor, vh: Tensor, r: int, tail: tuple[int, ...], alpha: float,
                     dora: Tensor | None = None) -> LoraModule:
    root = s[:r].clamp_min(0).sqrt()
    up = (u[:, :r] * root).cpu().contiguous()
    down = (root[:, None] * vh[:r]).cpu().contiguous()
    if len(tail) == 3:  # conv: down [r, in, k, k], up [out, r, 1, 1]
        down = down.reshape(r, *tail)
        up = up[:, :, None, None]
    return LoraModule(down, up, alpha, dora)


def _energies(s: Tensor, r: int) -> tuple[float, float]:
    s2 = s.double().pow(2)
    total = float(s2.sum())
    return total, (float(s2[:r].sum()) / total if total > 0 else 1.0)


def _check_rank(rank, what: str) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise MergeError(f"{what} {rank!r} is not a positive whole number; use e.g. 16 or 32")
    return rank


def _rank_metadata(modules: dict[str, LoraModule], dynamic: bool = False, args_json: str | None = None,
                   ) -> dict[str, str]:
    """ss_network_dim/alpha (largest linear rank; kohya writes "Dynamic" for per-module ranks) and
    conv_dim/conv_alpha updated in ss_network_args (``args_json``: the source's, other keys kept)."""
    linear = [m for m in modules.values() if not m.is_conv]
    conv = [m for m in modules.values() if m.is_conv]
    out = {}
    if dynamic:
        out["ss_network_dim"] = out["ss_network_alpha"] = "Dynamic"
    elif linear:
        top = max(linear, key=lambda m: m.rank)
        out["ss_network_dim"], out["ss_network_alpha"] = str(top.rank), f"{top.alpha:g}"
    if conv:
        top = max(conv, key=lambda m: m.rank)
        args = _json_dict(args_json)
        args.update(conv_dim="Dynamic" if dynamic else top.rank, conv_alpha="Dynamic" if dynamic else top.alpha)
        out["ss_network_args"] = json.dumps(args)
    return out


def _json_dict(text: str | None) -> dict:
    """A JSON object from metadata ({} when absent, not JSON or not an object)."""
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _merged_metadata(loras, labels, method: str, modules: dict[str, LoraModule], extra: dict) -> dict[str, str]:
    metas = [lw.metadata for lw, _ in loras]
    md = {k: metas[0][k] for k in _SHARED_KEYS if k in metas[0] and all(m.get(k) == metas[0][k] for m in metas)}
    family = ARCH_TABLE.get(loras[0][0].arch)
    md["ss_network_module"] = family.network_module if family else "networks.lora"
    md.update(_rank_metadata(modules))
    md["modelspec.title"] = " + ".join(f"{label} x{float(w):g}" for (_, w), label in zip(loras, labels))
    md["lw_merged_from"] = json.dumps([
        {"name": label, "title": lw.metadata.get("modelspec.title"),
         "hash": lw.metadata.get("sshs_model_hash") or lw.metadata.get("modelspec.hash_sha256"),
         "weight": float(w)}
        for (lw, w), label in zip(loras, labels)
    ])
    md["lw_merge"] = json.dumps({"method": method, **extra})
    return md


# ----------------------------------------------------------------------------- merges

def concat_merge(loras: Sequence[tuple[LoraWeights, float]], names: Sequence[str] | None = None) -> LoraWeights:
    """One LoRA whose delta is exactly ``sum_i w_i * delta_i``, per module.

    down = cat(down_i), up = cat(w_i * scale_i * up_i), alpha = rank (scale 1): the rank of a module is
    the sum of its sources' ranks. Modules present in only some LoRAs keep their own (weighted) delta;
    sources with weight 0 are left out. ``names`` label the sources in errors and metadata (default:
    their titles). Raises :class:`MergeError` for mixed architectures, shape / conv-kernel mismatches
    and DoRA modules.
    """
    labels = _check_sources(loras, names)
    for (lw, _), label in zip(loras, labels):
        if network_of(lw) != "lora":
            raise MergeError(f"{label} is a {network_of(lw)} (LyCORIS): a concat merge stacks LoRA factors and "
                             "no stack of them is a Hadamard or Kronecker product; use the SVD merge (svd_merge, "
                             "mode 'svd'), which merges the exact deltas to a rank you choose")
    modules = {}
    for name in _module_names(loras):
        stacked = _stacked(loras, labels, name, "cpu")
        if stacked is None:
            continue
        up, down, tail, r = stacked
        if len(tail) == 3:
            up, down = up[:, :, None, None], down.reshape(r, *tail)
        modules[name] = LoraModule(down.contiguous(), up.contiguous(), float(r))
    if not modules:
        raise MergeError("the merge is empty: every LoRA has weight 0; give at least one a non-zero weight")
    md = _merged_metadata(loras, labels, "concat", modules, {})
    log.info("concat-merged %d LoRAs into %d modules", len(loras), len(modules))
    return LoraWeights(modules, md, loras[0][0].arch)


def svd_merge(loras: Sequence[tuple[LoraWeights, float]], rank: int, conv_rank: int | None = None,
              device: str | torch.device | None = None, names: Sequence[str] | None = None,
              progress: Progress | None = None) -> tuple[LoraWeights, RankReport]:
    """Sum the weighted deltas per module and keep the top ``rank`` singular directions (``conv_rank``
    for conv modules with a kernel larger than 1x1; default ``rank``); alpha = rank (scale 1).

    A module whose summed delta has lower rank than asked keeps its own. Computed in fp32 on
    ``device`` (default CPU); the result lives on the CPU. ``progress(done, total)`` is called per module.
    The report gives each module's kept energy, ``sum(S_kept^2) / sum(S^2)``, and the overall one.
    """
    rank = _check_rank(rank, "rank")
    conv_rank = rank if conv_rank is None else _check_rank(conv_rank, "conv_rank")
    labels = _check_sources(loras, names)
    device = torch.device(device or "cpu")
    all_names = _module_names(loras)
    log.info("SVD-merging %d LoRAs (%d modules) to rank %d / conv rank %d on %s",
                len(loras), len(all_names), rank, conv_rank, device)
    modules, report = {}, {}
    for i, name in enumerate(all_names):
        stacked = _stacked(loras, labels, name, device)
        if stacked is not None:
            up, down, tail, total_rank = stacked
            u, s, vh = _svd(up, down)
            target = conv_rank if len(tail) == 3 and tail[1:] != (1, 1) else rank
            r = min(target, int(s.shape[0]))
            energy, kept = _energies(s, r)
            modules[name] = _module_from_svd(u, s, vh, r, tail, float(r))
            report[name] = ModuleRank(total_rank, r, energy, kept)
        if progress is not None:
            progress(i + 1, len(all_names))
    if not modules:
        raise MergeError("the merge is empty: every LoRA has weight 0; give at least one a non-zero weight")
    rep = RankReport("svd", report)
    md = _merged_metadata(loras, labels, "svd", modules,
                          {"rank": rank, "conv_rank": conv_rank, "kept_energy": rep.kept_energy})
    log.info("SVD merge done: %s", rep.summary())
    return LoraWeights(modules, md, loras[0][0].arch), rep


# ----------------------------------------------------------------------------- resize

def _new_rank(s: Tensor, method: str, rank: int, value: float | None) -> int:
    n = int(s.shape[0])
    if method == "fixed":
        r = rank
    elif float(s[0]) == 0.0:  # an all-zero delta: keep one (zero) direction
        r = 1
    elif method == "energy":
        s2 = s.double().pow(2)
        cum = torch.cumsum(s2, 0) / s2.sum()
        r = int((cum < value).sum()) + 1
    else:  # ratio: keep singular values within a factor ``value`` of the largest
        r = int((s.double() >= float(s[0]) / value).sum())
    return max(1, min(r, rank, n))


def resize_lora(lora: LoraWeights, rank: int, method: str = "fixed", value: float | None = None,
                device: str | torch.device | None = None, progress: Progress | None = None,
                ) -> tuple[LoraWeights, RankReport]:
    """Lower the ranks of ``lora`` (never raising one), like kohya's ``resize_lora.py``.

    method "fixed": every module to ``rank`` (the best rank-``rank`` approximation, Eckart-Young);
    "energy": per module the smallest rank keeping at least ``value`` (0 < value <= 1) of
    ``||delta||_F^2`` (kohya's ``sv_fro=f`` is ``energy=f**2``), at most ``rank``;
    "ratio": per module the singular values ``>= S_max / value`` (kohya's ``sv_ratio``), at most ``rank``.

    Each module keeps its ``alpha / rank`` scale (alpha is rescaled with the rank, as kohya does) and its
    DoRA magnitude. A LoHa / LoKr module becomes a plain LoRA module (scale 1) from the SVD of its exact delta,
    and the metadata then names a LoRA (``lw_resize`` records the source's network). Returns the new LoRA
    (fp32, CPU) and a report of ranks and kept energy per module.
    """
    rank = _check_rank(rank, "rank")
    if method not in METHODS:
        raise MergeError(f"resize method {method!r} unknown; use one of {METHODS}")
    if method == "fixed" and value is not None:
        raise MergeError(f"method 'fixed' takes no value (got {value!r}); use method 'energy' or 'ratio' with it")
    if method == "energy" and (value is None or not 0 < float(value) <= 1):
        raise MergeError(f"energy target {value!r} must be in (0, 1], e.g. 0.95 to keep 95% of each module's energy")
    if method == "ratio" and (value is None or not float(value) >= 1):
        raise MergeError(f"singular-value ratio {value!r} must be >= 1, e.g. 10 keeps values above S_max/10")
    value = None if value is None else float(value)
    device = torch.device(device or "cpu")
    log.info("resizing LoRA (%d modules): %s, rank %d%s", len(lora.modules), method, rank,
                "" if value is None else f", value {value:g}")
    source_network = network_of(lora)
    if source_network != "lora":
        log.info("resizing a %s: its modules become plain LoRA modules (SVD of each exact delta)", source_network)
    modules, report = {}, {}
    for i, (name, m) in enumerate(sorted(lora.modules.items())):
        if isinstance(m, LycorisModule):
            u, s, vh = _svd(m.delta_2d().to(device), None)
            r = _new_rank(s, method, rank, value)
            energy, kept = _energies(s, r)
            modules[name] = _module_from_svd(u, s, vh, r, _shape_of(m)[1], float(r))
            report[name] = ModuleRank(min(m.delta_2d().shape), r, energy, kept)
            if progress is not None:
                progress(i + 1, len(lora.modules))
            continue
        up = m.up.float().reshape(m.up.shape[0], -1).to(device)
        down = m.down.float().reshape(m.rank, -1).to(device)
        u, s, vh = lowrank_svd(up, down)
        r = min(_new_rank(s, method, rank, value), m.rank)
        energy, kept = _energies(s * m.scale, r)
        dora = None if m.dora_scale is None else m.dora_scale.float().cpu()
        modules[name] = _module_from_svd(u, s, vh, r, tuple(m.down.shape[1:]), m.scale * r, dora)
        report[name] = ModuleRank(m.rank, r, energy, kept)
        if progress is not None:
            progress(i + 1, len(lora.modules))
    rep = RankReport(method, report)
    md = {k: v for k, v in lora.metadata.items() if k not in HASH_KEYS}
    args_json = lora.metadata.get("ss_network_args")
    if source_network != "lora":  # now a plain LoRA: kohya's LoRA module, and no LyCORIS algo in its args
        family = ARCH_TABLE.get(lora.arch)
        md["ss_network_module"] = family.network_module if family else "networks.lora"
        args = _json_dict(args_json)
        args.pop("algo", None)
        args.pop("factor", None)
        args_json = json.dumps(args)
        md["ss_network_args"] = args_json
    md.update(_rank_metadata(modules, method != "fixed", args_json))
    md["lw_resized_from"] = json.dumps({
        "title": lora.metadata.get("modelspec.title") or lora.metadata.get("ss_output_name"),
        "hash": lora.metadata.get("sshs_model_hash") or lora.metadata.get("modelspec.hash_sha256"),
        "ranks": sorted({mm.rank for mm in lora.modules.values()}),
    })
    md["lw_resize"] = json.dumps({"method": method, "rank": rank, "value": value, "kept_energy": rep.kept_energy,
                                  **({"from_network": source_network} if source_network != "lora" else {})})
    log.info("resize done: %s", rep.summary())
    return LoraWeights(modules, md, lora.arch), rep
