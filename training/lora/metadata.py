"""The facts a trained LoRA carries: kohya ``ss_*``, ``modelspec.*`` and our ``lw_*`` keys."""

from __future__ import annotations

import json
import math
import time
from typing import TYPE_CHECKING

from ..data.dataset import dataset_fingerprint, dataset_summary
from ..data.captions import tag_frequency
from .files import kohya_metadata
from ..train.optim import optimizer_label

if TYPE_CHECKING:
    from ..train.trainer import Trainer


def training_metadata(trainer: "Trainer", steps_done: int) -> dict[str, str]:
    cfg, dcfg, be, records = trainer.cfg, trainer.dcfg, trainer.backend, trainer.records
    summary = dataset_summary(records)
    samples_per_epoch = max(1, summary["num_images_with_repeats"])
    epochs = math.ceil(steps_done * cfg.batch_size * cfg.grad_accum / samples_per_epoch) if steps_done else 0
    conv = cfg.preset == "all"
    te_lr = (cfg.lr if cfg.text_encoder_lr is None else cfg.text_encoder_lr) if cfg.train_text_encoder else None
    md = kohya_metadata(
        arch=be.arch,
        network_dim=cfg.rank,
        network_alpha=cfg.alpha,
        conv_dim=cfg.effective_conv_rank if conv else None,
        conv_alpha=cfg.effective_conv_alpha if conv else None,
        network_args={"preset": cfg.preset, **({"dropout": cfg.dropout} if cfg.dropout else {})},
        output_name=cfg.output_name,
        title=cfg.output_name,
        tag_frequency=tag_frequency(records, dcfg),
        dataset_dirs=summary["concepts"],
        resolution=dcfg.resolution,
        num_train_images=summary["num_images_with_repeats"],
        learning_rate=cfg.lr,
        unet_lr=cfg.lr,
        text_encoder_lr=te_lr,
        max_train_steps=cfg.steps,
        num_epochs=epochs,
        lr_scheduler=cfg.lr_scheduler,
        optimizer=optimizer_label(cfg.optimizer, cfg.optimizer_args or None),
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
            "run_id": getattr(trainer, "run_id", None),
            "dataset_fingerprint": dataset_fingerprint(records),
            "buckets": summary["buckets"],
            **trainer.extra_metadata,
        },
    )
    # kohya keys kohya_metadata has no argument for: the loss, noise and regularisation facts.
    md["ss_loss_type"] = {"mse": "l2"}.get(cfg.loss_type, cfg.loss_type)
    md["ss_noise_offset"] = str(cfg.noise_offset)
    md["ss_multires_noise_iterations"] = str(cfg.pyramid_noise_iterations)
    md["ss_min_snr_gamma"] = str(cfg.min_snr_gamma)
    md["ss_num_reg_images"] = str(len(trainer.class_records))
    if trainer.class_records:
        md["ss_prior_loss_weight"] = str(cfg.prior_loss_weight)
        md["ss_reg_dataset_dirs"] = json.dumps(dataset_summary(trainer.class_records)["concepts"])
        md["lw_class_prompt"] = trainer.class_prompt
    if cfg.use_dora:
        md["ss_network_args"] = json.dumps({**json.loads(md.get("ss_network_args", "{}")), "use_dora": True})
    return md
