"""SD3.5 through diffusers (the CLI's backend), on a tiny StableDiffusion3Pipeline built from configs: the
backend encodes and predicts as the pipeline does, the CLI trains a folder and the fixed-set loss falls, the
file is diffusers' SD3 format that ``StableDiffusion3Pipeline.load_lora_weights`` loads to reproduce the
trained transformer, and a resumed run continues the same curve."""

from __future__ import annotations

import safetensors
import torch

from fixtures.tiny_sd3_pipeline import save_tiny_sd3_pipeline, tiny_sd3_pipeline
from cli_checks import (assert_file_lowers_the_fixed_loss, assert_pipeline_reproduces,
                        assert_resume_continues_the_same_curve)
from helpers import make_images
from lora_workbench.app.cli import main
from lora_workbench.training.lora.formats import load_lora
from lora_workbench.training.model.sd3 import DiffusersSD3Backend
from test_flux_cli import SMALL

PROMPT = "a photo of sks ball"


def test_encoding_and_predict_are_the_pipelines():
    pipe = tiny_sd3_pipeline()
    be = DiffusersSD3Backend(pipe)
    assert be.variant == "3.5-medium" and be.timestep_sampling_default == "logit_normal" and be.flow_shift == 3.0
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(2, 16, 8, 8, generator=g), torch.tensor([0.25, 0.9])
    with torch.no_grad():
        cond = be.encode_prompts([PROMPT, "a dog"])
        embeds, _, pooled, _ = pipe.encode_prompt([PROMPT, "a dog"], None, None, do_classifier_free_guidance=False)
        theirs = pipe.transformer(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=embeds,
                                  pooled_projections=pooled).sample
        ours = be.predict(x, sigma, cond)
    torch.testing.assert_close(cond.context, embeds)
    torch.testing.assert_close(ours, theirs)
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(8)
    torch.testing.assert_close(be.flow_sigmas(8, x.shape), sched.sigmas.float())


def test_cli_trains_an_sd3_folder_loss_falls_and_diffusers_reproduces_it(tmp_path, capsys):
    folder = save_tiny_sd3_pipeline(tmp_path / "tiny-sd3")
    imgs = make_images(tmp_path / "img", n=4)
    out = tmp_path / "out"
    assert main(["train", str(imgs), "--model", str(folder), "--out", str(out), "--steps", "60", "--rank", "4",
                 "--alpha", "2", "--lr", "1e-2", "--preset", "all", "--batch-size", "2", "--trigger", "sks",
                 "--save-dtype", "fp32", *SMALL]) == 0
    capsys.readouterr()
    path = out / "lora.safetensors"
    with safetensors.safe_open(path, "pt") as f:
        keys, md = set(f.keys()), f.metadata()
    assert all(k.startswith("transformer.transformer_blocks.") for k in keys), sorted(keys)[:3]
    assert "transformer.transformer_blocks.0.attn2.to_q.lora_A.weight" in keys
    assert md["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora" and md["ss_base_model_version"] == "sd3"
    lora = load_lora(path)
    assert lora.arch == "sd3"
    # q / k / v were trained apart at rank 4: the file keeps each part at rank 4 (not the fused 12)
    assert {tuple(t.shape) for k, t in safetensors.torch.load_file(str(path)).items()
            if k.endswith("attn.to_q.lora_A.weight")} == {(4, 32)}

    be = DiffusersSD3Backend.from_pretrained(folder)
    assert_file_lowers_the_fixed_loss(be, lora, imgs, 4, 2)

    # diffusers' own loader on a fresh pipeline gives the trained transformer's output
    pipe = tiny_sd3_pipeline()
    g = torch.Generator().manual_seed(1)
    x, sigma = torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.6])
    assert_pipeline_reproduces(pipe, DiffusersSD3Backend(pipe), be, path, x, sigma, PROMPT)


def test_resume_continues_the_same_curve(tmp_path):
    assert_resume_continues_the_same_curve(tmp_path, lambda: DiffusersSD3Backend(tiny_sd3_pipeline(with_t5=False)))
