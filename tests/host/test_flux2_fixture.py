"""The tiny FLUX.2 klein 4B set (tests/fixtures/tiny_flux2.py): ComfyUI loads the DiT as FLUX.2 (flow, shift 2.02),
klein's Qwen3-4B encoder gives 7680-wide prompt-dependent conditioning, the DiT's prediction depends on the prompt,
the VAE has FLUX.2's 128-channel, factor-16 latent, and diffusers' Flux2Transformer2DModel with the same weights
computes the same function as ComfyUI's Flux.

The set is loaded once per module as a user's graph loads it (UNETLoader "default" = fp32 on a CPU, CLIPLoader type
flux2, VAELoader); the text encoder (4.0 GB in fp8, a full-size Qwen3-4B) is released as soon as the prompts are
encoded. The prompts are tokenized as the graph does (KleinTokenizer pads them to 512 tokens) but encoded with the
trailing padding dropped: a 512-token encode takes ~60 s on 2 CPU cores (every token runs through all 36 layers), a
20-token one ~6 s. The encoder is causal and masks the padding, so this changes nothing before the padding
(measured: the 21 leading positions of a 512-token encode equal the short encode exactly, max difference 0.0).
``model_base.Flux2.extra_conds`` pads the short context back to 512 tokens (zeros in front), as it does for any
shorter context, and that is what the DiT gets here.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the shared fixtures folder

from comfy_harness import set_folder  # noqa: E402
from fixtures import tiny_flux2  # noqa: E402  (imports no ComfyUI at module level)

PROMPTS = ("a photo of a cat", "an oil painting of a lighthouse at night")
HOST_LIMIT = ("host limit: this ComfyUI has no FLUX.2 (comfy.supported_models.Flux2, added after 0.3.64); "
              "the FLUX.2 fixture tests run on 0.33+")
H = W = 4  # 64 x 64 images: FLUX.2 latents are 1/16 of the image, 128 channels
PAD = 151643  # Qwen's <|endoftext|>, KleinTokenizer's pad token


def _unpadded(tokens: dict) -> dict:
    """``clip.tokenize`` output less its trailing pad tokens."""
    out = {}
    for name, sections in tokens.items():
        out[name] = []
        for section in sections:
            end = len(section)
            while end and section[end - 1][0] == PAD:
                end -= 1
            out[name].append(section[:end])
    return out


@pytest.fixture(scope="module")
def flux2(comfy_host, tmp_path_factory):
    """The set built and linked into the host's models folder, loaded with ComfyUI's nodes; the prompts encoded
    and the CLIP released. A namespace: model, vae, paths, te (facts about the encoder), conds (prompt ->
    ``encode_from_tokens(tokens less padding, return_dict=True)``). None on a ComfyUI without FLUX.2 (see
    ``loaded``)."""
    import comfy.model_management as mm
    import comfy.supported_models
    import torch

    if not hasattr(comfy.supported_models, "Flux2"):
        yield None
        return
    paths = tiny_flux2.build_flux2_set(set_folder(tmp_path_factory, "tiny_flux2"))
    names = tiny_flux2.link_flux2_set(paths, comfy_host.base_directory / "models")
    model, clip, vae = tiny_flux2.load_tiny_flux2(names)
    llama = clip.cond_stage_model.qwen3_4b.transformer.model
    te = SimpleNamespace(module=type(clip.cond_stage_model).__module__, layers=len(llama.layers),
                         width=llama.embed_tokens.weight.shape[1], dtype=llama.embed_tokens.weight.dtype,
                         taps=clip.cond_stage_model.qwen3_4b.layer)
    with torch.inference_mode():
        tokens = {p: clip.tokenize(p) for p in PROMPTS}
        conds = {p: clip.encode_from_tokens(_unpadded(tokens[p]), return_dict=True) for p in PROMPTS}
    te.n_tokens = {p: len(t["qwen3_4b"][0]) for p, t in tokens.items()}
    del clip, llama  # 4.0 GB
    gc.collect()
    mm.cleanup_models()
    yield SimpleNamespace(model=model, vae=vae, paths=paths, te=te, conds=conds)
    del model, vae
    mm.unload_all_models()
    gc.collect()


def loaded(flux2):
    """``flux2``, or the host-limit skip (raised in the test's call, so the module's skips fold into one line)."""
    if flux2 is None:
        pytest.skip(HOST_LIMIT)
    return flux2


def _model_context(model, cond):
    """What ComfyUI's sampler feeds the DiT as ``context`` for ``cond`` (``model_base.Flux2.extra_conds``)."""
    import torch

    conds = model.model.extra_conds(noise=torch.zeros(1, 128, H, W), device="cpu", cross_attn=cond)
    return conds["c_crossattn"].process_cond(batch_size=1, device="cpu", area=None).cond


