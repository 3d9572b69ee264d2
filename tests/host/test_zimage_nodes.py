"""Z-Image inside ComfyUI with its family entry: train on the MODEL / CLIP / VAE that UNETLoader, CLIPLoader
(type lumina2) and VAELoader give, save the LoRA in ai-toolkit's key format, load it with LoraLoader and with
diffusers' ZImagePipeline, and use it through LoRA Stack (block weights), the LoRA Grid and the merges.

On the tiny set of ``fixtures/tiny_zimage.py`` (ComfyUI pins Z-Image's width at 3840: one main layer, the two
noise and two context refiners, a full-size Qwen3-4B in fp8). The DiT is loaded at the default weight dtype
(fp32 on a CPU) so the LoRA comparisons hold to 1e-5. ComfyUI 0.3.64 has no Z-Image: one host-limit skip.
"""

from __future__ import annotations

import math

import pytest
import torch


CAPTION = "a photo of a red ball"
TRIGGER = "sks"  # make_dataset's trigger
STEPS = 20
RANK, ALPHA = 4, 2.0
SEED = 7
FOLDER = "lw_zimage"


@pytest.fixture(scope="module")
def zi(tiny_zimage_files):
    """(MODEL, CLIP, VAE, file names) of the tiny Z-Image set as a user's graph loads it."""
    from comfy_harness import release_models
    from fixtures import tiny_zimage

    model, clip, vae = tiny_zimage.load_tiny_zimage(tiny_zimage_files, weight_dtype="default")
    yield model, clip, vae, tiny_zimage_files
    del model, clip, vae
    release_models()


@pytest.fixture(scope="module")
def trained(zi, tmp_path_factory):
    """A LoRA trained through the node's code path on every Linear of the blocks (preset "all"), with a fixed
    set's loss (fixed noise and sigmas) before and after."""
    from comfy_harness import train_family_lora

    return train_family_lora(zi, tmp_path_factory.mktemp("zimage_photos"), name="tiny_zimage", steps=STEPS, rank=RANK,
                             alpha=ALPHA, lr=4e-3, caption=f"{TRIGGER}, {CAPTION}")


@pytest.fixture(scope="module")
def saved(comfy_host, trained) -> str:
    from comfy_harness import save_trained

    return save_trained(comfy_host, trained["result"].lora, FOLDER)


def test_zimage_trains_as_its_family(zi, trained):
    be = trained["backend"]
    assert be.arch == "zimage" and not be.untested and be.timestep_sampling_default == "logit_normal"
    assert be.flow_shift == pytest.approx(3.0)
    names = set(trained["result"].lora.modules)
    # the main layer and both refiners, modulation included where a block has one (not the context refiners)
    assert {"lora_unet_layers_0_attention_qkv", "lora_unet_layers_0_adaLN_modulation_0",
            "lora_unet_noise_refiner_1_feed_forward_w3", "lora_unet_context_refiner_0_attention_out"} <= names
    assert "lora_unet_context_refiner_0_adaLN_modulation_0" not in names
    assert not trained["clip_loaded"], "the Qwen3 encoder should leave once the prompts are encoded"


def test_loss_of_a_fixed_set_falls(trained):
    # The pinned 3840-wide model with one random main layer learns slowly: a tenth off in 20 steps
    assert trained["after"] < 0.9 * trained["before"], (trained["before"], trained["after"])
    assert all(math.isfinite(v) for v in trained["result"].losses)


def test_file_is_ai_toolkit_format_and_names_the_family(comfy_host, saved):
    import safetensors

    path = comfy_host.base_directory / "models" / "loras" / saved
    with safetensors.safe_open(path, "pt") as f:
        keys, md = list(f.keys()), f.metadata()
    assert all(k.startswith("diffusion_model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert "diffusion_model.layers.0.attention.to_q.lora_A.weight" in keys
    assert "diffusion_model.noise_refiner.0.attention.to_out.0.lora_B.weight" in keys
    assert md["modelspec.architecture"] == "z-image/lora" and md["ss_base_model_version"] == "zimage"


def test_loraloader_loads_every_key_and_matches_the_trained_model(trained, zi, saved, caplog):
    from comfy_harness import assert_loraloader_reproduces

    assert_loraloader_reproduces(trained, zi, saved, caplog)


def test_diffusers_pipeline_loads_the_file_and_reproduces_the_trained_model(trained, zi, comfy_host, saved):
    from diffusers import ZImagePipeline
    from fixtures import tiny_zimage

    # from the file: the live MODEL's weights may hold a LoraLoader patch (ComfyUI patches in place while loaded)
    dit_file = comfy_host.base_directory / "models" / "diffusion_models" / zi[3]["dit"]
    transformer = tiny_zimage.to_diffusers_zimage(dit_file)
    pipe = ZImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=transformer)
    x_t, sigma, cond = trained["x_t"], trained["sigma"], trained["cond"]
    # ComfyUI's NextDiT attends to the caption's real tokens only (its attention mask); diffusers takes them unpadded
    mask = cond.extras[0].get("attention_mask") if cond.extras else None
    n = int(mask[0].sum()) if mask is not None else cond.contexts[0].shape[1]
    context = torch.cat([c[:, :n] for c in cond.contexts]).float()
    with torch.no_grad():
        base = tiny_zimage.diffusers_forward(transformer, x_t.float(), sigma, context)
        pipe.load_lora_weights(str(comfy_host.base_directory / "models" / "loras" / saved))
        theirs = tiny_zimage.diffusers_forward(transformer, x_t.float(), sigma, context)
    assert (theirs - base).abs().max() > 1e-3, "the LoRA did not change diffusers' output"
    ours = trained["trained_out"]
    assert torch.allclose(theirs, ours, atol=1e-4), (theirs - ours).abs().max()


def sample(model, conditioning) -> torch.Tensor:
    import nodes

    latent = {"samples": torch.zeros([1, 16, 8, 8])}
    with torch.inference_mode():
        (out,) = nodes.common_ksampler(model, SEED, 2, 1.0, "euler", "simple", conditioning, conditioning, latent)
    return out["samples"].float()


def test_stack_block_weights_grid_and_merges(comfy_host, zi, saved, trained, caplog):
    from comfy_harness import check_stack_grid_and_merges

    model, clip, vae, _ = zi
    check_stack_grid_and_merges(comfy_host, model, clip, vae, saved, FOLDER, sample, caption=CAPTION, trigger=TRIGGER,
                                rank=RANK, seed=SEED, blocks_error="3 values; zimage takes 31 values", config_name="ZImage",
                                caplog=caplog)
