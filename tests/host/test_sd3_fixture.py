"""The tiny SD3.5 checkpoints (tests/fixtures/tiny_sd3.py): ComfyUI loads them as SD3 (medium: MMDiT-X with
attn2 in block 0; large: no attn2), the CLIP-L + CLIP-G encoder gives prompt-dependent conditioning without T5,
and diffusers' SD3Transformer2DModel with the same weights computes the same function as ComfyUI's MMDiT."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the shared fixtures folder

from comfy_harness import set_folder  # noqa: E402
from fixtures import tiny_sd3  # noqa: E402  (imports no ComfyUI at module level)

B, H, W, L = 2, 8, 12, 7  # batch, latent height / width (not square: a transposed patchify shows), text tokens


@pytest.fixture(scope="module")
def checkpoints(comfy_host, tmp_path_factory):
    """``load(variant)`` -> (model patcher, clip, vae, path) from ``load_checkpoint_guess_config``, built and
    loaded once per module (CLIP-G alone is 695M parameters in RAM, so each file loads once)."""
    import comfy.sd

    folder = set_folder(tmp_path_factory, "tiny_sd3")
    loaded = {}

    def load(variant):
        if variant not in loaded:
            path = tiny_sd3.build_sd3_checkpoint(folder, variant, vae_decoder_ch=tiny_sd3.host_vae_decoder_ch())
            # The text encoders are the same in both files: load them (and the VAE) once, from "medium".
            full = variant == "medium"
            model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=full, output_clip=full)
            loaded[variant] = (model, clip, vae, path)
        return loaded[variant]

    return load


@pytest.mark.parametrize("variant, self_attn_layers", [("medium", [0]), ("large", [])])
def test_checkpoint_loads_as_sd3(checkpoints, variant, self_attn_layers):
    import comfy.model_sampling
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    model, clip, vae, _ = checkpoints(variant)
    config = model.model.model_config
    assert type(config).__name__ == "SD3"
    sampling = model.model.model_sampling
    assert isinstance(sampling, comfy.model_sampling.CONST)
    assert isinstance(sampling, comfy.model_sampling.ModelSamplingDiscreteFlow) and sampling.shift == 3.0
    assert config.unet_config["x_block_self_attn_layers"] == self_attn_layers
    assert config.unet_config["qk_norm"] == "rms"
    dit = model.model.diffusion_model
    assert isinstance(dit, MMDiT) and len(dit.joint_blocks) == 2 and dit.hidden_size == 128
    assert [hasattr(b.x_block, "attn2") for b in dit.joint_blocks] == [i in self_attn_layers for i in range(2)]
    assert dit.joint_blocks[-1].context_block.pre_only
    if variant == "medium":
        assert vae.latent_channels == 16
        assert clip.cond_stage_model.clip_l is not None and clip.cond_stage_model.clip_g is not None
        assert clip.cond_stage_model.t5xxl is None


def test_clip_encode_depends_on_the_prompt(checkpoints):
    import torch

    _, clip, _, _ = checkpoints("medium")
    outs = []
    for prompt in ("a photo of a cat", "an oil painting of a lighthouse at night"):
        cond, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
        assert cond.shape == (1, 77, 4096) and pooled.shape == (1, 2048)
        assert torch.isfinite(cond).all() and torch.isfinite(pooled).all()
        assert cond[..., :2048].std() > 0.01 and pooled.std() > 0.01
        assert (cond[..., 2048:] == 0).all()  # no T5: CLIP-L + CLIP-G padded to 4096
        outs.append((cond, pooled))
    (cond_a, pooled_a), (cond_b, pooled_b) = outs
    assert (cond_a - cond_b).abs().max() > 0.01
    assert (pooled_a[:, :768] - pooled_b[:, :768]).abs().max() > 0.01  # CLIP-L's pooled part
    assert (pooled_a[:, 768:] - pooled_b[:, 768:]).abs().max() > 0.01  # CLIP-G's (through text_projection)


@pytest.mark.parametrize("variant", ["medium", "large"])
def test_mmdit_matches_diffusers(checkpoints, variant):
    import torch

    model, _, _, path = checkpoints(variant)
    dit = model.model.diffusion_model.float()
    g = torch.Generator().manual_seed(0)
    x, context, pooled = (torch.randn(B, 16, H, W, generator=g), torch.randn(B, L, 4096, generator=g),
                          torch.randn(B, 2048, generator=g))
    sigma = torch.tensor([0.3, 0.8])
    timesteps = model.model.model_sampling.timestep(sigma)
    assert torch.allclose(timesteps, sigma * 1000)  # the scale diffusers' timestep takes too
    transformer = tiny_sd3.to_diffusers_sd3(path)
    with torch.no_grad():
        ours = dit(x, timesteps, context, y=pooled)
        theirs = transformer(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                             timestep=sigma * 1000).sample
        other_pooled = dit(x, timesteps, context, y=torch.randn(B, 2048, generator=g))
    assert ours.shape == (B, 16, H, W) and ours.std() > 0.5  # nothing is zeroed
    assert (ours - other_pooled).abs().max() > 0.01  # the pooled vector (adaLN) matters
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5), (ours - theirs).abs().max()
