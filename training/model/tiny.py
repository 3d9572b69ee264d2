"""Tiny SD1-shaped models built from configs with random weights, for the demo, tests and bench.

Nothing here downloads anything: the tokenizer is a byte-level BPE written on the fly (every byte
is a token, plus a few merges), so captions tokenize exactly as CLIP's tokenizer would on a model
whose vocabulary lacks the longer merges.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)

TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=32,
)

TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    latent_channels=4,
    norm_num_groups=8,
    layers_per_block=1,
    sample_size=32,
)

TINY_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    steps_offset=1,
)

# A handful of merges so common letters pair up; everything else falls back to single bytes.
_MERGES = ["s k", "sk s</w>", "t h", "th e</w>", "o f</w>", "p h", "ph o", "pho t", "phot o</w>"]


def _bytes_to_unicode() -> dict[int, str]:
    # The reversible byte -> printable-character table of GPT-2/CLIP BPE.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_tiny_tokenizer(folder: str | os.PathLike) -> Path:
    """Write a CLIP-style ``vocab.json`` + ``merges.txt`` that ``CLIPTokenizer`` loads offline."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    vocab += ["".join(m.split()) for m in _MERGES]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "do_lower_case": True,
                "tokenizer_class": "CLIPTokenizer",
            }
        ),
        encoding="utf-8",
    )
    return folder


def tiny_vocab_size() -> int:
    """The tiny tokenizer's vocabulary size: 512 byte tokens (plain and ``</w>``), the merges, start and end."""
    return 512 + len(_MERGES) + 2


def build_tiny_components(seed: int = 0, tokenizer_dir: str | os.PathLike | None = None) -> dict:
    """UNet, text encoder, tokenizer, VAE and scheduler of a tiny SD1-shaped model."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(vocab_size=tiny_vocab_size(), bos_token_id=tiny_vocab_size() - 2,
                       eos_token_id=tiny_vocab_size() - 1, pad_token_id=tiny_vocab_size() - 1, **TINY_TEXT)
    )
    vae = AutoencoderKL(**TINY_VAE)
    if tokenizer_dir is None:
        import tempfile

        tokenizer_dir = tempfile.mkdtemp(prefix="lw_tiny_tok_")
    tokenizer = CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(tokenizer_dir)))
    scheduler = DDPMScheduler(**TINY_SCHEDULER)
    return dict(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae, scheduler=scheduler)


def save_tiny_pipeline(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write a complete diffusers folder (model_index.json + components) of the tiny model."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    c = build_tiny_components(seed=seed, tokenizer_dir=folder / "tokenizer")
    pipe = StableDiffusionPipeline(**c, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder
