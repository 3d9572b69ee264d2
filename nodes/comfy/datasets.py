"""Datasets as the nodes hand them to the engine."""

from __future__ import annotations

from ...training.config import DatasetConfig
from ...training.data.dataset import class_config, records_from_images, scan_folder
from ..types import ClassImagesPayload


def class_records(payload: ClassImagesPayload | None, cfg: DatasetConfig):
    """Class images as records bucketed like the instance set (captions default to the class prompt)."""
    if payload is None:
        return None
    ccfg = class_config(cfg, payload.prompt, payload.folder or "class images", flip=False)
    if payload.images is not None:
        return records_from_images(payload.images, [payload.prompt], ccfg, concept="class")
    return scan_folder(ccfg)
