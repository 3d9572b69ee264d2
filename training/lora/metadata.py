"""The facts a LoRA file carries: kohya ``ss_*``, ``modelspec.*`` and our ``lw_*`` keys.

Built from plain values (kohya's way: the training script gathers them, the LoRA-file code holds no
training logic): :func:`kohya_metadata` takes each fact as a keyword, :func:`training_metadata` takes a
run's config, images and model facts. :func:`tag_counts` and :func:`trigger_words` read them back.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections import Counter
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Mapping, Sequence

from ..data.captions import tag_frequency
from ..data.dataset import dataset_fingerprint, dataset_summary
from ..model.archs import get_arch, modelspec_architecture
from ..train.optim import optimizer_label
from .files import metadata_strings

if TYPE_CHECKING:
    from ..config import DatasetConfig, TrainConfig
    from ..data.images import ImageRecord

log = logging.getLogger(__name__)


def _resolution_pair(resolution) -> tuple[int, int]:
    if isinstance(resolution, int):
        return resolution, resolution
    if isinstance(resolution, str):
        resolution = [int(x) for x in re.split(r"[,x ]+", resolution.strip("() ")) if x]
    w, h = (list(resolution) * 2)[:2] if len(resolution) == 1 else resolution
    return int(w), int(h)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds")


def _package_version() -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("lora-workbench")
    except PackageNotFoundError:
        return None


def kohya_metadata(*, arch: str, network_dim: int | None = None, network_alpha: float | None = None,
                   conv_dim: int | None = None, conv_alpha: float | None = None, network_args: dict | None = None,
                   network_module: str | None = None, output_name: str | None = None, title: str | None = None,
                   tag_frequency: dict | None = None, dataset_dirs: dict | None = None,
                   resolution: int | str | tuple[int, int] | list[int] | None = None,
                   num_train_images: int | None = None, learning_rate: float | None = None,
                   unet_lr: float | None = None, text_encoder_lr: float | None = None,
                   max_train_steps: int | None = None, num_epochs: int | None = None,
                   lr_scheduler: str | None = None, optimizer: str | None = None, mixed_precision: str | None = None,
                   seed: int | None = None, training_started_at: float | None = None,
                   training_finished_at: float | None = None, sd_model_name: str | None = None,
                   sd_model_hash: str | None = None, prediction_type: str = "epsilon",
                   training_comment: str | None = None, trigger_phrase: str | None = None,
                   description: str | None = None, date: str | datetime | None = None,
                   lw_version: str | None = None, lw_config: object = None,
                   lw_extra: dict | None = None, variant: str | None = None,
                   modelspec_architecture_override: str | None = None,
                   timestep_sampling: str | None = None, logit_mean: float | None = None,
                   logit_std: float | None = None, flow_shift: float | None = None,
                   guidance_scale: float | None = None) -> dict[str, str]:
    """The ``ss_*`` / ``modelspec.*`` / ``lw_*`` metadata A1111, Civitai and rgthree read. Optional
    values left None are omitted; an unknown keyword is a TypeError (no silent typos).

    tag_frequency: {concept: {tag: count}}; dataset_dirs: {concept: {"n_repeats": r, "img_count": n}};
    resolution: int, (width, height) or "512,512"; times are unix seconds; lw_config: dict or dataclass
    (JSON-encoded); lw_extra: more facts, each stored as ``lw_<key>``.

    DiT families (Flux, Chroma): ``variant`` names the checkpoint ("dev" / "schnell": modelspec
    ``flux-1-dev/lora``, default the family's first); ``modelspec_architecture_override`` writes any other
    string (without "/lora"). ``prediction_type`` is "flow" (kohya writes no modelspec.prediction_type for
    Flux, nor do we), and the SD-only ``ss_v2`` is left out. timestep_sampling / logit_mean / logit_std /
    flow_shift / guidance_scale are kohya's ``ss_timestep_sampling``, ``ss_logit_mean``, ``ss_logit_std``,
    ``ss_discrete_flow_shift`` and ``ss_guidance_scale`` (flux_train_network.py ``update_metadata``).
    """
    family = get_arch(arch)
    dit = family.kind == "dit"
    allowed = ("flow",) if dit else ("epsilon", "v")
    if prediction_type == "epsilon" and dit:  # the default, for callers that do not pass it
        prediction_type = "flow"
    if prediction_type not in allowed:
        raise ValueError(f"prediction_type {prediction_type!r} unknown for {family.label}; use one of {allowed}")
    args = dict(network_args or {})
    if conv_dim is not None:
        args.setdefault("conv_dim", conv_dim)
        args.setdefault("conv_alpha", conv_alpha if conv_alpha is not None else conv_dim)
    w_h = _resolution_pair(resolution) if resolution is not None else None
    if date is None and (training_finished_at or training_started_at):
        date = _iso(training_finished_at or training_started_at)
    elif isinstance(date, datetime):
        date = date.isoformat(timespec="seconds")
    if is_dataclass(lw_config) and not isinstance(lw_config, type):
        lw_config = asdict(lw_config)
    sd_arch = modelspec_architecture_override or modelspec_architecture(arch, variant, prediction_type)
    values = {
        "ss_base_model_version": family.base_version,
        "ss_network_module": network_module or family.network_module,
        "ss_network_dim": network_dim,
        "ss_network_alpha": network_alpha,
        "ss_network_args": json.dumps(args) if args else None,
        "ss_output_name": output_name,
        "ss_tag_frequency": json.dumps(tag_frequency) if tag_frequency is not None else None,
        "ss_dataset_dirs": json.dumps(dataset_dirs) if dataset_dirs is not None else None,
        "ss_resolution": f"({w_h[0]}, {w_h[1]})" if w_h else None,
        "ss_num_train_images": num_train_images,
        "ss_learning_rate": learning_rate,
        "ss_unet_lr": unet_lr,
        "ss_text_encoder_lr": text_encoder_lr,
        "ss_max_train_steps": max_train_steps,
        "ss_num_epochs": num_epochs,
        "ss_lr_scheduler": lr_scheduler,
        "ss_optimizer": optimizer,
        "ss_mixed_precision": mixed_precision,
        "ss_seed": seed,
        "ss_training_started_at": training_started_at,
        "ss_training_finished_at": training_finished_at,
        "ss_sd_model_name": sd_model_name,
        "ss_new_sd_model_hash": sd_model_hash,
        "ss_v2": None if dit else arch == "sd2",
        "ss_training_comment": training_comment,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": sd_arch + "/lora",
        "modelspec.implementation": family.implementation,
        "modelspec.title": title or output_name or "LoRA",
        "modelspec.date": date,
        "modelspec.resolution": f"{w_h[0]}x{w_h[1]}" if w_h else None,
        "modelspec.trigger_phrase": trigger_phrase,
        "modelspec.prediction_type": None if dit else prediction_type,
        "modelspec.description": description,
        "ss_timestep_sampling": timestep_sampling,
        "ss_logit_mean": logit_mean,
        "ss_logit_std": logit_std,
        "ss_discrete_flow_shift": flow_shift,
        "ss_guidance_scale": guidance_scale,
        "lw_version": lw_version or _package_version(),
        "lw_config": json.dumps(lw_config, default=str) if lw_config is not None else None,
    }
    for k, v in (lw_extra or {}).items():
        values[k if k.startswith("lw_") else f"lw_{k}"] = v
    return metadata_strings(values)


def training_metadata(cfg: "TrainConfig", dcfg: "DatasetConfig", records: Sequence["ImageRecord"], *, arch: str,
                      steps_done: int, model_name: str = "", model_prediction: str = "epsilon",
                      class_records: Sequence["ImageRecord"] = (), class_prompt: str = "",
                      started_at: float | None = None, run_id: str | None = None,
                      extra: Mapping[str, object] | None = None, variant: str | None = None,
                      guidance_scale: float | None = None, timestep_sampling: str | None = None) -> dict[str, str]:
    """The metadata of a LoRA trained with ``cfg`` on ``records`` for ``steps_done`` steps (finished now).

    arch / model_name / model_prediction: the base model's family, name and prediction type ("epsilon" or
    "v_prediction"; ``cfg.prediction_type`` overrides it). class_records / class_prompt: the prior-preservation
    images. run_id names the run (``lw_run_id``); extra adds ``lw_*`` facts. DiTs: variant ("dev" / "schnell")
    picks the modelspec architecture; the timestep sampling facts come from ``cfg`` (timestep_sampling,
    logit_mean, logit_std, flow_shift; absent from older configs), ``timestep_sampling`` overrides the method
    (pass what ``cfg.timestep_sampling="default"`` resolved to for the model), and guidance_scale is the
    guidance the model saw while training (Flux dev: 1.0).
    """
    dit = get_arch(arch).kind == "dit"
    flow = {}
    if dit or timestep_sampling or getattr(cfg, "timestep_sampling", "default") != "default":
        flow = {"timestep_sampling": timestep_sampling or getattr(cfg, "timestep_sampling", None),
                "logit_mean": getattr(cfg, "logit_mean", None), "logit_std": getattr(cfg, "logit_std", None),
                "flow_shift": getattr(cfg, "flow_shift", None)}
    summary = dataset_summary(records)
    samples_per_epoch = max(1, summary["num_images_with_repeats"])
    epochs = math.ceil(steps_done * cfg.batch_size * cfg.grad_accum / samples_per_epoch) if steps_done else 0
    conv = cfg.preset == "all"
    te_lr = (cfg.lr if cfg.text_encoder_lr is None else cfg.text_encoder_lr) if cfg.train_text_encoder else None
    # LoHa / LoKr: what kohya's train_network.py writes with LyCORIS's network module (--network_module
    # lycoris.kohya --network_args algo=...); LoKr's factor -1 is peft's (and LyCORIS's) default.
    lycoris = cfg.network != "lora"
    algo = {"algo": cfg.network, **({"factor": -1} if cfg.network == "lokr" else {})} if lycoris else {}
    md = kohya_metadata(
        arch=arch,
        network_dim=cfg.rank,
        network_alpha=cfg.alpha,
        conv_dim=cfg.effective_conv_rank if conv else None,
        conv_alpha=cfg.effective_conv_alpha if conv else None,
        network_module="lycoris.kohya" if lycoris else None,
        network_args={**algo, "preset": cfg.preset, **({"dropout": cfg.dropout} if cfg.dropout else {})},
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
        training_started_at=started_at,
        training_finished_at=time.time(),
        sd_model_name=model_name or None,
        prediction_type="flow" if dit else (
            "v" if (cfg.prediction_type or model_prediction) == "v_prediction" else "epsilon"),
        variant=variant,
        guidance_scale=guidance_scale,
        **flow,
        trigger_phrase=dcfg.trigger or None,
        description=f"LoRA trained with LoRA Workbench for {steps_done} steps on {summary['num_images']} images",
        lw_config=cfg,
        lw_extra={
            "steps_done": steps_done,
            "run_id": run_id,
            "dataset_fingerprint": dataset_fingerprint(records),
            "buckets": summary["buckets"],
            **(extra or {}),
        },
    )
    # kohya keys kohya_metadata has no argument for: the loss, noise and regularisation facts.
    md["ss_loss_type"] = {"mse": "l2"}.get(cfg.loss_type, cfg.loss_type)
    md["ss_noise_offset"] = str(cfg.noise_offset)
    md["ss_multires_noise_iterations"] = str(cfg.pyramid_noise_iterations)
    md["ss_min_snr_gamma"] = str(cfg.min_snr_gamma)
    md["ss_num_reg_images"] = str(len(class_records))
    if class_records:
        md["ss_prior_loss_weight"] = str(cfg.prior_loss_weight)
        md["ss_reg_dataset_dirs"] = json.dumps(dataset_summary(class_records)["concepts"])
        md["lw_class_prompt"] = class_prompt
    if cfg.use_dora:
        md["ss_network_args"] = json.dumps({**json.loads(md.get("ss_network_args", "{}")), "use_dora": True})
    return md


# ---- reading it back ---------------------------------------------------------------------------
def tag_counts(metadata: Mapping[str, str]) -> Counter:
    """Caption tag -> count over all concepts of a file's ``ss_tag_frequency`` (tags stripped, blank ones
    dropped); empty when the key is missing or not a JSON object."""
    try:
        freq = json.loads(metadata.get("ss_tag_frequency") or "{}")
    except json.JSONDecodeError:
        log.debug("ss_tag_frequency is not JSON; no tag counts")
        return Counter()
    total: Counter = Counter()
    for tags in freq.values() if isinstance(freq, dict) else ():
        if isinstance(tags, dict):
            for tag, count in tags.items():
                if str(tag).strip():
                    total[str(tag).strip()] += int(count)
    return total


def trigger_words(metadata: Mapping[str, str], top_tags: int = 3) -> list[str]:
    """``modelspec.trigger_phrase``, else the ``top_tags`` most frequent training-caption tags."""
    phrase = (metadata.get("modelspec.trigger_phrase") or "").strip()
    if phrase:
        return [phrase]
    return [tag for tag, _ in tag_counts(metadata).most_common(top_tags)]
