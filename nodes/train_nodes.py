"""Train LoRA and Resume Training: ComfyUI's MODEL/CLIP/VAE + a dataset -> the engine -> a LoRA."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
from comfy_api.latest import io

from ..training.config import NETWORKS, PRESETS, SCHEDULERS, TIMESTEP_SAMPLINGS, TrainConfig
from ..training.lora.files import lora_state_dict, save_lora
from ..training.model.archs import distilled_notice
from ..training.fsutil import unique_path
from ..training.train.checkpoints import ema_name, step_files
from ..training.train.state import load_state
from ..training.train.trainer import RunOptions, TrainCallbacks, TrainData, Trainer
from .comfy import events
from .comfy import host as comfy_host
from .comfy.datasets import class_records
from .comfy.paths import lora_target_path, loras_dir, states_dir
from .types import ClassImages, Dataset, Lora, LossHistory, LossPayload

log = logging.getLogger(__name__)

RUNS_SUBFOLDER = "lora_workbench"  # under models/loras: step saves appear in every LoRA loader list
NO_STATES = "(no saved states yet)"  # Resume Training's list when there is nothing to resume


class ComfyCallbacks(TrainCallbacks):
    """Progress bar (with the current loss and previews) and live messages for the frontend.

    ``ProgressBar.update`` is also how Cancel reaches the run: ComfyUI's hook raises the interrupt
    there, the engine saves a resumable state and the LoRA so far, and the error goes up.
    """

    def __init__(self, node_id: str | None, total: int, notice: str = ""):
        import comfy.utils

        self.node_id = node_id
        self.notice = notice  # shown before the memory line (e.g. an untested model family)
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)

    def on_step(self, step, total, loss, lr):
        events.send(events.TRAIN_STEP, self.node_id, {"step": step, "total": total, "loss": loss, "lr": lr})
        self.bar.update_absolute(step, total)

    def on_validation(self, step, loss, best_step):
        events.send(events.TRAIN_VALIDATION, self.node_id, {"step": step, "loss": loss, "best_step": best_step})

    def on_preview(self, step, images, prompt):
        from PIL import Image

        arr = (images[0].clamp(0, 1).numpy() * 255).astype(np.uint8)
        # Sent at once with the step's progress (the trainer renders after on_step): the preview of
        # the last step reaches the editor too.
        self.bar.update_absolute(step, self.bar.total, ("JPEG", Image.fromarray(arr), 512))
        events.send(events.TRAIN_PREVIEW, self.node_id, {"step": step, "prompt": prompt})

    def on_save(self, path, step):
        events.send(events.TRAIN_SAVED, self.node_id, {"step": step, "path": str(path)})

    def on_memory_estimate(self, estimate):
        # Shown on the node before the first step (the memory line of its view), so a user sees whether
        # the run fits their GPU; the runner prints it.
        events.send(events.TRAIN_MEMORY, self.node_id,
                    {"bytes": estimate.total, "text": f"{self.notice}expected peak memory {estimate.summary()}"})


def _apply(model, clip, lora, dtype: str):
    """MODEL and CLIP with the LoRA applied through ComfyUI's own patching (the base stays untouched).

    The LoRA is applied as it is saved (rounded to ``dtype``), so the MODEL output samples exactly
    what its file gives in any LoRA loader.
    """
    import comfy.sd

    return comfy.sd.load_lora_for_models(model, clip, lora_state_dict(lora, dtype), 1.0, 1.0)


def _names_taken(out_dir: Path, name: str) -> bool:
    """Whether an earlier run wrote files a run named ``name`` would write beside its LoRA: step saves, the EMA's
    (``<name>-ema``, ``<name>-ema-stepN``) or the best step's (``<name>-best``)."""
    return bool(step_files(out_dir, name) or step_files(out_dir, ema_name(name))
                or any((out_dir / f"{n}.safetensors").exists() for n in (ema_name(name), f"{name}-best")))


