"""WD14-style taggers (booru tags): a SmilingWolf-style ONNX model run with onnxruntime, local files only.

:class:`WD14Tagger` reads ``model.onnx`` + ``selected_tags.csv`` (or ComfyUI-WD14-Tagger's
``<name>.onnx`` + ``<name>.csv``, e.g. in ``models/wd14_tagger/``) and runs on the CPU or CUDA.
onnxruntime is imported only here, so the rest of the package works without it.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..config import Checks, is_int
from .captions import CaptionError, MissingModelError, comma_list, tag_key

logger = logging.getLogger(__name__)

WD14_MODEL, WD14_TAGS = "model.onnx", "selected_tags.csv"
WD14_EXAMPLE = "SmilingWolf/wd-vit-tagger-v3"
WD14_DEFAULT_SIZE = 448
GENERAL, CHARACTER, RATING = 0, 4, 9  # categories of selected_tags.csv

# Tags that are faces made of characters: their underscores are part of the face.
KAOMOJIS = frozenset({"0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3",
                      "6_9", ">_o", "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"})


@dataclass(frozen=True)
class TaggerOptions:
    """Which of a tagger's tags make the caption, and how they are written."""

    general_threshold: float = 0.35  # general tags with at least this confidence
    character_threshold: float = 0.85  # character tags with at least this confidence
    exclude_tags: tuple[str, ...] = ()  # never written ("long hair" also drops "long_hair")
    underscores_to_spaces: bool = True  # long_hair -> long hair (kaomoji such as ^_^ stay)
    escape_parentheses: bool = True  # gloves_(marvel) -> gloves \(marvel\), safe in prompts
    include_rating: bool = False  # put the most likely rating (general, sensitive ...) first
    character_tags_first: bool = False  # character tags before general ones (else all by confidence)
    max_tags: int = 0  # 0 = no limit
    batch_size: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude_tags", comma_list(self.exclude_tags))
        check = Checks("tagger setting", CaptionError)
        for name in ("general_threshold", "character_threshold"):
            v = getattr(self, name)
            check.need(isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0, name, v,
                       "allowed: a number from 0 to 1")
        check.need(is_int(self.max_tags) and self.max_tags >= 0, "max_tags", self.max_tags,
                   "allowed: an integer >= 0 (0 = no limit)")
        check.need(is_int(self.batch_size) and self.batch_size >= 1, "batch_size", self.batch_size,
                   "allowed: an integer >= 1")
        check.raise_if_any()


def format_tag(name: str, underscores_to_spaces: bool = True, escape_parentheses: bool = True) -> str:
    """A tagger's tag name as written in a caption: ``long_hair`` -> ``long hair`` (kaomoji kept),
    ``(`` -> ``\\(`` so a prompt does not read it as emphasis."""
    if underscores_to_spaces and name not in KAOMOJIS:
        name = name.replace("_", " ")
    if escape_parentheses:
        name = name.replace("(", r"\(").replace(")", r"\)")
    return name


def find_wd14_model(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(model.onnx, tags.csv)`` for a tagger folder, a ``.onnx`` file, or a name without ``.onnx``."""
    p = Path(path).expanduser()
    if not p.exists() and p.suffix != ".onnx" and p.with_name(p.name + ".onnx").is_file():
        p = p.with_name(p.name + ".onnx")  # ComfyUI-WD14-Tagger's layout, named without the extension
    if p.is_file():
        if p.suffix.lower() != ".onnx":
            raise MissingModelError(f"{p} is not an .onnx file; give a tagger folder (with {WD14_MODEL} and "
                                    f"{WD14_TAGS}) or a <name>.onnx beside its <name>.csv")
        tags = next((c for c in (p.with_suffix(".csv"), p.parent / WD14_TAGS) if c.is_file()), None)
        if tags is None:
            raise MissingModelError(f"tagger {p} has no tag list: put the tagger's {WD14_TAGS} next to it as "
                                    f"{p.with_suffix('.csv')}")
        return p, tags
    howto = (f"put a WD14 tagger's {WD14_MODEL} and {WD14_TAGS} (e.g. from {WD14_EXAMPLE}) in {p}, or "
             f"<name>.onnx + <name>.csv in {p.parent}")
    if not p.is_dir():
        raise MissingModelError(f"WD14 tagger folder {p} does not exist; {howto}")
    model = p / WD14_MODEL
    if not model.is_file():  # one <name>.onnx in the folder will do too
        onnx = sorted(p.glob("*.onnx"))
        model = onnx[0] if len(onnx) == 1 else model
    tags = next((c for c in (p / WD14_TAGS, model.with_suffix(".csv")) if c.is_file()), None)
    missing = [name for name, ok in ((WD14_MODEL, model.is_file()), (WD14_TAGS, tags is not None)) if not ok]
    if missing:
        raise MissingModelError(f"WD14 tagger folder {p} is missing {' and '.join(missing)}; {howto}")
    return model, tags


def read_tags_csv(path: Path) -> tuple[list[str], np.ndarray]:
    """Tag names and categories, one per model output, from a ``selected_tags.csv``."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise CaptionError(f"cannot read the tag list {path} ({e}); use the tagger's own {WD14_TAGS}") from e
    if not rows or not {"name", "category"} <= set(rows[0]):
        raise CaptionError(f"tag list {path} needs the columns tag_id,name,category,count (one row per tag); "
                           f"use the tagger's own {WD14_TAGS}")
    try:
        categories = np.array([int(r["category"]) for r in rows])
    except (TypeError, ValueError) as e:
        raise CaptionError(f"tag list {path} has a category that is not a number ({e})") from e
    return [r["name"] for r in rows], categories


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise CaptionError("the WD14 tagger needs onnxruntime: pip install onnxruntime (CPU) or "
                           "onnxruntime-gpu (CUDA), into the Python that runs LoRA Workbench") from e
    return onnxruntime


def _providers(ort, device) -> list:
    device = "auto" if device in (None, "") else str(device)
    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if device.startswith("cuda") or (device == "auto" and has_cuda):
        if not has_cuda:
            raise CaptionError(f"device={device!r} but this onnxruntime has no CUDA ({', '.join(available)}); "
                               "pip uninstall onnxruntime && pip install onnxruntime-gpu, or use device='cpu'")
        index = int(device.split(":")[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    if device not in ("auto", "cpu"):
        raise CaptionError(f"device={device!r} is not available to the tagger; use 'auto', 'cpu' or 'cuda'")
    return ["CPUExecutionProvider"]


class WD14Tagger:
    """A SmilingWolf-style ONNX tagger: NHWC float32 BGR 0..255 in, one sigmoid score per tag out."""

    kind = "wd14"

    def __init__(self, path: str | os.PathLike, device: str | None = "auto") -> None:
        self.model_path, self.tags_path = find_wd14_model(path)
        self.names, self.categories = read_tags_csv(self.tags_path)
        ort = _import_onnxruntime()
        providers = _providers(ort, device)
        try:
            self.session = ort.InferenceSession(str(self.model_path), providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime's errors (InvalidProtobuf ...) derive from Exception
            raise CaptionError(f"onnxruntime cannot load {self.model_path} ({e}); re-download the tagger") from e
        inp = self.session.get_inputs()[0]
        shape = list(inp.shape)
        if len(shape) != 4 or shape[3] != 3:
            raise CaptionError(f"{self.model_path} takes input of shape {shape}; a WD14 tagger takes "
                               "[batch, size, size, 3] (NHWC)")
        self.input_name = inp.name
        self.size = shape[1] if is_int(shape[1]) else WD14_DEFAULT_SIZE
        self.fixed_batch = shape[0] if is_int(shape[0]) else None
        n_out = self.session.get_outputs()[0].shape[-1]
        if is_int(n_out) and n_out != len(self.names):
            raise CaptionError(f"{self.tags_path} lists {len(self.names)} tags but {self.model_path} scores "
                               f"{n_out}; the two files come from different taggers")
        logger.info("WD14 tagger %s loaded (%d tags, %dpx, %s)", self.model_path, len(self.names), self.size,
                    self.session.get_providers()[0])

    def prepare(self, image: Image.Image) -> np.ndarray:
        """[size, size, 3] float32 BGR 0..255: padded to a square with white, then resized."""
        image = image.convert("RGB")
        side = max(image.size)
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        if side != self.size:
            square = square.resize((self.size, self.size), Image.Resampling.BICUBIC)
        return np.asarray(square, dtype=np.float32)[:, :, ::-1]

    def scores(self, images: list[Image.Image], batch_size: int = 4) -> np.ndarray:
        """[N, tags] confidences in 0..1."""
        step = self.fixed_batch or batch_size
        out = []
        for i in range(0, len(images), step):
            batch = np.stack([self.prepare(im) for im in images[i:i + step]])
            n = len(batch)
            if self.fixed_batch and n < step:  # a model exported for a fixed batch: pad the last one
                batch = np.concatenate([batch, np.repeat(batch[-1:], step - n, axis=0)])
            out.append(self.session.run(None, {self.input_name: np.ascontiguousarray(batch)})[0][:n])
        return np.concatenate(out) if out else np.zeros((0, len(self.names)), dtype=np.float32)

    def tags(self, images: list[Image.Image], options: TaggerOptions | None = None) -> list[list[tuple[str, float]]]:
        """Per image: the chosen ``(tag, confidence)``, most confident first (rating first if asked)."""
        opts = options or TaggerOptions()
        excluded = {tag_key(t) for t in opts.exclude_tags}
        cats = self.categories
        result = []
        for row in self.scores(images, opts.batch_size):
            chosen = []
            for cat, threshold in ((CHARACTER, opts.character_threshold), (GENERAL, opts.general_threshold)):
                for i in np.flatnonzero((cats == cat) & (row >= threshold)):
                    chosen.append((cat, float(row[i]), i))
            chosen.sort(key=lambda c: (c[0] != CHARACTER if opts.character_tags_first else 0, -c[1]))
            tags = []
            for _cat, score, i in chosen:
                if tag_key(self.names[i]) in excluded:
                    continue
                tags.append((format_tag(self.names[i], opts.underscores_to_spaces, opts.escape_parentheses), score))
            if opts.max_tags:
                tags = tags[:opts.max_tags]
            ratings = np.flatnonzero(cats == RATING)
            if opts.include_rating and len(ratings):
                best = ratings[np.argmax(row[ratings])]
                tags.insert(0, (format_tag(self.names[best], opts.underscores_to_spaces, opts.escape_parentheses),
                                float(row[best])))
            result.append(tags)
        return result

    def caption(self, images: list[Image.Image], options: TaggerOptions | None = None) -> list[str]:
        """One comma-separated tag list per image, in order."""
        return [", ".join(t for t, _ in tags) for tags in self.tags(images, options)]
