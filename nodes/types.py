"""Custom socket types and the plain dataclasses that travel through them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from comfy_api.latest import io

from ..training.config import DatasetConfig
from ..training.data.images import ImageRecord

Dataset = io.Custom("LW_DATASET")
ClassImages = io.Custom("LW_CLASS_IMAGES")
Lora = io.Custom("LW_LORA")
LossHistory = io.Custom("LW_LOSS")
LoraStack = io.Custom("LORA_STACK")  # the de-facto type of other packs' stacks: (name, model, clip) tuples


@dataclass
class DatasetPayload:
    records: list[ImageRecord]
    config: DatasetConfig
    source: str  # folder or "images from the graph"


@dataclass
class ClassImagesPayload:
    prompt: str
    images: Any = None  # ComfyUI IMAGE batch [N, H, W, 3] in 0..1
    folder: str | None = None


@dataclass
class LossPayload:
    losses: list[float]
    instance: list[float] = field(default_factory=list)
    prior: list[float] = field(default_factory=list)
    validation: list = field(default_factory=list)  # (step, loss[, EMA loss]) per validation
