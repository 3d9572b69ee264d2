"""Caption files: the caption a captioner's text becomes, captioning a folder, bulk edits.

The tag and trigger rules are those of ``captions`` (the trainer's): ``[trigger]`` is replaced by the
trigger word, otherwise the trigger is put first unless the caption already holds it as a word, anywhere:
a caption file and the caption a step trains on agree.

:func:`caption_folder` writes one sidecar per image (``name.txt`` beside ``name.png``, kohya
``N_concept`` sub-folders included), keeps every existing caption unless asked to overwrite, and
then backs the old file up first (``name.txt.bak``, never replacing an older backup). Writes are
atomic. An unreadable image is reported by name and the others go on.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from PIL import Image

from .captions import CaptionError, comma_list, dedupe_tags, join_tags, place_trigger, split_tags, tag_key, word_pattern
from .images import IMAGE_EXTENSIONS, UNREADABLE, list_images, read_file, to_rgb
from ..config import CAPTION_EXTENSIONS
from ..fsutil import atomic_write, unique_path

logger = logging.getLogger(__name__)

class Captioner(Protocol):
    """What :func:`caption_folder` needs: one caption per RGB image, in order."""

    def caption(self, images: list[Image.Image], options: Any) -> list[str]:
        """One caption per image of ``images``, in the same order."""
        ...


# ---------------------------------------------------------------- caption text


@dataclass(frozen=True)
class CaptionFormat:
    """How a captioner's text becomes the caption written: prefix + text + suffix, trigger placed."""

    trigger: str = ""  # first, or where the text/prefix/suffix says [trigger]
    prefix: str = ""  # e.g. "photo of [trigger]," or "masterpiece"
    suffix: str = ""  # e.g. "high quality" after the caption
    dedupe: bool = True  # drop repeated tags (case and _ / space ignored), first kept

    def apply(self, text: str) -> str:
        """The caption to write for a captioner's ``text``: prefix, text, suffix joined, trigger placed."""
        parts = [p.strip().strip(",").strip() for p in (self.prefix, text, self.suffix)]
        caption = place_trigger(", ".join(p for p in parts if p), self.trigger)
        return join_tags(dedupe_tags(split_tags(caption))) if self.dedupe else caption


# ---------------------------------------------------------------- images and sidecars


def find_images(folder: str | os.PathLike, subfolders: bool = True) -> list[Path]:
    """The images of ``folder`` (and its sub-folders, one level, as the dataset reads them), sorted."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise CaptionError(f"folder {root} does not exist or is not a folder; check the path")
    folders = [root]
    if subfolders:
        folders += sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [image for f in folders for image, _caption in list_images(f, CAPTION_EXTENSIONS)[0]]


def sidecars(image: Path, extensions: tuple[str, ...] = CAPTION_EXTENSIONS) -> list[Path]:
    """The caption files an image already has."""
    return [p for p in (image.with_suffix(e) for e in extensions) if p.is_file()]


def read_image(path: Path) -> Image.Image:
    """RGB, EXIF rotation applied, transparency on white; a broken file raises ``CaptionError``."""
    try:
        return to_rgb(read_file(path))
    except UNREADABLE as e:
        raise CaptionError(f"{path.name} cannot be read ({e})") from e


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8-sig").strip()


def _write_text(path: Path, text: str, overwrite: bool) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")

    atomic_write(path, write, overwrite=overwrite)


def backup(path: Path) -> Path:
    """Copy ``path`` to ``path.bak`` (``name.txt_00001.bak`` ... if taken); returns the backup."""
    target = unique_path(path.with_name(path.name + ".bak"))
    atomic_write(target, lambda tmp: shutil.copyfile(path, tmp))
    return target


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _table(rows: list[tuple[str, str]], limit: int) -> str:
    lines = ["file | caption"] + [f"{name} | {text}" for name, text in rows[:limit]]
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more")
    return "\n".join(lines)


# ---------------------------------------------------------------- captioning a folder


@dataclass
class CaptionReport:
    """What :func:`caption_folder` did, image by image (paths are the images)."""

    folder: Path
    images: list[Path] = field(default_factory=list)  # every image, folder order
    written: list[Path] = field(default_factory=list)  # captioned now
    kept: list[Path] = field(default_factory=list)  # had a caption, left alone
    failed: dict[Path, str] = field(default_factory=dict)  # image -> why it was skipped
    captions: dict[Path, str] = field(default_factory=dict)  # image -> its caption (written or kept)
    backups: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the user: counts captioned, kept, backed up, and each failure with its reason."""
        text = f"{len(self.images)} image(s) in {self.folder}: {len(self.written)} captioned, {len(self.kept)} kept"
        if self.kept:
            text += " (already captioned; set overwrite to replace)"
        if self.backups:
            text += f", {len(self.backups)} old caption(s) backed up as .bak"
        if self.failed:
            text += f", {len(self.failed)} failed: " + "; ".join(
                f"{_rel(p, self.folder)}: {why}" for p, why in self.failed.items())
        return text

    def table(self, limit: int = 100) -> str:
        """``file | caption`` per image; kept captions marked ``(kept)``, failures ``FAILED``."""
        rows = []
        for image in self.images:
            if image in self.failed:
                text = f"FAILED: {self.failed[image]}"
            else:
                text = ("(kept) " if image in self.kept else "") + self.captions.get(image, "")
            rows.append((_rel(image, self.folder), text))
        return _table(rows, limit)


