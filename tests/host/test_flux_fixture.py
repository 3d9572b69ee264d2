"""The tiny Flux DiT fixtures (tests/fixtures/tiny_flux.py): ComfyUI detects them as Flux.1 dev and
schnell, and the diffusers counterparts compute the same function as ComfyUI's DiT (Chroma too,
through ComfyUI's Chroma module built at a small width, since detection pins Chroma to 3072)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the shared fixtures folder

from fixtures import tiny_flux  # noqa: E402  (imports no ComfyUI at module level)

B, H, W, L = 2, 8, 12, 7  # batch, latent height / width (not square: a transposed pack shows), text tokens


def _inputs():
    import torch

    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, 16, H, W, generator=g), torch.randn(B, L, 4096, generator=g),
            torch.randn(B, 768, generator=g), torch.tensor([0.3, 0.8]))


@pytest.mark.parametrize("variant, config_class", [("dev", "Flux"), ("schnell", "FluxSchnell")])
def test_flux_dit_is_detected_and_matches_diffusers(comfy_host, tmp_path, variant, config_class):
    import safetensors.torch
    import torch

    import comfy.model_detection
    import comfy.sd

    state_dict = tiny_flux.flux_dit_state_dict(variant)
    if comfy.model_detection.detect_unet_config(state_dict, "")["hidden_size"] != 128:
        pytest.skip("host limit: this ComfyUI pins Flux's hidden size to 3072 at detection; the hidden-128 "
                    "fixture needs 0.33+")
    path = tmp_path / tiny_flux.FLUX_FILE_NAMES[variant]
    safetensors.torch.save_file(state_dict, str(path))

    model = comfy.sd.load_diffusion_model(str(path)).model
    assert type(model.model_config).__name__ == config_class
    dit = model.diffusion_model.float()
    x, context, pooled, sigma = _inputs()
    guidance = torch.tensor([3.5, 2.0]) if variant == "dev" else None
    with torch.no_grad():
        ours = dit(x, model.model_sampling.timestep(sigma), context, y=pooled, guidance=guidance)
        theirs = tiny_flux.to_diffusers_flux(path)(
            hidden_states=tiny_flux.pack(x), encoder_hidden_states=context, pooled_projections=pooled,
            timestep=sigma, img_ids=tiny_flux.pack_ids(H, W), txt_ids=torch.zeros(L, 3), guidance=guidance).sample
    assert ours.std() > 0.5  # the output depends on the input: nothing is zeroed
    assert torch.allclose(ours, tiny_flux.unpack(theirs, H, W), atol=2e-5), (ours - tiny_flux.unpack(theirs, H, W)).abs().max()


def test_chroma_dit_matches_diffusers(comfy_host):
    import torch

    import comfy.ops
    from comfy.ldm.chroma.model import Chroma, ChromaParams

    state_dict = tiny_flux.materialize(tiny_flux.chroma_dit_state_dict(256, approximator_hidden=256, dtype=torch.float32))
    g = torch.Generator().manual_seed(1)
    for k in state_dict:  # the fixture's approximator MLPs are pass-through zeros; check their mapping too
        if k.startswith("distilled_guidance_layer.layers."):
            state_dict[k] = 0.05 * torch.randn(state_dict[k].shape, generator=g)
    config = tiny_flux._known_to(ChromaParams, tiny_flux.chroma_dit_config(256, approximator_hidden=256))
    comfy_model = Chroma(**config, dtype=torch.float32, operations=comfy.ops.disable_weight_init)
    own = comfy_model.state_dict().keys()  # RMSNorm scales are ".weight" on 0.33, ".scale" on 0.3.64
    comfy_model.load_state_dict({k if k in own else k[: -len("scale")] + "weight": v for k, v in state_dict.items()},
                                strict=True)
    x, context, _, sigma = _inputs()
    with torch.no_grad():
        ours = comfy_model(x, sigma, context, guidance=torch.zeros(B))
        theirs = tiny_flux.to_diffusers_chroma(state_dict)(
            hidden_states=tiny_flux.pack(x), encoder_hidden_states=context, timestep=sigma,
            img_ids=tiny_flux.pack_ids(H, W), txt_ids=torch.zeros(L, 3)).sample
    assert ours.std() > 0.5
    assert torch.allclose(ours, tiny_flux.unpack(theirs, H, W), atol=2e-5), (ours - tiny_flux.unpack(theirs, H, W)).abs().max()
