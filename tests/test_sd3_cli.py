"""SD3.5 through diffusers (the CLI's backend), on a tiny StableDiffusion3Pipeline built from configs: the
backend encodes and predicts as the pipeline does, the CLI trains a folder and the fixed-set loss falls, the
file is diffusers' SD3 format that ``StableDiffusion3Pipeline.load_lora_weights`` loads to reproduce the
trained transformer, and a resumed run continues the same curve."""

from __future__ import annotations

import safetensors
import torch

from fixtures.tiny_sd3_pipeline import save_tiny_sd3_pipeline, tiny_sd3_pipeline
from helpers import StopAt, make_images, tiny_dataset_cfg
from lora_workbench.app.cli import main
from lora_workbench.training.config import TrainConfig
from lora_workbench.training.data.dataset import scan_folder
from lora_workbench.training.lora import network
from lora_workbench.training.lora.formats import load_lora
from lora_workbench.training.model.sd3 import DiffusersSD3Backend
from lora_workbench.training.train.trainer import RunOptions, TrainData, Trainer
from test_flux_cli import SMALL, fixed_flow_loss

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
    dcfg = tiny_dataset_cfg(imgs)
    records = scan_folder(dcfg)
    targets = be.lora_targets("all", False)
    before = fixed_flow_loss(be, records, dcfg)
    network.inject(be.roots(), targets, 4, 2)
    network.load_into(be.roots(), targets, be.split_lora(lora))
    after = fixed_flow_loss(be, records, dcfg)
    assert after < 0.85 * before, f"fixed-set loss {before:.4f} -> {after:.4f}"

    # diffusers' own loader on a fresh pipeline gives the trained transformer's output
    pipe = tiny_sd3_pipeline()
    ref = DiffusersSD3Backend(pipe)
    g = torch.Generator().manual_seed(1)
    x, sigma = torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.6])
    with torch.no_grad():
        cond = be.encode_prompts([PROMPT])
        base = ref.predict(x, sigma, cond)
        pipe.load_lora_weights(str(path))
        theirs = ref.predict(x, sigma, cond)
        ours = be.predict(x, sigma, cond)
    assert (ours - base).abs().max() > 1e-3, "training did not change the output"
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_resume_continues_the_same_curve(tmp_path):
    dcfg = tiny_dataset_cfg(make_images(tmp_path / "img", n=4))
    records = scan_folder(dcfg)
    cfg = TrainConfig(rank=4, alpha=4, preset="all", steps=6, lr=2e-3, batch_size=2, seed=3, output_name="r")

    def backend():
        return DiffusersSD3Backend(tiny_sd3_pipeline(with_t5=False))

    full = Trainer(backend(), TrainData(records, dcfg), cfg).run()
    out = tmp_path / "run"
    first = Trainer(backend(), TrainData(records, dcfg), cfg, callbacks=StopAt(3),
                    options=RunOptions(output_dir=out)).run()
    assert first.stopped_early and first.steps_done == 3
    second = Trainer(backend(), TrainData(records, dcfg), cfg,
                     options=RunOptions(output_dir=out, resume_from=out / "r-state")).run()
    assert second.losses[:3] == first.losses
    torch.testing.assert_close(torch.tensor(second.losses), torch.tensor(full.losses), atol=1e-6, rtol=1e-5)
    for k, m in full.lora.modules.items():
        torch.testing.assert_close(second.lora.modules[k].delta(), m.delta(), atol=1e-6, rtol=1e-5, msg=k)
