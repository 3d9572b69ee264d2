"""Save LoRA (kohya format into models/loras) and Loss Graph."""

from __future__ import annotations

import os

import numpy as np
import torch
from comfy_api.latest import io, ui

from ..training.fsutil import unique_path
from ..training.lora.files import save_lora
from ..training.train.plot import loss_plot
from .comfy.paths import lora_target_path, loras_dir
from .types import Lora, LossHistory, LossPayload


class SaveLora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LW_SaveLoRA",
            display_name="Save LoRA (LoRA Workbench)",
            category="LoRA Workbench/lora",
            description="Writes the LoRA into ComfyUI's models/loras in kohya format with its training facts, so "
                        "it appears in every LoRA loader at once and loads in A1111/Forge and diffusers too. "
                        "An existing file is never replaced: a counter is added to the name.",
            inputs=[
                Lora.Input("lora", tooltip="The trained LoRA (from Train LoRA)."),
                io.String.Input("filename", default="lora_workbench/my_lora",
                                tooltip="Name under models/loras; sub-folders allowed."),
                io.Combo.Input("dtype", options=["fp16", "bf16", "fp32"], default="fp16",
                               tooltip="fp16 is what every tool reads; bf16 keeps range; fp32 is exact."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Where the file was written.")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename):
        # Checked when the prompt is queued: a bad name must not wait for the end of a training run.
        if filename is None:  # linked from another node: checked when this node runs
            return True
        try:
            lora_target_path(filename)
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, lora, filename, dtype) -> io.NodeOutput:
        path = unique_path(lora_target_path(filename))
        save_lora(path, lora, dtype=dtype)
        rel = os.path.relpath(path, loras_dir())
        return io.NodeOutput(str(path), ui=ui.PreviewText(f"saved {rel} ({len(lora.modules)} modules, {dtype})"))


class LossGraph(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LW_LossGraph",
            display_name="Loss Graph (LoRA Workbench)",
            category="LoRA Workbench/training",
            description="Draws the training loss per step (light) and its smoothed curve (dark) as an image.",
            inputs=[
                LossHistory.Input("loss", tooltip="Loss history from Train LoRA."),
                io.Float.Input("smoothing", default=0.9, min=0.0, max=0.999, step=0.01,
                               tooltip="Exponential smoothing of the dark curve (0: none)."),
                io.Int.Input("width", default=768, min=256, max=4096, step=64, tooltip="Image width in pixels."),
                io.Int.Input("height", default=384, min=128, max=4096, step=64, tooltip="Image height in pixels."),
            ],
            outputs=[io.Image.Output(display_name="image")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, loss: LossPayload, smoothing, width, height) -> io.NodeOutput:
        img = loss_plot(loss.losses, width, height, smoothing, validation=getattr(loss, "validation", None))
        t = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
        return io.NodeOutput(t, ui=ui.PreviewImage(t, cls=cls))


NODES = [SaveLora, LossGraph]
