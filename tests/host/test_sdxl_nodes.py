"""SDXL inside ComfyUI: train on its SDXL MODEL/CLIP/VAE, load the file with LoraLoader, stack it with block
weights, merge it into a checkpoint that reloads as SDXL, and compare it in the grid.

All on the tiny SDXL-family checkpoint (``tiny_sdxl.py``: ComfyUI's Segmind_Vega class, a full CLIP-L +
CLIP-G), loaded once for the module, on the CPU, under ``torch.inference_mode()`` as ComfyUI runs nodes.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from comfy_harness import assert_every_lora_key_loaded

PROMPT = "a photo of sks ball"
RANK = 4


@pytest.fixture(scope="module")
def xl(comfy_host, tiny_sdxl_checkpoint):
    import nodes

    with torch.inference_mode():
        return nodes.CheckpointLoaderSimple().load_checkpoint(tiny_sdxl_checkpoint.name)[:3]


@pytest.fixture(scope="module")
def random_xl_lora(comfy_host, xl) -> str:
    """A random rank-4 LoRA on the tiny SDXL's own kohya names (UNet attention + both encoders), under
    models/loras: its name as LoraLoader lists it."""
    from lora_workbench.nodes.comfy.backend import ComfyBackend
    from lora_workbench.training.lora.files import LoraModule, LoraWeights, save_lora
    from lora_workbench.training.lora.metadata import kohya_metadata

    backend = ComfyBackend(*xl)
    roots = backend.roots()
    g = torch.Generator().manual_seed(1)
    modules = {}
    for t in backend.lora_targets("attn", True):
        layer = roots[t.component].get_submodule(t.path)
        down = torch.randn(RANK, layer.in_features, generator=g) / math.sqrt(layer.in_features)
        up = torch.randn(layer.out_features, RANK, generator=g) * 0.5 / math.sqrt(RANK)
        modules[t.kohya_name] = LoraModule(down, up, alpha=float(RANK))
    name = "lw_sdxl/random_xl.safetensors"
    path = comfy_host.base_directory / "models" / "loras" / name
    if not path.exists():
        save_lora(path, LoraWeights(modules, kohya_metadata(arch="sdxl", title="random_xl", trigger_phrase="xlsks"),
                                    "sdxl"), dtype="fp32")
    return name


def comfy_sdxl_cond(clip, model, text: str, sizes: dict):
    """What CLIPTextEncodeSDXL + a sampler give the UNet: the cross-attention context and ``y``."""
    import comfy_extras.nodes_clip_sdxl as sdxl_nodes

    with torch.inference_mode():
        conditioning = sdxl_nodes.CLIPTextEncodeSDXL.execute(clip, text_g=text, text_l=text, **sizes).result[0]
        context, extra = conditioning[0]
        y = model.model.extra_conds(**extra)["y"].cond
    return context.clone(), y.clone(), extra["pooled_output"].clone()


def comfy_raw_output(model, x0, noise, t, context, y) -> torch.Tensor:
    """The UNet's eps for ``x0`` noised to DDPM step ``t``, from ComfyUI's ``BaseModel.apply_model``."""
    import comfy.model_management as mm

    with torch.inference_mode():
        mm.load_models_gpu([model])
        sigma = model.model.model_sampling.sigmas[t].float()
        s = sigma.view(-1, 1, 1, 1)
        x = x0 + s * noise
        denoised = model.model.apply_model(x, sigma, c_crossattn=context, y=y).float()
        return (x - denoised) / s


def make_dataset(folder, n: int = 2):
    from comfy_harness import make_photos

    from lora_workbench.training.config import DatasetConfig
    from lora_workbench.training.data.dataset import scan_folder

    make_photos(folder, n=n, size=64, caption="a photo of a ball")
    dcfg = DatasetConfig(path=str(folder), trigger="sks", resolution=64, bucket_step=64, min_bucket_side=64)
    return scan_folder(dcfg), dcfg


SIZES = {"width": 96, "height": 80, "crop_w": 8, "crop_h": 16, "target_width": 64, "target_height": 64}


# ---- the model -------------------------------------------------------------------------------------
def test_tiny_checkpoint_is_an_sdxl_family_model_with_comfyui_own_names(xl):
    import comfy.model_base
    import comfy.supported_models
    import comfy.utils
    from tiny_sdxl import UNET_CONFIG

    from lora_workbench.nodes.comfy.backend import ComfyBackend
    from lora_workbench.training.model import keys as unet_keys

    model, clip, vae = xl
    assert isinstance(model.model, comfy.model_base.SDXL)
    assert isinstance(model.model.model_config, comfy.supported_models.SDXL)
    backend = ComfyBackend(model, clip, vae)
    assert backend.arch == "sdxl" and set(backend.roots()) == {"unet", "te1", "te2"}
    comfy_map = comfy.utils.unet_to_diffusers(UNET_CONFIG)  # diffusers key -> LDM key, with .weight
    ours = unet_keys.unet_ldm_to_diffusers(backend.layout)
    assert not {ldm: d for ldm, d in ours.items() if comfy_map.get(f"{d}.weight") != f"{ldm}.weight"}
    # The tiny UNet's modules are named as in the real SDXL UNet (kohya names parse with the SDXL preset).
    for t in backend.lora_targets("all", False):
        assert unet_keys.parse_kohya_name(t.kohya_name, "sdxl")[1] == ours[t.path]


def test_predict_and_conditioning_equal_comfyui_sdxl_sampling(xl):
    """The backend's context, pooled output and ``y`` are ComfyUI's (CLIPTextEncodeSDXL + extra_conds),
    and its prediction is ``apply_model``'s, for a given original size, crop and target size."""
    from lora_workbench.nodes.comfy.backend import ComfyBackend
    from lora_workbench.training.train.schedules import add_noise

    model, clip, vae = xl
    backend = ComfyBackend(model, clip, vae)
    context, y, pooled = comfy_sdxl_cond(clip, model, PROMPT, SIZES)
    g = torch.Generator().manual_seed(11)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([25, 700])
    expected = comfy_raw_output(model, x0, noise, t, context.repeat(2, 1, 1), y.repeat(2, 1))
    size = {"original_size": (80, 96), "crop_top_left": (16, 8), "target_size": (64, 64)}
    with torch.inference_mode(), backend.training_context(), torch.no_grad():
        cond = backend.encode_prompts([PROMPT, PROMPT])
        ours = backend.predict(add_noise(x0, noise, backend.alphas_cumprod(), t), t,
                               backend.add_size_conditioning(cond, [size, size])).float()
    assert torch.equal(cond.context[:1], context) and torch.equal(cond.pooled[:1], pooled)
    assert torch.allclose(backend._adm(backend.add_size_conditioning(cond, [size, size]), x0.shape)[:1], y)
    assert torch.allclose(ours, expected, rtol=1e-4, atol=1e-4), (ours - expected).abs().max()


