"""ComfyUI booted in this process, without its web server, to run API prompts headless.

This follows what ComfyUI's ``main.py`` does at start-up, using only its public settings and
entry points: ``comfy.cli_args.args`` (``cpu``, ``base_directory``) set before ``folder_paths``
and ``comfy.model_management`` are imported, the extra model paths and output directory applied
as ``main.py``'s ``apply_custom_paths`` does, a ``server.PromptServer`` (so nodes reach
``PromptServer.instance``; its HTTP side is never started), ``nodes.init_extra_nodes`` (which scans
``custom_nodes/`` and loads this pack from there), the progress-bar hook, and a
``execution.PromptExecutor`` running each prompt in a worker thread while this thread relays the
messages nodes send to the client, the way ``main.py``'s ``prompt_worker`` does. Nothing of ComfyUI
is patched.

ComfyUI is imported only inside ``boot``: this module can be imported without ComfyUI on the path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from .workflow_runner import PromptInvalidError, PromptRun

log = logging.getLogger(__name__)

DEFAULT_COMFYUI = "~/comfy/ComfyUI"  # comfy-cli's default install
CLIENT_ID = "lora-workbench-headless"
PRESET_MODULES = ("folder_paths", "comfy.model_management", "nodes")


def find_comfyui(path: str | os.PathLike | None = None) -> Path:
    """The ComfyUI folder to boot: ``path``, else ``COMFYUI_PATH``, else ``~/comfy/ComfyUI``."""
    where = "--comfyui" if path else "COMFYUI_PATH" if os.environ.get("COMFYUI_PATH") else "the default"
    folder = Path(path or os.environ.get("COMFYUI_PATH") or DEFAULT_COMFYUI).expanduser().resolve()
    if not (folder / "main.py").is_file():
        raise ValueError(f"{folder} ({where}) is not a ComfyUI folder: it has no main.py; pass --comfyui PATH, "
                         "set COMFYUI_PATH, or use --server URL for a running ComfyUI")
    return folder


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


class InProcessHost:
    """ComfyUI running in this process: node definitions, prompt validation and execution."""

    def __init__(self, comfyui_path: Path, base_directory: Path, loop, server, executor, import_log: list[str]):
        self.comfyui_path = comfyui_path
        self.base_directory = base_directory
        self.loop = loop
        self.server = server  # server.PromptServer
        self.executor = executor  # execution.PromptExecutor, kept like main.py's worker (node outputs cached)
        self.import_log = import_log  # what ComfyUI logged while loading custom nodes
        self._object_info = None

    # ---- the HTTP API's answers, without HTTP ----
    def object_info(self) -> dict:
        """GET /object_info as a client receives it: the server's own route handler, JSON and all."""
        if self._object_info is None:
            route = next(r for r in self.server.routes if r.method == "GET" and r.path == "/object_info")
            response = self.loop.run_until_complete(route.handler(None))  # it reads nothing from the request
            self._object_info = json.loads(response.body)
        return self._object_info

    def validate(self, prompt: dict, prompt_id: str | None = None) -> list:
        """ComfyUI's validate_prompt; the outputs to execute, or PromptInvalidError naming every bad input."""
        import execution

        valid, error, outputs, node_errors = self.loop.run_until_complete(
            execution.validate_prompt(prompt_id or str(uuid.uuid4()), prompt, None))
        if not valid or node_errors:
            # ComfyUI would still run the valid outputs of a partly invalid prompt; a headless run
            # that asked for the whole graph wants to hear about every invalid node instead.
            raise PromptInvalidError(error or {"message": "some outputs are invalid", "details": ""}, node_errors)
        return outputs

    def file_location(self, ref: dict) -> str:
        import folder_paths

        return os.path.join(folder_paths.get_directory_by_type(ref.get("type", "output")), ref.get("subfolder", ""),
                            ref["filename"])

    @property
    def output_directory(self) -> Path:
        import folder_paths

        return Path(folder_paths.get_output_directory())

    # ---- running ----
    def run_prompt(self, prompt: dict, on_message: Callable[[str, dict], None] | None = None,
                   client_id: str = CLIENT_ID) -> PromptRun:
        """Validate and execute an API prompt, as POST /prompt and the queue worker do.

        Messages nodes send to the client reach ``on_message(event, data)`` while the prompt runs.
        Ctrl-C interrupts the prompt as the Cancel button does (a training node keeps its state) and
        the run returns once ComfyUI has stopped. Raises PromptInvalidError when validation fails; a node
        failure returns success=False.
        """
        import nodes

        prompt_id = str(uuid.uuid4())
        outputs = self.validate(prompt, prompt_id)
        self.drain_messages()
        self.server.last_prompt_id = prompt_id  # as main.py's prompt_worker does
        messages: list = []

        def relay(item):
            event, data = item
            messages.append(item)
            if on_message is not None:
                on_message(event, data)

        failure: list[BaseException] = []

        def work():
            try:
                self.executor.execute(prompt, prompt_id, {"client_id": client_id}, outputs)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread below
                failure.append(e)

        worker = threading.Thread(target=work, name="lora-workbench-prompt", daemon=True)
        worker.start()
        while worker.is_alive():
            try:
                self.loop.run_until_complete(self._relay_while(worker, relay, seconds=1.0))
            except KeyboardInterrupt:
                log.warning("interrupting the prompt (a training node saves its state first)")
                nodes.interrupt_processing(True)
        worker.join()
        for item in self.drain_messages():  # what the worker sent last
            relay(item)
        if failure:
            raise RuntimeError(f"ComfyUI's executor failed: {failure[0]}") from failure[0]
        history = self.executor.history_result
        return PromptRun(prompt_id=prompt_id, success=self.executor.success, outputs=history["outputs"],
                         history=history, status_messages=list(self.executor.status_messages), messages=messages)

    async def _relay_while(self, worker: threading.Thread, relay, seconds: float) -> None:
        end = time.monotonic() + seconds
        while worker.is_alive() and time.monotonic() < end:
            await asyncio.sleep(0.05)  # lets the worker's call_soon_threadsafe puts run
            while not self.server.messages.empty():
                event, data, _sid = self.server.messages.get_nowait()
                relay((event, data))

    def drain_messages(self) -> list:
        """(event, data) pairs queued by PromptServer.send_sync and not relayed yet."""
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


