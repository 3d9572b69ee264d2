"""Image/caption dataset of the LoRA trainer, with kohya sd-scripts semantics.

A dataset is a folder of images with optional caption sidecars (``name.txt`` / ``name.caption``).
Sub-folders named ``N_concept`` (``10_sks dog``) repeat their images N times per epoch. Images are
sorted into aspect-ratio buckets (``buckets``), and each step's caption is built by the caption rules
(``captions.build_caption``).

Everything a user can get wrong is checked by :func:`scan_folder` / :func:`records_from_images`
before any model loads, and all problems are reported together in one :class:`DatasetError`.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import logging
import os
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..config import DatasetConfig, DatasetError, listing
from .buckets import assign_buckets, load_pixels, repeat_starts
from .captions import build_caption
from .images import (IMAGE_EXTENSIONS, MASK_SUFFIX, UNREADABLE, ImageBatch, ImageRecord, list_images, read_file,
                     split_batch)

logger = logging.getLogger(__name__)

_REPEATS_DIR = re.compile(r"^(\d+)_")
_MAX_LISTED = 10


# ---------------------------------------------------------------- scanning and validation


# Image types PIL could open but the trainer does not read (animated, layered, or not in every PIL build).
_UNREAD_IMAGES = {".gif": "GIF", ".tif": "TIFF", ".tiff": "TIFF", ".avif": "AVIF", ".heic": "HEIC", ".heif": "HEIF",
                  ".jxl": "JPEG XL", ".jfif": "JFIF", ".psd": "PSD", ".svg": "SVG", ".ico": "ICO", ".tga": "TGA"}


def _unused_files(folder: Path, root: Path, caption_exts: tuple, deeper: bool) -> list[str]:
    """Files (and, below a concept folder, sub-folders) in ``folder`` that training will not read, each
    with the reason: ``'a.gif (GIF is not read; convert it to .png)'``."""
    lowered = tuple(e.lower() for e in caption_exts)
    stems_with: dict[str, list[str]] = {}
    out = []
    for p in sorted(folder.iterdir()):
        rel = str(p.relative_to(root))
        if p.name.startswith("."):
            continue
        if p.is_dir():
            if deeper:
                out.append(f"{rel}/ (sub-folders of a concept folder are not read)")
            continue
        ext = p.suffix.lower()
        if ext in IMAGE_EXTENSIONS:
            continue
        if ext in lowered:
            stems_with.setdefault(p.stem, []).append(ext)
        elif ext in _UNREAD_IMAGES:
            out.append(f"{rel} ({_UNREAD_IMAGES[ext]} is not read; convert it to .png/.jpg/.webp)")
        else:
            out.append(f"{rel} (not an image {'/'.join(IMAGE_EXTENSIONS)} or a caption {'/'.join(caption_exts)})")
    for stem, exts in stems_with.items():
        used = min(exts, key=lowered.index)
        out += [f"{(folder / (stem + e)).relative_to(root)} ({stem}{used} is the caption read)" for e in exts
                if e != used]
    return out


def _concept_folders(root: Path, cfg: DatasetConfig, problems: list[str]):
    """``[(folder, repeats, concept)]``: the root, then its sub-folders (one level)."""
    folders = [(root, cfg.repeats, root.name)]
    zero = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        match = _REPEATS_DIR.match(sub.name)
        repeats = int(match.group(1)) if match else cfg.repeats
        if repeats < 1:
            zero.append(sub.name)
            continue
        folders.append((sub, repeats, sub.name))
    if zero:
        problems.append(f"sub-folders ask for 0 repeats: {listing(zero)}; rename them N_concept with N >= 1")
    return folders


def scan_folder(cfg: DatasetConfig) -> list[ImageRecord]:
    """Records for every image in ``cfg.path`` and its ``N_concept`` sub-folders, buckets assigned.

    Reads every image fully once, so broken files fail here rather than mid-training.
    """
    if not cfg.path:
        raise DatasetError("no dataset folder given (path is empty); set it to the folder of training images")
    root = Path(cfg.path).expanduser()
    if not root.exists():
        raise DatasetError(f"dataset folder {root} does not exist; check the path")
    if not root.is_dir():
        raise DatasetError(f"dataset path {root} is a file, not a folder; "
                           "give the folder that holds the images")

    problems: list[str] = []
    unreadable, too_small, orphans, bad_text, records = [], [], [], [], []
    bad_masks: list[str] = []
    n_files = 0
    unused: list[str] = []
    for folder, repeats, concept in _concept_folders(root, cfg, problems):
        unused += _unused_files(folder, root, cfg.caption_extensions, deeper=folder != root)
        paired, lonely = list_images(folder, cfg.caption_extensions)
        orphans += [str(p.relative_to(root)) for p in lonely]
        masks: dict[str, Path] = {}
        if cfg.masked_loss:  # <name>_mask.png is the mask of <name>.*, not a training image
            stems = {p.stem for p, _ in paired}
            masks = {p.stem[: -len(MASK_SUFFIX)]: p for p, _ in paired
                     if p.stem.endswith(MASK_SUFFIX) and p.stem[: -len(MASK_SUFFIX)] in stems}
            paired = [(p, c) for p, c in paired if p not in masks.values()]
        for image_path, caption_path in paired:
            n_files += 1
            rel = str(image_path.relative_to(root))
            try:
                width, height = read_file(image_path).size
            except UNREADABLE as e:
                unreadable.append(f"{rel} ({e})")
                continue
            if min(width, height) < cfg.min_bucket_side:
                too_small.append(f"{rel} ({width}x{height})")
                continue
            caption = cfg.default_caption
            if caption_path is not None:
                try:
                    caption = caption_path.read_text(encoding="utf-8-sig")
                except (UnicodeDecodeError, OSError) as e:
                    bad_text.append(f"{caption_path.relative_to(root)} ({e})")
            mask = masks.get(image_path.stem)
            if mask is not None:
                try:
                    mask_size = read_file(mask).size
                except UNREADABLE as e:
                    bad_masks.append(f"{mask.relative_to(root)} cannot be read ({e})")
                    continue
                if mask_size != (width, height):
                    bad_masks.append(f"{mask.relative_to(root)} is {mask_size[0]}x{mask_size[1]} but {rel} is "
                                     f"{width}x{height}")
                    continue
            records.append(ImageRecord(str(image_path), caption.strip(), repeats, width, height, concept,
                                       mask_path=str(mask) if mask is not None else None))

    exts = "/".join(IMAGE_EXTENSIONS)
    if n_files == 0:
        problems.append(f"folder {root} has 0 images with extensions {exts} (sub-folders included); "
                        "put training images there")
    if unreadable:
        problems.append(f"{len(unreadable)} image(s) cannot be read (truncated, corrupt or not an image): "
                        f"{listing(unreadable)}; re-export or remove them")
    if too_small:
        side = cfg.min_bucket_side
        problems.append(f"{len(too_small)} image(s) are smaller than the smallest bucket ({side}x{side} px, "
                        f"both sides must be >= {side}): {listing(too_small)}; lower min_bucket_side "
                        "(and resolution) or upscale these images")
    if orphans:
        problems.append(f"{len(orphans)} caption file(s) have no matching image: {listing(orphans)}; "
                        f"rename each to match an image ({exts}) or delete it")
    if bad_masks:
        problems.append(f"{len(bad_masks)} loss mask(s) do not fit their image: {listing(bad_masks)}; a mask must "
                        "be a readable image of the same size as its image (white = learn, black = ignore)")
    if bad_text:
        problems.append(f"{len(bad_text)} caption file(s) cannot be read as UTF-8 text: "
                        f"{listing(bad_text)}; re-save them as UTF-8 text files")
    if problems:
        raise DatasetError(f"dataset {root} has {len(problems)} problem(s):\n- " + "\n- ".join(problems))

    if unused:
        logger.warning("dataset %s: %d file(s) not used: %s", root, len(unused), listing(unused))
    records = assign_buckets(records, cfg)
    no_caption = sum(1 for r in records if not r.caption)
    logger.info("dataset %s: %d images, %d per epoch with repeats, %d buckets, %d without caption",
                root, len(records), sum(r.repeats for r in records),
                len({r.bucket for r in records}), no_caption)
    return records


def class_config(cfg: DatasetConfig, class_prompt: str, path: str, flip: bool | None = None) -> DatasetConfig:
    """The dataset settings of DreamBooth class images beside the instance set ``cfg``: bucketed alike, no
    trigger, captions default to ``class_prompt``, never shuffled, dropped or repeated; ``flip`` as the
    instance set unless given."""
    return dataclasses.replace(cfg, path=path, trigger="", default_caption=class_prompt, shuffle_tags=False,
                               caption_dropout=0.0, repeats=1, flip=cfg.flip if flip is None else flip)


def records_from_images(images: ImageBatch, captions: str | list[str], cfg: DatasetConfig,
                        concept: str = "images") -> list[ImageRecord]:
    """Records for in-memory images: PIL images, or a float [N,H,W,3] batch in 0..1 (ComfyUI IMAGE).

    ``captions`` holds one caption for all images or exactly one per image; an empty caption falls
    back to ``cfg.default_caption``.
    """
    items = split_batch(images)
    if not items:
        raise DatasetError("got 0 images; connect at least one image")
    captions = [captions] if isinstance(captions, str) else list(captions)
    if len(captions) not in (1, len(items)):
        raise DatasetError(f"got {len(captions)} captions for {len(items)} images; give 1 caption "
                           f"(used for all) or exactly {len(items)}")
    if len(captions) == 1:
        captions = captions * len(items)
    problems, records = [], []
    for i, (item, caption) in enumerate(zip(items, captions)):
        if isinstance(item, Image.Image):
            width, height = ImageOps.exif_transpose(item).size
        else:
            height, width = item.shape[:2]
            if not np.isfinite(item).all():
                problems.append(f"image {i} contains NaN or infinite values; check the node that made it")
                continue
            if item.min() < -1e-3 or item.max() > 1 + 1e-3:
                problems.append(f"image {i} has values {item.min():.3g}..{item.max():.3g}, outside 0..1; "
                                "scale 0..255 data by 1/255")
                continue
        if min(width, height) < cfg.min_bucket_side:
            problems.append(f"image {i} is {width}x{height}, smaller than the smallest bucket "
                            f"({cfg.min_bucket_side} px per side); lower min_bucket_side or upscale it")
            continue
        text = str(caption).strip() or cfg.default_caption.strip()
        records.append(ImageRecord(None, text, cfg.repeats, width, height, concept, image=item))
    if problems:
        more = len(problems) - _MAX_LISTED
        raise DatasetError(f"{len(problems)} problem(s) with the input images:\n- "
                           + "\n- ".join(problems[:_MAX_LISTED] + ([f"and {more} more"] if more > 0 else [])))
    return assign_buckets(records, cfg)


# ---------------------------------------------------------------- the dataset


class ImageDataset:
    """Map-style dataset: index -> (pixels, caption, meta); each image appears ``repeats`` times.

    Randomness (flip, tag shuffle, caption dropout) depends only on ``(epoch_seed, index)``, so a
    resumed run sees the same samples.
    """

    def __init__(self, records: list[ImageRecord], cfg: DatasetConfig):
        if not records:
            raise DatasetError("the dataset has 0 images; scan a folder with images or pass some images")
        missing = [r for r in records if r.bucket is None]
        self.records = assign_buckets(records, cfg) if missing else list(records)
        self.cfg = cfg
        self._starts = repeat_starts(self.records)
        self._length = self._starts[-1] + self.records[-1].repeats

    def __len__(self) -> int:
        return self._length

    def record_index(self, index: int) -> int:
        """Which record dataset index ``index`` (one of its repeats) shows."""
        if not 0 <= index < self._length:
            raise IndexError(f"dataset index {index} out of range 0..{self._length - 1}")
        return bisect.bisect_right(self._starts, index) - 1

    def get(self, index: int, epoch_seed: int) -> dict:
        """``{pixels, caption, meta, record_index}`` of ``index`` as seen in the epoch of ``epoch_seed``."""
        i = self.record_index(index)
        record = self.records[i]
        rng = random.Random(f"{epoch_seed}:{index}")
        flip = self.cfg.flip and rng.random() < 0.5
        pixels, meta = load_pixels(record, self.cfg, flip=flip)
        caption = build_caption(record.caption, self.cfg, rng)
        return {"pixels": pixels, "caption": caption, "meta": meta, "record_index": i}

    def __getitem__(self, index: int) -> dict:
        return self.get(index, 0)


# ---------------------------------------------------------------- provenance


def _image_digest(image) -> str:
    h = hashlib.sha256()
    if isinstance(image, Image.Image):
        h.update(f"{image.mode}{image.size}".encode())
        h.update(image.tobytes())
    else:
        array = np.ascontiguousarray(image, dtype=np.float32)
        h.update(str(array.shape).encode())
        h.update(array.tobytes())
    return "mem:" + h.hexdigest()


def dataset_fingerprint(records: list[ImageRecord]) -> str:
    """sha256 over (path or pixel hash, size, mtime_ns, caption, repeats[, loss mask path, size, mtime_ns]) of
    every record."""
    rows = []
    for r in records:
        if r.path is None:
            key, size, mtime = _image_digest(r.image), 0, 0
        else:
            try:
                st = os.stat(r.path)
            except OSError as e:
                raise DatasetError(f"image {r.path} is gone ({e}); scan the folder again") from e
            key, size, mtime = r.path, st.st_size, st.st_mtime_ns
        row = [key, size, mtime, r.caption, r.repeats]
        if r.mask_path is not None:  # a changed loss mask changes the run (only then: older fingerprints hold)
            st = os.stat(r.mask_path)
            row += [r.mask_path, st.st_size, st.st_mtime_ns]
        rows.append(json.dumps(row))
    return hashlib.sha256("\n".join(sorted(rows)).encode()).hexdigest()


def dataset_summary(records: list[ImageRecord]) -> dict:
    """Numbers for LoRA metadata: images, images x repeats, bucket histogram, concepts."""
    buckets = Counter(f"{r.bucket[0]}x{r.bucket[1]}" for r in records if r.bucket)
    concepts: dict[str, dict] = {}
    for r in records:
        c = concepts.setdefault(r.concept, {"n_repeats": r.repeats, "img_count": 0})
        c["img_count"] += 1
    return {
        "num_images": len(records),
        "num_images_with_repeats": sum(r.repeats for r in records),
        "buckets": dict(sorted(buckets.items())),
        "concepts": concepts,
    }