def run_training(model, clip, vae, dataset, class_images, cfg: TrainConfig, node_id, resume_from=None,
                 validation=None):
    from .comfy.backend import comfy_backend

    out_dir = Path(loras_dir()) / RUNS_SUBFOLDER
    final = Path(unique_path(lora_target_path(f"{RUNS_SUBFOLDER}/{cfg.output_name}")))
    if resume_from is None and _names_taken(out_dir, cfg.output_name):
        # A new run must not replace an earlier run's step saves, EMA or best files: give it its own name.
        cfg = dataclasses.replace(cfg, output_name=final.stem)
    # The graph's MODEL/CLIP, or private clones where this host cannot train them in place.
    backend = comfy_backend(*comfy_host.trainable(model, clip), vae, model_name=comfy_host.model_file_name(model))
    notice = ""
    if getattr(backend, "untested", False):
        notice = (f"untested model family (ComfyUI's {backend.config_name}): it trains as a flow-matching "
                  "transformer with every Linear layer named as ComfyUI loads it; check the result. ")
        log.warning(notice)
    distilled = distilled_notice(backend.model_name)
    if distilled:
        notice += distilled + " "
        log.warning(distilled)
    cls_recs = class_records(class_images, dataset.config)
    data = TrainData(dataset.records, dataset.config, cls_recs, class_images.prompt if class_images else "",
                     validation.records if validation is not None else None)
    trainer = Trainer(backend, data, cfg, ComfyCallbacks(node_id, cfg.steps, notice),
                      RunOptions(output_dir=out_dir, state_dir=states_dir(), resume_from=resume_from,
                                 overwrite=resume_from is not None))
    estimate = trainer.memory_estimate()
    # Room for activations, gradients and optimizer state beside the weights: ComfyUI loads the
    # weights partly (lowvram) when the whole model would not fit next to them.
    extra = estimate.total - estimate.weights if estimate is not None else 0
    with backend.training_context(memory_required=extra):
        # The context takes the LoRA layers out on exit (also after a failure): the trainer leaves them.
        result = trainer.run(keep_injected=True)
    path = save_lora(final, result.lora, dtype=cfg.save_dtype)
    if result.ema_lora is not None:
        # The EMA of the weights beside the LoRA (<name>-ema), in every LoRA loader's list; the outputs stay the
        # trained weights, as the previews showed them.
        ema = save_lora(unique_path(final.with_name(f"{ema_name(final.stem)}{final.suffix}")), result.ema_lora,
                        dtype=cfg.save_dtype)
        log.info("EMA of the LoRA weights saved as %s", ema)
    m, c = _apply(model, clip, result.lora, cfg.save_dtype)
    loss = LossPayload(result.losses, result.instance_losses, result.prior_losses, result.validation)
    return io.NodeOutput(m, c, result.lora, loss, str(path))


OUTPUTS = [
    io.Model.Output(display_name="model", tooltip="The model with the trained LoRA applied."),
    io.Clip.Output(display_name="clip", tooltip="The CLIP with the trained LoRA applied."),
    Lora.Output(display_name="lora", tooltip="The LoRA itself, for Save LoRA or merging."),
    LossHistory.Output(display_name="loss", tooltip="Loss per step, for Loss Graph."),
    io.String.Output(display_name="path", tooltip="The LoRA file written under models/loras/lora_workbench."),
]


