"""HTTP routes for the pack's frontend (``js/lora_workbench.js``).

``GET /lora_workbench/lora_info?name=<name in the loras list>``: what a LoRA file says about itself,
for the trigger words shown under a loader's ``lora_name`` widget and the LoRA Stack rows. Only the
safetensors header is read (a few KB, cached by path + size + mtime), never the weights.
"""

from __future__ import annotations

import logging
import os

from ..training.lora.metadata import trigger_words
from .comfy.loras import NONE

log = logging.getLogger(__name__)

ROUTE = "/lora_workbench/lora_info"
_CACHE: dict[tuple, dict] = {}


def read_metadata(path: str) -> dict[str, str]:
    """The ``__metadata__`` of a .safetensors file's header ({} for other files or no metadata).

    ``safe_open`` reads the header only (the tensors are mapped, never read) and refuses a header over
    its 100 MB limit; a file it cannot read is a ValueError naming it."""
    from safetensors import SafetensorError, safe_open

    if not path.endswith(".safetensors"):
        return {}
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e


def lora_info(name: str) -> dict | None:
    """Trigger words and training facts of a LoRA in the loras list; None when there is no such file."""
    import folder_paths

    if not name or name == NONE:
        return {"name": name, "trigger_words": [], "found": False}
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        return None
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _CACHE:
        meta = read_metadata(path)
        _CACHE[key] = {
            "name": name,
            "found": True,
            "trigger_words": trigger_words(meta),
            "title": meta.get("modelspec.title") or meta.get("ss_output_name"),
            "architecture": meta.get("modelspec.architecture"),
            "base_model": meta.get("ss_sd_model_name") or meta.get("ss_base_model_version"),
            "rank": meta.get("ss_network_dim"),
            "alpha": meta.get("ss_network_alpha"),
            "steps": meta.get("ss_max_train_steps"),
            "resolution": meta.get("modelspec.resolution") or meta.get("ss_resolution"),
        }
    return _CACHE[key]


async def _lora_info(request):
    from aiohttp import web

    name = request.query.get("name", "")
    try:
        info = lora_info(name)
    except (OSError, ValueError) as e:  # a broken file: say so, the loader will say more
        return web.json_response({"name": name, "found": True, "trigger_words": [], "error": str(e)})
    if info is None:  # an answer, not a 404: a workflow from another machine names files this one lacks
        return web.json_response({"name": name, "found": False, "trigger_words": [],
                                  "error": f"no LoRA {name!r} in models/loras"})
    return web.json_response(info)


def register() -> None:
    """Add the routes to ComfyUI's server (once; nothing when there is no server)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is None:
        return
    if any(getattr(r, "path", None) == ROUTE for r in server.routes):
        return
    server.routes.get(ROUTE)(_lora_info)
