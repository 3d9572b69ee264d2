"""A1111 LoRA tags in prompts (``<lora:name:te:unet>``) and LoRA names resolved against the files on disk.

The rules follow A1111's built-in Lora extension: the tag body is split on ``:``; parts with ``=`` are
named (``te=``, ``unet=``, ``dyn=``, LBW's ``lbw=``/``start=``/``stop=``...), the others positional:
name, text-encoder weight (default 1), UNet weight (default: the text-encoder weight), dyn rank.
Named ``te=``/``unet=`` override the positional ones. ``<lyco:...>`` is read the same way.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from ..errors import LoraWorkbenchError

FORMS = "<lora:NAME>, <lora:NAME:WEIGHT>, <lora:NAME:TE_WEIGHT:UNET_WEIGHT> or <lora:NAME:WEIGHT:unet=W:lbw=PRESET>"
# Named arguments A1111's Lora extension and LBW understand; kept in LoraTag.extra except te/unet/lbw.
KNOWN_NAMED = ("te", "unet", "lbw", "dyn", "w", "lbwe", "start", "stop", "step", "x")
LORA_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

_OPEN = re.compile(r"<\s*(lora|lyco)\s*:", re.IGNORECASE)
_SPACES = re.compile(r"[ \t]{2,}")
_SPACE_BEFORE_COMMA = re.compile(r"[ \t]+,")
_COMMA_RUN = re.compile(r",(\s*,)+")


class PromptSyntaxError(LoraWorkbenchError, ValueError):
    """A malformed LoRA tag; the message quotes the tag and shows the accepted forms."""


class LoraNotFoundError(LoraWorkbenchError, ValueError):
    """A LoRA name that matches no available file; the message lists close matches."""


@dataclass(frozen=True)
class LoraTag:
    """One ``<lora:name:te:unet>`` tag. The strengths carry the names the LoRA loaders use (LoraLoader's
    strength_model / strength_clip, ``LoraUse``); A1111's tag gives the text-encoder weight first."""

    name: str
    clip_strength: float = 1.0
    model_strength: float = 1.0
    block_weights: str | None = None  # LBW spec (preset name or comma list), parsed per arch later
    kind: str = "lora"  # "lora" or "lyco"
    extra: dict[str, str] = field(default_factory=dict, compare=False)  # other named args (dyn, start ...)


