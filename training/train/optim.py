"""Optimizers by name: torch's AdamW and SGD, bitsandbytes' 8-bit AdamW, Prodigy.

    make_optimizer("prodigy", param_groups, lr=1.0, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8,
                   d_coef=1.0)

Optional packages are imported only when their optimizer is asked for; when one is missing,
``OptimizerUnavailableError`` says which ``pip install`` brings it. Options an optimizer does not take
are refused rather than silently ignored.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Iterable

import torch
from ..errors import LoraWorkbenchError

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "sgd")

# What kohya writes as ss_optimizer: the optimizer class's ``__module__ + "." + __name__``
# (kohya-ss/sd-scripts library/train_util.py::get_optimizer), so other tools read ours alike.
_LABELS = {
    "adamw": "torch.optim.adamw.AdamW",
    "adamw8bit": "bitsandbytes.optim.adamw.AdamW8bit",
    "prodigy": "prodigyopt.prodigy.Prodigy",
    "sgd": "torch.optim.sgd.SGD",
}

# The keyword options each optimizer accepts through ``**extra`` (beyond lr, betas, eps, weight_decay).
_EXTRA = {
    "adamw": (),
    "adamw8bit": ("min_8bit_size",),
    "prodigy": ("d_coef", "decouple", "use_bias_correction", "safeguard_warmup", "d0", "growth_rate", "beta3"),
    "sgd": ("momentum", "nesterov"),
}


class OptimizerUnavailableError(LoraWorkbenchError, RuntimeError):
    """The chosen optimizer needs a package that is not installed (or does not load); the message says how to get it."""


def _check_name(name: str) -> str:
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} is not supported; choose one of {', '.join(OPTIMIZERS)}")
    return name


def optimizer_label(name: str, extra: dict[str, Any] | None = None) -> str:
    """kohya's ``ss_optimizer`` text, e.g. "prodigyopt.prodigy.Prodigy(d_coef=2.0,decouple=True)"."""
    label = _LABELS[_check_name(name)]
    if extra:
        label += "(" + ",".join(f"{k}={v}" for k, v in extra.items()) + ")"
    return label


def _import(module: str, pip_name: str, why: str) -> Any:
    try:
        return importlib.import_module(module)
    except (ImportError, OSError, RuntimeError) as e:  # not installed, or its native library fails to load
        raise OptimizerUnavailableError(
            f"optimizer {why} needs the Python package {pip_name!r}, which is not installed or does not "
            f"load ({e}). Install it into the Python that runs the training: `pip install {pip_name}`"
            + (". bitsandbytes needs an NVIDIA CUDA GPU on most platforms (recent releases, 0.50+, also "
               "step on the CPU); without one choose optimizer 'adamw'." if pip_name == "bitsandbytes"
               else ", or choose optimizer 'adamw'.")
        ) from e


def _all_params(param_groups: Iterable[Any]) -> list[torch.Tensor]:
    groups = list(param_groups)
    if groups and isinstance(groups[0], dict):
        return [p for g in groups for p in g["params"]]
    return groups


def make_optimizer(name: str, param_groups: Iterable[Any], lr: float, weight_decay: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, **extra: Any
                   ) -> torch.optim.Optimizer:
    """Build optimizer ``name`` over ``param_groups`` (parameters, or dicts with "params" and "lr").

    adamw:     torch.optim.AdamW, fused when every parameter is a float tensor on CUDA or the CPU.
    adamw8bit: bitsandbytes.optim.AdamW8bit (8-bit state for tensors of 4096+ elements; `min_8bit_size`).
    prodigy:   prodigyopt.Prodigy, which estimates the step size itself: lr is a multiplier, usually
               1.0. Options: d_coef, decouple (default True: AdamW-style weight decay),
               use_bias_correction, safeguard_warmup, d0, growth_rate, beta3.
    sgd:       torch.optim.SGD (betas and eps unused). Options: momentum, nesterov.
    """
    _check_name(name)
    unknown = sorted(set(extra) - set(_EXTRA[name]))
    if unknown:
        allowed = ", ".join(_EXTRA[name]) or "none"
        raise ValueError(f"optimizer {name!r} does not take option(s) {unknown}; its options are: {allowed}")
    if not lr > 0:
        raise ValueError(f"lr={lr!r} is not allowed: use a positive learning rate "
                         f"({'1.0 for prodigy' if name == 'prodigy' else 'such as 1e-4'})")
    groups = list(param_groups)
    params = _all_params(groups)
    if not params:
        raise ValueError("the optimizer got no parameters to train; check that the LoRA was injected")

    if name == "adamw":
        # The fused kernel updates all tensors in one pass instead of several ops per tensor (about
        # 4x less optimizer time on the CPU for a rank-16 attention LoRA). torch has it for CUDA and
        # CPU floating-point tensors on one kind of device; otherwise the default implementation.
        kinds = {p.device.type for p in params}
        fused = len(kinds) == 1 and kinds <= {"cuda", "cpu"} and all(p.is_floating_point() for p in params)
        if fused:
            try:
                return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
            except (RuntimeError, TypeError):  # an older torch without the CPU kernel
                pass
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, weight_decay=weight_decay, momentum=extra.get("momentum", 0.0),
                               nesterov=extra.get("nesterov", False))
    if name == "adamw8bit":
        bnb_optim = _import("bitsandbytes.optim", "bitsandbytes", "'adamw8bit'")
        return bnb_optim.AdamW8bit(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **extra)

    prodigyopt = _import("prodigyopt", "prodigyopt", "'prodigy'")
    if lr <= 0.1:
        # As kohya warns: Prodigy's lr scales the step it estimates, so 1e-4 trains ~10^4x too slowly.
        log.warning("optimizer prodigy with lr=%g: Prodigy finds the step size itself and lr multiplies it; "
                    "use lr 1.0 (and d_coef to make steps smaller or larger)", lr)
    opts = {"decouple": True, **extra}
    return prodigyopt.Prodigy(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **opts)
