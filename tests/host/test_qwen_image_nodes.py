"""Qwen-Image inside ComfyUI with its family entry: train on the MODEL / CLIP / VAE that UNETLoader, CLIPLoader
(type qwen_image) and VAELoader give, save the LoRA in ai-toolkit's key format, load it with LoraLoader and with
diffusers' QwenImagePipeline, then use it as a graph does after training (LoRA Stack, Grid, merges), with prompts
encoded after ComfyUI unloaded the scaled-fp8 Qwen2.5-VL: the node loads and releases models in inference mode, so
its quantized weights stay inference tensors that ComfyUI can load again (``nodes/comfy/host.reloads_after_unload``).

On the tiny set of ``fixtures/tiny_qwen_image.py`` (one block at the pinned width 3072, the full-size Qwen2.5-VL-7B
in scaled fp8, a narrow Wan 2.1 VAE: latents [B, 16, 1, h, w]). The DiT is loaded at the default weight dtype (fp32
on a CPU) so the LoRA comparisons hold to 1e-5. On a CPU every prompt encode dequantizes the 7B encoder (20-45 s),
so the test encodes few. The merge into a checkpoint (which holds the 8 GB encoder) is the peak: 16-18.6 GiB RSS, of
which 9-11.3 GiB anonymous and the rest the mapped encoder file (measured, 2-core CI machine). ComfyUI 0.3.64 would
copy the encoder: one host-limit skip.
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
FOLDER = "lw_qwen_image"


@pytest.fixture(scope="module")
def kl(tiny_qwen_image_files):
    """(MODEL, CLIP, VAE, file names) of the tiny Qwen-Image set as a user's graph loads it."""
    from comfy_harness import release_models
    from fixtures import tiny_qwen_image

    model, clip, vae = tiny_qwen_image.load_tiny_qwen_image(tiny_qwen_image_files, weight_dtype="default")
    yield model, clip, vae, tiny_qwen_image_files
    del model, clip, vae
    release_models()


@pytest.fixture(scope="module")
def trained(kl, tmp_path_factory):
    """A LoRA trained through the node's code path on every Linear of the blocks (preset "all"), with a fixed
    set's loss (fixed noise and sigmas) before and after."""
    from comfy_harness import train_family_lora

    return train_family_lora(kl, tmp_path_factory.mktemp("qwen_image_photos"), name="tiny_qwen_image", steps=STEPS,
                             rank=RANK, alpha=ALPHA, lr=4e-3, caption=f"{TRIGGER}, {CAPTION}")


@pytest.fixture(scope="module")
def saved(comfy_host, trained) -> str:
    from comfy_harness import save_trained

    return save_trained(comfy_host, trained["result"].lora, FOLDER)


def test_qwen_image_trains_as_its_family(kl, trained):
    import comfy.model_sampling

    be = trained["backend"]
    assert be.arch == "qwen_image" and not be.untested and be.timestep_sampling_default == "qwen_shift"
    assert isinstance(be.model_sampling, comfy.model_sampling.CONST)
    names = set(trained["result"].lora.modules)
    assert {"lora_unet_transformer_blocks_0_attn_to_q", "lora_unet_transformer_blocks_0_attn_add_v_proj",
            "lora_unet_transformer_blocks_0_img_mlp_net_0_proj", "lora_unet_transformer_blocks_0_txt_mod_1"} <= names
    # Released once the prompts are encoded, its scaled-fp8 (QuantizedTensor) weights still inference tensors, which
    # ComfyUI's next CLIPTextEncode can load again (nodes/comfy/host.reloads_after_unload)
    from lora_workbench.nodes.comfy import host

    assert not trained["clip_loaded"], "the Qwen2.5-VL encoder should leave once the prompts are encoded"
    assert host.reloads_after_unload(kl[1].patcher)
    # the node's memory estimate reads the transformer's shape: two-stream blocks at 3072 with per-block modulation
    shape = be.memory_shape()
    dm = kl[0].model.diffusion_model
    assert shape.unet.hidden == 3072 and shape.unet.double_blocks == 1 and shape.unet.modulation
    assert shape.unet_params == sum(p.numel() for p in dm.parameters()) and shape.te_params[0] > 7_000_000_000


