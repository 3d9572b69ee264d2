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

Flow-matching DiTs (Flux.1, Chroma: :class:`DiTShape`) are counted the same way block by block over the
joint image + text tokens (``tests/test_memory_dit.py`` measures a scaled Flux), with what those runs add:
base weights stored in fp8 (1 byte, computed in bf16), text encoders counted only while resident (T5-XXL
leaves the GPU once captions are cached, as kohya's ``--cache_text_encoder_outputs``), and blocks held on
the CPU (kohya's ``--blocks_to_swap``) taken off the GPU's weights. ``python -m
lora_workbench.training.train.memory --table flux`` prints the README's Flux.1 dev table.
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
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1}  # fp8: e4m3fn storage, computed in bf16
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
class DiTShape:
    """The parts of a Flux-style DiT that decide its memory: ``double_blocks`` two-stream blocks (image and
    text tokens with their own weights, joint attention) then ``single_blocks`` blocks over the joined tokens."""

    hidden: int  # token width (Flux 3072)
    double_blocks: int
    single_blocks: int
    heads: int
    mlp_ratio: float = 4.0
    context_tokens: int = 512  # text tokens (T5: 512 for Flux dev and Chroma, 256 for schnell)
    context_dim: int = 4096  # width of the text encoder's output (T5-XXL)
    patch_size: int = 2  # latent pixels per token side
    latent_channels: int = 16
    modulation: bool = True  # per-block modulation Linears (Flux); Chroma computes them outside the blocks

    @property
    def mlp(self) -> int:
        return int(self.hidden * self.mlp_ratio)

    def block_params(self) -> tuple[int, int]:
        """Parameters of one (double, single) block: Linear weights and biases, plus the q/k RMSNorm scales."""
        h, m, hd = self.hidden, self.mlp, self.hidden // self.heads
        mod = self.modulation
        stream = (h * 3 * h + 3 * h) + (h * h + h) + (h * m + m) + (m * h + h) + 2 * hd + (h * 6 * h + 6 * h) * mod
        single = (h * (3 * h + m) + 3 * h + m) + ((h + m) * h + h) + 2 * hd + (h * 3 * h + 3 * h) * mod
        return 2 * stream, single


@dataclass(frozen=True)
class TextEncoderShape:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    tokens: int = 77


@dataclass(frozen=True)
class ModelShape:
    """A model for the estimate: its denoiser (``unet``: a UNet or a DiT) and text-encoder shapes, and
    parameter counts (``unet_params``: the denoiser's)."""

    name: str
    unet: UNetShape | DiTShape
    text_encoders: tuple[TextEncoderShape, ...]
    unet_params: int
    te_params: tuple[int, ...]
    vae_params: int
    latent_factor: int = 8
    latent_channels: int = 4
    # The text encoders' own storage dtypes ("fp8", "fp16" ...) where a host knows them (ComfyUI loads T5 in
    # fp8 beside a bf16 transformer); empty: the weight dtype of the estimate.
    te_dtypes: tuple[str, ...] = ()


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
# Flux.1: counts of diffusers' FluxTransformer2DModel with BFL's config (dev has the guidance embedder,
# schnell not), T5-XXL's encoder (T5EncoderModel, 24 x 4096, d_ff 10240), CLIP-L and the 16-channel "ae".
CLIP_L = TextEncoderShape(768, 12, 12, 3072)
T5_XXL = TextEncoderShape(4096, 24, 64, 10240, tokens=512)
CLIP_L_PARAMS, T5_XXL_PARAMS, FLUX_AE_PARAMS = 123_060_480, 4_762_310_656, 83_819_683
FLUX_DEV = ModelShape(
    "Flux.1 dev", DiTShape(hidden=3072, double_blocks=19, single_blocks=38, heads=24, context_tokens=512),
    (CLIP_L, T5_XXL), unet_params=11_901_408_320, te_params=(CLIP_L_PARAMS, T5_XXL_PARAMS),
    vae_params=FLUX_AE_PARAMS, latent_factor=8, latent_channels=16,
)
FLUX_SCHNELL = replace(FLUX_DEV, name="Flux.1 schnell", unet=replace(FLUX_DEV.unet, context_tokens=256),
                       text_encoders=(CLIP_L, replace(T5_XXL, tokens=256)), unet_params=11_891_178_560)
# Chroma: Flux schnell's blocks without their modulation Linears (one "distilled guidance" approximator
# makes them for every block), T5-XXL only (diffusers ChromaTransformer2DModel's default config).
CHROMA = ModelShape(
    "Chroma", replace(FLUX_DEV.unet, modulation=False), (T5_XXL,), unet_params=8_899_983_424,
    te_params=(T5_XXL_PARAMS,), vae_params=FLUX_AE_PARAMS, latent_factor=8, latent_channels=16,
)
# SD3.5 (Stability's MMDiT, counted on diffusers' SD3Transformer2DModel with the released configs): joint
# blocks are two-stream blocks like Flux's double blocks (hidden = 64 x depth, head 64), no single blocks;
# CLIP-L + CLIP-G (77 tokens) and T5-XXL (77 tokens at least; 256 in diffusers' pipeline) in one sequence.
# Medium's MMDiT-X second attention in 13 blocks is not modelled (about 5% of its blocks' activations).
CLIP_G = TextEncoderShape(1280, 32, 20, 5120)
CLIP_G_PARAMS = 694_659_840
SD35_LARGE = ModelShape(
    "SD3.5 large", DiTShape(hidden=2432, double_blocks=38, single_blocks=0, heads=38, context_tokens=77 + 256),
    (CLIP_L, CLIP_G, replace(T5_XXL, tokens=256)), unet_params=8_056_627_520,
    te_params=(CLIP_L_PARAMS, CLIP_G_PARAMS, T5_XXL_PARAMS), vae_params=FLUX_AE_PARAMS, latent_factor=8,
    latent_channels=16,
)
SD35_MEDIUM = replace(SD35_LARGE, name="SD3.5 medium", unet=replace(SD35_LARGE.unet, hidden=1536, double_blocks=24,
                                                                     heads=24), unet_params=2_243_171_520)
# Qwen3 text encoders (the LLM without its LM head, which neither host runs): Qwen3-4B for Z-Image and FLUX.2 klein
# 4B, Qwen3-8B for klein 9B; 512 tokens at most (diffusers' pipelines; FLUX.2 pads to 512).
QWEN3_4B = TextEncoderShape(2560, 36, 32, 9728, tokens=512)
QWEN3_8B = TextEncoderShape(4096, 36, 32, 12288, tokens=512)
QWEN3_4B_PARAMS, QWEN3_8B_PARAMS = 4_022_468_096, 7_568_380_928
# FLUX.2 klein (diffusers' Flux2Transformer2DModel with BFL's klein configs, no guidance embedder): Flux.1's block
# layout without per-block modulation and with a SwiGLU MLP at ratio 3, counted as a plain MLP of the same
# parameters (ratio 4.5); 32-channel VAE latents packed 2 x 2 into 128-channel tokens.
FLUX2_AE_PARAMS = 84_046_115
FLUX2_KLEIN_4B = ModelShape(
    "FLUX.2 klein 4B", DiTShape(hidden=3072, double_blocks=5, single_blocks=20, heads=24, mlp_ratio=4.5,
                                context_tokens=512, context_dim=3 * 2560, latent_channels=32, modulation=False),
    (QWEN3_4B,), unet_params=3_875_544_576, te_params=(QWEN3_4B_PARAMS,), vae_params=FLUX2_AE_PARAMS,
    latent_factor=8, latent_channels=32,
)
FLUX2_KLEIN_9B = replace(
    FLUX2_KLEIN_4B, name="FLUX.2 klein 9B",
    unet=replace(FLUX2_KLEIN_4B.unet, hidden=4096, double_blocks=8, single_blocks=24, heads=32, context_dim=3 * 4096),
    text_encoders=(QWEN3_8B,), unet_params=9_078_581_248, te_params=(QWEN3_8B_PARAMS,))
# Z-Image (diffusers' ZImageTransformer2DModel, default = released config): 30 single-stream layers plus 2 + 2
# refiners at 3840, counted as Flux-style single blocks (SwiGLU 10240 = a plain MLP of 15360), no per-block
# modulation Linear of the token width; Qwen3-4B; Flux's 16-channel "ae".
ZIMAGE = ModelShape(
    "Z-Image", DiTShape(hidden=3840, double_blocks=0, single_blocks=34, heads=30, mlp_ratio=4.0, context_tokens=512,
                        context_dim=2560, modulation=False),
    (QWEN3_4B,), unet_params=6_154_908_736, te_params=(QWEN3_4B_PARAMS,), vae_params=FLUX_AE_PARAMS,
    latent_factor=8, latent_channels=16,
)
# Qwen-Image (diffusers' QwenImageTransformer2DModel, default = released config): 60 two-stream blocks at 3072 with
# per-block modulation, GELU MLPs at 4x; Qwen2.5-VL-7B's language model (its vision tower only reads images, for the
# Edit models); the Wan 2.1 VAE (16 channels at 1/8); about 256 prompt tokens (the pipeline drops its template's).
QWEN25_VL_7B = TextEncoderShape(3584, 28, 28, 18944, tokens=256)
QWEN25_VL_7B_PARAMS, WAN21_VAE_PARAMS = 7_070_619_136, 126_892_531
QWEN_IMAGE = ModelShape(
    "Qwen-Image", DiTShape(hidden=3072, double_blocks=60, single_blocks=0, heads=24, mlp_ratio=4.0, context_tokens=256,
                           context_dim=3584),
    (QWEN25_VL_7B,), unet_params=20_430_401_088, te_params=(QWEN25_VL_7B_PARAMS,), vae_params=WAN21_VAE_PARAMS,
    latent_factor=8, latent_channels=16,
)
PRESET_SHAPES = {"sd1": SD15, "sd2": replace(SD15, name="SD2"), "sdxl": SDXL, "flux": FLUX_DEV, "chroma": CHROMA,
                 "sd3": SD35_LARGE, "sd3.5-medium": SD35_MEDIUM, "flux2": FLUX2_KLEIN_4B,
                 "flux2-klein-9b": FLUX2_KLEIN_9B, "zimage": ZIMAGE, "qwen_image": QWEN_IMAGE}


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


def dit_activation_elements(d: DiTShape, image_tokens: int, preset: str = "attn", attn_probs: bool = False,
                            checkpointing: bool = False) -> tuple[int, int, int]:
    """(elements kept for backward, elements of the largest block, elements the backward pass holds besides)
    for one sample of ``image_tokens`` image tokens (text tokens: ``d.context_tokens``).

    Counted as for the UNet: frozen Linears keep nothing, LoRA layers keep their input, norms, GELU and
    attention keep theirs, a product with a modulation (shift/scale/gate) keeps its token-wide operand.
    With checkpointing every block (ComfyUI's and diffusers' unit) keeps only its input tokens.
    """
    h, m, n = d.hidden, d.mlp, image_tokens + d.context_tokens
    ff = preset in ("attn_ff", "all")
    attention = d.heads * n * n if attn_probs else d.heads * n  # probabilities, or flash's logsumexp
    qkv_attn = 2 * h + 4 * h  # q, k RMSNorm inputs; attention's q, k, v and output
    # Per token of both streams: norm1 input and normalised x (kept by the scale product), the modulated
    # x (q/k/v LoRA input), q/k norms and attention, the reshaped output (out-proj LoRA input), the branch
    # output (kept by the gate); norm2 input and normalised x, fc1's LoRA input (ff), GELU's input,
    # fc2's LoRA input (ff), the MLP output (kept by the gate).
    double = n * (3 * h + qkv_attn + 2 * h + 2 * h + h * ff + m + m * ff + h) + attention
    # Per joint token: norm input, normalised x, the modulated x (linear1 LoRA input), q/k norms and
    # attention, GELU's input, linear2's LoRA input (attention output and GELU output side by side),
    # the output kept by the gate. linear1/linear2 carry LoRA in every preset.
    single = n * (3 * h + qkv_attn + m + (h + m) + h) + attention
    unit_max = max(double if d.double_blocks else 0, single if d.single_blocks else 0)
    if checkpointing:
        kept = (d.double_blocks + d.single_blocks) * n * h
    else:
        kept = d.double_blocks * double + d.single_blocks * single
    # Outside the blocks: the final norm's input and normalised x, its output Linear's input; with
    # preset "all" the img_in / txt_in LoRA inputs too.
    kept += 3 * h * image_tokens
    if preset == "all":
        kept += d.latent_channels * d.patch_size**2 * image_tokens + d.context_dim * d.context_tokens
    # The backward pass holds the gradients flowing through one block: the residual stream's, and
    # inside the block at most the MLP's (GELU input and output) and attention's (q, k, v, output).
    backward = n * (2 * m + 4 * h) + (unit_max if checkpointing else 0)
    return kept, unit_max, backward


def dit_lora_params(d: DiTShape, rank: int, preset: str = "attn") -> int:
    """Trainable parameters of a rank-``rank`` LoRA on a DiT with the BFL layout's presets (attn: attention
    q/k/v and output, single blocks' linear1/linear2; attn_ff: + the double blocks' MLPs; all: every Linear
    of the blocks, modulation included, plus the embedders and the final layer)."""
    h, m = d.hidden, d.mlp
    pair = lambda i, o: rank * (i + o)  # noqa: E731 - one LoRA's down and up
    double = 2 * (pair(h, 3 * h) + pair(h, h))
    single = pair(h, 3 * h + m) + pair(h + m, h)
    if preset in ("attn_ff", "all"):
        double += 2 * (pair(h, m) + pair(m, h))
    outside = 0
    if preset == "all":
        if d.modulation:
            double += 2 * pair(h, 6 * h)
            single += pair(h, 3 * h)
        pc = d.latent_channels * d.patch_size**2
        outside = pair(pc, h) + pair(d.context_dim, h) + 2 * (pair(256, h) + pair(h, h)) \
            + pair(768, h) + pair(h, h) + pair(h, 2 * h) + pair(h, pc)
    return d.double_blocks * double + d.single_blocks * single + outside


def kohya_swapped_blocks(d: DiTShape, blocks_to_swap: int) -> tuple[int, int]:
    """(double, single) blocks held on the CPU for kohya's ``--blocks_to_swap N``: N // 2 double blocks and
    twice the rest single ones (a double block weighs about two single ones), at most all but two of each."""
    if blocks_to_swap == 0:
        return 0, 0
    if d.single_blocks == 0:  # SD3's joint blocks only: kohya's sd3 --blocks_to_swap counts them one by one
        if not 0 < blocks_to_swap <= d.double_blocks - 2:
            raise ValueError(f"offloaded_blocks={blocks_to_swap!r} is not possible for this model: use "
                             f"0..{d.double_blocks - 2} (kohya's --blocks_to_swap; {d.double_blocks} joint blocks)")
        return blocks_to_swap, 0
    if d.double_blocks == 0:  # single-stream only (Z-Image's layers): musubi counts them one by one
        if not 0 < blocks_to_swap <= d.single_blocks - 2:
            raise ValueError(f"offloaded_blocks={blocks_to_swap!r} is not possible for this model: use "
                             f"0..{d.single_blocks - 2} (kohya's --blocks_to_swap; {d.single_blocks} blocks)")
        return 0, blocks_to_swap
    double = blocks_to_swap // 2
    single = (blocks_to_swap - double) * 2
    if blocks_to_swap < 0 or double > d.double_blocks - 2 or single > d.single_blocks - 2:
        limit = max(n for n in range(0, 2 * (d.double_blocks + d.single_blocks))
                    if n // 2 <= max(0, d.double_blocks - 2) and (n - n // 2) * 2 <= max(0, d.single_blocks - 2))
        raise ValueError(f"offloaded_blocks={blocks_to_swap!r} is not possible for this model: use 0..{limit} "
                         f"(kohya's --blocks_to_swap; {d.double_blocks} double and {d.single_blocks} single blocks)")
    return double, single


# ---- the estimate ----------------------------------------------------------------------------------
def estimate_memory(shape: ModelShape, resolution: int | tuple[int, int] = 512, batch_size: int = 1,
                    weight_dtype: str = "fp32", activation_dtype: str | None = None, preset: str = "attn",
                    gradient_checkpointing: bool = False, train_text_encoder: bool = False,
                    optimizer: str = "adamw", lora_params: int = 0, attn_probs: bool = False,
                    prior_preservation: bool = False, gpu: bool = True, text_encoders_resident: bool = True,
                    offloaded_blocks: int = 0) -> MemoryEstimate:
    """The training peak for ``shape`` with these options (see the module docstring).

    resolution: the bucket side (or (width, height)); batch_size: images per step (doubled by prior
    preservation, which puts the class images in the same forward); weight_dtype: the frozen base's
    dtype; activation_dtype: defaults to the weight dtype (autocast computes in it);
    lora_params: trainable parameters (:func:`lora_param_count`); attn_probs: True where attention
    keeps its probability matrix (PyTorch's math attention, e.g. on the CPU).
    DiT models (``shape.unet`` a :class:`DiTShape`, see :func:`_estimate_dit`) also take
    text_encoders_resident (False: the encoders leave the GPU once the captions are encoded, as kohya's
    ``--cache_text_encoder_outputs``) and offloaded_blocks (kohya's ``--blocks_to_swap``).
    """
    if optimizer not in OPTIMIZER_STATE_BYTES:
        raise ValueError(f"optimizer {optimizer!r} unknown; use one of {sorted(OPTIMIZER_STATE_BYTES)}")
    if isinstance(shape.unet, DiTShape):
        return _estimate_dit(shape, resolution, batch_size, weight_dtype, activation_dtype, preset,
                             gradient_checkpointing, train_text_encoder, optimizer, lora_params, attn_probs,
                             prior_preservation, gpu, text_encoders_resident, offloaded_blocks)
    if offloaded_blocks:
        raise ValueError(f"offloaded_blocks={offloaded_blocks!r}: block swapping is for DiT models; use 0")
    w, h = (resolution, resolution) if isinstance(resolution, int) else resolution
    wb = DTYPE_BYTES[weight_dtype]
    ab = DTYPE_BYTES[activation_dtype or weight_dtype]
    samples = batch_size * (2 if prior_preservation else 1)
    n0 = (w // shape.latent_factor) * (h // shape.latent_factor)

    parts = {"unet": shape.unet_params * wb}
    for i, p in enumerate(shape.te_params):
        te_bytes = DTYPE_BYTES[shape.te_dtypes[i]] if i < len(shape.te_dtypes) else wb
        parts[f"text encoder {i + 1}" if len(shape.te_params) > 1 else "text encoder"] = p * te_bytes
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


def _estimate_dit(shape: ModelShape, resolution, batch_size, weight_dtype, activation_dtype, preset, checkpointing,
                  train_text_encoder, optimizer, lora_params, attn_probs, prior_preservation, gpu, te_resident,
                  offloaded_blocks) -> MemoryEstimate:
    d: DiTShape = shape.unet
    w, h = (resolution, resolution) if isinstance(resolution, int) else resolution
    wb = DTYPE_BYTES[weight_dtype]
    # fp8 is a storage format: the layers compute in bf16 (ComfyUI's and kohya's fp8 base).
    ab = DTYPE_BYTES[activation_dtype or ("bf16" if weight_dtype == "fp8" else weight_dtype)]
    samples = batch_size * (2 if prior_preservation else 1)
    side = shape.latent_factor * d.patch_size
    tokens = (w // side) * (h // side)
    double, single = kohya_swapped_blocks(d, offloaded_blocks)
    per_double, per_single = d.block_params()
    parts = {"transformer": (shape.unet_params - double * per_double - single * per_single) * wb}
    if te_resident or train_text_encoder:
        for i, p in enumerate(shape.te_params):
            te_bytes = DTYPE_BYTES[shape.te_dtypes[i]] if i < len(shape.te_dtypes) else wb
            parts[f"text encoder {i + 1}" if len(shape.te_params) > 1 else "text encoder"] = p * te_bytes
    parts["vae"] = shape.vae_params * max(wb, 2)  # the VAE is not stored in fp8
    kept, _, backward = dit_activation_elements(d, tokens, preset, attn_probs, checkpointing)
    activations = kept * samples * ab
    if train_text_encoder:
        encoders = shape.text_encoders
        activations += sum(text_encoder_activation_elements(te, attn_probs) for te in encoders) * samples * ab
    backward *= samples * ab
    if wb < ab:  # an fp8 weight is cast up for its matmul, one Linear at a time: the widest (single linear1)
        backward += d.hidden * (3 * d.hidden + d.mlp) * ab
    return MemoryEstimate(weights=sum(parts.values()), lora=lora_params * 8,
                          optimizer=lora_params * OPTIMIZER_STATE_BYTES[optimizer], activations=activations,
                          backward=backward, overhead=GPU_OVERHEAD if gpu else 0, parts=parts)


def lora_param_count(roots: dict[str, nn.Module], targets: Iterable[LoraTarget], rank: int,
                     conv_rank: int | None = None, network: str = "lora", dora: bool = False) -> int:
    """Trainable parameters of the ``network`` ("lora", "loha", "lokr") layers on ``targets``
    (``network.LoraTarget``) of ``roots``, as peft makes them with ``network.inject``'s settings; ``dora``
    adds DoRA's magnitude vector (one value per output)."""
    total = 0
    for t in targets:
        weight = roots[t.component].get_submodule(t.path).weight
        r = (conv_rank or rank) if t.is_conv else rank
        out_f, in_f = weight.shape[0], weight.shape[1]
        kernel = weight[0, 0].numel() if weight.dim() == 4 else 1
        if network == "lora":
            total += r * in_f * kernel + out_f * r + (out_f if dora else 0)
        elif network == "loha":  # two Hadamard-multiplied pairs, flat conv factors (no Tucker)
            total += 2 * (r * in_f * kernel + out_f * r)
        elif network == "lokr":
            total += _lokr_params(out_f, in_f, kernel, r)
        else:
            raise ValueError(f"network {network!r} unknown; use lora, loha or lokr")
    return total


def _lokr_params(out_f: int, in_f: int, kernel: int, r: int) -> int:
    """peft's LoKr layer with ``network.inject``'s config (factor -1, w1 full, w2 low-rank unless r reaches half
    its factors): w1 (a x c) plus w2 (b x d x kernel) or its rank-r pair."""
    from peft.tuners.lokr.layer import factorization

    a, b = factorization(out_f, -1)
    c, d = factorization(in_f, -1)
    full_w2 = r >= max(b, d) / 2  # peft: Linear "not r < max/2", Conv2d "r >= max/2", the same test
    w2 = b * d * kernel if full_w2 else b * r + r * d * kernel
    return a * c + w2


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


def shape_from_diffusers_dit(transformer: nn.Module, text_encoders: Sequence[nn.Module] = (),
                             vae: nn.Module | None = None, name: str = "", context_tokens: int = 512) -> ModelShape:
    """A :class:`ModelShape` read from a diffusers ``FluxTransformer2DModel`` / ``ChromaTransformer2DModel``
    (latents packed 2 x 2 into tokens outside the model), its text encoders (CLIP-L, T5) and VAE.
    ``context_tokens``: the T5 length the pipeline pads to (512 for Flux dev and Chroma, 256 for schnell)."""
    cfg = transformer.config
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    blocks = transformer.transformer_blocks
    ff = blocks[0].ff.net[0].proj if len(blocks) else None
    mlp_ratio = ff.out_features / hidden if ff is not None else 4.0
    packed = 2  # FluxPipeline._pack_latents: 2 x 2 latent pixels per token
    dit = DiTShape(hidden, cfg.num_layers, cfg.num_single_layers, cfg.num_attention_heads, mlp_ratio,
                   context_tokens=context_tokens, context_dim=cfg.joint_attention_dim, patch_size=packed,
                   latent_channels=cfg.in_channels // packed**2,
                   # Flux's blocks make their modulation (norm1.linear); Chroma's get it from outside
                   modulation=hasattr(getattr(blocks[0], "norm1", None), "linear") if blocks else True)
    tes = []
    for te in text_encoders:
        c = te.config
        width = getattr(c, "hidden_size", None) or c.d_model
        layers = getattr(c, "num_hidden_layers", None) or c.num_layers
        heads = getattr(c, "num_attention_heads", None) or c.num_heads
        inner = getattr(c, "intermediate_size", None) or c.d_ff
        tokens = getattr(c, "max_position_embeddings", None) or context_tokens
        tes.append(TextEncoderShape(width, layers, heads, inner, tokens))
    levels = getattr(getattr(vae, "config", None), "block_out_channels", None)
    factor = 2 ** (len(levels) - 1) if levels else 8
    return ModelShape(name or type(transformer).__name__, dit, tuple(tes), unet_params=_count(transformer),
                      te_params=tuple(_count(te) for te in text_encoders), vae_params=_count(vae),
                      latent_factor=factor, latent_channels=dit.latent_channels)


def _dtype_name(dtype) -> str:
    import torch

    fp8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)}
    return "fp8" if dtype in fp8 else {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")


def estimate_for_run(backend: Backend, cfg: TrainConfig, targets: Sequence[LoraTarget],
                     buckets: Sequence[tuple[int, int]], prior_preservation: bool = False) -> MemoryEstimate | None:
    """The estimate for a ``Trainer`` run: the backend's model, the config's options, the largest bucket.

    None when the backend cannot describe its model (``memory_shape()`` is None)."""
    shape = backend.memory_shape()
    if shape is None:
        return None
    # The stored base weights: ``storage_dtype`` where a backend computes in another dtype (ComfyUI's fp8
    # weights with manual casting), else its ``dtype`` / ``weight_dtype``.
    base = (getattr(backend, "storage_dtype", None) or getattr(backend, "dtype", None)
            or getattr(backend, "weight_dtype", None))
    weight = _dtype_name(base)
    activation = cfg.mixed_precision if cfg.mixed_precision != "no" else ("bf16" if weight == "fp8" else weight)
    largest = max(buckets, key=lambda b: b[0] * b[1])
    # DiTs: the text encoders (T5-XXL is 9.5 GB in bf16) count only while the run needs them; with cached
    # embeddings the host lets them leave the GPU. SD models count them as before.
    dit = isinstance(shape.unet, DiTShape)
    # A host that keeps its text encoders loaded while training (``Backend.text_encoders_resident``) pays
    # for them; else a DiT's are only resident when they train or captions are not cached.
    te_resident = (getattr(backend, "text_encoders_resident", False) or not dit or cfg.train_text_encoder
                   or not cfg.cache_text_embeddings)
    return estimate_memory(
        shape, resolution=largest, batch_size=cfg.batch_size, weight_dtype=weight, activation_dtype=activation,
        preset=cfg.preset, gradient_checkpointing=cfg.gradient_checkpointing,
        train_text_encoder=cfg.train_text_encoder, optimizer=cfg.optimizer,
        lora_params=lora_param_count(backend.roots(), targets, cfg.rank, cfg.effective_conv_rank, cfg.network,
                                     cfg.use_dora),
        prior_preservation=prior_preservation, gpu=backend.device.type == "cuda",
        text_encoders_resident=te_resident)


# ---- the README's table ------------------------------------------------------------------------------
# kohya sd-scripts' published Flux.1 dev LoRA figures (README, "FLUX.1 LoRA training"), all with --fp8_base,
# gradient checkpointing and cached text-encoder outputs: (--blocks_to_swap, optimizer, batch, GPU GB).
KOHYA_FLUX_DEV = ((0, "adamw8bit", 2, 24), (16, "adamw8bit", 1, 12), (28, "adamw8bit", 1, 8))
TABLE_SIZES = ((512, 1), (512, 2), (1024, 1), (1024, 2))  # (resolution, batch) columns
# Blocks swapped in each family's table rows: kohya's Flux.1 figures, about half and the most the model allows
TABLE_SWAPS = {"flux": (0, 16, 28), "chroma": (0, 16, 28), "sd3": (0, 8, 16), "sd3.5-medium": (0, 8, 16),
               "flux2": (0, 4, 7), "flux2-klein-9b": (0, 6, 13), "zimage": (0, 16, 28), "qwen_image": (0, 16, 45)}


def flux_table(shape: ModelShape = FLUX_DEV, rank: int = 16, preset: str = "all",
               swapped: Sequence[int] = (0, 16, 28)) -> list[dict]:
    """One row per option set {bf16, fp8 base} x {checkpointing on, off} x {adamw, adamw8bit} x ``swapped``
    blocks, with the estimated GPU peak in GiB for each (resolution, batch) of ``TABLE_SIZES``.

    As kohya measures: LoRA on every Linear of the blocks (preset "all"), bf16 compute, flash attention,
    text-encoder outputs cached (encoders off the GPU), GPU overhead included; ``kohya`` holds the
    published figure for a row that matches one."""
    lora = dit_lora_params(shape.unet, rank, preset)
    rows = []
    for base in ("bf16", "fp8"):
        for ckpt in (True, False):
            for opt in ("adamw", "adamw8bit"):
                for n in swapped:
                    row = {"base": base, "checkpointing": ckpt, "optimizer": opt, "swapped": n, "kohya": ""}
                    for res, batch in TABLE_SIZES:
                        e = estimate_memory(shape, res, batch, weight_dtype=base, activation_dtype="bf16",
                                            preset=preset, gradient_checkpointing=ckpt, optimizer=opt,
                                            lora_params=lora, text_encoders_resident=False, offloaded_blocks=n)
                        row[(res, batch)] = e.total / GIB
                    for k_swap, k_opt, k_batch, gb in KOHYA_FLUX_DEV if shape is FLUX_DEV else ():
                        if (base, ckpt, opt, n) == ("fp8", True, k_opt, k_swap):
                            row["kohya"] = f"{gb} GB at batch {k_batch}"
                    rows.append(row)
    return rows


def flux_table_markdown(shape: ModelShape = FLUX_DEV, rank: int = 16, preset: str = "all",
                        swapped: Sequence[int] = (0, 16, 28)) -> str:
    """:func:`flux_table` as a Markdown table (the README's)."""
    head = ["base", "grad. ckpt", "optimizer", "blocks swapped"] + [f"{r} px b{b}" for r, b in TABLE_SIZES] + ["kohya"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in flux_table(shape, rank, preset, swapped):
        cells = [row["base"], "on" if row["checkpointing"] else "off", row["optimizer"], str(row["swapped"])]
        cells += [f"{row[size]:.1f}" for size in TABLE_SIZES] + [row["kohya"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m lora_workbench.training.train.memory --table flux
    import argparse
    import sys

    ap = argparse.ArgumentParser(description="Print the memory-estimate table of a model family (GiB).")
    ap.add_argument("--table", choices=tuple(k for k, v in PRESET_SHAPES.items() if isinstance(v.unet, DiTShape)),
                    default="flux")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--preset", choices=("attn", "attn_ff", "all"), default="all")
    args = ap.parse_args()
    shape = PRESET_SHAPES[args.table]
    swapped = TABLE_SWAPS.get(args.table, (0, 8, 16))
    sys.stdout.write(flux_table_markdown(shape, args.rank, args.preset, swapped))
