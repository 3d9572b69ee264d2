"""The tiny Z-Image set (tests/fixtures/tiny_zimage.py): ComfyUI loads the DiT as Z-Image (flow, shift 3), its
Qwen3-4B encoder gives prompt-dependent conditioning, the DiT's prediction depends on the prompt, and diffusers'
ZImageTransformer2DModel with the same weights computes the same function as ComfyUI's NextDiT.

The set is loaded once per module as a user's graph loads it (UNETLoader in fp8, CLIPLoader type lumina2,
VAELoader); the text encoder (4.0 GB in fp8, a full-size Qwen3-4B) is released as soon as the prompts are encoded,
before the fp32 copy of the DiT for the diffusers comparison exists.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the shared fixtures folder

from comfy_harness import set_folder  # noqa: E402
from fixtures import tiny_zimage  # noqa: E402  (imports no ComfyUI at module level)

PROMPTS = ("a photo of a cat", "an oil painting of a lighthouse at night")
HOST_LIMIT = ("host limit: this ComfyUI has no Z-Image (comfy.supported_models.ZImage, added after 0.3.64); "
              "the Z-Image fixture tests run on 0.33+")
B, H, W, L = 2, 8, 8, 20  # 64 x 64 images; 16 image and 20 text tokens, both padded to 32 inside


@pytest.fixture(scope="module")
def zimage(comfy_host, tmp_path_factory):
    """The set built and linked into the host's models folder, loaded with ComfyUI's nodes; the prompts encoded
    and the CLIP released. A namespace: model, vae, paths, te (facts about the encoder), conds (prompt ->
    ``encode_from_tokens(..., return_dict=True)``). None on a ComfyUI without Z-Image (see ``loaded``)."""
    import comfy.model_management as mm
    import comfy.supported_models
    import torch

    if not hasattr(comfy.supported_models, "ZImage"):
        yield None
        return
    paths = tiny_zimage.build_zimage_set(set_folder(tmp_path_factory, "tiny_zimage"))
    names = tiny_zimage.link_zimage_set(paths, comfy_host.base_directory / "models")
    model, clip, vae = tiny_zimage.load_tiny_zimage(names)
    llama = clip.cond_stage_model.qwen3_4b.transformer.model
    te = SimpleNamespace(module=type(clip.cond_stage_model).__module__, layers=len(llama.layers),
                         width=llama.embed_tokens.weight.shape[1], dtype=llama.embed_tokens.weight.dtype)
    with torch.inference_mode():
        conds = {p: clip.encode_from_tokens(clip.tokenize(p), return_dict=True) for p in PROMPTS}
    del clip, llama  # 4.0 GB: gone before the fp32 DiT copy of test_dit_matches_diffusers exists
    gc.collect()
    mm.cleanup_models()
    yield SimpleNamespace(model=model, vae=vae, paths=paths, te=te, conds=conds)
    del model, vae
    mm.unload_all_models()
    gc.collect()


def loaded(zimage):
    """``zimage``, or the host-limit skip. Raised here, in the tests' call, rather than in the fixture: pytest
    reports a fixture's skip at each test's line, this one at this line, so the module's skips fold into one."""
    if zimage is None:
        pytest.skip(HOST_LIMIT)
    return zimage


def test_text_encoder_depends_on_the_prompt(zimage):
    import torch

    zimage = loaded(zimage)
    assert zimage.te.module == "comfy.text_encoders.z_image"
    assert (zimage.te.layers, zimage.te.width, zimage.te.dtype) == (36, 2560, torch.float8_e4m3fn)
    a, b = (zimage.conds[p]["cond"] for p in PROMPTS)
    for cond in (a, b):
        assert cond.dim() == 3 and cond.shape[0] == 1 and cond.shape[2] == 2560
        assert torch.isfinite(cond).all() and cond.float().std() > 0.1
    # Same chat template prefix ("<|im_start|>user\n"), then the prompts differ: so do the hidden states.
    n = min(a.shape[1], b.shape[1])
    assert (a[:, :3] - b[:, :3]).abs().max() < 1e-4  # causal: the shared prefix is encoded alike
    assert (a[:, :n] - b[:, :n]).abs().max() > 0.1


