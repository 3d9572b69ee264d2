"""FLUX.2 klein inside ComfyUI with its family entry: train on the MODEL / CLIP / VAE that UNETLoader, CLIPLoader
(type flux2) and VAELoader give, save the LoRA in kohya's key format, load it with LoraLoader and with diffusers'
Flux2KleinPipeline, and use it through LoRA Stack (block weights), the LoRA Grid and the merges.

On the tiny set of ``fixtures/tiny_flux2.py`` (one double and one single block at a narrow width, which ComfyUI
0.33 reads from the weights; a full-size Qwen3-4B in fp8, klein 4B's encoder). The DiT is loaded at the default
weight dtype (fp32 on a CPU) so the LoRA comparisons hold to 1e-5. ComfyUI 0.3.64 has no FLUX.2: one host-limit
skip.
"""

from __future__ import annotations

import math

import pytest
import torch


CAPTION = "a photo of a red ball"
TRIGGER = "sks"  # make_dataset's trigger
STEPS = 60
RANK, ALPHA = 4, 2.0
SEED = 7
FOLDER = "lw_flux2"
PAD_TO = 32


@pytest.fixture(scope="module")
def kl(tiny_flux2_files):
    """(MODEL, CLIP, VAE, file names) of the tiny FLUX.2 klein set as a user's graph loads it."""
    from comfy_harness import release_models
    from fixtures import tiny_flux2

    model, clip, vae = tiny_flux2.load_tiny_flux2(tiny_flux2_files, weight_dtype="default")
    # klein's tokenizer pads every prompt to 512 tokens, and on a CPU each token costs a pass through 36 Qwen3
    # layers (~60 s a prompt): here prompts pad to 32 (the DiT gets them zero-padded to 512 by Flux2.extra_conds)
    clip.tokenizer.qwen3_4b.min_length = PAD_TO
    yield model, clip, vae, tiny_flux2_files
    del model, clip, vae
    release_models()


@pytest.fixture(scope="module")
def trained(kl, tmp_path_factory):
    """A LoRA trained through the node's code path on every Linear of the blocks (preset "all"), with a fixed
    set's loss (fixed noise and sigmas) before and after."""
    from comfy_harness import train_family_lora

    return train_family_lora(kl, tmp_path_factory.mktemp("flux2_photos"), name="tiny_flux2", steps=STEPS, rank=RANK,
                             alpha=ALPHA, lr=4e-3, caption=f"{TRIGGER}, {CAPTION}")


@pytest.fixture(scope="module")
def saved(comfy_host, trained) -> str:
    from comfy_harness import save_trained

    return save_trained(comfy_host, trained["result"].lora, FOLDER)


def test_klein_trains_as_its_family(kl, trained):
    import comfy.model_sampling

    be = trained["backend"]
    assert be.arch == "flux2" and not be.untested and be.variant == "klein-4b"
    assert be.timestep_sampling_default == "flux_shift" and be.patch_size == 1
    assert isinstance(be.model_sampling, comfy.model_sampling.CONST)
    names = set(trained["result"].lora.modules)
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_txt_mlp_0",
            "lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_0_linear2"} <= names
    assert not any("modulation" in n for n in names)  # klein's modulations live outside the blocks
    assert not trained["clip_loaded"], "the Qwen3 encoder should leave once the prompts are encoded"


def test_loss_of_a_fixed_set_falls(trained):
    assert trained["after"] < 0.9 * trained["before"], (trained["before"], trained["after"])
    assert all(math.isfinite(v) for v in trained["result"].losses)


def test_file_is_kohya_format_and_names_klein(comfy_host, saved):
    import safetensors

    from lora_workbench.training.lora.formats import load_lora

    path = comfy_host.base_directory / "models" / "loras" / saved
    with safetensors.safe_open(path, "pt") as f:
        keys, md = list(f.keys()), f.metadata()
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in keys)
    assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in keys
    assert md["modelspec.architecture"] == "Flux.2-klein-4b/lora" and md["ss_base_model_version"] == "flux2"
    assert md["ss_network_module"] == "networks.lora_flux_2"
    assert load_lora(path).arch == "flux2"


def test_the_distilled_klein_is_named_in_the_train_notice(kl):
    from lora_workbench.nodes.comfy import host
    from lora_workbench.training.model.archs import distilled_notice

    model, _, _, names = kl
    assert host.model_file_name(model) == names["dit"]
    assert ("klein Base" in distilled_notice(names["dit"])) == ("base" not in names["dit"].lower())
    assert "klein Base" in distilled_notice("flux-2-klein-4b-fp8.safetensors")


def test_loraloader_loads_every_key_and_matches_the_trained_model(trained, kl, saved, caplog):
    from comfy_harness import assert_loraloader_reproduces

    assert_loraloader_reproduces(trained, kl, saved, caplog)


def test_diffusers_pipeline_loads_the_file_and_reproduces_the_trained_model(trained, kl, comfy_host, saved):
    from diffusers import Flux2KleinPipeline
    from fixtures import tiny_flux2

    # from the file: the live MODEL's weights may hold a LoraLoader patch (ComfyUI patches in place while loaded)
    dit_file = comfy_host.base_directory / "models" / "diffusion_models" / kl[3]["dit"]
    transformer = tiny_flux2.to_diffusers_flux2(dit_file)
    pipe = Flux2KleinPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=transformer)
    x_t, sigma, cond = trained["x_t"], trained["sigma"], trained["cond"]
    # what ComfyUI's Flux2.extra_conds feeds the model: the context zero-padded at the front to 512 tokens
    context = torch.cat([torch.nn.functional.pad(c, (0, 0, 512 - c.shape[1], 0)) for c in cond.contexts]).float()
    with torch.no_grad():
        base = tiny_flux2.diffusers_forward(transformer, x_t.float(), sigma, context)
        pipe.load_lora_weights(str(comfy_host.base_directory / "models" / "loras" / saved))
        theirs = tiny_flux2.diffusers_forward(transformer, x_t.float(), sigma, context)
    assert (theirs - base).abs().max() > 1e-3, "the LoRA did not change diffusers' output"
    ours = trained["trained_out"]
    assert torch.allclose(theirs, ours, atol=1e-5), (theirs - ours).abs().max()


def sample(model, conditioning) -> torch.Tensor:
    import nodes

    latent = {"samples": torch.zeros([1, model.model.latent_format.latent_channels, 4, 4])}  # 64 x 64 px
    with torch.inference_mode():
        (out,) = nodes.common_ksampler(model, SEED, 2, 1.0, "euler", "simple", conditioning, conditioning, latent)
    return out["samples"].float()


def test_stack_block_weights_grid_and_merges(comfy_host, kl, saved, trained, caplog):
    from comfy_harness import check_stack_grid_and_merges

    model, clip, vae, _ = kl
    check_stack_grid_and_merges(comfy_host, model, clip, vae, saved, FOLDER, sample, caption=CAPTION, trigger=TRIGGER,
                                rank=RANK, seed=SEED, blocks_error="3 values; flux2 takes 33 values", config_name="Flux2",
                                caplog=caplog)
