"""LoRA Grid: the same prompt and seed across LoRA files (e.g. saved epochs) x strengths, labelled."""

from __future__ import annotations

import logging
import os

import torch
from comfy_api.latest import io, ui

from ..training.lora.files import read_metadata
from ..training.train.plot import label_grid
from ..training.train.validation import best_of_saves
# The grid applies each LoRA exactly as Apply LoRA Stack does.
from .comfy.loras import NONE, LoraUse, apply_loras, lora_path

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------
def parse_strengths(text: str) -> list[float]:
    values = []
    for item in text.replace(";", ",").split(","):
        if item.strip():
            try:
                values.append(float(item))
            except ValueError:
                raise ValueError(
                    f"strength {item.strip()!r} in {text!r} is not a number; write e.g. 0.5, 0.75, 1"
                ) from None
    if not values:
        raise ValueError(f"no strengths in {text!r}; write a comma list such as 0.5, 0.75, 1")
    return values


def grid_rows(text: str) -> list[str]:
    """One LoRA per line; empty lines and '#' comments skipped; 'None' is the model without a LoRA."""
    rows = [line.strip() for line in text.splitlines()]
    rows = [r for r in rows if r and not r.startswith("#")]
    if not rows:
        raise ValueError("no LoRAs listed; write one LoRA file per line (e.g. my_lora-000004.safetensors), "
                         "or 'None' for the model without a LoRA")
    return rows


def _patch_key(clip) -> tuple:
    """What decides a CLIP's encoding beyond its base: its patches, by identity (a clone shares its source's
    patch tuples; applying a LoRA adds new ones). A LoRA without text-encoder modules keeps the key."""
    return tuple(sorted((k, tuple(id(p) for p in v)) for k, v in clip.patcher.patches.items()))


class PromptCache:
    """The grid's conditionings, encoded once per distinct CLIP: a Flux / Chroma LoRA rarely patches the
    text encoder, and on a CPU a T5-XXL encode costs longer than sampling a cell."""

    def __init__(self, positive: str, negative: str):
        self.positive, self.negative = positive, negative
        self._cache: dict[tuple, tuple] = {}

    def get(self, clip, need_negative: bool):
        key = (_patch_key(clip), need_negative)
        hit = self._cache.get(key)
        if hit is None:
            pos = clip.encode_from_tokens_scheduled(clip.tokenize(self.positive))
            # cfg 1 never evaluates the negative (ComfyUI's cfg1 optimisation): it is not encoded then.
            neg = clip.encode_from_tokens_scheduled(clip.tokenize(self.negative)) if need_negative else pos
            hit = self._cache[key] = (pos, neg, clip)  # the clip is kept so its patch ids stay unique
        return hit[0], hit[1]


