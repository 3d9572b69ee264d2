"""Training images: the record of one image, listing a folder's images with their caption sidecars,
and decoding an image to RGB the one way training and captioning both read it.

An image is read with its EXIF rotation applied; transparency is composited on white and 16-bit
grey is scaled (not clipped) to 8 bits, so a PNG with alpha trains on what a viewer shows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from ..config import DatasetError

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".webp")
MASK_SUFFIX = "_mask"  # masked loss: <name>_mask.png is the loss mask of <name>.png / .jpg ...
# A ComfyUI IMAGE batch [N, H, W, 3] in 0..1, or a list of PIL images / [H, W, 3] arrays or tensors.
ImageBatch = Union[torch.Tensor, np.ndarray, Sequence[Union[Image.Image, np.ndarray, torch.Tensor]]]


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
    mask_path: str | None = None  # masked loss: the <name>_mask.png beside the image (None: its alpha, if any)

    @property
    def name(self) -> str:
        """The file name, or a label for an in-memory image (for messages)."""
        return os.path.basename(self.path) if self.path else f"<in-memory {self.width}x{self.height}>"


def list_images(folder: Path, caption_exts: tuple[str, ...]) -> tuple[list[tuple[Path, Path | None]], list[Path]]:
    """``([(image, caption_file | None)], orphan_caption_files)`` for one folder, sorted.

    Hidden files are skipped; of several sidecars of one image the first of ``caption_exts`` wins.
    """
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


# What a broken, truncated or hostile (decompression bomb) image file raises while it is read.
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def read_file(path: str | os.PathLike) -> Image.Image:
    """The image in ``path`` fully decoded (a truncated file raises here), EXIF rotation applied.

    A file that cannot be read raises one of :data:`UNREADABLE`."""
    with Image.open(path) as f:
        f.load()
        return ImageOps.exif_transpose(f)  # a copy, safe after close


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB; transparency composited on white, 16-bit grey scaled (not clipped) to 8 bits."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        image = image.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    transparent = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if transparent:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def array_to_pil(array: np.ndarray) -> Image.Image:
    """An [H, W, 3] float array in 0..1 (one ComfyUI IMAGE) as an 8-bit RGB image; values outside are clipped."""
    return Image.fromarray((np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), "RGB")


def open_image(record: ImageRecord) -> Image.Image:
    """The record's image as RGB (file or in-memory), EXIF orientation applied."""
    if record.image is None:
        image = read_file(record.path)
    elif isinstance(record.image, Image.Image):
        image = ImageOps.exif_transpose(record.image)
    else:
        image = array_to_pil(np.asarray(record.image))
    return to_rgb(image)


def split_batch(images: ImageBatch) -> list[Image.Image | np.ndarray]:
    """A ComfyUI IMAGE batch [N,H,W,3] or a list of PIL images / [H,W,3] arrays -> list of items.

    Items are PIL images or float32 [H, W, 3] arrays (values not checked here); a bad shape raises
    :class:`DatasetError`.
    """
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
