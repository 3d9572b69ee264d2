"""Captioners by name: BLIP (sentences, ``blip``) and WD14-style taggers (booru tags, ``wd14``).

Nothing here reaches a model hub: a captioner loads from a folder the user filled (ComfyUI's
``models/blip/<name>/`` and ``models/wd14_tagger/<name>/``, or any path from the CLI), and a folder
that lacks files is an error naming the folder and the files to put there.

Both have ``caption(images, options) -> list[str]`` over RGB PIL images. Trigger words, prefixes
and caption files are ``captions``' and ``caption_files``' business.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from .blip import BlipCaptioner, BlipOptions, find_blip_folder
from .captions import CaptionError
from .wd14 import TaggerOptions, WD14Tagger, find_wd14_model

CAPTIONERS = ("blip", "wd14")


def _unknown(kind: str) -> CaptionError:
    return CaptionError(f"unknown captioner {kind!r}; use one of {', '.join(CAPTIONERS)}")


def check_model(kind: str, path: str | os.PathLike) -> None:
    """Raise :class:`MissingModelError` (naming the files and where they go) unless ``path`` holds a model."""
    if kind == "blip":
        find_blip_folder(path)
    elif kind == "wd14":
        find_wd14_model(path)
    else:
        raise _unknown(kind)


def load_captioner(kind: str, path: str | os.PathLike, device: str | None = None) -> BlipCaptioner | WD14Tagger:
    """A :class:`BlipCaptioner` (``kind='blip'``) or :class:`WD14Tagger` (``'wd14'``) from ``path``.

    ``device`` None: CUDA when there is one, else the CPU."""
    if kind == "blip":
        return BlipCaptioner(path, device=device)
    if kind == "wd14":
        return WD14Tagger(path, device=device or "auto")
    raise _unknown(kind)


def options_for(kind: str, **values: Any) -> BlipOptions | TaggerOptions:
    """The options dataclass of ``kind`` with the given fields set (other keys and None values are ignored)."""
    cls = {"blip": BlipOptions, "wd14": TaggerOptions}.get(kind)
    if cls is None:
        raise _unknown(kind)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names and v is not None})
