"""Boot ComfyUI in this process on the CPU, load our pack as ComfyUI does, run API prompts.

This follows what ComfyUI's ``main.py`` does at start-up, using only its public settings and
entry points: ``comfy.cli_args.args`` (``cpu``, ``base_directory``) set before ``folder_paths``
and ``comfy.model_management`` are imported, a ``server.PromptServer`` (so nodes can reach
``PromptServer.instance``; its HTTP side is never started), ``nodes.init_extra_nodes`` (which
scans ``custom_nodes/`` and calls our ``comfy_entrypoint``), the global progress-bar hook, and
``execution.PromptExecutor`` for prompts. Nothing of ComfyUI is patched.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # the pack: its __init__.py is what ComfyUI imports
PACK_FOLDER_NAME = "lora-workbench"
BASE_SUBFOLDERS = ("models/checkpoints", "models/loras", "input", "output", "custom_nodes")


def make_base_directory(base_directory: Path, repo_root: Path) -> Path:
    """Lay out a ComfyUI ``--base-directory`` with our repo linked into ``custom_nodes``.

    Returns the pack's path inside ``custom_nodes``.
    """
    for sub in BASE_SUBFOLDERS:
        (base_directory / sub).mkdir(parents=True, exist_ok=True)
    pack_dir = base_directory / "custom_nodes" / PACK_FOLDER_NAME
    if not pack_dir.exists():
        pack_dir.symlink_to(repo_root, target_is_directory=True)
    return pack_dir


@dataclass
class PromptRun:
    """What one prompt produced, as the HTTP API would report it."""

    prompt_id: str
    success: bool
    outputs: dict  # node id -> ui output, e.g. {"9": {"images": [{"filename": ..., "type": "output"}]}}
    history: dict  # the executor's history_result: {"outputs": ..., "meta": ...}
    status_messages: list  # (event, data) from the executor: execution_start/cached/success/error
    messages: list = field(default_factory=list)  # (event, data) sent to the client via send_sync

    def events(self, name: str) -> list:
        return [data for event, data in self.messages if event == name]

    def error(self) -> dict | None:
        for event, data in self.status_messages:
            if event in ("execution_error", "execution_interrupted"):
                return {"event": event, **data}
        return None


class PromptInvalid(ValueError):
    """ComfyUI's validate_prompt refused the prompt (the HTTP API would answer 400)."""

    def __init__(self, error: dict, node_errors: dict):
        super().__init__(f"{error.get('message')}: {error.get('details')} {node_errors}")
        self.error = error
        self.node_errors = node_errors


