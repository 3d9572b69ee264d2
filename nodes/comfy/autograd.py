"""Making ComfyUI's modules differentiable without changing ComfyUI: inference-mode tensors swapped for
equal normal ones, inputs copied where a module writes into them, and checkpointed forwards."""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn


def plain(t: torch.Tensor) -> torch.Tensor:
    """A tensor autograd may use: inference-mode tensors are cloned out of it."""
    return t.clone() if isinstance(t, torch.Tensor) and t.is_inference() else t


def clone_input(module: nn.Module, args: tuple) -> tuple:
    """A forward pre-hook that hands the module a copy of its input (see ``training_context``)."""
    return (args[0].clone(), *args[1:])


def leave_inference_mode(root: nn.Module) -> int:
    """Swap parameters and buffers created under ``torch.inference_mode`` for equal normal tensors.

    ComfyUI builds and loads models inside inference mode; autograd cannot save such tensors for
    backward, even frozen. Values, dtype and device stay the same, one tensor at a time.
    """
    n = 0
    for module in root.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_inference():
                setattr(module, name, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
                n += 1
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_inference():
                module._buffers[name] = b.clone()
                n += 1
    return n


def checkpointed(forward, copy_input: bool):
    """``forward`` recomputed in backward (non-reentrant checkpointing). ``copy_input`` for modules that
    overwrite their inputs in place (CLIP layers, Flux's blocks): they get copies of their floating-point
    tensor arguments, so the inputs the checkpoint keeps for the recomputation stay as they came in."""

    def copy(v):
        return v.clone() if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    def run(*args, **kwargs):
        if copy_input:
            args = tuple(copy(a) for a in args)
            kwargs = {k: copy(v) for k, v in kwargs.items()}
        return forward(*args, **kwargs)

    def checkpointed_forward(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)

    return checkpointed_forward
