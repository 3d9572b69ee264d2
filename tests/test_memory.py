"""The memory estimate shown before training, against the peak of torch's own allocator.

Real SD1.5/SDXL runs need a GPU; here the same block structures are scaled down (every width / 8,
the resolution / sqrt(8) so activations keep about their real share of the total) and a whole
``Trainer.run`` is measured with ``torch.profiler``'s allocator events on the CPU: the weights that
exist before the run plus the highest point of everything the run allocates (LoRA layers, caches,
activations, gradients, optimizer state). Measured (torch 2.13, CPU): the SD1.5-shaped estimate is 0.99
of the peak (0.97 of what the run allocates), the SDXL-shaped one with gradient checkpointing 1.00 (1.02).
"""

from __future__ import annotations

import pytest
import torch

from lora_workbench.training.train import memory as M
from lora_workbench.training.model.backend import DiffusersBackend, SDXLDiffusersBackend
from lora_workbench.training.config import TrainConfig
from lora_workbench.training.data.dataset import scan_folder
from lora_workbench.training.train.trainer import TrainData, Trainer

from helpers import make_images, tiny_dataset_cfg

SCALE = 8  # widths / 8; head dims stay whole (SD1.5 8 heads, SDXL 64-wide heads -> 8-wide)


def _vae_f8():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8, 8, 8), latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         norm_num_groups=4, layers_per_block=1)


