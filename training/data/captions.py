"""Caption text: the one place that says how tags are split and compared and where the trigger goes.

A caption is a list of tags split by the dataset's ``tag_separator`` (``,`` by default; a BLIP
sentence is one tag). The trainer (:func:`build_caption`) and the caption-file tools
(``caption_files``) use these same rules:

* ``[trigger]`` in a caption is replaced by the trigger word (every occurrence) and the trigger is
  then an ordinary tag: shuffled like the others unless it is among the first ``keep_tokens``.
* Otherwise the trigger is prefixed as the first tag, unless the caption already holds it as a word
  anywhere (case-insensitive: CLIP lower-cases text), so "a photo of sks dog" stays as written. A
  leading trigger (prefixed or written first) is *always kept in front*, and ``keep_tokens`` counts
  the caption's own tags after it. Caption files written by a captioner follow the same rule.
* ``caption_dropout`` empties the whole caption, trigger included (as kohya does).
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections import Counter
from typing import Iterable

from ..config import DatasetConfig
from ..errors import LoraWorkbenchError
from .images import ImageRecord

TRIGGER_PLACEHOLDER = "[trigger]"


class CaptionError(LoraWorkbenchError, ValueError):
    """A captioning problem; the message names the file or setting and the fix."""


class MissingModelError(CaptionError):
    """A model folder or file is not there; the message lists what to put where."""


# ---------------------------------------------------------------- tags


def split_tags(text: str | None, sep: str = ",") -> list[str]:
    """The non-empty tags of ``text``, stripped."""
    return [t.strip() for t in (text or "").split(sep) if t.strip()]


def _joiner(sep: str) -> str:
    return sep if sep[-1].isspace() else sep + " "


def join_tags(tags: list[str], sep: str = ",") -> str:
    """Tags joined by ``sep`` and a space (``a, b``)."""
    return _joiner(sep).join(tags)


def comma_list(items: str | Iterable[str]) -> tuple[str, ...]:
    """('a, b', 'c') or 'a, b, c' -> ('a', 'b', 'c'): comma lists as the CLI and widgets give them."""
    if isinstance(items, str):
        items = (items,)
    return tuple(tag for item in items for tag in split_tags(str(item)))


def tag_key(tag: str) -> str:
    """What makes two spellings the same tag: case, underscores and prompt escapes ignored."""
    return " ".join(tag.replace("\\(", "(").replace("\\)", ")").replace("_", " ").lower().split())


def dedupe_tags(tags: list[str]) -> list[str]:
    """Tags without repeats, the first spelling kept (``Long_Hair`` repeats ``long hair``)."""
    seen, out = set(), []
    for tag in tags:
        key = tag_key(tag)
        if key not in seen:
            seen.add(key)
            out.append(tag)
    return out


# ---------------------------------------------------------------- the trigger


def word_pattern(text: str) -> str:
    """A regex for ``text`` as a whole word (or words): no word character right before or after."""
    return r"(?<!\w)" + re.escape(text) + r"(?!\w)"


def holds_trigger(caption: str, trigger: str) -> bool:
    """The trigger appears as a word (or words) anywhere in the caption, in any case."""
    return re.search(word_pattern(trigger), caption, re.IGNORECASE) is not None


def starts_with_trigger(caption: str, trigger: str, sep: str = ",") -> bool:
    """The caption starts with the trigger (any case), followed by nothing, a space or ``sep``."""
    if not caption.lower().startswith(trigger.lower()):
        return False
    rest = caption[len(trigger):]
    return rest == "" or rest[0].isspace() or rest.startswith(sep)


def place_trigger(caption: str, trigger: str, sep: str = ",") -> str:
    """``[trigger]`` replaced by ``trigger``; else ``trigger`` put first unless the caption already holds it
    as a word, anywhere (case-insensitive). An empty trigger removes ``[trigger]`` without leaving an empty tag.
    """
    caption, trigger = caption.strip(), trigger.strip()
    if TRIGGER_PLACEHOLDER in caption:
        caption = caption.replace(TRIGGER_PLACEHOLDER, trigger)
        return caption if trigger else join_tags(split_tags(caption, sep), sep)
    if not trigger or starts_with_trigger(caption, trigger, sep) or holds_trigger(caption, trigger):
        return caption
    return f"{trigger}{_joiner(sep)}{caption}" if caption else trigger


# ---------------------------------------------------------------- the caption a step trains on


def build_caption(raw: str, cfg: DatasetConfig, rng: random.Random) -> str:
    """The caption used for one training step: trigger placed, tags shuffled, maybe dropped."""
    caption = (raw or "").strip()
    trigger = cfg.trigger.strip()
    sep = cfg.tag_separator
    placed = place_trigger(caption, trigger, sep)
    n_front = 0  # leading tags that are the trigger (prefixed or written first): always kept in front
    if trigger and TRIGGER_PLACEHOLDER not in caption and starts_with_trigger(placed, trigger, sep):
        n_front = len(split_tags(trigger, sep)) or 1
    caption = placed
    if cfg.shuffle_tags:
        tags = split_tags(caption, sep)
        fixed = n_front + cfg.keep_tokens
        rest = tags[fixed:]
        rng.shuffle(rest)
        caption = join_tags(tags[:fixed] + rest, sep)
    if cfg.caption_dropout > 0 and rng.random() < cfg.caption_dropout:
        return ""
    return caption


def trained_caption(raw: str, cfg: DatasetConfig) -> str:
    """The caption as training writes it, before shuffling and dropout: the trigger in place."""
    fixed = dataclasses.replace(cfg, shuffle_tags=False, caption_dropout=0.0)
    return build_caption(raw, fixed, random.Random(0))


def tag_frequency(records: list[ImageRecord], cfg: DatasetConfig | None = None) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency``: {concept: {tag: images with that tag}}, repeats ignored.

    With ``cfg`` the captions are counted as trained (trigger placed, no literal ``[trigger]``);
    tags are split at commas either way, as kohya counts them."""
    freq: dict[str, Counter] = {}
    for r in records:
        caption = trained_caption(r.caption, cfg) if cfg is not None else r.caption
        freq.setdefault(r.concept, Counter()).update(set(split_tags(caption, ",")))
    return {concept: dict(counts) for concept, counts in freq.items()}