def caption_folder(folder: str | os.PathLike, captioner: Captioner | Callable[[], Captioner], options: Any = None,
                   fmt: CaptionFormat = CaptionFormat(), overwrite: bool = False,
                   extension: str = ".txt", subfolders: bool = True, batch_size: int | None = None,
                   progress: Callable[[int, int], None] | None = None) -> CaptionReport:
    """Caption every image of ``folder`` that has no caption (all of them with ``overwrite``).

    ``captioner`` has ``caption(images, options) -> list[str]``; it may also be a function that
    returns one, called only if some image needs a caption (so a fully captioned folder loads no
    model). ``progress(done, total)`` is called after each image.
    """
    from tqdm.auto import tqdm

    if not (extension.startswith(".") and len(extension) > 1):
        raise CaptionError(f"extension={extension!r}; use a caption extension such as '.txt'")
    root = Path(folder).expanduser()
    report = CaptionReport(root, images=find_images(root, subfolders))
    if not report.images:
        raise CaptionError(f"folder {root} has 0 images with extensions {'/'.join(IMAGE_EXTENSIONS)}"
                           f"{' (sub-folders included)' if subfolders else ''}; put the images to caption there")
    extensions = (extension, *(e for e in CAPTION_EXTENSIONS if e != extension))
    todo, claimed = [], {}
    for image in report.images:
        existing = sidecars(image, extensions)
        target = image.with_suffix(extension)
        if target in claimed:  # a.png and a.jpg would share a.txt
            report.failed[image] = (f"shares the caption file {target.name} with {claimed[target].name}; "
                                    "rename one of them")
            logger.warning("skipped %s: %s", image.name, report.failed[image])
        elif existing and not overwrite:
            report.kept.append(image)
            try:
                report.captions[image] = _read_text(existing[0])
            except (OSError, UnicodeDecodeError) as e:
                report.captions[image] = f"(unreadable: {e})"
        else:
            todo.append(image)
        claimed.setdefault(target, image)
    logger.info("captioning %d of %d image(s) in %s (%d kept)", len(todo), len(report.images), root,
                len(report.kept))
    if todo and not hasattr(captioner, "caption"):
        captioner = captioner()  # load the model only now that it is needed
    step = batch_size or getattr(options, "batch_size", 4)
    done = 0
    with tqdm(total=len(todo), desc="captioning", unit="image", disable=not todo) as bar:
        for i in range(0, len(todo), step):
            loaded = {}
            for image in todo[i:i + step]:
                try:
                    loaded[image] = read_image(image)
                except CaptionError as e:
                    report.failed[image] = str(e).removeprefix(f"{image.name} ")
                    logger.warning("skipped %s", e)
            texts = captioner.caption(list(loaded.values()), options) if loaded else []
            if len(texts) != len(loaded):
                raise RuntimeError(f"the captioner returned {len(texts)} captions for {len(loaded)} images")
            for image, text in zip(loaded, texts):
                caption = fmt.apply(text)
                target = image.with_suffix(extension)
                for old in sidecars(image, extensions):
                    report.backups.append(backup(old))
                    if old != target:
                        old.unlink()  # a .caption the new .txt replaces: only its backup stays
                _write_text(target, caption, overwrite=overwrite)
                report.written.append(image)
                report.captions[image] = caption
                logger.debug("%s: %s", _rel(target, root), caption)
            n = len(todo[i:i + step])
            done += n
            bar.update(n)
            if progress is not None:
                progress(done, len(todo))
    logger.info("captioned %s", report.summary())
    return report


# ---------------------------------------------------------------- editing captions


def _matches(tag: str, patterns: list[str]) -> bool:
    """Whether ``tag`` is one of ``patterns`` (same tag_key; ``*`` / ``?`` as wildcards)."""
    key = tag_key(tag)
    for pattern in map(tag_key, patterns):
        wildcard = "*" in pattern or "?" in pattern
        if key == pattern or (wildcard and fnmatch.fnmatchcase(key, pattern)):
            return True
    return False