class TrainLora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LW_TrainLoRA",
            display_name="Train LoRA (LoRA Workbench)",
            category="LoRA Workbench/training",
            description="Trains a LoRA on your images with the model already loaded (no second copy): SD1.x, "
                        "SDXL (both CLIP-L and CLIP-G get a LoRA with the text encoder on), Flux.1 dev / schnell, "
                        "Chroma and SD3.5 (the transformer; load it in fp8 to fit 12-16 GB), and other flow-matching "
                        "models ComfyUI loads (untested, said on the node). Connect Class Images for DreamBooth prior preservation. Shows the expected peak "
                        "memory first, then the loss and preview images while it runs; Cancel keeps a resumable "
                        "state and the LoRA so far.",
            inputs=[
                io.Model.Input("model", tooltip="MODEL of an SD1.x or SDXL-family (SDXL, Pony, Illustrious, "
                                                "SSD-1B, Segmind Vega, KOALA) checkpoint, or of a Flux.1 / Chroma "
                                                "Load Diffusion Model (fp8_e4m3fn weights train in bf16), or an "
                                                "SD3.5 checkpoint."),
                io.Clip.Input("clip", tooltip="CLIP of the same checkpoint (Flux: DualCLIPLoader clip_l + t5xxl, "
                                              "type flux; Chroma: CLIPLoader t5xxl, type chroma)."),
                io.Vae.Input("vae", tooltip="VAE of the same checkpoint (Flux / Chroma: ae.safetensors); it "
                                            "encodes the training images."),
                Dataset.Input("dataset", tooltip="From Load Image Dataset."),
                io.Int.Input("steps", default=500, min=1, max=100000, tooltip="Optimizer steps."),
                io.Int.Input("rank", default=16, min=1, max=256, tooltip="LoRA rank: capacity and file size."),
                io.Float.Input("alpha", default=16.0, min=0.01, max=1024.0, step=0.01,
                               tooltip="LoRA alpha: scale = alpha / rank (alpha = rank gives 1)."),
                io.Combo.Input("target", options=list(PRESETS), default="attn",
                               tooltip="attn: attention only; attn_ff: + feed-forward; all: every Linear "
                                       "and Conv layer (LoCon)."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-6,
                               tooltip="1e-4 is a good start for rank 16."),
                io.Combo.Input("lr_schedule", options=list(SCHEDULERS), default="constant",
                               tooltip="How the learning rate changes over the run."),
                io.Int.Input("warmup_steps", default=0, min=0, max=100000, tooltip="Linear warm-up steps."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Images per step."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Same seed, same run."),
                io.Boolean.Input("train_text_encoder", default=False,
                                 tooltip="Also train the text encoder (stronger trigger words, more drift)."),
                io.Float.Input("prior_loss_weight", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Weight of the class-image loss when Class Images are connected."),
                io.Combo.Input("precision", options=["no", "bf16", "fp16"], default="no",
                               tooltip="Autocast for the frozen model (bf16 on modern GPUs); LoRA stays fp32."),
                io.Boolean.Input("gradient_checkpointing", default=False,
                                 tooltip="Less memory for slower steps (needed for SDXL at 1024 px on 8-12 GB GPUs)."),
                io.Int.Input("save_every", default=0, min=0, max=100000,
                             tooltip="Also save a LoRA every N steps into models/loras/lora_workbench (0: off)."),
                io.Int.Input("preview_every", default=0, min=0, max=100000,
                             tooltip="Render a preview image every N steps (0: off)."),
                io.String.Input("preview_prompt", default="", tooltip="Prompt of the previews (default: the "
                                "first caption)."),
                io.String.Input("output_name", default="my_lora", tooltip="File name of the LoRA."),
                io.Combo.Input("timestep_sampling", options=list(TIMESTEP_SAMPLINGS), default="default",
                               tooltip="Which noise levels training sees. default: the model family's practice "
                                       "(uniform for SD1.x/SDXL; Flux dev, Chroma and FLUX.2: flux_shift, logit-normal "
                                       "shifted by resolution as Flux samples; Qwen-Image: qwen_shift, its own "
                                       "resolution shift; schnell, SD3.5 and Z-Image: logit_normal). shift, flux_shift "
                                       "and qwen_shift are for flow models.", optional=True),
                io.Float.Input("validation_split", default=0.0, min=0.0, max=0.5, step=0.05, optional=True,
                               tooltip="Share of the images held out for a validation loss (never a folder's only "
                                       "image): measured with fixed noise about 20 times per run and drawn green "
                                       "on the chart; its lowest point is the step to keep. 0: off."),
                Dataset.Input("validation_dataset", optional=True,
                              tooltip="Validation images of their own (a second Load Image Dataset): their loss is "
                                      "measured as for validation_split, and adds to it."),
                io.Boolean.Input("keep_best", default=False, optional=True,
                                 tooltip="With a validation set: also save <name>-best, the LoRA at the lowest "
                                         "validation loss so far (replaced as the run finds a lower one)."),
                io.Int.Input("validation_patience", default=0, min=0, max=1000, optional=True,
                             tooltip="With a validation set: stop after this many validations in a row without a "
                                     "new lowest loss (0: never stop early). The LoRA is saved as at the last step."),
                io.Float.Input("ema_decay", default=0.0, min=0.0, max=0.9999, step=0.0001, round=0.0001,
                               optional=True,
                               tooltip="Also keep an exponential moving average of the LoRA weights (0.999 "
                                       "typical; 0: off), saved beside the LoRA and each step save as "
                                       "<name>-ema: smoother than the last step's weights, often better on a "
                                       "small set. The outputs stay the trained weights."),
                io.Combo.Input("network", options=list(NETWORKS), default="lora", optional=True,
                               tooltip="What is trained. lora: a plain LoRA (kohya format). loha / lokr: LyCORIS "
                                       "LoHa (Hadamard product of two low-rank pairs) or LoKr (Kronecker product), "
                                       "saved in LyCORIS keys that ComfyUI, A1111/Forge and kohya load; alpha / rank "
                                       "scales them as a LoRA (a LoKr with two full factors trains at scale 1, as "
                                       "LyCORIS does)."),
                ClassImages.Input("class_images", optional=True, tooltip="Prior-preservation images."),
            ],
            outputs=OUTPUTS,
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, steps, rank):
        # Only the inputs named here skip ComfyUI's own checks: a **kwargs would switch off the
        # min/max of every input and pin this message on all of them.
        if steps < 1:
            return f"steps={steps}: train for at least 1 step"
        if rank < 1:
            return f"rank={rank}: use 1 or more (4-64 is typical)"
        return True

    @classmethod
    def execute(cls, model, clip, vae, dataset, steps, rank, alpha, target, learning_rate, lr_schedule,
                warmup_steps, batch_size, seed, train_text_encoder, prior_loss_weight, precision,
                gradient_checkpointing, save_every, preview_every, preview_prompt, output_name,
                timestep_sampling="default", validation_split=0.0, validation_dataset=None, keep_best=False,
                validation_patience=0, ema_decay=0.0, network="lora", class_images=None) -> io.NodeOutput:
        cfg = TrainConfig(validation_split=validation_split, validation_every=max(1, steps // 20), keep_best=keep_best,
                          validation_patience=validation_patience, ema_decay=ema_decay, network=network,
                          rank=rank, alpha=alpha, preset=target, steps=steps, lr=learning_rate,
                          lr_scheduler=lr_schedule, warmup_steps=min(warmup_steps, steps), batch_size=batch_size,
                          seed=seed, train_text_encoder=train_text_encoder, prior_loss_weight=prior_loss_weight,
                          mixed_precision=precision, gradient_checkpointing=gradient_checkpointing,
                          save_every=save_every, preview_every=preview_every, preview_prompt=preview_prompt,
                          output_name=output_name.strip() or "my_lora", timestep_sampling=timestep_sampling)
        return run_training(model, clip, vae, dataset, class_images, cfg, cls.hidden.unique_id,
                            validation=validation_dataset)


class ResumeTraining(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LW_ResumeTraining",
            display_name="Resume Training (LoRA Workbench)",
            category="LoRA Workbench/training",
            description="Continues a stopped or cancelled Train LoRA run from its saved state, with the same "
                        "images and settings, along the same loss curve.",
            inputs=[
                io.Model.Input("model", tooltip="The same checkpoint as the original run."),
                io.Clip.Input("clip", tooltip="CLIP of the same checkpoint."),
                io.Vae.Input("vae", tooltip="VAE of the same checkpoint."),
                Dataset.Input("dataset", tooltip="The same images as the original run."),
                io.Combo.Input("state", options=_state_names(), tooltip="A saved state (output/"
                               "lora_workbench_states)."),
                io.Int.Input("steps", default=0, min=0, max=100000, tooltip="Total steps (0: as saved; more "
                             "only with a constant learning rate)."),
                ClassImages.Input("class_images", optional=True, tooltip="The same class images, if any."),
                Dataset.Input("validation_dataset", optional=True,
                              tooltip="The same validation images, if the run had its own."),
            ],
            outputs=OUTPUTS,
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, state):
        # ComfyUI does not check a V3 combo's value against its options: without this, a state that
        # is gone (or a workflow from another machine) would fail only after the checkpoint loads.
        if state is None or (state != NO_STATES and state in _state_names()):
            return True
        return (f"state {state!r} is not a training state in {states_dir()}; pick a saved state from the list, "
                "or cancel or stop a Train LoRA run to save one")

    @classmethod
    def execute(cls, model, clip, vae, dataset, state, steps, class_images=None,
                validation_dataset=None) -> io.NodeOutput:
        folder = states_dir() / state
        saved = load_state(folder)
        cfg = TrainConfig.from_dict({**saved.config, **({"steps": steps} if steps else {})})
        return run_training(model, clip, vae, dataset, class_images, cfg, cls.hidden.unique_id,
                            resume_from=folder, validation=validation_dataset)


def _state_names() -> list[str]:
    try:
        root = states_dir()
        names = sorted(p.name for p in root.iterdir() if (p / "trainer.pt").is_file()) if root.is_dir() else []
    except Exception:  # noqa: BLE001 - a schema must always build
        names = []
    return names or [NO_STATES]


NODES = [TrainLora, ResumeTraining]