def _number(text: str, what: str, tag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise PromptSyntaxError(
            f"LoRA tag {tag!r}: {what} {text.strip()!r} is not a number; write it as {FORMS}"
        )
    return value


def _parse_tag(kind: str, body: str, tag: str) -> LoraTag:
    positional: list[str] = []
    named: dict[str, str] = {}
    for part in body.split(":"):
        key, eq, value = part.partition("=")
        if eq:
            key = key.strip().lower()
            if key not in KNOWN_NAMED:
                raise PromptSyntaxError(
                    f"LoRA tag {tag!r}: unknown argument {key + '='!r}; known are "
                    f"{', '.join(k + '=' for k in KNOWN_NAMED)} ({FORMS})"
                )
            if key in named:
                raise PromptSyntaxError(f"LoRA tag {tag!r} gives {key}= twice; keep one")
            named[key] = value.strip()
        else:
            positional.append(part.strip())
    name = positional[0].strip("\"'").strip() if positional else ""
    if not name:
        raise PromptSyntaxError(f"LoRA tag {tag!r} has no LoRA name; write it as {FORMS}")
    if len(positional) > 4:
        raise PromptSyntaxError(
            f"LoRA tag {tag!r} has {len(positional) - 1} weights; at most a text-encoder weight, a UNet "
            f"weight and a dyn rank are allowed: {FORMS}"
        )
    te = _number(positional[1], "weight", tag) if len(positional) > 1 else 1.0
    if "te" in named:
        te = _number(named.pop("te"), "te=", tag)
    unet = _number(positional[2], "UNet weight", tag) if len(positional) > 2 else te
    if "unet" in named:
        unet = _number(named.pop("unet"), "unet=", tag)
    if len(positional) > 3:
        named.setdefault("dyn", positional[3])
    lbw = named.pop("lbw", None)
    if lbw is None and "w" in named:  # LBW's older spelling
        lbw = named.pop("w")
    if lbw is not None and not lbw:
        raise PromptSyntaxError(f"LoRA tag {tag!r} has an empty lbw=; give a preset (lbw=OUTD) or a comma list")
    return LoraTag(name, clip_strength=te, model_strength=unet, block_weights=lbw, kind=kind.lower(), extra=named)


def clean_prompt(text: str) -> str:
    """Tidy what removing tags leaves: runs of spaces, ``a , , b``, leading/trailing commas per line."""
    lines = []
    for line in text.split("\n"):
        line = _COMMA_RUN.sub(",", _SPACE_BEFORE_COMMA.sub(",", line))
        line = _SPACES.sub(" ", line).strip(" \t")
        line = line.strip(",").strip(" \t")
        lines.append(line)
    return "\n".join(lines).strip("\n")


def parse_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """``(prompt without the tags, the tags in order)``; malformed tags raise :class:`PromptSyntaxError`."""
    tags: list[LoraTag] = []
    pieces: list[str] = []
    pos = 0
    for m in _OPEN.finditer(prompt):
        end = prompt.find(">", m.end())
        nested = prompt.find("<", m.end())
        if end < 0 or 0 <= nested < end:
            stop = nested if 0 <= nested and (end < 0 or nested < end) else len(prompt)
            fragment = prompt[m.start():stop].rstrip()
            fragment = fragment if len(fragment) <= 60 else fragment[:57] + "..."
            raise PromptSyntaxError(f"LoRA tag {fragment!r} is not closed with '>'; write it as {FORMS}")
        tag = prompt[m.start():end + 1]
        tags.append(_parse_tag(m.group(1), prompt[m.end():end], tag))
        pieces.append(prompt[pos:m.start()])
        pos = end + 1
    pieces.append(prompt[pos:])
    return clean_prompt(" ".join(pieces)) if tags else prompt, tags


def _strip_ext(path: str) -> str:
    lower = path.lower()
    for ext in LORA_EXTENSIONS:
        if lower.endswith(ext):
            return path[: -len(ext)]
    return path


def _basename(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def resolve_lora_name(name: str, available: list[str], where: str | None = None) -> str:
    """The entry of ``available`` (paths relative to the LoRA folder) that ``name`` means.

    Tried in order, each case-sensitively then case-insensitively: the exact path; the path without
    its extension (``people/alice.v2``); the file name without folder and extension (``alice.v2``).
    A name matching several files at the first level that matches is ambiguous. Unknown or ambiguous
    names raise :class:`LoraNotFoundError`, listing up to 5 close matches and ``where`` (the folders searched).
    """
    target = name.strip().replace("\\", "/")
    norm = {a: a.replace("\\", "/") for a in available}
    keys = (lambda a: norm[a], lambda a: _strip_ext(norm[a]), lambda a: _basename(_strip_ext(norm[a])))
    for key in keys:
        for fold in (False, True):
            want = target.lower() if fold else target
            hits = [a for a in available if (key(a).lower() if fold else key(a)) == want]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise LoraNotFoundError(
                    f"LoRA name {name!r} matches {len(hits)} files: {sorted(hits)}; write the sub-folder "
                    "(e.g. <lora:folder/name:1>) to pick one"
                )
    place = f" in {where}" if where else ""
    if not available:
        raise LoraNotFoundError(f"LoRA {name!r} not found: there are no LoRA files{place}; put .safetensors files there")
    stems = {_basename(_strip_ext(norm[a])).lower(): a for a in available}
    stems.update({_strip_ext(norm[a]).lower(): a for a in available})
    close = difflib.get_close_matches(_basename(_strip_ext(target)).lower(), list(stems), n=10, cutoff=0.5)
    close += difflib.get_close_matches(_strip_ext(target).lower(), list(stems), n=10, cutoff=0.5)
    suggestions = list(dict.fromkeys(stems[c] for c in close))[:5]
    hint = f"; did you mean {', '.join(suggestions)}?" if suggestions else "; check the spelling"
    raise LoraNotFoundError(f"LoRA {name!r} not found among {len(available)} LoRA files{place}{hint}")