@dataclass(frozen=True)
class CaptionEdit:
    """A bulk change to captions, applied in the order of the fields."""

    find: str = ""  # text to replace (plain text, or a regular expression with regex=True)
    replace: str = ""
    regex: bool = False
    old_trigger: str = ""  # this word (whole word, any case) becomes ``trigger`` (or goes, if trigger is "")
    remove_tags: tuple[str, ...] = ()  # "long hair", "*background" (* and ? are wildcards)
    add_front: tuple[str, ...] = ()  # put first (moved there if already present)
    add_back: tuple[str, ...] = ()  # appended unless already present
    trigger: str = ""  # at [trigger], else first unless the caption already has it
    dedupe: bool = False  # also drop repeated tags

    def __post_init__(self):
        for name in ("remove_tags", "add_front", "add_back"):
            object.__setattr__(self, name, comma_list(getattr(self, name)))
        if self.regex and self.find:
            try:
                re.compile(self.find)
            except re.error as e:
                raise CaptionError(f"find={self.find!r} is not a valid regular expression ({e}); fix it or turn "
                                   "regex off to replace the plain text") from e

    def apply(self, caption: str) -> str:
        """The edited caption: find/replace, trigger swap, tag edits, then the trigger added unless present."""
        text = caption.strip()
        if self.find:
            text = re.sub(self.find, self.replace, text) if self.regex else text.replace(self.find, self.replace)
        if self.old_trigger.strip():
            new = re.sub(word_pattern(self.old_trigger.strip()), lambda _m: self.trigger.strip(), text, flags=re.IGNORECASE)
            if new != text and not self.trigger.strip():  # removed: no empty tag or double space left
                new = join_tags([" ".join(t.split()) for t in split_tags(new)])
            text = new
        tags = split_tags(text)
        edited = [t for t in tags if not _matches(t, list(self.remove_tags))]
        front = list(self.add_front)
        edited = front + [t for t in edited if not _matches(t, front)]
        edited += [t for t in self.add_back if not _matches(t, edited)]
        if self.dedupe:
            edited = dedupe_tags(edited)
        if edited != tags:  # tags untouched: keep the text as it was written
            text = join_tags(edited)
        return place_trigger(text, self.trigger)  # not added twice (e.g. where old_trigger was)


@dataclass
class EditReport:
    """What an edit changed: ``(name, old, new)`` for each changed caption."""

    changes: list[tuple[str, str, str]] = field(default_factory=list)
    unchanged: int = 0
    dry_run: bool = False
    backups: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        """One line: how many captions changed (or would, in a dry run) and how many did not."""
        verb = "would change" if self.dry_run else "changed"
        return f"{verb} {len(self.changes)} caption(s), {self.unchanged} unchanged" + (
            " (dry run: nothing written)" if self.dry_run else "")

    def table(self, limit: int = 100) -> str:
        """A ``file | caption`` table of the first ``limit`` changes as ``old  ->  new``, plus a count of the rest."""
        return _table([(name, f"{old}  ->  {new}") for name, old, new in self.changes], limit)


def edit_captions(captions: list[str], edit: CaptionEdit) -> tuple[list[str], EditReport]:
    """``edit`` applied to each caption string."""
    out, report = [], EditReport()
    for i, caption in enumerate(captions):
        new = edit.apply(caption)
        out.append(new)
        if new != caption.strip():
            report.changes.append((str(i), caption.strip(), new))
        else:
            report.unchanged += 1
    return out, report


def edit_caption_folder(folder: str | os.PathLike, edit: CaptionEdit, dry_run: bool = False, make_backup: bool = True,
                        subfolders: bool = True) -> EditReport:
    """``edit`` applied to the caption file of every image in ``folder`` (``.txt``, else ``.caption``).

    ``dry_run`` only reports; otherwise each changed file is backed up (``make_backup``) and
    rewritten atomically. Images without a caption file are left alone.
    """
    root = Path(folder).expanduser()
    report = EditReport(dry_run=dry_run)
    for image in find_images(root, subfolders):
        files = sidecars(image)
        if not files:
            continue
        path = files[0]
        try:
            old = _read_text(path)
        except (OSError, UnicodeDecodeError) as e:
            raise CaptionError(f"caption file {path} cannot be read as UTF-8 text ({e}); re-save it as UTF-8") from e
        new = edit.apply(old)
        if new == old:
            report.unchanged += 1
            continue
        report.changes.append((_rel(path, root), old, new))
        if not dry_run:
            if make_backup:
                report.backups.append(backup(path))
            _write_text(path, new, overwrite=True)
    logger.info("edit captions in %s: %s", root, report.summary())
    return report
