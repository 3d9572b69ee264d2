"""LoRA Workbench: train, save, stack and merge LoRAs inside ComfyUI.

ComfyUI imports this folder from ``custom_nodes/``; ``pip install -e .`` makes the same folder
importable as ``lora_workbench``. Importing it has no side effects and does not import ComfyUI:
the node modules load only when ComfyUI asks for the extension.
"""

WEB_DIRECTORY = "./js"


async def comfy_entrypoint():
    """ComfyUI V3 entry point: returns the extension that lists our nodes."""
    from .nodes import LoraWorkbenchExtension

    return LoraWorkbenchExtension()
