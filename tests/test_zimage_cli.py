"""Z-Image through diffusers (the CLI's backend), on a tiny ZImagePipeline built from configs: the backend encodes,
predicts and schedules as the pipeline does, the CLI trains a folder and the fixed-set loss falls, the file is
ai-toolkit's Z-Image format that ``ZImagePipeline.load_lora_weights`` loads whole to reproduce the trained
transformer, the text encoder leaves once the prompts are cached, and a resumed run continues the same curve."""

from __future__ import annotations

import safetensors
import safetensors.torch
import torch

from fixtures.tiny_zimage_pipeline import save_tiny_zimage_pipeline, tiny_zimage_pipeline
from cli_checks import (assert_file_lowers_the_fixed_loss, assert_pipeline_reproduces,
                        assert_resume_continues_the_same_curve, assert_text_encoder_leaves_and_comes_back)
from helpers import make_images
from lora_workbench.app.cli import main
from lora_workbench.training.lora.formats import load_lora
from lora_workbench.training.model.single_file import load_model
from lora_workbench.training.model.zimage import DiffusersZImageBackend
from test_flux_cli import SMALL

PROMPT = "a photo of sks ball"


def test_encoding_predict_and_schedule_are_the_pipelines():
    from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas

    pipe = tiny_zimage_pipeline()
    be = DiffusersZImageBackend(pipe)
    assert be.timestep_sampling_default == "logit_normal" and be.flow_shift == 3.0
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(2, 16, 8, 8, generator=g), torch.tensor([0.25, 0.9])
    with torch.no_grad():
        cond = be.encode_prompts([PROMPT, "a dog"])
        embeds, _ = pipe.encode_prompt([PROMPT, "a dog"], device="cpu", do_classifier_free_guidance=False,
                                       max_sequence_length=be.max_sequence_length)
        # ZImagePipeline's step: t = (1000 - timestep) / 1000 = 1 - sigma, latents [C, 1, h, w] each, output negated
        theirs = -torch.stack(pipe.transformer(list(x.unsqueeze(2)), 1 - sigma, embeds).sample).squeeze(2)
        ours = be.predict(x, sigma, cond)
    assert [f.shape[0] for f in cond.feats] != [cond.feats[0].shape[0]] * 2  # each prompt keeps its own length
    for a, b in zip(cond.feats, embeds):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(ours, theirs)
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(sigmas=get_default_z_image_sigmas(8), mu=calculate_shift(16))
    torch.testing.assert_close(be.flow_sigmas(8, x.shape), sched.sigmas.float())


def test_preview_is_the_pipelines_image():
    """Our Euler preview at cfg G is ZImagePipeline's image at guidance_scale G - 1 (it adds G - 1 times
    cond - uncond to cond) from the same starting noise."""
    from lora_workbench.training.train.preview import sample_preview

    pipe = tiny_zimage_pipeline()
    be = DiffusersZImageBackend(pipe)
    kw = dict(steps=4, width=32, height=32, latent_channels=16, latent_factor=be.latent_factor)
    ours = sample_preview(be, PROMPT, seed=5, guidance=be.preview_guidance, **kw)
    noise = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(5))
    theirs = pipe(PROMPT, height=32, width=32, num_inference_steps=4, guidance_scale=be.preview_guidance - 1,
                  latents=noise, output_type="pt", max_sequence_length=be.max_sequence_length).images
    assert ours.shape == (1, 32, 32, 3)
    torch.testing.assert_close(ours, theirs.permute(0, 2, 3, 1).float(), atol=1e-4, rtol=1e-4)


def test_cli_trains_a_zimage_folder_loss_falls_and_diffusers_reproduces_it(tmp_path, capsys):
    folder = save_tiny_zimage_pipeline(tmp_path / "tiny-z-image")
    assert isinstance(load_model(folder), DiffusersZImageBackend)
    imgs = make_images(tmp_path / "img", n=4)
    out = tmp_path / "out"
    assert main(["train", str(imgs), "--model", str(folder), "--out", str(out), "--steps", "150", "--rank", "4",
                 "--alpha", "2", "--lr", "1e-2", "--preset", "all", "--batch-size", "2", "--trigger", "sks",
                 "--save-dtype", "fp32", *SMALL]) == 0
    capsys.readouterr()
    path = out / "lora.safetensors"
    with safetensors.safe_open(path, "pt") as f:
        keys, md = set(f.keys()), f.metadata()
    # ai-toolkit's Z-Image keys: ComfyUI's prefix, diffusers' module names, q / k / v apart
    assert all(k.startswith(("diffusion_model.layers.", "diffusion_model.noise_refiner.",
                             "diffusion_model.context_refiner.")) for k in keys), sorted(keys)[:3]
    assert {"diffusion_model.layers.0.attention.to_q.lora_A.weight",
            "diffusion_model.context_refiner.1.attention.to_v.lora_B.weight",
            "diffusion_model.noise_refiner.0.adaLN_modulation.0.lora_A.weight"} <= keys
    assert md["modelspec.architecture"] == "z-image/lora" and md["ss_base_model_version"] == "zimage"
    lora = load_lora(path)
    assert lora.arch == "zimage" and "lora_unet_layers_0_attention_qkv" in lora.modules
    # q / k / v were trained apart at rank 4: the file keeps each part at rank 4 (not the fused 12)
    assert {tuple(t.shape) for k, t in safetensors.torch.load_file(str(path)).items()
            if k.endswith("attention.to_q.lora_A.weight")} == {(4, 32)}

    be = DiffusersZImageBackend.from_pretrained(folder)
    assert_file_lowers_the_fixed_loss(be, lora, imgs, 4, 2)

    # diffusers' own loader on a fresh pipeline: every key becomes a LoRA layer, and the output is the trained one
    from peft.utils import get_peft_model_state_dict

    pipe = tiny_zimage_pipeline()
    g = torch.Generator().manual_seed(1)
    x, sigma = torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.6])
    assert_pipeline_reproduces(pipe, DiffusersZImageBackend(pipe), be, path, x, sigma, PROMPT)
    adapter = next(iter(pipe.transformer.peft_config))
    loaded = {"diffusion_model." + k.replace(f".{adapter}.", ".")
              for k in get_peft_model_state_dict(pipe.transformer, adapter_name=adapter)}
    assert loaded == keys, sorted(loaded ^ keys)[:5]


def test_text_encoder_leaves_once_prompts_are_cached_and_comes_back(tmp_path):
    folder = save_tiny_zimage_pipeline(tmp_path / "tiny-z-image")
    assert_text_encoder_leaves_and_comes_back(DiffusersZImageBackend.from_pretrained(folder),
                                              make_images(tmp_path / "img", n=2), PROMPT)


def test_resume_continues_the_same_curve(tmp_path):
    assert_resume_continues_the_same_curve(tmp_path, lambda: DiffusersZImageBackend(tiny_zimage_pipeline()))
