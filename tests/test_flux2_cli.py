"""FLUX.2 klein through diffusers (the CLI's backend), on a tiny Flux2KleinPipeline built from configs: the backend
encodes, predicts and schedules as the pipeline does, its preview is the pipeline's image, the CLI trains a folder
(warning when its name is the distilled klein) and the fixed-set loss falls, the file is kohya's FLUX.2 format that
``Flux2KleinPipeline.load_lora_weights`` loads whole to reproduce the trained transformer, the text encoder leaves
once the prompts are cached, and a resumed run continues the same curve."""

from __future__ import annotations

import logging

import safetensors
import torch

from fixtures.tiny_flux2_pipeline import LATENT_CHANNELS, save_tiny_flux2_pipeline, tiny_flux2_pipeline
from cli_checks import (assert_file_lowers_the_fixed_loss, assert_pipeline_reproduces,
                        assert_resume_continues_the_same_curve)
from helpers import make_images, tiny_dataset_cfg
from lora_workbench.app.cli import main
from lora_workbench.training.config import TrainConfig
from lora_workbench.training.data.dataset import scan_folder
from lora_workbench.training.lora.formats import load_lora
from lora_workbench.training.model.flux2 import DiffusersFlux2Backend
from lora_workbench.training.model.single_file import load_model
from lora_workbench.training.train.trainer import TrainData, Trainer
from test_flux_cli import SMALL

PROMPT = "a photo of sks ball"
C = 4 * LATENT_CHANNELS  # the transformer's channels: the VAE's in 2 x 2 patches


def test_encoding_predict_and_schedule_are_the_pipelines():
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    pipe = tiny_flux2_pipeline()
    be = DiffusersFlux2Backend(pipe)
    assert be.timestep_sampling_default == "flux_shift" and be.variant is None and be.preview_guidance == 4.0
    assert (be.latent_channels, be.latent_factor, be.patch_size) == (C, 8, 1)
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, 32, 48, generator=g) * 2 - 1
    x, sigma = torch.randn(2, C, 4, 6, generator=g), torch.tensor([0.25, 0.9])
    with torch.no_grad():
        lat = be.encode_images(pixels)
        # the pipeline's latents: the VAE's mode, 2 x 2 patches, batch-norm statistics (its image-conditioning path)
        torch.testing.assert_close(lat, pipe._encode_vae_image(pixels, generator=None))
        assert lat.shape == (2, C, 4, 6) and abs(float(lat.mean())) < 5
        torch.testing.assert_close(be.decode_latents(lat), _pipeline_decode(pipe, lat))
        cond = be.encode_prompts([PROMPT, "a dog"])
        embeds, text_ids = pipe.encode_prompt([PROMPT, "a dog"], device="cpu",
                                              max_sequence_length=be.max_sequence_length)
        # Flux2KleinPipeline's step: packed tokens, timestep / 1000 = sigma, no guidance, the output as it is
        latents, latent_ids = pipe.prepare_latents(2, LATENT_CHANNELS, 32, 48, torch.float32, "cpu", None, latents=x)
        out = pipe.transformer(hidden_states=latents, timestep=sigma, guidance=None, encoder_hidden_states=embeds,
                               txt_ids=text_ids, img_ids=latent_ids, return_dict=False)[0]
        theirs = pipe._unpack_latents_with_ids(out, latent_ids, 4, 6)
        ours = be.predict(x, sigma, cond)
    assert cond.context.shape == (2, be.max_sequence_length, 3 * 32)  # three tapped layers side by side
    torch.testing.assert_close(cond.context, embeds)
    torch.testing.assert_close(ours, theirs)
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(sigmas=[1 - i / 8 for i in range(8)], mu=compute_empirical_mu(24, 8))
    torch.testing.assert_close(be.flow_sigmas(8, x.shape), sched.sigmas.float())
    # the text encoder's width names the klein size; a distilled model previews without the negative pass
    pipe.register_to_config(is_distilled=True)
    assert DiffusersFlux2Backend(pipe).preview_guidance == 1.0


def _pipeline_decode(pipe, lat):
    """What Flux2KleinPipeline.__call__ does after its loop, for output_type="pt", as [B, H, W, 3]."""
    mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    img = pipe.vae.decode(pipe._unpatchify_latents(lat * std + mean), return_dict=False)[0]
    return pipe.image_processor.postprocess(img, output_type="pt").permute(0, 2, 3, 1)


def test_preview_is_the_pipelines_image():
    """Our Euler preview at cfg G is Flux2KleinPipeline's image at guidance_scale G (both add G times cond - uncond
    to uncond, the negative prompt "") from the same starting noise."""
    from lora_workbench.training.train.preview import sample_preview

    pipe = tiny_flux2_pipeline()
    be = DiffusersFlux2Backend(pipe)
    kw = dict(steps=4, width=32, height=48, latent_channels=be.latent_channels, latent_factor=be.latent_factor)
    ours = sample_preview(be, PROMPT, seed=5, guidance=be.preview_guidance, **kw)
    noise = torch.randn((1, C, 6, 4), generator=torch.Generator().manual_seed(5))
    theirs = pipe(prompt=PROMPT, height=48, width=32, num_inference_steps=4, guidance_scale=be.preview_guidance,
                  latents=noise, output_type="pt", max_sequence_length=be.max_sequence_length).images
    assert ours.shape == (1, 48, 32, 3)
    torch.testing.assert_close(ours, theirs.permute(0, 2, 3, 1).float(), atol=1e-4, rtol=1e-4)