def render(model, clip, vae, prompts: PromptCache, seed, steps, cfg, sampler_name, scheduler, width, height):
    """What CLIPTextEncode x2 + an empty latent of the model's channels and the VAE's scale (EmptyLatentImage: 4,
    Flux's EmptySD3LatentImage: 16, EmptyFlux2LatentImage: 128 at 1/16) + KSampler + VAEDecode give: one IMAGE [1, H, W, 3]. Flux.1 dev samples at its
    distilled guidance 3.5 (FluxGuidance's default, which the model takes when the conditioning has none)."""
    import comfy.model_management as mm
    import nodes

    need_negative = cfg != 1.0 or bool(model.model_options.get("disable_cfg1_optimization", False))
    pos, neg = prompts.get(clip, need_negative)
    channels = model.get_model_object("latent_format").latent_channels
    ratio = getattr(vae, "downscale_ratio", 8)  # 16 for FLUX.2's VAE (EmptyFlux2LatentImage's height // 16)
    ratio = ratio if isinstance(ratio, int) else ratio[-1]  # video VAEs: (time rule, height, width)
    latent = {"samples": torch.zeros([1, channels, height // ratio, width // ratio], device=mm.intermediate_device())}
    (sampled,) = nodes.common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, pos, neg, latent)
    return nodes.VAEDecode().decode(vae, sampled)[0]


class LoraGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import comfy.samplers

        return io.Schema(
            node_id="LW_LoraGrid",
            display_name="LoRA Grid (LoRA Workbench)",
            category="LoRA Workbench/use",
            description="Compares LoRAs (e.g. the epochs a training run saved) at several strengths: renders the "
                        "same prompt and seed for every LoRA x strength and lays the images out in one labelled "
                        "grid, a row per LoRA and a column per strength. Of a run's step saves trained with a "
                        "validation loss, the one at its lowest point is labelled (best).",
            inputs=[
                io.Model.Input("model", tooltip="The base diffusion model (without the LoRAs)."),
                io.Clip.Input("clip", tooltip="The base text encoder."),
                io.Vae.Input("vae", tooltip="The VAE that decodes the images."),
                io.String.Input("loras", multiline=True, default="None",
                                tooltip="One LoRA file per line (names under models/loras). 'None' adds a row "
                                        "without a LoRA; lines starting with # are skipped."),
                io.String.Input("strengths", default="0.5, 0.75, 1.0",
                                tooltip="Comma list of strengths, one column each (applied to model and CLIP)."),
                io.String.Input("positive", multiline=True, default="a photo of sks",
                                tooltip="The prompt every cell renders."),
                io.String.Input("negative", multiline=True, default="", tooltip="The negative prompt."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The same noise seed for every cell."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Sampling steps per cell."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale (1 for Flux.1 dev and schnell)."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="The sampler, as in KSampler."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal",
                               tooltip="The noise schedule, as in KSampler."),
                io.Int.Input("width", default=512, min=64, max=4096, step=8, tooltip="Image width in pixels."),
                io.Int.Input("height", default=512, min=64, max=4096, step=8, tooltip="Image height in pixels."),
            ],
            outputs=[
                io.Image.Output(display_name="grid", tooltip="All cells in one image with LoRA and strength labels."),
                io.Image.Output(display_name="images", tooltip="The cells as a batch, row by row."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, loras, strengths, positive, negative, seed, steps, cfg, sampler_name,
                scheduler, width, height) -> io.NodeOutput:
        import comfy.utils

        rows, cols = grid_rows(loras), parse_strengths(strengths)
        rows = [NONE if r.lower() == "none" else r for r in rows]
        for r in rows:  # every name resolves before the first image is rendered
            if r != NONE:
                lora_path(r)
        log.info("LoRA grid: %d LoRAs x %d strengths", len(rows), len(cols))
        bar = comfy.utils.ProgressBar(len(rows) * len(cols))
        prompts = PromptCache(positive, negative)
        args = (prompts, seed, steps, cfg, sampler_name, scheduler, width, height)
        cells = []
        for r in rows:
            base = render(model, clip, vae, *args) if r == NONE else None
            for s in cols:
                if base is None:
                    m, c, _ = apply_loras(model, clip, [LoraUse(r, s, s)])
                    cells.append(render(m, c, vae, *args))
                else:
                    cells.append(base)
                bar.update(1)
        images = torch.cat(cells)
        labels = [os.path.splitext(r.replace("\\", "/").rsplit("/", 1)[-1])[0] if r != NONE else NONE for r in rows]
        # a run's step saves: the one at its lowest validation loss is marked
        best = best_of_saves([read_metadata(lora_path(r)) if r != NONE else {} for r in rows])
        labels = [f"{label} (best)" if is_best else label for label, is_best in zip(labels, best)]
        grid = label_grid(images, labels, [f"{s:g}" for s in cols])
        log.info("LoRA grid done: %d images", len(cells))
        return io.NodeOutput(grid, images, ui=ui.PreviewImage(grid, cls=cls))


NODES = [LoraGrid]