def _apply_paths(folder_paths, extra_config, comfyui_path: Path, output_directory, extra_model_paths: bool) -> None:
    """main.py's apply_custom_paths: extra_model_paths.yaml, --output-directory, the output model folders."""
    config = comfyui_path / "extra_model_paths.yaml"
    if extra_model_paths and config.is_file():
        extra_config.load_extra_path_config(str(config))
    if output_directory:
        folder_paths.set_output_directory(os.path.abspath(output_directory))
    for kind in ("checkpoints", "clip", "vae", "diffusion_models", "loras"):
        folder_paths.add_model_folder_path(kind, os.path.join(folder_paths.get_output_directory(), kind))


def boot(comfyui_path: str | os.PathLike | None = None, *, base_directory: str | os.PathLike | None = None,
         output_directory: str | os.PathLike | None = None, cpu: bool = False,
         extra_model_paths: bool = True) -> InProcessHost:
    """Start ComfyUI in this process with its custom nodes (API nodes stay off: no network).

    ``base_directory`` is ComfyUI's ``--base-directory`` (models/, input/, output/, custom_nodes/;
    default: the ComfyUI folder), ``output_directory`` its ``--output-directory``, ``cpu`` its ``--cpu``.
    ComfyUI can boot once per process.
    """
    comfyui_path = find_comfyui(comfyui_path)
    already = [m for m in PRESET_MODULES if m in sys.modules]
    if already:
        raise RuntimeError(f"ComfyUI modules {already} were imported before boot; its settings would not apply. "
                           "ComfyUI can be booted once per process.")
    # ComfyUI's top-level modules (nodes, server, utils ...) must win over same-named folders of
    # the cwd, such as this repo's own nodes/ package.
    sys.path.insert(0, str(comfyui_path))
    import comfy.options  # noqa: F401  (argument parsing stays off: args are the defaults)
    from comfy.cli_args import args

    if cpu:
        args.cpu = True
    if base_directory is not None:
        args.base_directory = str(Path(base_directory).resolve())  # read by folder_paths at import
    from ..nodes.comfy import host as comfy_host

    comfy_host.setup_dynamic_vram(args, "early")  # main.py: before comfy.model_management is imported

    import folder_paths

    base = Path(folder_paths.base_path)
    if base_directory is not None and base != Path(base_directory).resolve():
        raise RuntimeError(f"ComfyUI took {base} as its base directory instead of {base_directory}")
    # Import in main.py's order: nodes.py puts ComfyUI/comfy/ on sys.path, after which a fresh
    # `import utils` would find comfy/utils.py instead of ComfyUI's utils/ package.
    import utils.extra_config

    _apply_paths(folder_paths, utils.extra_config, comfyui_path, output_directory, extra_model_paths)
    import comfy.utils
    import server
    import nodes
    import comfy.model_management
    import hook_breaker_ac10a0

    comfy_host.setup_dynamic_vram(args, "devices")  # main.py: after model_management, before any model loads
    from comfy_execution.progress import get_progress_state
    from comfy_execution.utils import get_executing_context

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    prompt_server = server.PromptServer(loop)

    records = _Records()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(records)
    root.setLevel(min(old_level, logging.INFO) if old_level else logging.INFO)
    try:
        hook_breaker_ac10a0.save_functions()
        loop.run_until_complete(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        comfy_host.after_custom_nodes()
        hook_breaker_ac10a0.restore_functions()
    finally:
        root.removeHandler(records)
        root.setLevel(old_level)

    def progress_hook(value, total, preview_image, prompt_id=None, node_id=None):
        # What main.py installs: Cancel reaches a node through its ProgressBar updates, and the
        # progress goes to the client as a "progress" message (previews through the progress registry).
        context = get_executing_context()
        if context is not None:
            prompt_id = prompt_id or context.prompt_id
            node_id = node_id or context.node_id
        comfy.model_management.throw_exception_if_processing_interrupted()
        prompt_id = prompt_id or getattr(prompt_server, "last_prompt_id", None)
        node_id = node_id or prompt_server.last_node_id
        get_progress_state().update_progress(node_id, value, total, preview_image)
        prompt_server.send_sync("progress", {"value": value, "max": total, "prompt_id": prompt_id, "node": node_id},
                                prompt_server.client_id)

    comfy.utils.set_progress_bar_global_hook(progress_hook)
    executor = comfy_host.prompt_executor(prompt_server)
    return InProcessHost(comfyui_path, base, loop, prompt_server, executor, records.messages)