def test_dit_loads_as_zimage(zimage):
    import comfy.model_base
    import comfy.model_sampling
    import torch
    from comfy.ldm.lumina.model import NextDiT

    zimage = loaded(zimage)
    base = zimage.model.model
    assert type(base.model_config).__name__ == "ZImage" and isinstance(base, comfy.model_base.Lumina2)
    config = base.model_config.unet_config
    assert {k: config[k] for k in tiny_zimage.zimage_dit_config(1)} == tiny_zimage.zimage_dit_config(1)
    sampling = base.model_sampling
    assert isinstance(sampling, comfy.model_sampling.CONST)
    assert isinstance(sampling, comfy.model_sampling.ModelSamplingDiscreteFlow) and sampling.shift == 3.0
    sigma = torch.tensor([0.25, 0.9])
    assert torch.allclose(sampling.timestep(sigma), sigma)  # multiplier 1: NextDiT takes sigma itself
    dit = base.diffusion_model
    assert isinstance(dit, NextDiT) and dit.dim == 3840
    assert (len(dit.layers), len(dit.noise_refiner), len(dit.context_refiner)) == (1, 2, 2)
    assert dit.layers[0].attention.qkv.weight.dtype == torch.float8_e4m3fn  # UNETLoader weight_dtype fp8_e4m3fn
    assert zimage.vae.latent_channels == 16


def test_prediction_depends_on_the_prompt(zimage):
    """One ComfyUI ``apply_model`` (what the sampler calls) at 64 x 64 for each prompt."""
    import comfy.model_management as mm
    import torch

    zimage = loaded(zimage)
    model = zimage.model
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(1, 16, H, W, generator=g), torch.tensor([0.7])
    outs = []
    with torch.inference_mode():
        mm.load_models_gpu([model])
        for p in PROMPTS:
            c = zimage.conds[p]
            conds = model.model.extra_conds(noise=x, device=x.device, cross_attn=c["cond"],
                                            attention_mask=c.get("attention_mask"))
            conds = {k: v.process_cond(batch_size=1, device=x.device, area=None).cond for k, v in conds.items()}
            outs.append(model.model.apply_model(x, sigma, **conds).float())
    a, b = outs
    assert a.shape == (1, 16, H, W) and torch.isfinite(a).all() and torch.isfinite(b).all()
    assert (a - x).std() > 0.1  # denoised = x - sigma * velocity: the model says something
    assert (a - b).abs().max() > 0.01


def test_dit_matches_diffusers(zimage):
    import comfy.ops
    import torch
    from comfy.ldm.lumina.model import NextDiT

    zimage = loaded(zimage)
    config = {**zimage.model.model.model_config.unet_config, "dtype": torch.float32}  # it holds the load dtype
    sd = {k: v.float() for k, v in zimage.model.model.diffusion_model.state_dict().items()}
    ours = NextDiT(**config, device="meta", operations=comfy.ops.disable_weight_init)
    ours.load_state_dict(sd, strict=True, assign=True)
    theirs = tiny_zimage.to_diffusers_zimage(sd)  # views of the same fp32 tensors: no second copy
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(B, 16, H, W, generator=g), torch.randn(B, L, 2560, generator=g)
    sigma = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        a = ours(x, sigma, context, L)
        b = tiny_zimage.diffusers_forward(theirs, x, sigma, context)
        other = ours(x, sigma, torch.randn(B, L, 2560, generator=g), L)
    assert a.shape == (B, 16, H, W) and a.std() > 0.5  # nothing is zeroed
    assert (a - other).abs().max() > 0.01
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
