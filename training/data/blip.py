"""BLIP image captioning (sentences) from a local transformers folder; nothing reaches a model hub.

:class:`BlipCaptioner` runs transformers' ``BlipForConditionalGeneration`` (e.g. the files of
``Salesforce/blip-image-captioning-large`` in ComfyUI's ``models/blip/<name>/``): batched, beam or greedy
search, optional conditional start text ("a photo of"). A folder that lacks files is a
:class:`MissingModelError` naming the folder and the files to put there.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from ..config import Checks, is_int
from .captions import CaptionError, MissingModelError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

BLIP_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")
BLIP_IMAGE_PROCESSOR = ("preprocessor_config.json", "processor_config.json")
BLIP_TOKENIZER = ("tokenizer.json", "vocab.txt")
BLIP_EXAMPLE = ("Salesforce/blip-image-captioning-large: config.json, model.safetensors, "
                "preprocessor_config.json, tokenizer.json, tokenizer_config.json, vocab.txt")


@dataclass(frozen=True)
class BlipOptions:
    """How BLIP writes a caption."""

    prompt: str = ""  # conditional start text, e.g. "a photo of"; the caption continues it
    strip_prompt: bool = False  # drop the start text from the caption
    num_beams: int = 3  # 1 = greedy
    max_length: int = 40  # new tokens at most
    min_length: int = 5  # new tokens at least
    batch_size: int = 4  # images captioned at once

    def __post_init__(self) -> None:
        check = Checks("BLIP setting", CaptionError)
        check.need(is_int(self.num_beams) and 1 <= self.num_beams <= 64, "num_beams", self.num_beams,
                   "allowed: an integer from 1 (greedy) to 64")
        check.need(is_int(self.max_length) and 1 <= self.max_length <= 512, "max_length", self.max_length,
                   "allowed: an integer from 1 to 512")
        below_max = not is_int(self.max_length) or self.min_length <= self.max_length
        check.need(is_int(self.min_length) and self.min_length >= 0 and below_max, "min_length",
                   self.min_length, f"allowed: an integer from 0 to max_length={self.max_length}")
        check.need(is_int(self.batch_size) and self.batch_size >= 1, "batch_size", self.batch_size,
                   "allowed: an integer >= 1")
        check.raise_if_any()


def _hf_snapshot(folder: Path) -> Path:
    """A Hugging Face cache folder (``models--org--name``) -> its newest snapshot; else ``folder``."""
    if (folder / "config.json").is_file() or not (folder / "snapshots").is_dir():
        return folder
    snaps = [p for p in (folder / "snapshots").iterdir() if (p / "config.json").is_file()]
    return max(snaps, key=lambda p: p.stat().st_mtime) if snaps else folder


def find_blip_folder(path: str | os.PathLike) -> Path:
    """The BLIP model folder at ``path``, checked to hold a model, its processor and tokenizer."""
    folder = Path(path).expanduser()
    howto = f"put the files of a BLIP captioning model (e.g. {BLIP_EXAMPLE}) in {folder}"
    if not folder.is_dir():
        raise MissingModelError(f"BLIP model folder {folder} does not exist; {howto}")
    folder = _hf_snapshot(folder)
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    for group in (BLIP_WEIGHTS, BLIP_IMAGE_PROCESSOR, BLIP_TOKENIZER):
        if not any((folder / name).is_file() for name in group):
            missing.append(group[0] + (f" (or {group[1]})" if len(group) > 1 else ""))
    if missing:
        raise MissingModelError(f"BLIP model folder {folder} is missing {', '.join(missing)}; {howto}")
    return folder


def _torch_device(device: str | torch.device | None) -> torch.device:
    import torch

    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _strip_prompt(text: str, prompt: str) -> str:
    """``text`` without the leading words of ``prompt`` (compared word by word, ignoring case)."""
    want = re.findall(r"\w+", prompt.lower())
    words = list(re.finditer(r"\w+", text))
    if not want or [m.group().lower() for m in words[:len(want)]] != want:
        return text
    return text[words[len(want) - 1].end():].lstrip(" ,.:;")


class BlipCaptioner:
    """BLIP image captioning from a local transformers folder, on ``device`` in ``dtype``.

    ``dtype`` defaults to fp16 on CUDA and fp32 elsewhere.
    """

    kind = "blip"

    def __init__(self, path: str | os.PathLike, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        import torch
        from transformers import BlipForConditionalGeneration, BlipProcessor

        self.folder = find_blip_folder(path)
        self.device = _torch_device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        try:
            self.processor = BlipProcessor.from_pretrained(self.folder, local_files_only=True)
            model = BlipForConditionalGeneration.from_pretrained(self.folder, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CaptionError(f"cannot load the BLIP model in {self.folder} ({e}); the files must be those of "
                               f"a BLIP captioning model such as {BLIP_EXAMPLE}") from e
        self.model = model.to(self.device, self.dtype).eval()
        logger.info("BLIP loaded from %s on %s (%s)", self.folder, self.device, str(self.dtype).split(".")[-1])

    def to(self, device: str | torch.device) -> BlipCaptioner:
        """Move the model (e.g. to the CPU between runs, so the GPU is free)."""
        self.device = _torch_device(device)
        self.model.to(self.device)
        return self

    @property
    def nbytes(self) -> int:
        """Bytes the model's weights take (what moving it frees)."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def caption(self, images: list[Image.Image], options: BlipOptions | None = None) -> list[str]:
        """One caption per RGB image, in order."""
        import torch

        opts = options or BlipOptions()
        out: list[str] = []
        for i in range(0, len(images), opts.batch_size):
            batch = list(images[i:i + opts.batch_size])
            kwargs = {"images": batch, "return_tensors": "pt"}
            if opts.prompt.strip():
                kwargs["text"] = [opts.prompt.strip()] * len(batch)
            inputs = self.processor(**kwargs)
            generate = {"pixel_values": inputs["pixel_values"].to(self.device, self.dtype)}
            if "input_ids" in inputs:
                generate["input_ids"] = inputs["input_ids"].to(self.device)
                generate["attention_mask"] = inputs["attention_mask"].to(self.device)
            with torch.no_grad():
                ids = self.model.generate(**generate, num_beams=opts.num_beams, max_new_tokens=opts.max_length,
                                          min_new_tokens=opts.min_length)
            for text in self.processor.batch_decode(ids, skip_special_tokens=True):
                text = " ".join(text.split())
                out.append(_strip_prompt(text, opts.prompt) if opts.strip_prompt else text)
        return out