def test_text_encoder_depends_on_the_prompt(flux2):
    import torch

    flux2 = loaded(flux2)
    assert flux2.te.module == "comfy.text_encoders.flux"
    assert (flux2.te.layers, flux2.te.width, flux2.te.dtype) == (36, 2560, torch.float8_e4m3fn)
    assert list(flux2.te.taps) == list(tiny_flux2.KLEIN_TE_LAYERS)
    assert set(flux2.te.n_tokens.values()) == {tiny_flux2.TEXT_TOKENS}  # KleinTokenizer pads to 512
    a, b = (flux2.conds[p]["cond"] for p in PROMPTS)
    assert a.shape[2] == b.shape[2] == tiny_flux2.KLEIN_4B_CONTEXT_DIM and 10 < a.shape[1] < b.shape[1] < 40
    for cond in (a, b):
        assert cond.shape[0] == 1 and torch.isfinite(cond).all() and cond.float().std() > 0.1
    # Same chat template prefix ("<|im_start|>user\n"), then the prompts differ: so do the hidden states.
    n = a.shape[1]
    assert (a[:, :3] - b[:, :3]).abs().max() < 1e-4
    assert (a[:, :n] - b[:, :n]).abs().max() > 0.1


def test_dit_loads_as_flux2(flux2):
    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_sampling
    import torch
    from comfy.ldm.flux.model import Flux

    flux2 = loaded(flux2)
    base = flux2.model.model
    assert type(base.model_config).__name__ == "Flux2" and isinstance(base, comfy.model_base.Flux2)
    config = base.model_config.unet_config
    expected = tiny_flux2.flux2_dit_config()
    assert {k: config[k] for k in expected} == expected
    assert isinstance(base.latent_format, comfy.latent_formats.Flux2)
    sampling = base.model_sampling
    assert isinstance(sampling, comfy.model_sampling.CONST)
    assert isinstance(sampling, comfy.model_sampling.ModelSamplingFlux) and sampling.shift == 2.02
    sigma = torch.tensor([0.25, 0.9])
    assert torch.allclose(sampling.timestep(sigma), sigma)  # the DiT takes sigma and scales by 1000 itself
    dit = base.diffusion_model
    assert isinstance(dit, Flux) and dit.hidden_size == 256 and dit.num_heads == 2
    assert (len(dit.double_blocks), len(dit.single_blocks)) == (1, 1)
    assert not hasattr(dit, "guidance_in") or isinstance(dit.guidance_in, torch.nn.Identity)
    assert dit.img_in.weight.dtype == torch.float32  # UNETLoader "default" on a CPU
    vae = flux2.vae
    assert (vae.latent_channels, vae.downscale_ratio) == (128, 16)
    with torch.inference_mode():
        latent = vae.encode(torch.rand(1, 64, 64, 3))
        image = vae.decode(latent)
    assert latent.shape == (1, 128, H, W) and image.shape == (1, 64, 64, 3)


def test_prediction_depends_on_the_prompt(flux2):
    """One ComfyUI ``apply_model`` (what the sampler calls) at 64 x 64 for each prompt."""
    import comfy.model_management as mm
    import torch

    flux2 = loaded(flux2)
    model = flux2.model
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(1, 128, H, W, generator=g), torch.tensor([0.7])
    outs = []
    with torch.inference_mode():
        mm.load_models_gpu([model])
        for c in (flux2.conds[p] for p in PROMPTS):
            conds = model.model.extra_conds(noise=x, device=x.device, cross_attn=c["cond"],
                                            attention_mask=c.get("attention_mask"))
            assert conds["c_crossattn"].cond.shape == (1, 512, 7680)  # padded in front
            conds = {k: v.process_cond(batch_size=1, device=x.device, area=None).cond for k, v in conds.items()}
            outs.append(model.model.apply_model(x, sigma, **conds).float())
    a, b = outs
    assert a.shape == (1, 128, H, W) and torch.isfinite(a).all() and torch.isfinite(b).all()
    assert (a - x).std() > 0.1  # denoised = x - sigma * velocity: the model says something
    assert (a - b).abs().max() > 0.01