def _text(hidden, layers, heads, projection=False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lora_workbench.training.model.tiny import tiny_vocab_size

    v = tiny_vocab_size()
    cfg = CLIPTextConfig(vocab_size=v, bos_token_id=v - 2, eos_token_id=v - 1, pad_token_id=v - 1,
                         hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, max_position_embeddings=77, projection_dim=hidden)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def scaled_sd15(tmp_path) -> DiffusersBackend:
    """SD1.5's blocks (4 levels, 2 ResBlocks, conv projections, 8 heads) at 1/8 of its widths."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer

    from lora_workbench.training.model.tiny import TINY_SCHEDULER, write_tiny_tokenizer

    torch.manual_seed(0)
    k = SCALE
    unet = UNet2DConditionModel(block_out_channels=(320 // k, 640 // k, 1280 // k, 1280 // k), layers_per_block=2,
                                cross_attention_dim=768 // k, attention_head_dim=8, norm_num_groups=8)
    tok = CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(tmp_path / "tok")))
    return DiffusersBackend(unet, _text(768 // k, 12, 12), tok, _vae_f8(), DDPMScheduler(**TINY_SCHEDULER))


def scaled_sdxl(tmp_path) -> SDXLDiffusersBackend:
    """SDXL's blocks (3 levels, depths 0/2/10, mid 10, linear projections, 64-wide heads) at 1/8 widths."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer

    from lora_workbench.training.model.tiny import TINY_SCHEDULER, write_tiny_tokenizer

    torch.manual_seed(0)
    k = SCALE
    te1, te2 = _text(768 // k, 12, 12), _text(1280 // k, 32, 20, projection=True)
    unet = UNet2DConditionModel(
        block_out_channels=(320 // k, 640 // k, 1280 // k), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
        cross_attention_dim=(768 + 1280) // k, addition_embed_type="text_time", addition_time_embed_dim=256 // k,
        projection_class_embeddings_input_dim=1280 // k + 6 * 256 // k, norm_num_groups=8)
    folder = str(write_tiny_tokenizer(tmp_path / "tok"))
    tok, tok2 = CLIPTokenizer.from_pretrained(folder), CLIPTokenizer.from_pretrained(folder, pad_token="!")
    return SDXLDiffusersBackend(unet, te1, te2, tok, tok2, _vae_f8(), DDPMScheduler(**TINY_SCHEDULER))


def measured_peak(backend, trainer) -> tuple[int, int]:
    """(bytes of the model before the run, highest point of the CPU allocator during the run)."""
    from torch.profiler import ProfilerActivity, profile

    modules = [backend.unet, backend.text_encoder, getattr(backend, "text_encoder_2", None), backend.vae]
    before = sum(t.numel() * t.element_size() for m in modules if m is not None
                 for t in [*m.parameters(), *m.buffers()])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.run()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return before, peak


@pytest.mark.parametrize("which", ["sd15", "sdxl"])
def test_estimate_is_within_a_quarter_of_the_allocator_peak(tmp_path, which):
    # Usual settings, scaled: SD1.5 at 512 px without checkpointing, SDXL at 1024 px with it; UNet only.
    size, ckpt, build = {"sd15": (192, False, scaled_sd15), "sdxl": (384, True, scaled_sdxl)}[which]
    backend = build(tmp_path)
    dcfg = tiny_dataset_cfg(make_images(tmp_path / "img", n=2, size=size), resolution=size, bucket_step=64,
                            min_bucket_side=64, max_bucket_side=size)
    cfg = TrainConfig(rank=16, alpha=16, steps=2, gradient_checkpointing=ckpt, lr=1e-4)
    trainer = Trainer(backend, TrainData(scan_folder(dcfg), dcfg), cfg)
    estimate = trainer.memory_estimate()
    weights, run = measured_peak(backend, trainer)
    ratio = estimate.total / (weights + run)
    print(f"{which}: estimate {estimate.summary()}; measured {(weights + run) / 2**20:.2f} MiB ({ratio:.3f}); "
          f"run part {(estimate.total - estimate.weights) / run:.3f}")
    assert 0.75 <= ratio <= 1.25, f"estimate {estimate.summary()} vs measured {(weights + run) / 2**20:.1f} MiB"
    assert estimate.weights == pytest.approx(weights, rel=1e-3)  # parameters (buffers are a few bytes)
    # What the run adds (activations, LoRA, gradients, optimizer state) on its own, so the check is
    # not carried by the weights alone (activations are 8-40% of the total at these settings).
    assert 0.75 <= (estimate.total - estimate.weights) / run <= 1.25


@pytest.mark.parametrize("network,dora", [("lora", False), ("lora", True), ("loha", False), ("lokr", False)])
def test_trainable_parameter_count_is_what_peft_injects(tmp_path, network, dora):
    # The estimate's LoRA, gradient and optimizer terms scale with this count: a LoHa has twice a LoRA's
    # factors, a LoKr far fewer (its full w1 and, at rank 16 here, full w2 on the narrow layers).
    from lora_workbench.training.lora import network as N

    backend = scaled_sd15(tmp_path)
    targets = backend.lora_targets("all", True)
    assert any(t.is_conv for t in targets) and any(t.component == "te" for t in targets)
    counts = {}
    for rank, conv_rank in ((2, 1), (16, 8)):
        expected = M.lora_param_count(backend.roots(), targets, rank, conv_rank, network, dora)
        params = N.inject(backend.roots(), targets, rank, rank, conv_rank=conv_rank, conv_alpha=conv_rank,
                          use_dora=dora, network=network)
        counts[rank] = sum(p.numel() for p in params)
        N.remove(backend.roots())
        assert expected == counts[rank], (network, rank)
    plain = M.lora_param_count(backend.roots(), targets, 16, 8)
    if network == "lora":
        assert (counts[16] > plain) if dora else (counts[16] == plain)
    else:
        assert counts[16] == 2 * plain if network == "loha" else counts[16] < plain


def test_options_move_the_estimate_the_way_they_move_memory():
    base = dict(resolution=1024, weight_dtype="fp16", lora_params=23_000_000)
    plain = M.estimate_memory(M.SDXL, **base)
    ckpt = M.estimate_memory(M.SDXL, gradient_checkpointing=True, **base)
    assert ckpt.activations < plain.activations / 5  # only block inputs are kept
    assert M.estimate_memory(M.SDXL, optimizer="adamw8bit", **base).optimizer == plain.optimizer // 4
    assert M.estimate_memory(M.SDXL, batch_size=2, **base).activations == 2 * plain.activations
    assert M.estimate_memory(M.SDXL, prior_preservation=True, **base).activations == 2 * plain.activations
    te = M.estimate_memory(M.SDXL, train_text_encoder=True, **base)
    assert te.activations > plain.activations
    fp32 = M.estimate_memory(M.SDXL, **{**base, "weight_dtype": "fp32"})
    assert fp32.weights == 2 * plain.weights
    # Public figures for a sense of scale: SDXL's UNet is 2.57B parameters, 4.8 GiB in fp16.
    assert plain.parts["unet"] / 2**30 == pytest.approx(4.78, abs=0.01)
    assert "GiB" in ckpt.summary() and "text encoder 2" in ckpt.summary()
    with pytest.raises(ValueError, match="optimizer 'lion' unknown"):
        M.estimate_memory(M.SD15, optimizer="lion")


def test_shape_read_from_diffusers_matches_the_presets():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        sd15 = UNet2DConditionModel(cross_attention_dim=768)  # otherwise diffusers' defaults are SD1.5's UNet
    shape = M.shape_from_diffusers(sd15)
    assert shape.unet == M.SD15.unet
    assert shape.unet_params == M.SD15.unet_params
