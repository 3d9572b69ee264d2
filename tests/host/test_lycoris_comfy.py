"""LoHa and LoKr trained on ComfyUI's own SD1.5 modules load through ComfyUI's LoraLoader with every key, and the
patched model computes what the engine's peft layers computed (the tiny SD1.5-detected checkpoint, on the CPU)."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from comfy_harness import assert_every_lora_key_loaded
from test_comfy_backend import PROBE_PROMPT, comfy_cond, comfy_raw_output, load_tiny, make_dataset, probe_inputs

TOL = 1e-5


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_lycoris_file_loads_in_lora_loader_and_reproduces_the_engine(comfy_host, tiny_sd15_checkpoint, tmp_path,
                                                                      caplog, monkeypatch, algo):
    import comfy.cli_args
    import comfy.lora
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils
    import nodes

    from lora_workbench.nodes.comfy.backend import ComfyBackend
    from lora_workbench.training.config import TrainConfig
    from lora_workbench.training.lora.files import LycorisModule, read_lora_file, save_lora
    from lora_workbench.training.train.schedules import add_noise
    from lora_workbench.training.train.trainer import TrainData, Trainer

    # CLIP in fp32 (ComfyUI's --fp32-text-enc; its CPU default is fp16, where a merged weight rounds): the text
    # states then compare at the same 1e-5 as the UNet's output.
    monkeypatch.setattr(comfy.cli_args.args, "fp32_text_enc", True)
    model, clip, vae = load_tiny(tiny_sd15_checkpoint.name)
    assert clip.cond_stage_model.clip_l.transformer.text_model.embeddings.token_embedding.weight.dtype == torch.float32
    backend = ComfyBackend(model, clip, vae, model_name=tiny_sd15_checkpoint.name)
    records, dcfg = make_dataset(tmp_path / "img")
    # alpha != rank: LoHa and a low-rank LoKr factor scale by alpha / rank, a LoKr of two full factors by 1.
    # LoKr rank 16: CLIP's 768-wide layers get two full factors, its 3072-wide MLP a low-rank one (peft's rule).
    rank = 4 if algo == "loha" else 16
    cfg = TrainConfig(network=algo, rank=rank, alpha=rank / 2, preset="all", steps=4, lr=2e-2, train_text_encoder=True,
                      save_dtype="fp32", seed=0, output_name=f"lw_{algo}")
    x0, noise, t = probe_inputs(backend)
    trainer = Trainer(backend, TrainData(records, dcfg), cfg)
    with torch.inference_mode(), backend.training_context():
        x_t = add_noise(x0, noise, backend.alphas_cumprod(), t)
        with torch.no_grad():
            base_cond = backend.encode_prompts([PROBE_PROMPT])
            base_out = backend.predict(x_t, t, base_cond.repeat(len(t), 1, 1)).float()
        result = trainer.run(keep_injected=True)
        with torch.no_grad():  # the engine's trained model: peft LoHa / LoKr layers on ComfyUI's modules
            engine_cond = backend.encode_prompts([PROBE_PROMPT])
            engine_out = backend.predict(x_t, t, engine_cond.repeat(len(t), 1, 1)).float()
    mods = result.lora.modules.values()
    assert all(isinstance(m, LycorisModule) and m.algo == algo for m in mods)
    assert any(m.is_conv for m in mods), "preset 'all' trains the 3x3 convs too"
    if algo == "lokr":  # both kinds of LoKr module, so both scale rules are checked
        assert {m.rank == 0 for m in mods} == {True, False}

    loras = comfy_host.base_directory / "models" / "loras"
    path = save_lora(loras / f"lw_{algo}.safetensors", trainer.extract(cfg.steps), dtype="fp32", overwrite=True)
    sd, meta = read_lora_file(path)
    prefix = "hada_" if algo == "loha" else "lokr_"
    assert all(k.split(".")[-1].startswith(prefix) or k.endswith(".alpha") for k in sd)
    assert meta["ss_network_module"] == "lycoris.kohya" and f'"algo": "{algo}"' in meta["ss_network_args"]

    with caplog.at_level(logging.WARNING):
        with torch.inference_mode():
            model_l, clip_l = nodes.LoraLoader().load_lora(model, clip, path.name, 1.0, 1.0)
    assert_every_lora_key_loaded(caplog.text, model_l, clip_l, result.lora)

    # Every module: ComfyUI's LoHa / LoKr weight patch, in fp32, is the base weight plus the engine's delta.
    lw, checked = trainer.extract(cfg.steps), 0
    for target in trainer.targets:
        patcher = model_l if target.component == "unet" else clip_l.patcher
        key = next(k for k in patcher.patches if k.endswith(f".{target.path}.weight"))
        base = comfy.utils.get_attr(patcher.model, key).detach().float()
        patched = comfy.lora.calculate_weight(patcher.patches[key], base.clone(), key)
        delta = lw.modules[target.kohya_name].delta(shape=tuple(base.shape))
        assert torch.allclose(patched, base + delta, rtol=0, atol=1e-6), (key, (patched - base - delta).abs().max())
        checked += 1
    assert checked == len(result.lora.modules)

    # The patched UNet (fp32 here) computes what the engine's peft layers computed, from the same text states.
    comfy_out = comfy_raw_output(model_l, x0, noise, t, engine_cond.repeat(len(t), 1, 1))
    assert (engine_out - base_out).abs().max() > 1e-3, "the UNet LoHa/LoKr changed nothing"
    assert torch.allclose(comfy_out, engine_out, rtol=TOL, atol=TOL), (comfy_out - engine_out).abs().max()
    comfy_te = comfy_cond(clip_l, PROBE_PROMPT)
    assert (engine_cond - base_cond).abs().max() > 1e-2, "the text-encoder LoHa/LoKr changed nothing"
    assert torch.allclose(comfy_te, engine_cond, rtol=TOL, atol=TOL), (comfy_te - engine_cond).abs().max()

    # LoRA Stack and Merge LoRAs into Checkpoint give the same UNet. (Block weights need a UNet of a known layout,
    # which this tiny one is not; tests/test_lycoris.py checks that they scale the delta.)
    from test_flux_use_nodes import apply_stack, stack_rows

    from lora_workbench.nodes.merge_nodes import MergeLorasToCheckpoint

    stack = stack_rows([{"lora": path.name}])
    stacked, _, _ = apply_stack(model, clip, stack)
    stack_out = comfy_raw_output(stacked, x0, noise, t, engine_cond.repeat(len(t), 1, 1))
    assert torch.allclose(stack_out, engine_out, rtol=TOL, atol=TOL), (stack_out - engine_out).abs().max()
    with torch.inference_mode():
        merged_path = MergeLorasToCheckpoint.execute(model, clip, vae, f"lw_{algo}_merged", "fp32",
                                                     lora_stack=stack).result[0]
        merged = comfy.sd.load_checkpoint_guess_config(merged_path, output_vae=False, output_clip=False)[0]
    merged_out = comfy_raw_output(merged, x0, noise, t, engine_cond.repeat(len(t), 1, 1))
    os.unlink(merged_path)
    assert torch.allclose(merged_out, engine_out, rtol=TOL, atol=TOL), (merged_out - engine_out).abs().max()
    mm.unload_all_models()
