"""An exponential moving average (EMA) of the LoRA weights, as ai-toolkit, OneTrainer and SimpleTuner keep one:
the averaged weights are smoother than the last step's and often generalise better on a small set.

The average lives beside the trained parameters, in fp32 on their devices. Before ``start_step`` it follows the
weights (a copy); from ``start_step`` on, every ``every`` steps,

    ema <- decay * ema + (1 - decay) * weights

(diffusers' ``EMAModel`` without its decay warm-up, so a hand computation gives the same numbers). The trainer
saves it in the training state, so a resumed run continues the same average, and writes the EMA LoRA beside each
save (``<name>-ema.safetensors``).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class LoraEma:
    """The EMA of ``params`` (the LoRA's trainable tensors, in the order the trainer passes them)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float, start_step: int = 0, every: int = 1):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay={decay!r} is not an average; use a value in (0, 1) such as 0.999")
        self.params, self.decay, self.start_step, self.every = list(params), decay, start_step, max(1, every)
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the weights after optimizer step ``step`` (1-based) into the average."""
        if step < self.start_step:
            for s, p in zip(self.shadow, self.params):
                s.copy_(p.detach())
        elif (step - self.start_step) % self.every == 0:
            torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - self.decay)

    def state_dict(self) -> list[torch.Tensor]:
        """The average on the CPU, for a training state."""
        return [s.detach().cpu() for s in self.shadow]

    def load_state_dict(self, shadow: list[torch.Tensor]) -> None:
        if len(shadow) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(shadow, self.shadow)):
            raise ValueError("the saved EMA does not match this run's LoRA layers (another rank or preset)")
        for s, saved in zip(self.shadow, shadow):
            s.copy_(saved)

    @contextmanager
    @torch.no_grad()
    def swapped_in(self):
        """The average in the LoRA layers for the time of the block (to extract or render it), then the trained
        weights back exactly."""
        kept = [p.detach().clone() for p in self.params]
        for p, s in zip(self.params, self.shadow):
            p.copy_(s.to(p.dtype))
        try:
            yield
        finally:
            for p, k in zip(self.params, kept):
                p.copy_(k)
