"""Qwen-Image through diffusers (the CLI's backend), on a tiny QwenImagePipeline built from configs: the backend
encodes, predicts and schedules as the pipeline does, the CLI trains a folder and the fixed-set loss falls, the file is
ai-toolkit's Qwen-Image format that ``QwenImagePipeline.load_lora_weights`` loads whole to reproduce the trained
transformer, our preview with the LoRA is the pipeline's image with it, the text encoder leaves once the prompts are
cached, and a resumed run continues the same curve."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors
import torch

from cli_checks import (assert_file_lowers_the_fixed_loss, assert_pipeline_reproduces,
                        assert_resume_continues_the_same_curve, assert_text_encoder_leaves_and_comes_back)
from fixtures.tiny_qwen_image_pipeline import LATENT_CHANNELS, save_tiny_qwen_image_pipeline, tiny_qwen_image_pipeline
from helpers import make_images
from lora_workbench.app.cli import main
from lora_workbench.training.lora import network
from lora_workbench.training.lora.formats import load_lora
from lora_workbench.training.model.qwen_image import DiffusersQwenImageBackend
from lora_workbench.training.model.single_file import load_model
from test_flux_cli import SMALL

PROMPT = "a photo of sks ball"
C = LATENT_CHANNELS


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny folder, its images and the LoRA the CLI trained on them (one run for the module)."""
    tmp = tmp_path_factory.mktemp("qwen-image")
    folder = save_tiny_qwen_image_pipeline(tmp / "tiny-qwen-image")
    imgs = make_images(tmp / "img", n=4)
    out = tmp / "out"
    assert main(["train", str(imgs), "--model", str(folder), "--out", str(out), "--steps", "100", "--rank", "4",
                 "--alpha", "2", "--lr", "1e-2", "--preset", "all", "--batch-size", "2", "--trigger", "sks",
                 "--save-dtype", "fp32", *SMALL]) == 0
    return folder, imgs, out / "lora.safetensors"


def _trained_backend(folder, path) -> DiffusersQwenImageBackend:
    """The folder's backend with the file's LoRA in our own modules."""
    be = DiffusersQwenImageBackend.from_pretrained(folder)
    targets = be.lora_targets("all", False)
    network.inject(be.roots(), targets, 4, 2)
    network.load_into(be.roots(), targets, be.split_lora(load_lora(path)))
    return be


def test_encoding_predict_and_schedule_are_the_pipelines():
    from diffusers import QwenImageEditPipeline
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    pipe = tiny_qwen_image_pipeline()
    be = DiffusersQwenImageBackend(pipe)
    assert be.timestep_sampling_default == "qwen_shift" and be.preview_guidance == 4.0 and be.variant is None
    assert (be.latent_channels, be.latent_factor, be.patch_size) == (C, 4, 2)
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, 32, 48, generator=g) * 2 - 1
    x, sigma = torch.randn(2, C, 8, 12, generator=g), torch.tensor([0.25, 0.9])
    edit = QwenImageEditPipeline(pipe.scheduler, pipe.vae, pipe.text_encoder, pipe.tokenizer, None, pipe.transformer)
    with torch.no_grad():
        lat = be.encode_images(pixels)
        # the pipelines' image latents: the VAE's mode of one frame, normalised by latents_mean / latents_std
        torch.testing.assert_close(lat, edit._encode_vae_image(pixels.unsqueeze(2), generator=None).squeeze(2))
        cond = be.encode_prompts([PROMPT, "a dog"])
        embeds, mask = pipe.encode_prompt([PROMPT, "a dog"], device="cpu", max_sequence_length=be.max_sequence_length)
        # QwenImagePipeline's step: 2 x 2 patches, timestep / 1000 = sigma, img_shapes, the prompt mask, output as is
        latents = pipe._pack_latents(x, 2, C, 8, 12)
        out = pipe.transformer(hidden_states=latents, timestep=sigma * 1000 / 1000, guidance=None,
                               encoder_hidden_states_mask=mask, encoder_hidden_states=embeds,
                               img_shapes=[[(1, 4, 6)]] * 2, return_dict=False)[0]
        theirs = pipe._unpack_latents(out, 32, 48, pipe.vae_scale_factor).squeeze(2)
        ours = be.predict(x, sigma, cond)
        alone = be.predict(x[1:], sigma[1:], cond[1])  # a batch of one: no padding, no mask
    assert mask is not None and [f.shape[0] for f in cond.feats] == mask.sum(1).tolist()  # each prompt its own length
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(alone, theirs[1:], atol=1e-5, rtol=1e-5)
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 8, 8), mu=calculate_shift(24, 256, 8192, 0.5, 0.9))
    torch.testing.assert_close(be.flow_sigmas(8, x.shape), sched.sigmas.float())