# ---- train, save, LoraLoader ---------------------------------------------------------------------------
def test_train_5_steps_save_and_lora_loader_loads_every_key(comfy_host, xl, tmp_path, caplog):
    import nodes

    from lora_workbench.nodes.comfy.backend import ComfyBackend
    from lora_workbench.training.config import TrainConfig
    from lora_workbench.training.lora.files import save_lora
    from lora_workbench.training.lora.formats import load_lora
    from lora_workbench.training.train.schedules import add_noise
    from lora_workbench.training.train.trainer import TrainData, Trainer

    model, clip, vae = xl
    backend = ComfyBackend(model, clip, vae, model_name="tiny_sdxl.safetensors")
    records, dcfg = make_dataset(tmp_path / "img")
    cfg = TrainConfig(rank=RANK, alpha=RANK, preset="attn", steps=5, lr=1e-2, train_text_encoder=True,
                      save_dtype="fp32", seed=0, output_name="lw_xl")
    g = torch.Generator().manual_seed(3)
    x0, noise, t = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    with torch.inference_mode(), backend.training_context():
        trainer = Trainer(backend, TrainData(records, dcfg), cfg)
        estimate = trainer.memory_estimate()
        result = trainer.run(keep_injected=True)
        with torch.no_grad():  # the engine's trained model: peft layers on ComfyUI's modules
            engine_cond = backend.add_size_conditioning(backend.encode_prompts([PROMPT]), [
                {"original_size": (80, 96), "crop_top_left": (16, 8), "target_size": (64, 64)}])
            engine_out = backend.predict(add_noise(x0, noise, backend.alphas_cumprod(), t), t, engine_cond).float()
    assert result.steps_done == 5 and all(math.isfinite(v) for v in result.losses)
    assert estimate is not None and estimate.parts.keys() == {"unet", "text encoder 1", "text encoder 2", "vae"}
    prefixes = {name.split("_")[1] for name in result.lora.modules}
    assert prefixes == {"unet", "te1", "te2"}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k" in result.lora.modules
    assert "lora_te2_text_model_encoder_layers_31_self_attn_q_proj" in result.lora.modules

    path = save_lora(comfy_host.base_directory / "models" / "loras" / "lw_xl.safetensors", result.lora,
                     dtype="fp32", overwrite=True)
    back = load_lora(path)
    assert back.arch == "sdxl"
    assert back.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert back.metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"

    with caplog.at_level(logging.WARNING):
        with torch.inference_mode():
            model_l, clip_l = nodes.LoraLoader().load_lora(model, clip, path.name, 1.0, 1.0)
    assert_every_lora_key_loaded(caplog.text, model_l, clip_l, result.lora)

    # ComfyUI's LoRA-patched weights give what the engine's injected layers gave.
    context, y, _ = comfy_sdxl_cond(clip_l, model_l, PROMPT, SIZES)
    comfy_out = comfy_raw_output(model_l, x0, noise, t, context, y)
    base_context, base_y, _ = comfy_sdxl_cond(clip, model, PROMPT, SIZES)
    base_out = comfy_raw_output(model, x0, noise, t, base_context, base_y)
    # Measured: the LoRA moves the UNet output by 1.6 and the context by 163; ComfyUI and the engine agree
    # to 1e-5 and 8e-3 (merged vs separate LoRA weights round differently over 12 + 32 fp16 CLIP layers).
    assert (comfy_out - base_out).abs().max() > 0.1, "the UNet LoRA changed nothing"
    assert (context - base_context).abs().max() > 1.0, "the text-encoder LoRAs changed nothing"
    assert torch.allclose(context, engine_cond.context, rtol=1e-3, atol=5e-2), (context - engine_cond.context).abs().max()
    assert torch.allclose(comfy_out, engine_out, rtol=1e-3, atol=1e-3), (comfy_out - engine_out).abs().max()


