"""Image/caption dataset of the LoRA trainer, with kohya sd-scripts semantics.

A dataset is a folder of images with optional caption sidecars (``name.txt`` / ``name.caption``).
Sub-folders named ``N_concept`` (``10_sks dog``) repeat their images N times per epoch. Images are
sorted into aspect-ratio buckets (kohya's BucketManager): every bucket has about
``resolution**2`` pixels, each image is scaled to *cover* its bucket and centre-cropped, so only
the bucket's rounding is cut away. A batch never mixes buckets.

Everything a user can get wrong is checked by :func:`scan_folder` / :func:`records_from_images`
before any model loads, and all problems are reported together in one :class:`DatasetError`.

Caption rules (:func:`build_caption`):

* ``[trigger]`` in a caption is replaced by the trigger word (every occurrence) and the trigger is
  then an ordinary tag: shuffled like the others unless it is among the first ``keep_tokens``.
* Otherwise the trigger is prefixed as the first tag, unless the caption already holds it as a word
  anywhere (case-insensitive: CLIP lower-cases text), so "a photo of sks dog" stays as written. A
  leading trigger (prefixed or written first) is *always kept in front*, and ``keep_tokens`` counts
  the caption's own tags after it.
* ``caption_dropout`` empties the whole caption, trigger included (as kohya does).
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".webp")
TRIGGER_PLACEHOLDER = "[trigger]"
_REPEATS_DIR = re.compile(r"^(\d+)_")
_MAX_LISTED = 10


class DatasetError(ValueError):
    """A bad dataset or dataset setting; the message names the problem, the files and the fix."""


def _listing(names: list[str], limit: int = _MAX_LISTED) -> str:
    """``a, b, c`` - at most ``limit`` names, then ``and N more``."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def default_min_bucket_side(resolution, step) -> int | None:
    """Half the resolution on the bucket grid, at most 256 (256 at 512 px and above, as kohya)."""
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (resolution, step)):
        return resolution  # reported as an invalid setting below
    return max(step, min(256, resolution // 2) // step * step)


@dataclass(frozen=True)
class DatasetConfig:
    """Where the images are and how they become (pixels, caption) training pairs."""

    path: str
    trigger: str = ""  # trigger word: replaces [trigger] in captions, else put first unless already there
    caption_extensions: tuple = (".txt", ".caption")  # caption sidecar extensions, the first found is read
    default_caption: str = ""  # used when an image has no caption sidecar
    repeats: int = 1  # for images not inside an ``N_concept`` sub-folder
    shuffle_tags: bool = False  # shuffle the caption's comma-separated tags each time an image is seen
    keep_tokens: int = 0  # first K caption tags never shuffled (a prefixed trigger is kept on top)
    caption_dropout: float = 0.0  # probability that the whole caption (trigger too) becomes ""
    tag_separator: str = ","  # what separates tags in a caption
    resolution: int = 512  # bucket area is resolution**2
    bucket_step: int = 64  # bucket sides are multiples of this (64 for SD; resolution and sides too)
    # The smallest bucket side, also the smallest image side accepted (buckets on or off). None: half
    # the resolution, at most 256 (kohya's default), so small resolutions keep aspect-ratio buckets.
    min_bucket_side: int | None = None  # smallest bucket side and image side (default: resolution/2, at most 256)
    max_bucket_side: int = 1024  # largest bucket side
    enable_buckets: bool = True  # off: every image becomes a resolution x resolution square
    flip: bool = False  # random horizontal flip augmentation

    def __post_init__(self):
        object.__setattr__(self, "path", os.fspath(self.path))
        object.__setattr__(self, "caption_extensions", tuple(self.caption_extensions))
        if self.min_bucket_side is None:
            object.__setattr__(self, "min_bucket_side", default_min_bucket_side(self.resolution, self.bucket_step))
        bad = []

        def need(ok: bool, name: str, allowed: str):
            if not ok:
                bad.append(f"{name}={getattr(self, name)!r} (allowed: {allowed})")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        need(is_int(self.repeats) and self.repeats >= 1, "repeats", "an integer >= 1")
        need(is_int(self.keep_tokens) and self.keep_tokens >= 0, "keep_tokens", "an integer >= 0")
        need(isinstance(self.caption_dropout, (int, float)) and 0.0 <= self.caption_dropout <= 1.0,
             "caption_dropout", "a number from 0 to 1")
        need(isinstance(self.tag_separator, str) and self.tag_separator.strip() != "",
             "tag_separator", "a non-blank string such as ','")
        exts = self.caption_extensions
        exts_ok = all(isinstance(e, str) and len(e) > 1 and e.startswith(".") for e in exts)
        need(exts_ok and len(exts) > 0, "caption_extensions",
             "extensions like ('.txt', '.caption')")
        step_ok = is_int(self.bucket_step) and self.bucket_step > 0
        need(step_ok, "bucket_step", "an integer > 0, usually 64")
        if step_ok:
            multiple = f"a positive multiple of bucket_step={self.bucket_step}"
            for name in ("resolution", "min_bucket_side", "max_bucket_side"):
                v = getattr(self, name)
                need(is_int(v) and v > 0 and v % self.bucket_step == 0, name, multiple)
            if not bad:
                need(self.min_bucket_side <= self.max_bucket_side, "min_bucket_side",
                     f"<= max_bucket_side={self.max_bucket_side}")
                if self.enable_buckets:  # the square bucket must exist
                    need(self.min_bucket_side <= self.resolution <= self.max_bucket_side, "resolution",
                         f"from min_bucket_side={self.min_bucket_side} "
                         f"to max_bucket_side={self.max_bucket_side}")
        if bad:
            raise DatasetError("invalid dataset setting: " + "; ".join(bad))


@dataclass(frozen=True)
class ImageRecord:
    """One training image: where it is, its raw caption, repeats, size after EXIF rotation, bucket."""

    path: str | None
    caption: str
    repeats: int
    width: int
    height: int
    concept: str  # the sub-folder (or folder) name, the key of ss_tag_frequency
    image: object = field(default=None, compare=False, repr=False)  # PIL image or HxWx3 float array
    bucket: tuple[int, int] | None = None  # (width, height)

    @property
    def name(self) -> str:
        return os.path.basename(self.path) if self.path else f"<in-memory {self.width}x{self.height}>"


# ---------------------------------------------------------------- buckets


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


def fit_to_bucket(image: Image.Image, bucket: tuple[int, int], flip: bool = False):
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


# ---------------------------------------------------------------- reading images


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB; transparency composited on white, 16-bit grey scaled (not clipped) to 8 bits."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        image = image.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    transparent = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if transparent:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _array_to_pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), "RGB")


def _open_oriented(record: ImageRecord) -> Image.Image:
    """The record's image as RGB, EXIF orientation applied."""
    if record.image is None:
        with Image.open(record.path) as f:
            image = ImageOps.exif_transpose(f)  # always a loaded copy, safe after close
    elif isinstance(record.image, Image.Image):
        image = ImageOps.exif_transpose(record.image)
    else:
        image = _array_to_pil(np.asarray(record.image))
    return _to_rgb(image)


def load_pixels(record: ImageRecord, cfg: DatasetConfig, flip: bool = False):
    """Pixels of ``record`` fitted to its bucket: ``(tensor[3,bh,bw] in [-1,1], meta)``.

    ``meta`` holds SDXL's size conditioning: ``original_size`` (h, w), ``crop_top_left``
    (top, left) and ``target_size`` (bh, bw).
    """
    bucket = record.bucket or assign_bucket(record.width, record.height, _buckets_for(cfg))
    image, (left, top), (w, h) = fit_to_bucket(_open_oriented(record), bucket, flip=flip)
    bw, bh = bucket
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    return pixels, {"original_size": (h, w), "crop_top_left": (top, left), "target_size": (bh, bw)}


# ---------------------------------------------------------------- scanning and validation


def _list_images(folder: Path, caption_exts: tuple):
    """``([(image, caption_file | None)], orphan_caption_files)`` for one folder, sorted."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    lowered = tuple(e.lower() for e in caption_exts)
    captions: dict[str, dict[str, Path]] = {}
    for p in files:
        if p.suffix.lower() in lowered:
            captions.setdefault(p.stem, {})[p.suffix.lower()] = p
    stems = {p.stem for p in images}
    paired = []
    for image in images:
        sidecars = captions.get(image.stem, {})
        paired.append((image, next((sidecars[e] for e in lowered if e in sidecars), None)))
    orphans = [p for stem, found in captions.items() if stem not in stems for p in found.values()]
    return paired, sorted(orphans)


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
        problems.append(f"sub-folders ask for 0 repeats: {_listing(zero)}; rename them N_concept with N >= 1")
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
    n_files = 0
    unused: list[str] = []
    for folder, repeats, concept in _concept_folders(root, cfg, problems):
        unused += _unused_files(folder, root, cfg.caption_extensions, deeper=folder != root)
        paired, lonely = _list_images(folder, cfg.caption_extensions)
        orphans += [str(p.relative_to(root)) for p in lonely]
        for image_path, caption_path in paired:
            n_files += 1
            rel = str(image_path.relative_to(root))
            try:
                with Image.open(image_path) as f:
                    f.load()  # decodes everything: truncated files raise here
                    width, height = ImageOps.exif_transpose(f).size
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
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
            records.append(ImageRecord(str(image_path), caption.strip(), repeats, width, height, concept))

    exts = "/".join(IMAGE_EXTENSIONS)
    if n_files == 0:
        problems.append(f"folder {root} has 0 images with extensions {exts} (sub-folders included); "
                        "put training images there")
    if unreadable:
        problems.append(f"{len(unreadable)} image(s) cannot be read (truncated, corrupt or not an image): "
                        f"{_listing(unreadable)}; re-export or remove them")
    if too_small:
        side = cfg.min_bucket_side
        problems.append(f"{len(too_small)} image(s) are smaller than the smallest bucket ({side}x{side} px, "
                        f"both sides must be >= {side}): {_listing(too_small)}; lower min_bucket_side "
                        "(and resolution) or upscale these images")
    if orphans:
        problems.append(f"{len(orphans)} caption file(s) have no matching image: {_listing(orphans)}; "
                        f"rename each to match an image ({exts}) or delete it")
    if bad_text:
        problems.append(f"{len(bad_text)} caption file(s) cannot be read as UTF-8 text: "
                        f"{_listing(bad_text)}; re-save them as UTF-8 text files")
    if problems:
        raise DatasetError(f"dataset {root} has {len(problems)} problem(s):\n- " + "\n- ".join(problems))

    if unused:
        logger.warning("dataset %s: %d file(s) not used: %s", root, len(unused), _listing(unused))
    records = assign_buckets(records, cfg)
    no_caption = sum(1 for r in records if not r.caption)
    logger.info("dataset %s: %d images, %d per epoch with repeats, %d buckets, %d without caption",
                root, len(records), sum(r.repeats for r in records),
                len({r.bucket for r in records}), no_caption)
    return records


def _split_batch(images) -> list:
    """A ComfyUI IMAGE batch [N,H,W,3] or a list of PIL images / [H,W,3] arrays -> list of items."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().float().numpy()
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise DatasetError(f"image batch has shape {list(images.shape)}; expected [N, H, W, 3] "
                               "(ComfyUI IMAGE layout, values 0..1)")
        return [images[i].astype(np.float32) for i in range(images.shape[0])]
    items = []
    for i, item in enumerate(images):
        if isinstance(item, Image.Image):
            items.append(item)
            continue
        array = item.detach().cpu().float().numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
        if array.ndim == 4 and array.shape[0] == 1:
            array = array[0]
        if array.ndim != 3 or array.shape[-1] != 3:
            raise DatasetError(f"image {i} has shape {list(array.shape)}; expected [H, W, 3] or a PIL image")
        items.append(array.astype(np.float32))
    return items


def records_from_images(images, captions, cfg: DatasetConfig, concept: str = "images") -> list[ImageRecord]:
    """Records for in-memory images: PIL images, or a float [N,H,W,3] batch in 0..1 (ComfyUI IMAGE).

    ``captions`` holds one caption for all images or exactly one per image; an empty caption falls
    back to ``cfg.default_caption``.
    """
    items = _split_batch(images)
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


# ---------------------------------------------------------------- captions


def _split_tags(text: str, sep: str) -> list[str]:
    return [t.strip() for t in text.split(sep) if t.strip()]


def _joiner(sep: str) -> str:
    return sep if sep[-1].isspace() else sep + " "


def _starts_with_trigger(caption: str, trigger: str, sep: str) -> bool:
    if not caption.lower().startswith(trigger.lower()):
        return False
    rest = caption[len(trigger):]
    return rest == "" or rest[0].isspace() or rest.startswith(sep)


def _holds_trigger(caption: str, trigger: str) -> bool:
    """The trigger appears as a word (or words) anywhere in the caption, in any case."""
    return re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption, re.IGNORECASE) is not None


def trained_caption(raw: str, cfg: DatasetConfig) -> str:
    """The caption as training writes it, before shuffling and dropout: the trigger in place."""
    fixed = dataclasses.replace(cfg, shuffle_tags=False, caption_dropout=0.0)
    return build_caption(raw, fixed, random.Random(0))


def build_caption(raw: str, cfg: DatasetConfig, rng: random.Random) -> str:
    """The caption used for one training step: trigger placed, tags shuffled, maybe dropped."""
    caption = (raw or "").strip()
    trigger = cfg.trigger.strip()
    sep = cfg.tag_separator
    n_front = 0  # leading tags that are the trigger: always kept in front
    if TRIGGER_PLACEHOLDER in caption:
        caption = caption.replace(TRIGGER_PLACEHOLDER, trigger)
        if not trigger:  # tidy the empty tag the placeholder leaves behind
            caption = _joiner(sep).join(_split_tags(caption, sep))
    elif trigger:
        if _starts_with_trigger(caption, trigger, sep):
            n_front = len(_split_tags(trigger, sep)) or 1
        elif not _holds_trigger(caption, trigger):
            n_front = len(_split_tags(trigger, sep)) or 1
            caption = f"{trigger}{_joiner(sep)}{caption}" if caption else trigger
    if cfg.shuffle_tags:
        tags = _split_tags(caption, sep)
        fixed = n_front + cfg.keep_tokens
        rest = tags[fixed:]
        rng.shuffle(rest)
        caption = _joiner(sep).join(tags[:fixed] + rest)
    if cfg.caption_dropout > 0 and rng.random() < cfg.caption_dropout:
        return ""
    return caption


# ---------------------------------------------------------------- dataset and sampler


def _starts(records: list[ImageRecord]) -> list[int]:
    """Dataset index of each record's first repeat: record i owns [starts[i], starts[i+1])."""
    starts, total = [], 0
    for r in records:
        starts.append(total)
        total += r.repeats
    return starts


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
        self._starts = _starts(self.records)
        self._length = self._starts[-1] + self.records[-1].repeats

    def __len__(self) -> int:
        return self._length

    def record_index(self, index: int) -> int:
        if not 0 <= index < self._length:
            raise IndexError(f"dataset index {index} out of range 0..{self._length - 1}")
        return bisect.bisect_right(self._starts, index) - 1

    def get(self, index: int, epoch_seed: int) -> dict:
        i = self.record_index(index)
        record = self.records[i]
        rng = random.Random(f"{epoch_seed}:{index}")
        flip = self.cfg.flip and rng.random() < 0.5
        pixels, meta = load_pixels(record, self.cfg, flip=flip)
        caption = build_caption(record.caption, self.cfg, rng)
        return {"pixels": pixels, "caption": caption, "meta": meta, "record_index": i}

    def __getitem__(self, index: int) -> dict:
        return self.get(index, 0)


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
            raise DatasetError(f"records have no bucket: {_listing(unbucketed)}; use the records from "
                               "scan_folder/records_from_images or assign_buckets(records, cfg)")
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0
        self._by_bucket: dict[tuple[int, int], list[int]] = {}
        for r, start in zip(records, _starts(records)):
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
    """sha256 over (path or pixel hash, size, mtime_ns, caption, repeats) of every record."""
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
        rows.append(json.dumps([key, size, mtime, r.caption, r.repeats]))
    return hashlib.sha256("\n".join(sorted(rows)).encode()).hexdigest()


def tag_frequency(records: list[ImageRecord], cfg: DatasetConfig | None = None) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency``: {concept: {tag: images with that tag}}, repeats ignored.

    With ``cfg`` the captions are counted as trained (trigger placed, no literal ``[trigger]``)."""
    freq: dict[str, Counter] = {}
    for r in records:
        caption = trained_caption(r.caption, cfg) if cfg is not None else r.caption
        freq.setdefault(r.concept, Counter()).update(set(_split_tags(caption, ",")))
    return {concept: dict(counts) for concept, counts in freq.items()}


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