@dataclass
class ComfyHost:
    """ComfyUI running in this process; our pack loaded from ``custom_nodes/lora-workbench``."""

    comfyui_path: Path
    base_directory: Path
    pack_dir: Path
    loop: asyncio.AbstractEventLoop
    server: object  # server.PromptServer
    executor: object  # execution.PromptExecutor, kept for the session like main.py's worker
    pack_import_line: str  # ComfyUI's "Import times for custom nodes" line for our pack

    def run_prompt(self, prompt: dict, client_id: str = "lw-host-test") -> PromptRun:
        """Validate and execute an API-format prompt, as POST /prompt + the queue worker do.

        Node outputs are cached across calls like in a running server (same executor).
        Raises PromptInvalid when validation fails; a node failure returns success=False.
        """
        import execution

        prompt_id = str(uuid.uuid4())
        valid, error, outputs_to_execute, node_errors = self.loop.run_until_complete(
            execution.validate_prompt(prompt_id, prompt, None)
        )
        if not valid or node_errors:
            # ComfyUI would still run the valid outputs of a partly invalid prompt; a test asking for
            # the whole graph wants to hear about every invalid node.
            raise PromptInvalid(error or {"message": "some outputs are invalid", "details": ""}, node_errors)
        self.drain_messages()
        self.server.last_prompt_id = prompt_id  # as main.py's prompt_worker does
        self.loop.run_until_complete(
            self.executor.execute_async(prompt, prompt_id, {"client_id": client_id}, outputs_to_execute)
        )
        history = self.executor.history_result
        return PromptRun(
            prompt_id=prompt_id,
            success=self.executor.success,
            outputs=history["outputs"],
            history=history,
            status_messages=list(self.executor.status_messages),
            messages=self.drain_messages(),
        )

    def drain_messages(self) -> list:
        """(event, data) pairs queued by PromptServer.send_sync since the last drain."""
        self.loop.run_until_complete(asyncio.sleep(0))  # run the queued call_soon_threadsafe puts
        messages = []
        while not self.server.messages.empty():
            event, data, _sid = self.server.messages.get_nowait()
            messages.append((event, data))
        return messages

    def close(self) -> None:
        self.drain_messages()
        self.loop.close()
        asyncio.set_event_loop(None)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def boot_in_process(comfyui_path: Path, base_directory: Path, repo_root: Path) -> ComfyHost:
    """Start ComfyUI in this process (CPU, paths under ``base_directory``) with our pack loaded."""
    already = [m for m in ("folder_paths", "comfy.model_management", "nodes") if m in sys.modules]
    if already:
        raise RuntimeError(f"ComfyUI modules {already} were imported before boot; settings would not apply")
    pack_dir = make_base_directory(base_directory, repo_root)

    # ComfyUI's top-level modules (nodes, server, utils ...) must win over same-named folders of
    # the cwd, such as this repo's own nodes/ package.
    sys.path.insert(0, str(comfyui_path))
    import comfy.options  # noqa: F401  (argument parsing stays off: args are the defaults)
    from comfy.cli_args import args

    args.cpu = True
    args.base_directory = str(base_directory)  # read by folder_paths at import

    import folder_paths

    assert Path(folder_paths.base_path) == base_directory, folder_paths.base_path
    # Import in main.py's order: nodes.py puts ComfyUI/comfy/ on sys.path, after which a fresh
    # `import utils` would find comfy/utils.py instead of ComfyUI's utils/ package.
    import utils.extra_config  # noqa: F401
    import comfy.utils
    import execution
    import server
    import nodes
    import comfy.model_management
    import hook_breaker_ac10a0
    from comfy_execution.progress import get_progress_state
    from comfy_execution.utils import get_executing_context

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    prompt_server = server.PromptServer(loop)

    records = _Records()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(records)
    root.setLevel(logging.INFO)
    try:
        hook_breaker_ac10a0.save_functions()
        loop.run_until_complete(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        hook_breaker_ac10a0.restore_functions()
    finally:
        root.removeHandler(records)
        root.setLevel(old_level)

    pack_lines = [m for m in records.messages if "seconds" in m and str(pack_dir) in m]
    assert pack_lines, f"ComfyUI did not try to load {pack_dir}; log:\n" + "\n".join(records.messages)
    assert "IMPORT FAILED" not in pack_lines[0], "\n".join(
        m for m in records.messages if "Traceback" in m or str(pack_dir) in m or "comfy_entrypoint" in m
    )
    assert nodes.LOADED_MODULE_DIRS.get(PACK_FOLDER_NAME) == str(pack_dir.absolute())

    def progress_hook(value, total, preview_image, prompt_id=None, node_id=None):
        # What main.py installs: Cancel reaches a node through its ProgressBar updates, and the
        # progress goes to the client as a "progress" message.
        context = get_executing_context()
        if context is not None:
            prompt_id = prompt_id or context.prompt_id
            node_id = node_id or context.node_id
        comfy.model_management.throw_exception_if_processing_interrupted()
        prompt_id = prompt_id or getattr(prompt_server, "last_prompt_id", None)
        node_id = node_id or prompt_server.last_node_id
        get_progress_state().update_progress(node_id, value, total, preview_image)
        prompt_server.send_sync(
            "progress", {"value": value, "max": total, "prompt_id": prompt_id, "node": node_id}, prompt_server.client_id
        )

    comfy.utils.set_progress_bar_global_hook(progress_hook)

    return ComfyHost(
        comfyui_path=comfyui_path,
        base_directory=base_directory,
        pack_dir=pack_dir,
        loop=loop,
        server=prompt_server,
        executor=execution.PromptExecutor(prompt_server, cache_type=execution.CacheType.CLASSIC),
        pack_import_line=pack_lines[0],
    )


def make_photos(folder: Path, n: int = 3, size: int = 64, caption: str = "a photo of a ball") -> Path:
    """n small captioned pictures (a red disc on varied backgrounds) to train on."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (size, size), tuple(rng.randint(0, 255) for _ in range(3)))
        ImageDraw.Draw(img).ellipse([size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill=(220, 20, 20))
        img.save(folder / f"img_{i}.png")
        (folder / f"img_{i}.txt").write_text(caption)
    return folder
