"""What each training step sees: micro-batches in a fixed order, their latents, captions and conditioning.

Every draw is a pure function of (seed, position), never of what ran before, so a resumed run that
skips the batches already trained lands exactly where an uninterrupted run would be.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from ..config import DatasetConfig, TrainConfig
from ..data.buckets import BucketBatchSampler, load_mask, load_pixels, size_conditioning
from ..data.captions import build_caption, trained_caption
from ..data.dataset import ImageDataset
from ..data.images import ImageRecord
from ..model.backend import Backend
from .distributed import Dist
from .interface import TrainCallbacks


@dataclass
class MicroBatch:
    idx: list[int]  # record indices (instance)
    flips: list[bool]
    captions: list[str]
    bucket: tuple[int, int]
    class_idx: list[int] = field(default_factory=list)


class Batches:
    """The data side of one run: instance images (``dataset``), optional class images for prior
    preservation (fitted into each instance batch's bucket, captioned ``class_prompt`` where they have
    no caption), latents cached when ``cfg.cache_latents``, prompt embeddings cached on request.

    Each global micro-batch holds ``batch_size * dist.world`` images; ``rank_slice`` says which are
    this process's, so N processes with batch b train exactly like one with batch N*b.
    """

    def __init__(self, backend: Backend, dataset: ImageDataset, dcfg: DatasetConfig, class_records: list[ImageRecord],
                 class_prompt: str, cfg: TrainConfig, dist: Dist, callbacks: TrainCallbacks):
        self.backend, self.dataset, self.dcfg, self.cfg, self.dist, self.cb = backend, dataset, dcfg, cfg, dist, callbacks
        self.records, self.class_records, self.class_prompt = dataset.records, class_records, class_prompt
        self._latents: dict[tuple, torch.Tensor] = {}
        self._masks: dict[tuple, torch.Tensor] = {}
        self._embeds: dict[str, Any] = {}

    def micro_batches(self) -> Iterator[MicroBatch]:
        """Endless global micro-batches in a deterministic order.

        Flip and caption draws depend only on (seed, epoch, dataset index) and the class images on
        (seed, cycle), so skipping k batches lands where a run that did them would be.
        """
        sampler = BucketBatchSampler(self.records, self.cfg.batch_size * self.dist.world, seed=self.cfg.seed,
                                     shuffle=True)
        n_class, class_pos = len(self.class_records), 0
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            for batch in sampler:
                mb = MicroBatch([], [], [], self.records[self.dataset.record_index(batch[0])].bucket)
                for index in batch:
                    rng = random.Random(f"{self.cfg.seed}:{epoch}:{index}")
                    i = self.dataset.record_index(index)
                    mb.idx.append(i)
                    mb.flips.append(bool(self.dcfg.flip and rng.random() < 0.5))
                    mb.captions.append(build_caption(self.records[i].caption, self.dcfg, rng))
                for _ in batch if n_class else ():
                    cycle, k = divmod(class_pos, n_class)
                    order = list(range(n_class))
                    random.Random(f"{self.cfg.seed}:class:{cycle}").shuffle(order)
                    mb.class_idx.append(order[k])
                    class_pos += 1
                yield mb
            epoch += 1

    def rank_slice(self, n: int) -> list[int]:
        """This rank's positions in a global batch of n (wrapping when n is not a multiple of world)."""
        b = self.cfg.batch_size
        if self.dist.world == 1:
            return list(range(n))
        return [(self.dist.rank * b + j) % n for j in range(b)]

    def _latent(self, key: tuple, record: ImageRecord, flip: bool) -> torch.Tensor:
        if self.cfg.cache_latents and key in self._latents:
            return self._latents[key]
        lat = self.backend.encode_images(load_pixels(record, self.dcfg, flip=flip)[0][None])[0]
        if self.cfg.cache_latents:
            self._latents[key] = lat
        return lat

    @torch.no_grad()
    def precache_latents(self) -> None:
        """Encode every image (each flip, each class image in each bucket) once, reporting progress."""
        flips = (False, True) if self.dcfg.flip else (False,)
        buckets = sorted({r.bucket for r in self.records}) if self.class_records else []
        total, done = len(self.records) * len(flips) + len(buckets) * len(self.class_records), 0
        for i, r in enumerate(self.records):
            for f in flips:
                self._latent(("i", i, f), r, f)
                done += 1
                self.cb.on_progress("caching latents", done, total)
        for bucket in buckets:
            for c, r in enumerate(self.class_records):
                self._latent(("c", c, bucket), dataclasses.replace(r, bucket=bucket), False)
                done += 1
                self.cb.on_progress("caching latents", done, total)

    def latents(self, mb: MicroBatch, pos: list[int]) -> torch.Tensor:
        """The latents of the samples at ``pos``, then (prior preservation) their class images, on the device."""
        lat = [self._latent(("i", mb.idx[p], mb.flips[p]), self.records[mb.idx[p]], mb.flips[p]) for p in pos]
        for p in pos if mb.class_idx else ():
            # Class images are fitted into the instance batch's bucket so both go through one forward.
            rec = dataclasses.replace(self.class_records[mb.class_idx[p]], bucket=mb.bucket)
            lat.append(self._latent(("c", mb.class_idx[p], mb.bucket), rec, False))
        return torch.stack(lat).to(self.backend.device)

    def masks(self, mb: MicroBatch, pos: list[int], latent_size: tuple[int, int]) -> torch.Tensor | None:
        """The loss weights [B, 1, h, w] in the order of ``latents`` (``masked_loss``; class images count
        everywhere), on the device; None when the dataset has masked loss off."""
        if not self.dcfg.masked_loss:
            return None
        out = []
        for p in pos:
            key = (mb.idx[p], mb.flips[p], latent_size)
            if key not in self._masks:  # small (one value per latent pixel): always cached
                self._masks[key] = load_mask(self.records[mb.idx[p]], self.dcfg, mb.flips[p], latent_size)
            out.append(self._masks[key])
        out += [torch.ones(1, *latent_size) for _ in (pos if mb.class_idx else ())]
        return torch.stack(out).to(self.backend.device)

    def captions(self, mb: MicroBatch, pos: list[int]) -> list[str]:
        """The captions in the order of ``latents``; a class image without one gets the class prompt."""
        captions = [mb.captions[p] for p in pos]
        for p in pos if mb.class_idx else ():
            captions.append(self.class_records[mb.class_idx[p]].caption or self.class_prompt)
        return captions

    def sizes(self, mb: MicroBatch, pos: list[int]) -> list[dict]:
        """Each sample's size/crop conditioning (SDXL), in the order of ``latents``."""
        sizes = [size_conditioning(self.records[mb.idx[p]], mb.bucket) for p in pos]
        for p in pos if mb.class_idx else ():
            sizes.append(size_conditioning(self.class_records[mb.class_idx[p]], mb.bucket))
        return sizes

    def fixed_captions(self) -> list[str] | None:
        """Every caption a step can train on, when they are a fixed set (no tag shuffling): each image's caption
        as trained, "" when captions drop out, and the class images' captions. None when shuffling makes them
        unbounded."""
        if self.dcfg.shuffle_tags:
            return None
        out = [trained_caption(r.caption, self.dcfg) for r in self.records]
        if self.dcfg.caption_dropout > 0:
            out.append("")
        out += [r.caption or self.class_prompt for r in self.class_records]
        return list(dict.fromkeys(out))

    def precache_conds(self, prompts: list[str]) -> None:
        """Encode ``prompts`` into the caption cache now (what :meth:`cond` with ``use_cache`` reads)."""
        for i in range(0, len(prompts), 8):
            self.cond(prompts[i:i + 8], use_cache=True)
            self.cb.on_progress("encoding captions", min(i + 8, len(prompts)), len(prompts))

    def encode_cached(self, prompts: list[str]) -> Any:
        """:meth:`cond` with the cache: prompts encoded before the text encoders were released stay usable."""
        return self.cond(prompts, use_cache=True)

    def cond(self, captions: list[str], use_cache: bool) -> Any:
        """The backend's conditioning for ``captions``; with ``use_cache`` each caption is encoded once
        (without gradients: only while the text encoder does not train)."""
        if not use_cache:
            return self.backend.encode_prompts(captions)
        missing = sorted({c for c in captions if c not in self._embeds})
        if missing:
            with torch.no_grad():
                enc = self.backend.encode_prompts(missing)
            for j, c in enumerate(missing):
                self._embeds[c] = enc[j : j + 1].detach()
        return self.backend.cat_cond([self._embeds[c] for c in captions])
