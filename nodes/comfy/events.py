"""The messages Train LoRA sends to the editor while it runs: their names are defined here once.

``js/lora_workbench.js`` uses the same names (``EVENTS`` at its top; a test compares the two), and the
headless runner (``lora-workbench run``) prints progress from them. Importable without ComfyUI.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

TRAIN_STEP = "lw.train.step"  # {"node", "step", "total", "loss", "lr"} after every optimizer step
TRAIN_PREVIEW = "lw.train.preview"  # {"node", "step", "prompt"}; the image comes with the progress update
TRAIN_SAVED = "lw.train.saved"  # {"node", "step", "path"} after every LoRA file written
TRAIN_MEMORY = "lw.train.memory"  # {"node", "bytes", "text"}: the expected peak, before the first step
TRAIN_VALIDATION = "lw.train.validation"  # {"node", "step", "loss", "best_step"} after every validation
ALL = (TRAIN_STEP, TRAIN_PREVIEW, TRAIN_SAVED, TRAIN_MEMORY, TRAIN_VALIDATION)


def send(event: str, node_id: str | None, data: dict) -> None:
    """Send ``event`` to the client that queued the prompt; a headless run without a server just trains."""
    try:
        from server import PromptServer

        server = PromptServer.instance
        server.send_sync(event, {"node": node_id, **data}, server.client_id)
    except Exception:  # noqa: BLE001 - no PromptServer (headless, tests): the run goes on
        log.debug("no PromptServer to send %s to", event)
