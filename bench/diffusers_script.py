"""Run diffusers' ``examples/dreambooth/train_dreambooth_lora.py`` with a clock on its optimizer.

``python -m bench.diffusers_script SCRIPT STAMPS.json -- SCRIPT ARGS...`` runs the script as
``__main__`` in this process, unchanged, and writes the time at the end of every optimizer step
(and its trainable parameter count) to STAMPS.json, so its step time is measured the same way as
the other contenders' (warm-up excluded), without its start-up and model loading.
"""

from __future__ import annotations

import json
import runpy
import sys
import time


def main() -> None:
    script, stamps_path = sys.argv[1], sys.argv[2]
    args = sys.argv[sys.argv.index("--") + 1:]
    import torch

    stamps: list[float] = []
    trainable: list[int] = []
    original = torch.optim.AdamW.step

    def step(self, *a, **kw):
        out = original(self, *a, **kw)
        if not trainable:
            trainable.append(sum(p.numel() for g in self.param_groups for p in g["params"]))
        stamps.append(time.perf_counter())
        return out

    torch.optim.AdamW.step = step
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        with open(stamps_path, "w") as f:
            json.dump({"stamps": stamps, "trainable": trainable[0] if trainable else 0}, f)


if __name__ == "__main__":
    main()
