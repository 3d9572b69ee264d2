"""Aspect-ratio buckets (kohya's BucketManager) and the sampler that batches by bucket.

Every bucket has about ``resolution**2`` pixels; each image is scaled to *cover* its bucket and
centre-cropped, so only the bucket's rounding is cut away. A batch never mixes buckets.
"""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import torch
from PIL import Image

from ..config import DatasetConfig, DatasetError, listing
from .images import ImageRecord, open_image, read_file


def make_buckets(resolution: int, step: int, min_side: int, max_side: int) -> list[tuple[int, int]]:
    """All (width, height) multiples of ``step`` within the side limits and ``resolution**2`` area.

    For each width only the tallest height that fits is kept, plus the transposed bucket, as in
    kohya's ``make_bucket_resolutions``. The square (resolution, resolution) is always included.
    """
    if step <= 0 or min_side <= 0 or min_side % step or max_side % step or resolution % step:
        raise DatasetError(f"bucket sizes must be positive multiples of step={step}: got resolution="
                           f"{resolution}, min_side={min_side}, max_side={max_side}")
    if not min_side <= resolution <= max_side:
        raise DatasetError(f"resolution={resolution} must lie between min_side={min_side} and "
                           f"max_side={max_side} so the square bucket exists")
    area = resolution * resolution
    buckets = {(resolution, resolution)}
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, area // width // step * step)
        if height >= min_side:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


def assign_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log space); ties go to the larger area."""
    if width <= 0 or height <= 0:
        raise DatasetError(f"image size {width}x{height} is not a real size; check the image file")
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - aspect), 9), -b[0] * b[1]))


def _buckets_for(cfg: DatasetConfig) -> list[tuple[int, int]]:
    if not cfg.enable_buckets:
        return [(cfg.resolution, cfg.resolution)]
    return make_buckets(cfg.resolution, cfg.bucket_step, cfg.min_bucket_side, cfg.max_bucket_side)


def assign_buckets(records: list[ImageRecord], cfg: DatasetConfig) -> list[ImageRecord]:
    """Copies of ``records`` with ``bucket`` set for ``cfg`` (a square for all if buckets are off)."""
    buckets = _buckets_for(cfg)
    return [dataclasses.replace(r, bucket=assign_bucket(r.width, r.height, buckets)) for r in records]


def fit_to_bucket(image: Image.Image, bucket: tuple[int, int],
                  flip: bool = False) -> tuple[Image.Image, tuple[int, int], tuple[int, int]]:
    """Scale ``image`` to cover ``bucket`` (LANCZOS), optionally mirror it, and centre-crop the rest.

    Returns ``(cropped_image, (left, top), (original_width, original_height))``; the crop offsets
    are in the scaled (and mirrored) image, as SDXL's ``crop_top_left`` conditioning expects.
    """
    bw, bh = bucket
    w, h = image.size
    (nw, nh), (left, top) = _cover_and_crop(w, h, bucket)
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.Resampling.LANCZOS)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if (nw, nh) != (bw, bh):
        image = image.crop((left, top, left + bw, top + bh))
    return image, (left, top), (w, h)


def _cover_and_crop(w: int, h: int, bucket: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """((scaled width, height), (left, top) of the centred crop) when a w x h image covers ``bucket``."""
    bw, bh = bucket
    scale = max(bw / w, bh / h)
    nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
    return (nw, nh), ((nw - bw) // 2, (nh - bh) // 2)


def size_conditioning(record: ImageRecord, bucket: tuple[int, int] | None = None) -> dict:
    """SDXL's size conditioning of ``record`` fitted to ``bucket`` (default: its own), without reading it.

    The same numbers :func:`load_pixels` returns as ``meta``: ``original_size`` (h, w) of the image,
    ``crop_top_left`` (top, left) of the centred crop in the scaled image, ``target_size`` (bh, bw).
    A mirrored image keeps them: the crop is centred, so its offsets are the same either way.
    """
    bucket = bucket or record.bucket
    if bucket is None:
        raise DatasetError(f"{record.name} has no bucket; assign buckets first (assign_buckets)")
    _, (left, top) = _cover_and_crop(record.width, record.height, bucket)
    return {"original_size": (record.height, record.width), "crop_top_left": (top, left),
            "target_size": (bucket[1], bucket[0])}


def load_pixels(record: ImageRecord, cfg: DatasetConfig, flip: bool = False) -> tuple[torch.Tensor, dict]:
    """Pixels of ``record`` fitted to its bucket: ``(tensor[3,bh,bw] in [-1,1], meta)``.

    ``meta`` holds SDXL's size conditioning: ``original_size`` (h, w), ``crop_top_left``
    (top, left) and ``target_size`` (bh, bw). A record without a bucket gets the one ``cfg`` gives it.
    """
    bucket = record.bucket or assign_bucket(record.width, record.height, _buckets_for(cfg))
    image, (left, top), (w, h) = fit_to_bucket(open_image(record), bucket, flip=flip)
    bw, bh = bucket
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    return pixels, {"original_size": (h, w), "crop_top_left": (top, left), "target_size": (bh, bw)}


def load_mask(record: ImageRecord, cfg: DatasetConfig, flip: bool, latent_size: tuple[int, int]) -> torch.Tensor:
    """The loss weight of ``record`` at latent size ``(h, w)``: its ``mask_path`` (else its alpha channel, else all
    ones) fitted to the bucket exactly as its pixels are (scale, flip, centre crop), then area-averaged to the
    latent grid; [1, h, w] float32 in 0..1."""
    mask = None
    if record.mask_path is not None:
        mask = read_file(record.mask_path).convert("L")
    elif record.image is None:
        image = read_file(record.path)
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
            mask = image.convert("RGBA").getchannel("A")
    if mask is None:
        return torch.ones(1, *latent_size)
    bucket = record.bucket or assign_bucket(record.width, record.height, _buckets_for(cfg))
    mask, _, _ = fit_to_bucket(mask, bucket, flip=flip)
    mask = mask.resize((latent_size[1], latent_size[0]), Image.Resampling.BOX)
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]


def repeat_starts(records: list[ImageRecord]) -> list[int]:
    """Dataset index of each record's first repeat: record i owns [starts[i], starts[i+1])."""
    starts, total = [], 0
    for r in records:
        starts.append(total)
        total += r.repeats
    return starts