# ---- stack, block weights, merge, grid ---------------------------------------------------------------
def test_stack_with_sdxl_block_weights_and_family_check(xl, random_xl_lora, tiny_sd15_checkpoint):
    import nodes

    from lora_workbench.nodes.comfy.loras import LoraArchMismatchError, LoraUse, apply_loras

    model, clip, _ = xl
    with torch.inference_mode():
        full, full_clip, triggers = apply_loras(model, clip, [LoraUse(random_xl_lora)])
        # LBW's 12 SDXL values: BASE, IN04, IN05, IN07, IN08, MID, OUT00..OUT05 - text encoders and the
        # up path only.
        outs, outs_clip, _ = apply_loras(model, clip, [LoraUse(random_xl_lora)], "1,0,0,0,0,0,1,1,1,1,1,1")
    assert triggers == ["xlsks"]

    assert len(full.patches) == len(outs.patches) and len(full_clip.patcher.patches) == len(outs_clip.patcher.patches)
    with torch.inference_mode():
        sd15_model = nodes.CheckpointLoaderSimple().load_checkpoint(tiny_sd15_checkpoint.name)[0]
        with pytest.raises(LoraArchMismatchError, match="made for SDXL.*the model is SD1.x"):
            apply_loras(sd15_model, None, [LoraUse(random_xl_lora)])
    # The weighted file: input-block modules zeroed, output-block ones kept.
    from lora_workbench.nodes.comfy.loras import _weighted_state_dict, load_lora_file, lora_path, parse_spec

    weighted = _weighted_state_dict(random_xl_lora, load_lora_file(lora_path(random_xl_lora)),
                                     parse_spec("1,0,0,0,0,0,1,1,1,1,1,1", model))
    ups = {k: v for k, v in weighted.items() if k.endswith("lora_up.weight")}
    assert all(float(v.abs().max()) == 0 for k, v in ups.items() if "input_blocks" in k)
    assert all(float(v.abs().max()) > 0 for k, v in ups.items() if "output_blocks" in k or "_te" in k)