def test_cli_trains_a_klein_folder_loss_falls_and_diffusers_reproduces_it(tmp_path, capsys, caplog):
    folder = save_tiny_flux2_pipeline(tmp_path / "tiny-flux-2-klein-base-4b")
    assert isinstance(load_model(folder), DiffusersFlux2Backend)
    imgs = make_images(tmp_path / "img", n=4)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        assert main(["train", str(imgs), "--model", str(folder), "--out", str(out), "--steps", "120", "--rank", "4",
                     "--alpha", "2", "--lr", "1e-2", "--preset", "all", "--batch-size", "2", "--trigger", "sks",
                     "--save-dtype", "fp32", *SMALL]) == 0
    capsys.readouterr()
    assert "step-distilled" not in caplog.text  # a Base folder: no train-on-Base notice
    path = out / "lora.safetensors"
    with safetensors.safe_open(path, "pt") as f:
        keys, md = set(f.keys()), f.metadata()
    # kohya's FLUX.2 keys: BFL's fused modules under lora_unet_, the blocks only
    assert all(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) for k in keys), sorted(keys)[:3]
    assert {"lora_unet_double_blocks_1_img_attn_qkv.lora_down.weight", "lora_unet_double_blocks_0_txt_mlp_0.alpha",
            "lora_unet_single_blocks_1_linear1.lora_up.weight", "lora_unet_single_blocks_0_linear2.alpha"} <= keys
    assert not any("_mod_" in k or "modulation" in k for k in keys)
    assert md["modelspec.architecture"] == "Flux.2-klein-4b/lora" and md["ss_base_model_version"] == "flux2"
    lora = load_lora(path)
    assert lora.arch == "flux2"
    # q / k / v trained apart at rank 4, joined into one qkv module of rank 12 (block-diagonal)
    assert lora.modules["lora_unet_double_blocks_0_img_attn_qkv"].rank == 12
    assert lora.modules["lora_unet_single_blocks_0_linear1"].rank == 4

    be = DiffusersFlux2Backend.from_pretrained(folder)
    targets = be.lora_targets("all", False)
    assert_file_lowers_the_fixed_loss(be, lora, imgs, 4, 2)

    # diffusers' own loader on a fresh pipeline: every module becomes a LoRA layer, and the output is the trained one
    from peft.utils import get_peft_model_state_dict

    pipe = tiny_flux2_pipeline()
    g = torch.Generator().manual_seed(1)
    x, sigma = torch.randn(1, C, 4, 4, generator=g), torch.tensor([0.6])
    assert_pipeline_reproduces(pipe, DiffusersFlux2Backend(pipe), be, path, x, sigma, PROMPT)
    adapter = next(iter(pipe.transformer.peft_config))
    loaded = {k.replace(f".{adapter}.", ".").rsplit(".lora_", 1)[0]
              for k in get_peft_model_state_dict(pipe.transformer, adapter_name=adapter)}
    assert loaded == {t.path for t in targets}, sorted(loaded ^ {t.path for t in targets})[:5]


def test_cli_warns_for_the_distilled_klein(tmp_path, caplog):
    folder = save_tiny_flux2_pipeline(tmp_path / "flux-2-klein-4b")
    imgs = make_images(tmp_path / "img", n=2)
    with caplog.at_level(logging.WARNING):
        assert main(["train", str(imgs), "--model", str(folder), "--out", str(tmp_path / "out"), "--steps", "1",
                     "--rank", "2", "--preset", "attn", "--batch-size", "2", *SMALL]) == 0
    assert "'flux-2-klein-4b' looks like the step-distilled FLUX.2 klein" in caplog.text
    assert "flux-2-klein-base-4b" in caplog.text  # the fix: train on Base


def test_memory_shape_of_klein_4b_is_the_tables():
    """Counted on klein 4B's configs (weights on the meta device), the backend's shape is ``memory.FLUX2_KLEIN_4B``:
    SwiGLU as a plain MLP of 0.75 x linear_in's rows, no per-block modulation, Qwen3-4B."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3Config

    from lora_workbench.training.train import memory

    be = object.__new__(DiffusersFlux2Backend)  # the parts memory_shape reads, without loading 4B weights
    with torch.device("meta"):
        be.transformer = Flux2Transformer2DModel(num_layers=5, num_single_layers=20, num_attention_heads=24,
                                                 joint_attention_dim=3 * 2560, guidance_embeds=False)
        be.vae = AutoencoderKLFlux2()
    be.pipe = type("Pipe", (), {"vae_scale_factor": 8})()
    be._te_config = Qwen3Config(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
                                intermediate_size=9728, num_key_value_heads=8, head_dim=128)
    be._te_params, be.max_sequence_length, be.model_name = memory.QWEN3_4B_PARAMS, 512, "FLUX.2 klein 4B"
    assert be.memory_shape() == memory.FLUX2_KLEIN_4B


def test_text_encoder_leaves_once_prompts_are_cached_and_comes_back(tmp_path):
    folder = save_tiny_flux2_pipeline(tmp_path / "tiny-klein-base")
    dcfg = tiny_dataset_cfg(make_images(tmp_path / "img", n=2))
    be = DiffusersFlux2Backend.from_pretrained(folder)
    with torch.no_grad():
        before = be.encode_prompts([PROMPT])
    cfg = TrainConfig(rank=4, alpha=4, preset="attn", steps=2, lr=1e-3, batch_size=2, seed=3, output_name="t")
    result = Trainer(be, TrainData(scan_folder(dcfg), dcfg), cfg).run()
    assert result.steps_done == 2 and be.pipe.text_encoder is None
    assert be.memory_shape().te_params[0] > 0  # the estimate still knows the encoder
    with torch.no_grad():
        again = be.encode_prompts([PROMPT])  # reloaded from the folder
    torch.testing.assert_close(again.context, before.context)


def test_resume_continues_the_same_curve(tmp_path):
    assert_resume_continues_the_same_curve(tmp_path, lambda: DiffusersFlux2Backend(tiny_flux2_pipeline()))
