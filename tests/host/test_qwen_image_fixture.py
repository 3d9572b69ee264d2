"""The tiny Qwen-Image set (tests/fixtures/tiny_qwen_image.py): ComfyUI loads the DiT as Qwen-Image (FLUX model type,
shift 1.15, Wan 2.1 latent), the full-size Qwen2.5-VL-7B encoder (fp8 scaled, 28 layers, vision tower) gives
3584-wide prompt-dependent conditioning, the DiT's prediction depends on the prompt, the VAE has the Wan 2.1 latent,
and diffusers' QwenImageTransformer2DModel with the same weights computes the same function as ComfyUI's.

The set is loaded once per module as a user's graph loads it (UNETLoader "default" = fp32 on a CPU, CLIPLoader type
qwen_image, VAELoader); the text encoder (8.3 GB apparent, read lazily from the file) is released as soon as the two
prompts are encoded (20-45 s each on 2 CPU cores: every fp8 matrix is dequantized per call).
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the shared fixtures folder

from fixtures import tiny_qwen_image  # noqa: E402  (imports no ComfyUI at module level)

PROMPTS = ("a photo of a cat", "an oil painting of a lighthouse at night")
H = W = 8  # 64 x 64 images: Wan 2.1 latents are 1/8 of the image, 16 channels, one frame


@pytest.fixture(scope="module")
def qwen(tiny_qwen_image_files):
    """The set loaded with ComfyUI's nodes; the prompts encoded and the CLIP released. A namespace: model, vae,
    te (facts about the encoder), conds (prompt -> ``encode_from_tokens(tokens, return_dict=True)``)."""
    import comfy.model_management as mm
    import torch

    model, clip, vae = tiny_qwen_image.load_tiny_qwen_image(tiny_qwen_image_files)
    outer = clip.cond_stage_model.qwen25_7b.transformer  # llama.Qwen25_7BVLI: .model (the LLM) and .visual
    embed, o_proj = outer.model.embed_tokens.weight, outer.model.layers[0].self_attn.o_proj.weight
    te = SimpleNamespace(module=type(clip.cond_stage_model).__module__, layers=len(outer.model.layers),
                         width=embed.shape[1], embed_dtype=embed.dtype, vision_blocks=len(outer.visual.blocks),
                         linear_dtype=getattr(o_proj, "storage_dtype", o_proj.dtype))  # a QuantizedTensor's storage
    with torch.inference_mode():
        conds = {p: clip.encode_from_tokens(clip.tokenize(p), return_dict=True) for p in PROMPTS}
    del clip, outer, embed, o_proj  # 8.3 GB of mapped file
    gc.collect()
    mm.cleanup_models()
    yield SimpleNamespace(model=model, vae=vae, te=te, conds=conds)
    del model, vae
    mm.unload_all_models()
    gc.collect()


def test_text_encoder_depends_on_the_prompt(qwen):
    import torch

    assert qwen.te.module == "comfy.text_encoders.qwen_image"
    assert (qwen.te.layers, qwen.te.width, qwen.te.vision_blocks) == (28, tiny_qwen_image.TE_WIDTH, 32)
    assert (qwen.te.embed_dtype, qwen.te.linear_dtype) == (torch.bfloat16, torch.float8_e4m3fn)
    a, b = (qwen.conds[p]["cond"] for p in PROMPTS)
    # QwenImageTEModel drops the chat template's system part and "<|im_start|>user\n": what is left starts with the
    # prompt's own tokens and ends with "<|im_end|>\n<|im_start|>assistant\n".
    assert a.shape[2] == b.shape[2] == tiny_qwen_image.TE_WIDTH and 5 < a.shape[1] < b.shape[1] < 30
    for cond in (a, b):
        assert cond.shape[0] == 1 and torch.isfinite(cond).all() and cond.float().std() > 0.1
    n = a.shape[1]
    assert (a[:, :n] - b[:, :n]).abs().max() > 0.1


def test_dit_loads_as_qwen_image(qwen):
    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_sampling
    import torch
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

    model = qwen.model.model
    assert type(model) is comfy.model_base.QwenImage
    assert isinstance(model.latent_format, comfy.latent_formats.Wan21)
    dit = model.diffusion_model
    assert isinstance(dit, QwenImageTransformer2DModel)
    assert (len(dit.transformer_blocks), dit.inner_dim, dit.in_channels) == (1, 3072, 64)
    assert dit.img_in.weight.dtype == torch.float32  # "default" on a CPU
    sampling = model.model_sampling
    assert isinstance(sampling, comfy.model_sampling.ModelSamplingFlux)
    assert isinstance(sampling, comfy.model_sampling.CONST)
    assert sampling.shift == pytest.approx(1.15)
    assert float(sampling.timestep(torch.tensor(0.25))) == pytest.approx(0.25)  # multiplier 1.0


def test_vae_has_the_wan21_latent(qwen):
    import torch

    image = torch.rand(1, 64, 64, 3)
    with torch.inference_mode():
        latent = qwen.vae.encode(image)
        decoded = qwen.vae.decode(latent)
    assert latent.shape == (1, 16, 1, H, W) and torch.isfinite(latent).all()
    assert decoded.shape[-3:] == (64, 64, 3)


def _context(model, cond, x):
    """What ComfyUI's sampler feeds the DiT as ``context`` for ``cond`` (``model_base.QwenImage.extra_conds``)."""
    conds = model.model.extra_conds(noise=x, device="cpu", cross_attn=cond)
    return conds["c_crossattn"].process_cond(batch_size=1, device="cpu", area=None).cond