def test_dit_matches_diffusers(flux2):
    import torch

    flux2 = loaded(flux2)
    ours = flux2.model.model.diffusion_model  # fp32 ("default" on a CPU): diffusers gets views of its weights
    with torch.inference_mode():  # ComfyUI loaded them as inference tensors
        theirs = tiny_flux2.to_diffusers_flux2(ours)
    assert theirs.config.guidance_embeds is False and theirs.config.joint_attention_dim == 7680
    context = torch.cat([_model_context(flux2.model, flux2.conds[p]["cond"]) for p in PROMPTS]).float()
    g = torch.Generator().manual_seed(1)
    x, sigma = torch.randn(2, 128, H, W, generator=g), torch.tensor([0.3, 0.8])
    with torch.inference_mode():
        a = ours(x, sigma, context)
        b = tiny_flux2.diffusers_forward(theirs, x, sigma, context)
        other = ours(x, sigma, context.flip(0))
    assert a.shape == (2, 128, H, W) and a.std() > 0.5  # nothing is zeroed
    assert (a - other).abs().max() > 0.01
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()


def test_klein_9b_is_told_by_its_context_width_and_its_loras_load_with_33_block_weights(comfy_host, caplog):
    """A DiT of klein 9B's shape (8 double + 24 single blocks, 12288-wide context: 3 tapped Qwen3-8B layers) at a
    narrow width: ComfyUI loads it as FLUX.2 and we name it klein 9B; a LoRA on every block Linear in kohya's FLUX.2
    keys loads in LoraLoader with every key patched; LoRA Stack takes klein 9B's 33 block weights (BASE, D00..D07,
    S00..S23) and refuses 4B's 26, naming the 33. Qwen3-8B itself has no tiny set (it would load at about twice the
    4B encoder's 8.9 GB peak): the 9B path differs from 4B's by these sizes only."""
    import logging

    import comfy.supported_models
    import nodes
    import torch

    if not hasattr(comfy.supported_models, "Flux2"):
        pytest.skip(HOST_LIMIT)
    from comfy_harness import release_models
    from test_flux_use_nodes import apply_stack, stack_rows

    from lora_workbench.nodes.comfy.families import family_variant
    from lora_workbench.training.lora.block_weights import BlockWeightError, apply_block_weights, parse_block_weights
    from lora_workbench.training.lora.files import LoraModule, LoraWeights, save_lora
    from lora_workbench.training.lora.metadata import kohya_metadata

    nine = tiny_flux2.KLEIN_9B
    models = comfy_host.base_directory / "models"
    dit = models / "diffusion_models" / "lw_tiny_flux-2-klein-base-9b.safetensors"
    if not dit.exists():
        tiny_flux2.write_sparse_safetensors(dit, tiny_flux2.flux2_dit_state_dict(
            hidden=tiny_flux2.HEAD_DIM, depth=nine["depth"], depth_single=nine["depth_single_blocks"],
            context_in_dim=nine["context_in_dim"]))
    try:
        with torch.inference_mode():
            model = nodes.UNETLoader().load_unet(dit.name, "default")[0]
        assert type(model.model.model_config).__name__ == "Flux2" and family_variant(model) == "klein-9b"
        blocks = model.model.diffusion_model
        g = torch.Generator().manual_seed(0)
        modules = {}
        for path, m in blocks.named_modules():
            if isinstance(m, torch.nn.Linear) and path.startswith(("double_blocks.", "single_blocks.")):
                modules["lora_unet_" + path.replace(".", "_")] = LoraModule(
                    torch.randn(2, m.in_features, generator=g), torch.randn(m.out_features, 2, generator=g) * 0.01, 2)
        lora = LoraWeights(modules, kohya_metadata(arch="flux2", variant="klein-9b", network_dim=2, network_alpha=2),
                           arch="flux2")
        save_lora(models / "loras" / "lw_klein9b" / "random.safetensors", lora, dtype="fp32", overwrite=True)
        name = "lw_klein9b/random.safetensors"
        with caplog.at_level(logging.WARNING), torch.inference_mode():
            patched = nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, 1.0)[0]
        assert "lora key not loaded" not in caplog.text and len(patched.patches) == len(modules) == 8 * 8 + 24 * 2  # q k v, out, MLP in, out per stream
        only_last = ",".join(["0"] * 32 + ["1"])  # S23 alone
        m, _, _ = apply_stack(model, None, stack_rows([{"lora": name}]), only_last)
        assert len(m.patches) == len(modules)
        kept = apply_block_weights(lora, parse_block_weights(only_last, "flux2"))
        assert {k for k, v in kept.modules.items() if v.up.abs().max() > 0} == {
            "lora_unet_single_blocks_23_linear1", "lora_unet_single_blocks_23_linear2"}
        with pytest.raises(BlockWeightError, match="33"):
            apply_stack(model, None, stack_rows([{"lora": name}]), ",".join(["1"] * 26))
    finally:
        model = patched = m = None
        release_models()
