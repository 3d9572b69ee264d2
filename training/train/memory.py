"""How much memory a training run needs, estimated before it starts.

    estimate_memory(shape, resolution=1024, batch_size=1, weight_dtype="fp16", gradient_checkpointing=True,
                    optimizer="adamw8bit", lora_params=n) -> MemoryEstimate (bytes per part, .summary())

The peak of a LoRA step is the frozen weights, the LoRA weights with their gradients and optimizer
state, and the activations autograd keeps between the forward and the backward pass, plus what the
backward pass holds while it runs. The activations are counted tensor by tensor from the UNet's
shape, the way autograd saves them when the base model is frozen: a frozen Linear or Conv keeps
nothing (its input is only needed for its own weight's gradient), while a norm, a SiLU/GELU, an
attention and every LoRA layer keep their input. So the count follows the model (SD1.5, SDXL or a
custom UNet), the resolution, the batch, the LoRA preset, whether attention stores its probability
matrix (PyTorch's math attention) or not (flash / memory-efficient attention on GPUs), and gradient
checkpointing (only each block's input is kept; one block is recomputed at a time).

The estimate is checked against the peak of torch's own CPU allocator (``tests/test_memory.py``) on
tiny models with SD1.5's and SDXL's block structure. Allocator overhead (fragmentation, CUDA context,
cuDNN workspaces: typically 0.3-1 GB on a GPU) is not in it; :attr:`MemoryEstimate.total` adds a
stated margin for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from torch import nn

    from ..config import TrainConfig
    from ..lora.network import LoraTarget
    from ..model.backend import Backend

GIB = 2**30
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
# Optimizer state per trainable parameter, in bytes: AdamW two fp32 moments; 8-bit AdamW two 1-byte
# moments (+ block-wise scales, ~0.1%); Prodigy four fp32 buffers; SGD with momentum one.
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "prodigy": 16, "sgd": 4}
GPU_OVERHEAD = int(0.5 * GIB)  # CUDA context + allocator slack, added to the total on GPUs


@dataclass(frozen=True)
class UNetShape:
    """The parts of an SD-style UNet that decide its activation memory."""

    channels: tuple[int, ...]  # width per level (diffusers block_out_channels)
    layers_per_block: int  # ResBlocks per level on the way down (one more on the way up)
    transformer_depth: tuple[int, ...]  # transformer blocks per attention layer, per level (0: no attention)
    mid_depth: int  # transformer blocks in the middle block (0: no middle block)
    heads: tuple[int, ...]  # attention heads per level
    context_dim: int  # width of the text conditioning
    linear_proj: bool = True  # transformer proj_in/out are Linear (SDXL, SD2) or 1x1 Conv (SD1)
    context_tokens: int = 77
    latent_channels: int = 4


@dataclass(frozen=True)
class TextEncoderShape:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    tokens: int = 77


@dataclass(frozen=True)
class ModelShape:
    """A model for the estimate: its UNet and text-encoder shapes and parameter counts."""

    name: str
    unet: UNetShape
    text_encoders: tuple[TextEncoderShape, ...]
    unet_params: int
    te_params: tuple[int, ...]
    vae_params: int
    latent_factor: int = 8
    latent_channels: int = 4


SD15 = ModelShape(
    "SD1.5",
    UNetShape(channels=(320, 640, 1280, 1280), layers_per_block=2, transformer_depth=(1, 1, 1, 0), mid_depth=1,
              heads=(8, 8, 8, 8), context_dim=768, linear_proj=False),
    (TextEncoderShape(768, 12, 12, 3072),),
    unet_params=859_520_964, te_params=(123_060_480,), vae_params=83_653_863,
)
SDXL = ModelShape(
    "SDXL",
    UNetShape(channels=(320, 640, 1280), layers_per_block=2, transformer_depth=(0, 2, 10), mid_depth=10,
              heads=(5, 10, 20), context_dim=2048),
    (TextEncoderShape(768, 12, 12, 3072), TextEncoderShape(1280, 32, 20, 5120)),
    unet_params=2_567_463_684, te_params=(123_060_480, 694_659_840), vae_params=83_653_863,
)
PRESET_SHAPES = {"sd1": SD15, "sd2": replace(SD15, name="SD2"), "sdxl": SDXL}


@dataclass
class MemoryEstimate:
    """Bytes per part of the training peak; ``total`` is their sum (plus GPU overhead on a GPU)."""

    weights: int
    lora: int  # LoRA weights + their gradients (fp32)
    optimizer: int
    activations: int  # kept for the backward pass, UNet and trained text encoders
    backward: int  # what the backward pass holds at its peak besides the kept activations
    overhead: int = 0
    parts: dict[str, int] = field(default_factory=dict)  # weights per component

    @property
    def total(self) -> int:
        """The whole peak in bytes: every part plus the GPU overhead."""
        return self.weights + self.lora + self.optimizer + self.activations + self.backward + self.overhead

    def summary(self) -> str:
        """One line for the user: the total and each part, in GiB (MiB below 1 GiB)."""
        unit, scale = ("GiB", GIB) if self.total >= GIB else ("MiB", 2**20)

        def g(n: int) -> str:
            return f"{n / scale:.2f}"

        weights = ", ".join(f"{k} {g(v)}" for k, v in self.parts.items())
        text = (f"~{g(self.total)} {unit}: weights {g(self.weights)} ({weights}), activations "
                f"{g(self.activations + self.backward)}, LoRA + gradients {g(self.lora)}, optimizer {g(self.optimizer)}")
        return text + (f", GPU overhead {g(self.overhead)}" if self.overhead else "")


# ---- activations -----------------------------------------------------------------------------------
def _resnet(c_in: int, c_out: int, n: int) -> int:
    """Kept by one ResBlock: the GroupNorm, SiLU and conv inputs of both halves (a convolution keeps its
    input even when frozen; a conv LoRA reads the same tensor)."""
    return 3 * (c_in + c_out) * n


def _transformer_block(c: int, n: int, heads: int, ctx_tokens: int, preset: str, attn_probs: bool) -> int:
    """Kept by one BasicTransformerBlock (self-attention, cross-attention, GEGLU feed-forward)."""
    kept = 3 * c * n  # the three LayerNorms' inputs
    # Self-attention: the LoRA'd q/k/v read the normed input; attention keeps q, k, v and its output
    # (and the probabilities with math attention); to_out's LoRA reads the re-shaped output.
    kept += c * n + 3 * c * n + c * n + c * n
    kept += heads * n * n if attn_probs else heads * n
    # Cross-attention: q from the image (k, v from the 77 text tokens are small), output, re-shaped output.
    kept += c * n + c * n + c * n + c * n
    kept += heads * n * ctx_tokens if attn_probs else heads * n
    # GEGLU: the 8c-wide projection (its gate half is kept by GELU, its other half by the product) and
    # GELU's 4c-wide output; the second feed-forward Linear keeps its 4c input only with an ff LoRA.
    kept += 12 * c * n + (4 * c * n if preset in ("attn_ff", "all") else 0)
    return kept


def unet_activation_elements(u: UNetShape, n0: int, preset: str = "attn", attn_probs: bool = False,
                             checkpointing: bool = False) -> tuple[int, int]:
    """(elements kept for backward, elements of the largest checkpointed unit) for one sample whose
    latent has ``n0`` pixels.

    With checkpointing (diffusers and ComfyUI alike: every ResBlock and every transformer block is
    one unit) a unit keeps only its input; the ops between units (a transformer's GroupNorm and
    projections, the resamplers) keep theirs as before.
    """
    kept = unit_max = 0
    levels = len(u.channels)

    def unit(full: int, c_in: int, n: int) -> None:
        nonlocal kept, unit_max
        kept += c_in * n if checkpointing else full
        unit_max = max(unit_max, full)

    def transformer(c: int, n: int, depth: int, heads: int) -> None:
        nonlocal kept
        # GroupNorm input; proj_in/out inputs when they are convolutions or carry a LoRA.
        kept += c * n + (2 * c * n if preset == "all" or not u.linear_proj else 0)
        for _ in range(depth):
            unit(_transformer_block(c, n, heads, u.context_tokens, preset, attn_probs), c, n)

    kept += u.latent_channels * n0  # conv_in's input
    c = u.channels[0]
    skips = [c]
    for lvl in range(levels):
        n = n0 // 4**lvl
        for _ in range(u.layers_per_block):
            unit(_resnet(c, u.channels[lvl], n), c, n)
            c = u.channels[lvl]
            if u.transformer_depth[lvl]:
                transformer(c, n, u.transformer_depth[lvl], u.heads[lvl])
            skips.append(c)
        if lvl != levels - 1:
            kept += c * n  # the downsampler conv's input
            skips.append(c)
    if u.mid_depth:
        n = n0 // 4 ** (levels - 1)
        unit(_resnet(c, c, n), c, n)
        transformer(c, n, u.mid_depth, u.heads[-1])
        unit(_resnet(c, c, n), c, n)
    for lvl in reversed(range(levels)):
        n = n0 // 4**lvl
        for _ in range(u.layers_per_block + 1):
            c_in = c + skips.pop()
            unit(_resnet(c_in, u.channels[lvl], n), c_in, n)
            c = u.channels[lvl]
            if u.transformer_depth[lvl]:
                transformer(c, n, u.transformer_depth[lvl], u.heads[lvl])
        if lvl:
            kept += 4 * c * n  # the upsampler conv's input, at the next level's size
    kept += 3 * u.channels[0] * n0  # the output GroupNorm, SiLU and conv inputs
    return kept, unit_max


def text_encoder_activation_elements(te: TextEncoderShape, attn_probs: bool = True) -> int:
    """Kept per sample by a trained CLIP text encoder (LoRA on attention and MLP of every layer)."""
    t, d = te.tokens, te.hidden
    per_layer = 2 * t * d  # LayerNorm inputs
    per_layer += t * d + 3 * t * d + t * d + t * d  # LoRA input, q/k/v, output, re-shaped output
    per_layer += te.heads * t * t if attn_probs else te.heads * t
    per_layer += t * d + 2 * t * te.intermediate  # fc1 LoRA input; GELU input and fc2 LoRA input
    return te.layers * per_layer + t * d


# ---- the estimate ----------------------------------------------------------------------------------
def estimate_memory(shape: ModelShape, resolution: int | tuple[int, int] = 512, batch_size: int = 1,
                    weight_dtype: str = "fp32", activation_dtype: str | None = None, preset: str = "attn",
                    gradient_checkpointing: bool = False, train_text_encoder: bool = False,
                    optimizer: str = "adamw", lora_params: int = 0, attn_probs: bool = False,
                    prior_preservation: bool = False, gpu: bool = True) -> MemoryEstimate:
    """The training peak for ``shape`` with these options (see the module docstring).

    resolution: the bucket side (or (width, height)); batch_size: images per step (doubled by prior
    preservation, which puts the class images in the same forward); weight_dtype: the frozen base's
    dtype; activation_dtype: defaults to the weight dtype (autocast computes in it);
    lora_params: trainable parameters (:func:`lora_param_count`); attn_probs: True where attention
    keeps its probability matrix (PyTorch's math attention, e.g. on the CPU).
    """
    if optimizer not in OPTIMIZER_STATE_BYTES:
        raise ValueError(f"optimizer {optimizer!r} unknown; use one of {sorted(OPTIMIZER_STATE_BYTES)}")
    w, h = (resolution, resolution) if isinstance(resolution, int) else resolution
    wb = DTYPE_BYTES[weight_dtype]
    ab = DTYPE_BYTES[activation_dtype or weight_dtype]
    samples = batch_size * (2 if prior_preservation else 1)
    n0 = (w // shape.latent_factor) * (h // shape.latent_factor)

    parts = {"unet": shape.unet_params * wb}
    for i, p in enumerate(shape.te_params):
        parts[f"text encoder {i + 1}" if len(shape.te_params) > 1 else "text encoder"] = p * wb
    parts["vae"] = shape.vae_params * wb

    kept, block = unet_activation_elements(shape.unet, n0, preset, attn_probs, gradient_checkpointing)
    activations = kept * samples * ab
    if train_text_encoder:
        activations += sum(text_encoder_activation_elements(te, attn_probs) for te in shape.text_encoders) * samples * ab
    # The backward pass holds, besides what is kept: with checkpointing, the unit being recomputed
    # (its peak comes first, at the last unit); without, the gradients flowing through the
    # full-resolution level (about three of its activation maps).
    backward = (block if gradient_checkpointing else 3 * shape.unet.channels[0] * n0) * samples * ab
    return MemoryEstimate(weights=sum(parts.values()), lora=lora_params * 8,
                          optimizer=lora_params * OPTIMIZER_STATE_BYTES[optimizer], activations=activations,
                          backward=backward, overhead=GPU_OVERHEAD if gpu else 0, parts=parts)


def lora_param_count(roots: dict[str, nn.Module], targets: Iterable[LoraTarget], rank: int,
                     conv_rank: int | None = None) -> int:
    """Trainable parameters of LoRA layers on ``targets`` (``network.LoraTarget``) of ``roots``."""
    total = 0
    for t in targets:
        weight = roots[t.component].get_submodule(t.path).weight
        r = (conv_rank or rank) if t.is_conv else rank
        out_f, in_f = weight.shape[0], weight.shape[1]
        kernel = weight[0, 0].numel() if weight.dim() == 4 else 1
        total += r * in_f * kernel + out_f * r
    return total


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def shape_from_diffusers(unet: nn.Module, text_encoders: Sequence[nn.Module] = (), vae: nn.Module | None = None,
                         name: str = "") -> ModelShape:
    """A :class:`ModelShape` read from a diffusers ``UNet2DConditionModel`` and HF CLIP text encoders."""
    cfg = unet.config
    channels = tuple(cfg.block_out_channels)
    levels = len(channels)
    lpb = cfg.layers_per_block if isinstance(cfg.layers_per_block, int) else cfg.layers_per_block[0]
    raw = cfg.transformer_layers_per_block
    raw = (raw,) * levels if isinstance(raw, int) else tuple(raw)
    depth = tuple(d if t.startswith("CrossAttn") else 0 for d, t in zip(raw, cfg.down_block_types))
    heads = cfg.num_attention_heads or cfg.attention_head_dim  # diffusers' old name for the head count
    heads = (heads,) * levels if isinstance(heads, int) else tuple(heads)
    mid = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    tes = tuple(TextEncoderShape(te.config.hidden_size, te.config.num_hidden_layers, te.config.num_attention_heads,
                                 te.config.intermediate_size, te.config.max_position_embeddings)
                for te in text_encoders)
    blocks = getattr(getattr(vae, "config", None), "block_out_channels", None)
    factor = 2 ** (len(blocks) - 1) if blocks and hasattr(vae, "quant_conv") else 8
    return ModelShape(
        name or "UNet", UNetShape(channels, lpb, depth, raw[-1] if mid else 0, heads, cfg.cross_attention_dim,
                                  linear_proj=bool(cfg.use_linear_projection), latent_channels=cfg.in_channels),
        tes, unet_params=_count(unet), te_params=tuple(_count(te) for te in text_encoders), vae_params=_count(vae),
        latent_factor=factor, latent_channels=cfg.in_channels)


def _dtype_name(dtype) -> str:
    import torch

    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")


def estimate_for_run(backend: Backend, cfg: TrainConfig, targets: Sequence[LoraTarget],
                     buckets: Sequence[tuple[int, int]], prior_preservation: bool = False) -> MemoryEstimate | None:
    """The estimate for a ``Trainer`` run: the backend's model, the config's options, the largest bucket.

    None when the backend cannot describe its model (``memory_shape()`` is None)."""
    shape = backend.memory_shape()
    if shape is None:
        return None
    base = getattr(backend, "dtype", None) or getattr(backend, "weight_dtype", None)
    weight = _dtype_name(base)
    activation = cfg.mixed_precision if cfg.mixed_precision != "no" else weight
    largest = max(buckets, key=lambda b: b[0] * b[1])
    return estimate_memory(
        shape, resolution=largest, batch_size=cfg.batch_size, weight_dtype=weight, activation_dtype=activation,
        preset=cfg.preset, gradient_checkpointing=cfg.gradient_checkpointing,
        train_text_encoder=cfg.train_text_encoder, optimizer=cfg.optimizer,
        lora_params=lora_param_count(backend.roots(), targets, cfg.rank, cfg.effective_conv_rank),
        prior_preservation=prior_preservation, gpu=backend.device.type == "cuda")