class BucketBatchSampler:
    """Batches of dataset indices, one bucket per batch, shuffled per (seed, epoch), sharded by rank.

    Pass the same records as the :class:`ImageDataset` (``dataset.records``). With several
    replicas every rank gets the same number of batches: the batch list is padded by wrapping
    around (``drop_last`` instead truncates it), then rank r takes batches r, r+R, r+2R, ...
    """

    def __init__(self, records: list[ImageRecord], batch_size: int, seed: int, shuffle: bool = True,
                 drop_last: bool = False, num_replicas: int = 1, rank: int = 0):
        if batch_size < 1:
            raise DatasetError(f"batch_size={batch_size}; use 1 or more")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise DatasetError(f"rank={rank} with num_replicas={num_replicas}; need 0 <= rank < num_replicas")
        unbucketed = [r.name for r in records if r.bucket is None]
        if unbucketed:
            raise DatasetError(f"records have no bucket: {listing(unbucketed)}; use the records from "
                               "scan_folder/records_from_images or assign_buckets(records, cfg)")
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0
        self._by_bucket: dict[tuple[int, int], list[int]] = {}
        for r, start in zip(records, repeat_starts(records)):
            self._by_bucket.setdefault(r.bucket, []).extend(range(start, start + r.repeats))
        rounding = (lambda n: n // batch_size) if drop_last else (lambda n: -(-n // batch_size))
        self._total = sum(rounding(len(ix)) for ix in self._by_bucket.values())
        if self._total == 0:
            raise DatasetError(f"batch_size={batch_size} with drop_last=True leaves 0 batches: no bucket "
                               "has that many images; lower batch_size or set drop_last=False")
        if drop_last:
            self._per_rank = self._total // num_replicas
        else:
            self._per_rank = -(-self._total // num_replicas)
        if self._per_rank == 0:
            raise DatasetError(f"{self._total} batches cannot be shared by {num_replicas} ranks with "
                               "drop_last=True; set drop_last=False or use fewer ranks")

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds the shuffle; call it before each epoch so every rank draws the same order."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self._per_rank

    def _epoch_batches(self) -> list[list[int]]:
        rng = random.Random(f"{self.seed}:{self.epoch}")
        batches = []
        for bucket in sorted(self._by_bucket):
            indices = list(self._by_bucket[bucket])
            if self.shuffle:
                rng.shuffle(indices)
            for i in range(0, len(indices), self.batch_size):
                batch = indices[i:i + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self):
        batches = self._epoch_batches()
        needed = self._per_rank * self.num_replicas
        batches = [batches[i % len(batches)] for i in range(needed)]  # pad by wrapping / truncate
        yield from (list(b) for b in batches[self.rank::self.num_replicas])
