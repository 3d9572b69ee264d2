"""Using LoRAs: LoRA Stack, Apply LoRA Stack and Prompt LoRAs (the work is ``comfy/loras.py``)."""

from __future__ import annotations

import logging

from comfy_api.latest import io, ui

from ..training.lora.prompt_syntax import parse_lora_tags
from .comfy.loras import NONE, LoraUse, apply_loras, lora_names, stack_uses
from .types import LoraStack

log = logging.getLogger(__name__)

ROWS = 6  # rows of the LoRA Stack node (dynamic rows would need a frontend extension)
STRENGTH = dict(min=-100.0, max=100.0, step=0.01)  # LoraLoader's range


def _summary(uses: list[LoraUse], triggers: list[str]) -> str:
    lines = [f"{u.name}: model {u.model_strength:g}, clip {u.clip_strength:g}" for u in uses
             if u.model_strength or u.clip_strength]
    lines.append(f"trigger words: {', '.join(triggers) or '(none in the files)'}")
    return "\n".join(lines)


# ---- nodes -----------------------------------------------------------------------------------------
class LoraStackNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        choices = [NONE, *lora_names()]
        inputs = [LoraStack.Input("lora_stack", optional=True,
                                  tooltip="Another LoRA stack to extend; its LoRAs come before these rows.")]
        for i in range(1, ROWS + 1):
            inputs += [
                io.Combo.Input(f"lora_{i}", options=choices, default=NONE,
                               tooltip=f"Row {i}: a LoRA file from models/loras ('None' leaves the row empty)."),
                io.Boolean.Input(f"enabled_{i}", default=True, label_on="on", label_off="off",
                                 tooltip=f"Row {i}: off leaves the LoRA out without losing its settings."),
                io.Float.Input(f"model_strength_{i}", default=1.0, **STRENGTH,
                               tooltip=f"Row {i}: how strongly the LoRA changes the diffusion model "
                                       "(may be negative)."),
                io.Float.Input(f"clip_strength_{i}", default=1.0, **STRENGTH,
                               tooltip=f"Row {i}: how strongly the LoRA changes the text encoder (may be negative)."),
            ]
        return io.Schema(
            node_id="LW_LoraStack",
            display_name="LoRA Stack (LoRA Workbench)",
            category="LoRA Workbench/use",
            description="Lists up to six LoRAs with their strengths as a LORA_STACK, the list Apply LoRA Stack, "
                        "Merge LoRAs and other node packs (Efficiency, Comfyroll) read. Nothing is loaded here. "
                        "Chain stacks for more rows.",
            inputs=inputs,
            outputs=[LoraStack.Output(display_name="lora_stack",
                                      tooltip="(lora name, model strength, clip strength) for each row that is on.")],
        )

    @classmethod
    def execute(cls, lora_stack=None, **rows) -> io.NodeOutput:
        stack = [(u.name, u.model_strength, u.clip_strength) for u in stack_uses(lora_stack)]
        for i in range(1, ROWS + 1):
            name = rows.get(f"lora_{i}", NONE)
            if name and name != NONE and rows.get(f"enabled_{i}", True):
                stack.append((name, float(rows.get(f"model_strength_{i}", 1.0)),
                              float(rows.get(f"clip_strength_{i}", 1.0))))
        return io.NodeOutput(stack)


class ApplyLoraStack(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LW_ApplyLoraStack",
            display_name="Apply LoRA Stack (LoRA Workbench)",
            category="LoRA Workbench/use",
            description="Applies every LoRA of a stack to the MODEL and CLIP, in order, exactly as a chain of "
                        "LoraLoader nodes would. A LoRA made for another model family (e.g. SDXL on SD1.5) stops "
                        "with an error naming it. Also outputs the LoRAs' trigger words.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to apply the LoRAs to."),
                io.Clip.Input("clip", optional=True, tooltip="The text encoder to apply the LoRAs to (optional)."),
                LoraStack.Input("lora_stack", tooltip="The LoRAs and strengths, e.g. from LoRA Stack."),
                io.String.Input("block_weights", default="", optional=True,
                                tooltip="Optional per-block strengths for every LoRA of the stack, as in A1111's "
                                        "LoRA Block Weight: a preset (ALL, INS, IND, INALL, MIDD, OUTD, OUTS, OUTALL, "
                                        "NONE) or a comma list of 17 (SD1) / 12 (SDXL) values. Flux.1 / Chroma, as "
                                        "in Inspire's loader: 58 values (BASE, double blocks D00-D18, single blocks "
                                        "S00-S37) or a preset (ALL, NONE, DOUBLE, SINGLE, FLUX-*). SD3.5: 39 "
                                        "(BASE, joint blocks J00-J37) or 25 (medium: J00-J23) values, or ALL, NONE, "
                                        "FRONT, MID, BACK. Empty: off."),
            ],
            outputs=[
                io.Model.Output(display_name="model"),
                io.Clip.Output(display_name="clip"),
                io.String.Output(display_name="trigger_words",
                                 tooltip="The applied LoRAs' trigger words, joined with ', ': each file's trigger "
                                         "phrase, else its 3 most frequent training-caption tags."),
            ],
        )

    @classmethod
    def execute(cls, model, lora_stack, clip=None, block_weights="") -> io.NodeOutput:
        uses = stack_uses(lora_stack)
        model, clip, triggers = apply_loras(model, clip, uses, block_weights)
        return io.NodeOutput(model, clip, ", ".join(triggers), ui=ui.PreviewText(_summary(uses, triggers)))


class PromptLoras(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LW_PromptLoras",
            display_name="Prompt LoRAs (LoRA Workbench)",
            category="LoRA Workbench/use",
            description="Reads A1111-style LoRA tags from a prompt - <lora:name:weight>, <lora:name:te:unet>, "
                        "<lora:name:1:lbw=OUTD> - applies those LoRAs to the MODEL and CLIP and outputs the prompt "
                        "without the tags. A name that matches no file stops with the closest file names.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to apply the LoRAs to."),
                io.Clip.Input("clip", tooltip="The text encoder to apply the LoRAs to."),
                io.String.Input("prompt", multiline=True, default="a photo of <lora:my_lora:0.8> a dog",
                                tooltip="Prompt with <lora:NAME:WEIGHT> tags; NAME is a file under models/loras, "
                                        "with or without folder and extension."),
            ],
            outputs=[
                io.Model.Output(display_name="model"),
                io.Clip.Output(display_name="clip"),
                io.String.Output(display_name="prompt", tooltip="The prompt without the LoRA tags."),
                io.String.Output(display_name="trigger_words",
                                 tooltip="The LoRAs' trigger words (from their metadata), joined with ', '."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, prompt) -> io.NodeOutput:
        text, tags = parse_lora_tags(prompt)
        ignored = sorted({k for t in tags for k in t.extra})
        if ignored:
            log.warning("LoRA tag arguments %s are not supported here and are ignored", ", ".join(ignored))
        uses = [LoraUse(t.name, t.model_strength, t.clip_strength, t.block_weights) for t in tags]
        model, clip, triggers = apply_loras(model, clip, uses)
        return io.NodeOutput(model, clip, text, ", ".join(triggers), ui=ui.PreviewText(_summary(uses, triggers)))


NODES = [LoraStackNode, ApplyLoraStack, PromptLoras]
