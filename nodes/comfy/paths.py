"""Where the nodes read and write: ComfyUI's model folders, its input folder, the training states."""

from __future__ import annotations

import os
from pathlib import Path

from ...training.config import DatasetError


def loras_dir() -> str:
    import folder_paths

    return folder_paths.get_folder_paths("loras")[0]


def model_file_path(folder_name: str, name: str, prefer: str | None = None) -> str:
    """models/<folder>/<name>.safetensors (ComfyUI's first folder of that kind, or the first whose own name is
    ``prefer``); sub-folders allowed, escaping the folder is not."""
    import folder_paths

    roots = folder_paths.get_folder_paths(folder_name)
    root = os.path.realpath(next((r for r in roots if os.path.basename(os.path.normpath(r)) == prefer), roots[0]))
    name = name.strip().replace("\\", "/")
    if not name or name.endswith("/"):
        raise ValueError(f"file name {name!r} is empty; type a name such as 'my_file' or 'folder/my_file'")
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    path = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root:
        raise ValueError(f"file name {name!r} leaves the {folder_name} folder {root}; use a plain name or a "
                         "sub-folder")
    return path


def diffusion_model_target_path(name: str) -> str:
    """models/diffusion_models/<name>.safetensors, which Load Diffusion Model lists (ComfyUI keeps the legacy
    models/unet first in that list)."""
    return model_file_path("diffusion_models", name, prefer="diffusion_models")


def lora_target_path(name: str) -> str:
    return model_file_path("loras", name)


def checkpoint_target_path(name: str) -> str:
    return model_file_path("checkpoints", name)


def input_folder(folder: str) -> str:
    """An absolute path, or a path under ComfyUI's input folder."""
    import folder_paths

    folder = folder.strip().strip('"')
    if not folder:
        raise DatasetError("no folder given: type a folder under ComfyUI's input folder or an absolute path, "
                           "or connect images")
    if os.path.isabs(folder):
        return folder
    return os.path.join(folder_paths.get_input_directory(), folder)


def states_dir() -> Path:
    """Where Train LoRA keeps resumable states (the output folder: states are not models)."""
    import folder_paths

    return Path(folder_paths.get_output_directory()) / "lora_workbench_states"
