"""ComfyUI's model classes -> the engine's model families (``training.model.archs``): one table.

A MODEL's family is that of the first listed class its config is an instance of, so subclasses count
(SD2 unCLIP is SD2, SDXL InstructPix2Pix is SDXL) when a LoRA is checked against the model. Training
takes only the exact classes marked trainable: ``SD15_instructpix2pix`` and ``SDXL_instructpix2pix``
subclass SD15 / SDXL but need an image concat input the engine does not feed. Flux dev and schnell are
one family (their LoRAs are interchangeable); the table entry in ``archs`` tells them apart by class name.
"""

from __future__ import annotations

# (class in comfy.supported_models, family, trainable by ComfyBackend / ComfyDiTBackend)
MODEL_CONFIGS = (
    ("SD15", "sd1", True),
    ("SD20", "sd2", False),
    ("SDXL", "sdxl", True),
    ("SSD1B", "sdxl", True),
    ("Segmind_Vega", "sdxl", True),
    ("KOALA_700M", "sdxl", True),
    ("KOALA_1B", "sdxl", True),
    ("Flux2", "flux2", True),  # FLUX.2 (klein 4B / 9B): a Flux subclass with other blocks, before Flux
    ("FluxSchnell", "flux", True),  # before Flux, its base class
    ("Flux", "flux", True),
    ("Chroma", "chroma", True),
    ("SD3", "sd3", True),
    ("ZImage", "zimage", True),
    ("QwenImage", "qwen_image", True),  # not its Lumina2 base class (a Gemma-2 model) nor ZImagePixelSpace (no VAE)
)


def _classes():
    import comfy.supported_models as sm

    # A class this ComfyUI does not have (an older host) is left out.
    return [(getattr(sm, name), arch, trainable) for name, arch, trainable in MODEL_CONFIGS if hasattr(sm, name)]


def model_family(model) -> tuple[str | None, str]:
    """(the family's name in ``training.model.archs`` or None, ComfyUI's model config class name) of a MODEL."""
    config = model.model.model_config
    arch = next((arch for cls, arch, _ in _classes() if isinstance(config, cls)), None)
    return arch, type(config).__name__


def trainable_family(model) -> str | None:
    """The family of a MODEL the engine can train ("sd1", "sdxl", "flux", "chroma"), None for any other (exact
    classes only)."""
    config = model.model.model_config
    return next((arch for cls, arch, trainable in _classes() if trainable and type(config) is cls), None)


VARIANTS = {"FluxSchnell": "schnell", "Flux": "dev"}  # config class -> the family's named variant


def family_variant(model) -> str | None:
    """The named variant of a MODEL's family ("dev" / "schnell" for Flux.1; "3-medium", "3.5-medium" or
    "3.5-large" for SD3.x, told by the config ComfyUI detected: MMDiT-X layers mean 3.5 medium, RMS q/k norms
    without them 3.5 large, neither SD3 medium; "klein-4b" / "klein-9b" for FLUX.2 by its context width), None
    where it has none."""
    config = model.model.model_config
    if type(config).__name__ == "Flux2":  # klein's size, told by its text encoder's width (3 tapped Qwen3 layers)
        return {7680: "klein-4b", 12288: "klein-9b"}.get(config.unet_config.get("context_in_dim"))
    if type(config).__name__ == "SD3":
        unet = config.unet_config
        if unet.get("x_block_self_attn_layers"):
            return "3.5-medium"
        return "3.5-large" if unet.get("qk_norm") else "3-medium"
    return VARIANTS.get(type(config).__name__)
