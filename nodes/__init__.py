"""ComfyUI V3 nodes: thin adapters over the engine in ``training/``.

The extension (``extension.py``) is imported only when ComfyUI asks for it from
``comfy_entrypoint``: importing ``comfy_api`` imports ``folder_paths``, which fixes ComfyUI's paths,
so it must not happen before ComfyUI is booted. That keeps ``app.headless`` (which boots ComfyUI)
and ``app.comfy_client`` importable without ComfyUI. Nothing in ``training/`` may import ComfyUI.
"""


def __getattr__(name):
    if name == "LoraWorkbenchExtension":
        from .extension import LoraWorkbenchExtension

        return LoraWorkbenchExtension
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
