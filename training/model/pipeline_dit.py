"""What the diffusers backends of the LLM-encoded DiTs (Z-Image, FLUX.2 klein) share: one diffusers pipeline folder
(transformer, text encoder + tokenizer, VAE, scheduler) loaded offline, its parts frozen on one device, fp8 storage
through layerwise casting, LoRA targets on the family's module names (split q / k / v joined back exactly, as the Flux
backend does), and the text encoder released once the run's prompts are cached, reloaded from the folder if asked
to encode again. A family's module says how it encodes prompts and images and calls its transformer.
"""

from __future__ import annotations

import gc
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..lora.network import LoraTarget
from .backend import Backend, ModelLoadError
from .flux import FP8, DiffusersFluxBackend, split_targets

log = logging.getLogger(__name__)

PIPELINE_PARTS = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer")


def names_pipeline(folder: str | os.PathLike, pipeline: str) -> bool:
    """Whether a diffusers folder's model_index.json names ``pipeline``."""
    try:
        index = json.loads((Path(folder) / "model_index.json").read_text(encoding="utf-8"))
        return index.get("_class_name") == pipeline
    except (OSError, ValueError):
        return False


class DiffusersPipelineDiT(Backend):
    """The shared part of a flow-matching DiT backend on one diffusers pipeline. Subclasses set ``ARCH``,
    ``LABEL`` (for messages) and ``PIPELINE`` (the diffusers class name) and implement the encoders and ``predict``."""

    ARCH = ""
    LABEL = ""
    PIPELINE = ""
    prediction_type = "flow"
    releases_text_encoders = True

    def __init__(self, pipe, device: str | torch.device = "cpu", weight_dtype: torch.dtype = torch.float32,
                 model_name: str = "", max_sequence_length: int = 512, source: str | os.PathLike | None = None):
        self.pipe = pipe
        self.transformer, self.vae, self.scheduler = pipe.transformer, pipe.vae, pipe.scheduler
        self.device = torch.device(device)
        self.model_name = model_name
        self.arch = self.ARCH
        self.fp8 = weight_dtype == FP8
        self.weight_dtype = torch.bfloat16 if self.fp8 else weight_dtype
        self.dtype = weight_dtype
        # the pipeline pads prompts to 512 tokens; a tokenizer may allow fewer
        self.max_sequence_length = min(max_sequence_length, pipe.tokenizer.model_max_length)
        self.flow_shift = float(self.scheduler.config.get("shift", 1.0))
        self._source = Path(source) if source is not None else None
        # what a reload and a late memory estimate need once the encoder is released
        self._te_class, self._te_config = type(pipe.text_encoder), pipe.text_encoder.config
        self._te_params = sum(p.numel() for p in pipe.text_encoder.parameters())
        for m in (self.transformer, self.vae, pipe.text_encoder):
            self._prepare(m)
        if self.fp8:
            self.transformer.enable_layerwise_casting(storage_dtype=FP8, compute_dtype=torch.bfloat16)
        self._parts: dict[str, list[tuple[str, int]]] = {}

    def _prepare(self, m: nn.Module) -> None:
        m.requires_grad_(False)
        m.eval()
        m.to(self.device)
        if any(p.dtype != self.weight_dtype for p in m.parameters()):
            m.to(dtype=self.weight_dtype)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        weight_dtype: torch.dtype = torch.float32):
        """The family's diffusers pipeline folder, offline; ``ModelLoadError`` naming what is missing."""
        import diffusers

        path = Path(path)
        missing = [d for d in PIPELINE_PARTS if not (path / d).is_dir()]
        if missing:
            raise ModelLoadError(f"{path} ({cls.LABEL}) lacks the sub-folders {missing}; download the complete "
                                 "diffusers model folder")
        load_dtype = torch.bfloat16 if weight_dtype == FP8 else weight_dtype
        pipe = getattr(diffusers, cls.PIPELINE).from_pretrained(path, local_files_only=True, torch_dtype=load_dtype)
        return cls(pipe, device=device, weight_dtype=weight_dtype, model_name=path.name, source=path)

    # ---- Backend -----------------------------------------------------------------------------
    def roots(self) -> dict[str, nn.Module]:
        return {"unet": self.transformer}

    def lora_targets(self, preset: str, text_encoder: bool) -> list[LoraTarget]:
        """The preset's transformer Linears, each part of a fused module of the family (q / k / v) its own target."""
        if text_encoder:
            raise ValueError(f"text-encoder training is not supported for {self.LABEL} (its LoRAs train the "
                             "transformer only); turn off train_text_encoder (--no-train-text-encoder)")
        out, self._parts = split_targets(self.transformer, self.ARCH, preset)
        return out

    # The parts joined into the family's fused modules and split back for a resume: exactly the Flux backend's
    # (they read only ``self._parts``).
    finalize_lora = DiffusersFluxBackend.finalize_lora
    split_lora = DiffusersFluxBackend.split_lora
    joins_split_layers = DiffusersFluxBackend.joins_split_layers

    def alphas_cumprod(self) -> torch.Tensor:
        raise NotImplementedError(f"{self.LABEL} is a flow-matching model: it has no alphas_cumprod")

    def release_text_encoders(self) -> bool:
        """Drop the text encoder (an LLM of billions of parameters on the real models) once the prompts are cached;
        only a backend loaded from a folder can, since a later encode reloads it from there."""
        if self._source is None or self.pipe.text_encoder is None:
            return False
        self.pipe.text_encoder = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return True

    def _text_encoder_ready(self) -> None:
        """Reload a released text encoder from the model folder (before an encode)."""
        if self.pipe.text_encoder is not None:
            return
        log.info("reloading the %s text encoder from %s", self.LABEL, self._source)
        load_dtype = torch.bfloat16 if self.fp8 else self.weight_dtype
        te = self._te_class.from_pretrained(self._source, subfolder="text_encoder", local_files_only=True,
                                            torch_dtype=load_dtype)
        self._prepare(te)
        self.pipe.text_encoder = te

    def enable_gradient_checkpointing(self) -> None:
        self.transformer.enable_gradient_checkpointing()
