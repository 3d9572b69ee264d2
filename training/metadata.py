"""The facts a trained LoRA carries: kohya ``ss_*``, ``modelspec.*`` and our ``lw_*`` keys."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from .dataset import dataset_fingerprint, dataset_summary, tag_frequency
from .lora_io import kohya_metadata

if TYPE_CHECKING:
    from .train import Trainer


def training_metadata(trainer: "Trainer", steps_done: int) -> dict[str, str]:
    cfg, dcfg, be, records = trainer.cfg, trainer.dcfg, trainer.backend, trainer.records
    summary = dataset_summary(records)
    samples_per_epoch = max(1, summary["num_images_with_repeats"])
    epochs = math.ceil(steps_done * cfg.batch_size * cfg.grad_accum / samples_per_epoch) if steps_done else 0
    conv = cfg.preset == "all"
    te_lr = (cfg.lr if cfg.text_encoder_lr is None else cfg.text_encoder_lr) if cfg.train_text_encoder else None
    return kohya_metadata(
        arch=be.arch,
        network_dim=cfg.rank,
        network_alpha=cfg.alpha,
        conv_dim=cfg.effective_conv_rank if conv else None,
        conv_alpha=cfg.effective_conv_alpha if conv else None,
        network_args={"preset": cfg.preset, **({"dropout": cfg.dropout} if cfg.dropout else {})},
        output_name=cfg.output_name,
        title=cfg.output_name,
        tag_frequency=tag_frequency(records),
        dataset_dirs=summary["concepts"],
        resolution=dcfg.resolution,
        num_train_images=summary["num_images_with_repeats"],
        learning_rate=cfg.lr,
        unet_lr=cfg.lr,
        text_encoder_lr=te_lr,
        max_train_steps=cfg.steps,
        num_epochs=epochs,
        lr_scheduler=cfg.lr_scheduler,
        optimizer="torch.optim.AdamW",
        mixed_precision=cfg.mixed_precision,
        seed=cfg.seed,
        training_started_at=getattr(trainer, "started_at", None),
        training_finished_at=time.time(),
        sd_model_name=be.model_name or None,
        prediction_type="v" if (cfg.prediction_type or be.prediction_type) == "v_prediction" else "epsilon",
        trigger_phrase=dcfg.trigger or None,
        description=f"LoRA trained with LoRA Workbench for {steps_done} steps on {summary['num_images']} images",
        lw_config=cfg,
        lw_extra={
            "steps_done": steps_done,
            "dataset_fingerprint": dataset_fingerprint(records),
            "buckets": summary["buckets"],
            **trainer.extra_metadata,
        },
    )