def test_merge_into_checkpoint_reloads_as_sdxl_with_the_lora_in_its_weights(comfy_host, run_prompt,
                                                                             tiny_sdxl_checkpoint, random_xl_lora):
    import comfy.model_base
    import comfy.supported_models
    import nodes
    import safetensors

    prompt = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_sdxl_checkpoint.name}},
        "stack": {"class_type": "LW_LoraStack", "inputs": {
            "lora_1": random_xl_lora, "enabled_1": True, "model_strength_1": 1.0, "clip_strength_1": 1.0,
            **{f"{k}_{i}": v for i in range(2, 7) for k, v in (("lora", "None"), ("enabled", True),
                                                                ("model_strength", 1.0), ("clip_strength", 1.0))}}},
        "merge": {"class_type": "LW_MergeLorasToCheckpoint", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "lora_stack": ["stack", 0],
            "filename": "lw_sdxl/merged", "dtype": "fp16"}},
    }
    run = run_prompt(prompt)
    assert run.success, run.error()
    merged = sorted((comfy_host.base_directory / "models" / "checkpoints" / "lw_sdxl").glob("merged*.safetensors"))[-1]
    with safetensors.safe_open(str(merged), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert random_xl_lora in meta["lw_merged_loras"]
    with torch.inference_mode():
        model, clip, _ = nodes.CheckpointLoaderSimple().load_checkpoint(f"lw_sdxl/{merged.name}")[:3]
        base_model, base_clip, _ = nodes.CheckpointLoaderSimple().load_checkpoint(tiny_sdxl_checkpoint.name)[:3]
    assert isinstance(model.model, comfy.model_base.SDXL)
    assert isinstance(model.model.model_config, comfy.supported_models.SDXL)
    key = "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    merged_w = model.model.diffusion_model.state_dict()[key].float()
    base_w = base_model.model.diffusion_model.state_dict()[key].float()
    assert (merged_w - base_w).abs().max() > 1e-3, "the LoRA is not in the merged UNet weights"
    te_key = "clip_g.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert (clip.cond_stage_model.state_dict()[te_key].float()
            - base_clip.cond_stage_model.state_dict()[te_key].float()).abs().max() > 1e-3


def test_grid_renders_sdxl_with_and_without_the_lora(xl, random_xl_lora):
    from lora_workbench.nodes.grid_nodes import LoraGrid

    model, clip, vae = xl
    with torch.inference_mode():
        out = LoraGrid.execute(model, clip, vae, loras=f"None\n{random_xl_lora}", strengths="0, 1", positive=PROMPT,
                               negative="", seed=0, steps=1, cfg=1.0, sampler_name="euler", scheduler="normal",
                               width=64, height=64)
    images = out.result[1]
    assert images.shape == (4, 64, 64, 3)
    assert torch.equal(images[0], images[2]), "strength 0 should give the model without the LoRA"
    assert (images[3] - images[0]).abs().max() > 1e-3, "the SDXL LoRA did not change the image"