def test_prediction_depends_on_the_prompt(qwen):
    """One ComfyUI ``apply_model`` (what the sampler calls) at 64 x 64 for each prompt."""
    import comfy.model_management as mm
    import torch

    model = qwen.model
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(1, 16, 1, H, W, generator=g), torch.tensor([0.7])
    outs = []
    with torch.inference_mode():
        mm.load_models_gpu([model])
        for p in PROMPTS:
            outs.append(model.model.apply_model(x, sigma, c_crossattn=_context(model, qwen.conds[p]["cond"], x)))
    a, b = (o.float() for o in outs)
    assert a.shape == (1, 16, 1, H, W) and torch.isfinite(a).all() and torch.isfinite(b).all()
    assert (a - x).std() > 0.1  # denoised = x - sigma * velocity: the model says something
    assert (a - b).abs().max() > 0.01


def test_dit_matches_diffusers(qwen):
    """The two prompts in one batch: the shorter one padded with zeros and masked, as a batched pipeline does."""
    import torch

    ours = qwen.model.model.diffusion_model  # fp32 ("default" on a CPU): diffusers gets views of its weights
    with torch.inference_mode():  # ComfyUI loaded them as inference tensors
        theirs = tiny_qwen_image.to_diffusers_qwen_image(ours)
    a, b = (qwen.conds[p]["cond"].float() for p in PROMPTS)
    length = b.shape[1]
    context = torch.cat([torch.nn.functional.pad(a, (0, 0, 0, length - a.shape[1])), b])
    mask = torch.zeros(2, length, dtype=torch.long)
    mask[0, :a.shape[1]] = 1
    mask[1] = 1
    g = torch.Generator().manual_seed(1)
    x, sigma = torch.randn(2, 16, 1, H, W, generator=g), torch.tensor([0.3, 0.8])
    with torch.inference_mode():
        out = ours(x, sigma, context, attention_mask=mask)
        ref = tiny_qwen_image.diffusers_forward(theirs, x, sigma, context, mask)
        swapped = ours(x, sigma, context.flip(0), attention_mask=mask.flip(0))
        alone = ours(x[:1], sigma[:1], a)  # unpadded, unmasked: the padding changes nothing
    assert out.shape == (2, 16, 1, H, W) and out.std() > 0.5
    assert (out - swapped).abs().max() > 0.01
    assert torch.allclose(out[:1], alone, atol=1e-4, rtol=1e-4), (out[:1] - alone).abs().max()
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4), (out - ref).abs().max()