def test_loss_of_a_fixed_set_falls(trained):
    assert trained["after"] < 0.9 * trained["before"], (trained["before"], trained["after"])
    assert all(math.isfinite(v) for v in trained["result"].losses)


def test_file_is_ai_toolkit_format_and_names_qwen_image(comfy_host, saved):
    import safetensors

    from lora_workbench.training.lora.formats import load_lora

    path = comfy_host.base_directory / "models" / "loras" / saved
    with safetensors.safe_open(path, "pt") as f:
        keys, md = list(f.keys()), f.metadata()
    assert all(k.startswith("diffusion_model.transformer_blocks.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in keys)
    assert "diffusion_model.transformer_blocks.0.img_mod.1.lora_A.weight" in keys
    assert md["modelspec.architecture"] == "Qwen-Image/lora" and md["ss_base_model_version"] == "qwen_image"
    assert load_lora(path).arch == "qwen_image"


def test_loraloader_loads_every_key_and_matches_the_trained_model(trained, kl, saved, caplog):
    from comfy_harness import assert_loraloader_reproduces

    assert_loraloader_reproduces(trained, kl, saved, caplog)


def test_diffusers_pipeline_loads_the_file_and_reproduces_the_trained_model(trained, kl, comfy_host, saved):
    from diffusers import QwenImagePipeline
    from fixtures import tiny_qwen_image

    # from the file: the live MODEL's weights may hold a LoraLoader patch (ComfyUI patches in place while loaded)
    dit_file = comfy_host.base_directory / "models" / "diffusion_models" / kl[3]["dit"]
    transformer = tiny_qwen_image.to_diffusers_qwen_image(dit_file)
    pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=transformer)
    x_t, sigma, cond = trained["x_t"], trained["sigma"], trained["cond"]
    context = torch.cat(cond.contexts).float()
    with torch.no_grad():
        base = tiny_qwen_image.diffusers_forward(transformer, x_t.float(), sigma, context)
        pipe.load_lora_weights(str(comfy_host.base_directory / "models" / "loras" / saved))
        theirs = tiny_qwen_image.diffusers_forward(transformer, x_t.float(), sigma, context)
    assert (theirs - base).abs().max() > 1e-3, "the LoRA did not change diffusers' output"
    ours = trained["trained_out"]
    assert torch.allclose(theirs, ours, atol=1e-5), (theirs - ours).abs().max()


def sample(model, conditioning) -> torch.Tensor:
    import nodes

    # EmptySD3LatentImage's 4-D latent at 64 x 64 px; the sampler adds the frame axis of the Wan 2.1 latents
    latent = {"samples": torch.zeros([1, model.model.latent_format.latent_channels, 8, 8])}
    with torch.inference_mode():
        (out,) = nodes.common_ksampler(model, SEED, 2, 1.0, "euler", "simple", conditioning, conditioning, latent)
    return out["samples"].float()


def test_stack_block_weights_grid_and_merges(comfy_host, kl, saved, trained, caplog):
    import comfy.model_management as mm

    from comfy_harness import check_stack_grid_and_merges

    model, clip, vae, _ = kl
    with torch.inference_mode():  # what ComfyUI does to make room for the DiT: the next encode loads Qwen2.5-VL again
        mm.unload_all_models()
    check_stack_grid_and_merges(comfy_host, model, clip, vae, saved, FOLDER, sample, caption=CAPTION, trigger=TRIGGER,
                                rank=RANK, seed=SEED, blocks_error="3 values; qwen_image takes 61 values",
                                config_name="QwenImage", caplog=caplog)