def test_cli_trains_a_qwen_image_folder_loss_falls_and_diffusers_reproduces_it(trained):
    folder, imgs, path = trained
    assert isinstance(load_model(folder), DiffusersQwenImageBackend)
    with safetensors.safe_open(path, "pt") as f:
        keys, md = set(f.keys()), f.metadata()
    # ai-toolkit's Qwen-Image keys: ComfyUI's prefix, diffusers' module names (already Qwen-Image's)
    assert all(k.startswith("diffusion_model.transformer_blocks.") for k in keys), sorted(keys)[:3]
    assert {"diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight",
            "diffusion_model.transformer_blocks.1.attn.add_v_proj.lora_B.weight",
            "diffusion_model.transformer_blocks.0.txt_mlp.net.0.proj.lora_A.weight",
            "diffusion_model.transformer_blocks.1.img_mod.1.lora_B.weight"} <= keys
    assert len(keys) == 2 * 2 * 14  # every Linear of both blocks, A and B
    assert md["modelspec.architecture"] == "Qwen-Image/lora" and md["ss_base_model_version"] == "qwen_image"
    lora = load_lora(path)
    assert lora.arch == "qwen_image" and "lora_unet_transformer_blocks_0_attn_to_q" in lora.modules

    be = DiffusersQwenImageBackend.from_pretrained(folder)
    assert_file_lowers_the_fixed_loss(be, lora, imgs, 4, 2)

    # diffusers' own loader on a fresh pipeline: every key becomes a LoRA layer, and the output is the trained one
    from peft.utils import get_peft_model_state_dict

    pipe = tiny_qwen_image_pipeline()
    g = torch.Generator().manual_seed(1)
    x, sigma = torch.randn(1, C, 8, 8, generator=g), torch.tensor([0.6])
    assert_pipeline_reproduces(pipe, DiffusersQwenImageBackend(pipe), be, path, x, sigma, PROMPT)
    adapter = next(iter(pipe.transformer.peft_config))
    loaded = {"diffusion_model." + k.replace(f".{adapter}.", ".")
              for k in get_peft_model_state_dict(pipe.transformer, adapter_name=adapter)}
    assert loaded == keys, sorted(loaded ^ keys)[:5]


def test_preview_with_the_lora_is_the_pipelines_image(trained):
    """Our Euler preview without guidance is QwenImagePipeline's image (true_cfg_scale 1) from the same starting noise,
    both with the trained LoRA. (With guidance they differ by design: the pipeline rescales the guided velocity to the
    conditional one's norm; our previews use ComfyUI's cfg.)"""
    from lora_workbench.training.train.preview import sample_preview

    folder, _, path = trained
    be = _trained_backend(folder, path)
    kw = dict(seed=5, steps=4, width=32, height=32, guidance=1.0, latent_channels=C, latent_factor=be.latent_factor)
    ours = sample_preview(be, PROMPT, **kw)
    pipe = tiny_qwen_image_pipeline()
    pipe.load_lora_weights(str(path))
    noise = torch.randn((1, C, 8, 8), generator=torch.Generator().manual_seed(5))
    theirs = pipe(PROMPT, height=32, width=32, num_inference_steps=4, true_cfg_scale=1.0,
                  latents=pipe._pack_latents(noise, 1, C, 8, 8), output_type="pt",
                  max_sequence_length=be.max_sequence_length).images
    assert ours.shape == (1, 32, 32, 3)
    torch.testing.assert_close(ours, theirs.permute(0, 2, 3, 1).float(), atol=1e-4, rtol=1e-4)
    base = sample_preview(DiffusersQwenImageBackend(tiny_qwen_image_pipeline()), PROMPT, **kw)
    assert (ours - base).abs().max() > 1e-3, "the LoRA did not change the preview"


def test_text_encoder_leaves_once_prompts_are_cached_and_comes_back(trained):
    folder, imgs, _ = trained
    assert_text_encoder_leaves_and_comes_back(DiffusersQwenImageBackend.from_pretrained(folder), imgs, PROMPT)


def test_resume_continues_the_same_curve(tmp_path):
    assert_resume_continues_the_same_curve(tmp_path, lambda: DiffusersQwenImageBackend(tiny_qwen_image_pipeline()))
