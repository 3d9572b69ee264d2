"""The CLIP tokenizer of a single-file SD1.x/SD2.x checkpoint (such files carry none), found offline:
a folder the user names, ComfyUI's ``comfy/sd1_tokenizer``, or the Hugging Face cache."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .backend import ModelLoadError

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

CLIP_L_REPO = "openai/clip-vit-large-patch14"  # its vocab.json + merges.txt serve SD1 and SD2 alike


def _bpe_folder(folder: Path) -> Path | None:
    """``folder`` or its ``tokenizer/`` sub-folder (a diffusers model), whichever has vocab.json + merges.txt."""
    for cand in (folder, folder / "tokenizer"):
        if (cand / "vocab.json").is_file() and (cand / "merges.txt").is_file():
            return cand
    return None


def _hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def _hf_cached_tokenizer(repo_id: str, cache_dir: Path) -> Path | None:
    """The cached snapshot folder of ``repo_id`` holding both BPE files, looked up offline."""
    from huggingface_hub import try_to_load_from_cache

    found = [try_to_load_from_cache(repo_id, name, cache_dir=str(cache_dir)) for name in ("vocab.json", "merges.txt")]
    if all(isinstance(f, str) for f in found) and Path(found[0]).parent == Path(found[1]).parent:
        return Path(found[0]).parent
    return None


def comfyui_tokenizer_dirs() -> list[Path]:
    """Where ComfyUI keeps the CLIP-L tokenizer: ``$COMFYUI_PATH`` then comfy-cli's ``~/comfy/ComfyUI``."""
    roots = [Path(os.environ["COMFYUI_PATH"])] if os.environ.get("COMFYUI_PATH") else []
    roots.append(Path.home() / "comfy" / "ComfyUI")
    return [r / "comfy" / "sd1_tokenizer" for r in roots]


def find_tokenizer(tokenizer: str | os.PathLike | None = None) -> Path:
    """The folder with the CLIP ``vocab.json`` + ``merges.txt`` to use, searched offline.

    ``tokenizer`` (a BPE folder or a diffusers model folder) wins and must be right; otherwise
    ComfyUI's ``comfy/sd1_tokenizer``, then the Hugging Face cache of ``openai/clip-vit-large-patch14``.
    """
    if tokenizer is not None:
        found = _bpe_folder(Path(tokenizer))
        if found is None:
            raise ModelLoadError(
                f"tokenizer folder {tokenizer} has no vocab.json + merges.txt (nor a tokenizer/ sub-folder "
                "with them); pass ComfyUI's comfy/sd1_tokenizer folder or a diffusers SD1.x/SD2.x model folder"
            )
        return found
    searched = comfyui_tokenizer_dirs()
    for cand in searched:
        if _bpe_folder(cand) == cand:
            return cand
    cache = _hf_cache_dir()
    found = _hf_cached_tokenizer(CLIP_L_REPO, cache)
    if found is not None:
        return found
    raise ModelLoadError(
        "no CLIP tokenizer found: a single-file checkpoint has none and LoRA Workbench ships none. Pass "
        "--tokenizer DIR (tokenizer=DIR) with a folder holding the CLIP vocab.json + merges.txt: ComfyUI keeps "
        "one in <ComfyUI>/comfy/sd1_tokenizer (set COMFYUI_PATH=<ComfyUI> and it is found by itself), and any "
        "diffusers SD1.x/SD2.x model folder has one in tokenizer/. Looked in: "
        + ", ".join(str(p) for p in searched) + f", and the Hugging Face cache {cache} ({CLIP_L_REPO})"
    )


def load_tokenizer(folder: str | os.PathLike, arch: str, max_length: int = 77) -> CLIPTokenizer:
    """CLIPTokenizer from a BPE folder, padded the way the text encoder was trained.

    ``model_max_length`` is pinned (ComfyUI's copy says 8192). SD1's CLIP pads with
    ``<|endoftext|>``; SD2's OpenCLIP pads with ``!`` (id 0), as ComfyUI's SD2 tokenizer does.
    """
    from transformers import CLIPTokenizer

    kw = {"pad_token": "!"} if arch == "sd2" else {}
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length, local_files_only=True, **kw)
