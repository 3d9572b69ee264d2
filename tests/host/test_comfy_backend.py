"""The engine trains on ComfyUI's own MODEL/CLIP/VAE, and ComfyUI reads back exactly what it trained.

All on the tiny SD1.5-detected checkpoint, on the CPU. Models are loaded under
``torch.inference_mode()`` and nodes are called under it, as ComfyUI's executor does.
"""

from __future__ import annotations

import logging
import random

import pytest
import torch

from comfy_harness import assert_every_lora_key_loaded

PROBE_PROMPT = "a photo of sks ball"


# ---- helpers -------------------------------------------------------------------------------------
def load_tiny(ckpt_name: str):
    import nodes

    with torch.inference_mode():
        return nodes.CheckpointLoaderSimple().load_checkpoint(ckpt_name)


def sample_image(model, clip, vae, seed: int = 3) -> torch.Tensor:
    """ComfyUI's text-to-image graph at 64x64, 2 euler steps: the decoded IMAGE.

    The prompt is also the negative: one text encoding per image keeps the CPU run short.
    """
    import nodes

    with torch.inference_mode():
        (positive,) = nodes.CLIPTextEncode().encode(clip, PROBE_PROMPT)
        (latent,) = nodes.EmptyLatentImage().generate(64, 64, 1)
        (sampled,) = nodes.common_ksampler(model, seed, 2, 5.0, "euler", "normal", positive, positive, latent)
        (image,) = nodes.VAEDecode().decode(vae, sampled)
    return image.clone()


def comfy_raw_output(model, x0, noise, t, cond) -> torch.Tensor:
    """The UNet output ComfyUI computes for ``x0`` noised to DDPM step ``t``, recovered from
    ``BaseModel.apply_model`` (which takes ``x = x0 + sigma * noise`` and returns the denoised x0)."""
    import comfy.model_management as mm
    import comfy.model_sampling

    with torch.inference_mode():
        mm.load_models_gpu([model])
        sampling = model.model.model_sampling
        sigma = sampling.sigmas[t].float()
        s = sigma.view(-1, 1, 1, 1)
        x = x0 + s * noise
        denoised = model.model.apply_model(x, sigma, c_crossattn=cond).float()
        if isinstance(sampling, comfy.model_sampling.V_PREDICTION):
            # denoised = x / (s^2 + 1) - v * s / sqrt(s^2 + 1)
            return (x / (s**2 + 1) - denoised) * (s**2 + 1).sqrt() / s
        return (x - denoised) / s  # denoised = x - eps * s


def comfy_cond(clip, text: str) -> torch.Tensor:
    with torch.inference_mode():
        return clip.encode_from_tokens(clip.tokenize(text)).clone()


def make_dataset(folder, n: int = 2):
    from PIL import Image, ImageDraw

    from lora_workbench.training.config import DatasetConfig
    from lora_workbench.training.data.dataset import scan_folder

    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (64, 64), tuple(rng.randint(0, 255) for _ in range(3)))
        cx, cy = rng.randint(16, 48), rng.randint(16, 48)
        ImageDraw.Draw(img).ellipse([cx - 16, cy - 16, cx + 16, cy + 16], fill=(220, 20, 20))
        img.save(folder / f"img_{i}.png")
        (folder / f"img_{i}.txt").write_text(f"a photo of a ball, tag{i}")
    dcfg = DatasetConfig(path=str(folder), trigger="sks", resolution=64, bucket_step=64, min_bucket_side=64)
    return scan_folder(dcfg), dcfg


def probe_inputs(backend, n: int = 3):
    """Fixed latents, noise and timesteps spread over the schedule."""
    g = torch.Generator().manual_seed(11)
    x0 = torch.randn(n, 4, 8, 8, generator=g)
    noise = torch.randn(n, 4, 8, 8, generator=g)
    t = torch.tensor([25, 500, 975])[:n]
    return x0, noise, t


def tolerance(backend) -> float:
    return 1e-4 if backend.dtype == torch.float32 else 2e-2


def base_state(model, clip):
    """Everything training could leave behind on the base MODEL/CLIP."""
    roots = {"unet": model.model.diffusion_model, "te": clip.cond_stage_model}
    return {
        name: {
            "tensors": {k: v.detach().clone() for k, v in root.state_dict().items()},
            "types": [(p, type(m)) for p, m in root.named_modules()],
            "grad": [p.requires_grad for p in root.parameters()],
            "forwards": [p for p, m in root.named_modules() if "forward" in m.__dict__],
            "hooks": [p for p, m in root.named_modules() if m._forward_pre_hooks or m._forward_hooks],
            "attrs": [p for p, m in root.named_modules() if "peft_config" in m.__dict__],
        }
        for name, root in roots.items()
    }


def assert_same_state(before, after):
    for name in before:
        b, a = before[name], after[name]
        assert a["types"] == b["types"], f"{name}: module structure changed"
        assert a["tensors"].keys() == b["tensors"].keys(), f"{name}: state dict keys changed"
        # equal_nan: SD1 files carry no CLIP text_projection, so ComfyUI leaves it uninitialised.
        changed = [k for k in b["tensors"]
                   if not torch.allclose(b["tensors"][k], a["tensors"][k], rtol=0, atol=0, equal_nan=True)]
        assert not changed, f"{name}: weights changed: {changed[:5]}"
        assert a["grad"] == b["grad"], f"{name}: requires_grad flags changed"
        assert a["forwards"] == b["forwards"] == [], f"{name}: forward overrides left: {a['forwards']}"
        assert a["attrs"] == b["attrs"] == [], f"{name}: peft attributes left"
        assert a["hooks"] == b["hooks"] == [], f"{name}: hooks left: {a['hooks']}"


# ---- 0. module names --------------------------------------------------------------------------------
# What ComfyUI's model detection reports for a real SD1.5 checkpoint.
SD15_UNET_CONFIG = {
    "channel_mult": [1, 2, 4, 4], "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "transformer_depth_middle": 1, "adm_in_channels": None, "use_temporal_resblock": False,
    "use_temporal_attention": False,
}


@pytest.mark.parametrize("which", ["sd15", "tiny"])
def test_layout_names_agree_with_comfyui_own_map(comfy_host, which):
    """Our LDM -> diffusers names (hence the kohya names we write) are ComfyUI's, on SD1.5 and the tiny UNet."""
    import comfy.utils
    from tiny_sd15 import UNET_CONFIG

    from lora_workbench.nodes.comfy.backend import layout_from_unet_config
    from lora_workbench.training.model import keys as unet_keys

    config = SD15_UNET_CONFIG if which == "sd15" else UNET_CONFIG
    layout = layout_from_unet_config(config)
    if which == "sd15":
        assert layout == unet_keys.SD1
    else:
        assert layout.channel_mult == (1,) and not layout.has_middle_block
    comfy_map = comfy.utils.unet_to_diffusers(config)  # diffusers key -> LDM key, with .weight
    ours = unet_keys.unet_ldm_to_diffusers(layout)
    wrong = {ldm: diff for ldm, diff in ours.items() if comfy_map.get(f"{diff}.weight") != f"{ldm}.weight"}
    assert not wrong


# ---- 1. the denoiser convention --------------------------------------------------------------------
@pytest.mark.parametrize("sampling", ["eps", "v_prediction"])
def test_predict_equals_comfyui_apply_model(comfy_host, tiny_sd15_checkpoint, sampling):
    import comfy_extras.nodes_model_advanced as advanced
    import nodes

    from lora_workbench.nodes.comfy.backend import ComfyBackend
    from lora_workbench.training.train.schedules import add_noise

    model, clip, vae = load_tiny(tiny_sd15_checkpoint.name)
    if sampling == "v_prediction":  # ComfyUI's ModelSamplingDiscrete node: an object patch on model_sampling
        with torch.inference_mode():
            (model,) = advanced.ModelSamplingDiscrete().patch(model, "v_prediction", False)
    backend = ComfyBackend(model, clip, vae, model_name=tiny_sd15_checkpoint.name)
    assert backend.arch == "sd1"
    assert backend.prediction_type == {"eps": "epsilon", "v_prediction": "v_prediction"}[sampling]

    x0, noise, t = probe_inputs(backend)
    cond = comfy_cond(clip, PROBE_PROMPT).repeat(len(t), 1, 1)
    expected = comfy_raw_output(model, x0, noise, t, cond)
    with pytest.raises(RuntimeError, match="outside its training_context"):
        backend.predict(x0, t, cond)
    with torch.inference_mode(), backend.training_context(), torch.no_grad():
        alphas = backend.alphas_cumprod()
        ours = backend.predict(add_noise(x0, noise, alphas, t), t, cond).float()
        our_cond = backend.encode_prompts([PROBE_PROMPT])
        pixels = torch.rand(1, 3, 64, 64) * 2 - 1
        latents = backend.encode_images(pixels)
    tol = tolerance(backend)
    assert torch.allclose(ours, expected, rtol=tol, atol=tol), (ours - expected).abs().max()
    assert torch.equal(our_cond, cond[:1])
    with torch.inference_mode():
        (ref,) = nodes.VAEEncode().encode(vae, ((pixels + 1) / 2).movedim(1, -1))
    assert torch.allclose(latents, model.model.process_latent_in(ref["samples"]), atol=1e-5)
    # The schedule is ComfyUI's: a_t = 1 / (1 + sigma_t^2), SD's scaled-linear betas.
    assert alphas.shape == (1000,) and abs(float(alphas[0]) - (1 - 0.00085)) < 1e-6


def test_non_sd1_model_is_refused_naming_it(comfy_host, tiny_sd15_checkpoint):
    import comfy.supported_models

    from lora_workbench.nodes.comfy.backend import ComfyBackend, UnsupportedModelError

    model, clip, vae = load_tiny(tiny_sd15_checkpoint.name)
    model.model.model_config = comfy.supported_models.SD20(model.model.model_config.unet_config)
    with pytest.raises(UnsupportedModelError, match=r"'my_sd2.safetensors' \(SD20\).*SDXL.*later"):
        ComfyBackend(model, clip, vae, model_name="my_sd2.safetensors")


# ---- 2. train, save, load with ComfyUI's LoraLoader --------------------------------------------------
@pytest.mark.parametrize("preset", ["attn", "all"])
def test_trained_lora_loads_in_lora_loader_and_reproduces_the_engine(
        comfy_host, tiny_sd15_checkpoint, tmp_path, caplog, preset):
    import comfy.model_management as mm
    import comfy.sd
    import nodes

    from lora_workbench.nodes.comfy.backend import ComfyBackend
    from lora_workbench.training.config import TrainConfig
    from lora_workbench.training.lora.files import lora_state_dict, save_lora
    from lora_workbench.training.train.schedules import add_noise
    from lora_workbench.training.train.trainer import TrainData, Trainer

    model, clip, vae = load_tiny(tiny_sd15_checkpoint.name)
    backend = ComfyBackend(model, clip, vae, model_name=tiny_sd15_checkpoint.name)
    records, dcfg = make_dataset(tmp_path / "img")
    cfg = TrainConfig(rank=4, alpha=4, preset=preset, steps=5, lr=5e-2, train_text_encoder=True,
                      save_dtype="fp32", seed=0, output_name=f"lw_{preset}")
    x0, noise, t = probe_inputs(backend)
    base_image = sample_image(model, clip, vae)
    state_before = base_state(model, clip)

    with torch.inference_mode(), backend.training_context():
        alphas = backend.alphas_cumprod()
        x_t = add_noise(x0, noise, alphas, t)
        with torch.no_grad():
            base_cond = backend.encode_prompts([PROBE_PROMPT])
            base_out = backend.predict(x_t, t, base_cond.repeat(len(t), 1, 1)).float()
        result = Trainer(backend, TrainData(records, dcfg), cfg).run(keep_injected=True)
        with torch.no_grad():  # the engine's own trained model: peft layers on ComfyUI's modules
            engine_cond = backend.encode_prompts([PROBE_PROMPT])
            engine_out = backend.predict(x_t, t, engine_cond.repeat(len(t), 1, 1)).float()
    # Leaving the context took the LoRA layers out again: the base MODEL/CLIP is as it was.
    assert_same_state(state_before, base_state(model, clip))
    assert torch.equal(sample_image(model, clip, vae), base_image)
    assert result.steps_done == 5 and all(map(torch.isfinite, map(torch.tensor, result.losses)))
    kinds = {name.split("_")[1] for name in result.lora.modules}
    assert kinds == {"unet", "te"}
    if preset == "all":
        assert any(m.down.dim() == 4 and m.down.shape[-1] == 3 for m in result.lora.modules.values())

    loras = comfy_host.base_directory / "models" / "loras"
    path = save_lora(loras / f"lw_{preset}.safetensors", result.lora, dtype="fp32", overwrite=True)

    with caplog.at_level(logging.WARNING):
        # The capture works: a key no model has is reported by ComfyUI's loader.
        comfy.sd.load_lora_for_models(model, clip, {"lora_unet_nowhere.lora_down.weight": torch.zeros(1, 1),
                                                    "lora_unet_nowhere.lora_up.weight": torch.zeros(1, 1)}, 1.0, 1.0)
        assert "lora key not loaded" in caplog.text
        caplog.clear()
        with torch.inference_mode():
            model_l, clip_l = nodes.LoraLoader().load_lora(model, clip, path.name, 1.0, 1.0)
    assert_every_lora_key_loaded(caplog.text, model_l, clip_l, result.lora)

    # ComfyUI's LoRA-patched weights give what the engine's injected layers gave.
    comfy_te = comfy_cond(clip_l, PROBE_PROMPT)
    comfy_out = comfy_raw_output(model_l, x0, noise, t, comfy_te.repeat(len(t), 1, 1))
    tol = tolerance(backend)
    assert (engine_cond - base_cond).abs().max() > 100 * tol, "the text-encoder LoRA changed nothing"
    assert (engine_out - base_out).abs().max() > 100 * tol, "the UNet LoRA changed nothing"
    # Merged (ComfyUI) vs separate (peft) LoRA weights round differently; 12 CLIP layers add that up.
    te_tol = 10 * tol
    assert torch.allclose(comfy_te, engine_cond, rtol=te_tol, atol=te_tol), (comfy_te - engine_cond).abs().max()
    assert torch.allclose(comfy_out, engine_out, rtol=tol, atol=tol), (comfy_out - engine_out).abs().max()

    # KSampler: the file through LoraLoader = the in-memory LoraWeights through ComfyUI's LoRA path.
    from_file = sample_image(model_l, clip_l, vae)
    with torch.inference_mode():
        model_m, clip_m = comfy.sd.load_lora_for_models(model, clip, lora_state_dict(result.lora), 1.0, 1.0)
    from_memory = sample_image(model_m, clip_m, vae)
    assert torch.equal(from_file, from_memory)
    assert (from_file - base_image).abs().max() > 1e-3, "the LoRA does not show in the image"
    mm.unload_all_models()


# ---- 3. the base model stays as it was, also when a run fails --------------------------------------
# (After a successful run: checked in the LoraLoader test above, right after training.)
def test_base_model_untouched_after_a_run_that_raises(comfy_host, tiny_sd15_checkpoint, tmp_path):
    from lora_workbench.nodes.comfy.backend import ComfyBackend
    from lora_workbench.training.config import TrainConfig
    from lora_workbench.training.train.trainer import TrainCallbacks, TrainData, Trainer

    class FailAtStep2(TrainCallbacks):
        def on_step(self, step, total, loss, lr):
            if step == 2:
                raise RuntimeError("boom at step 2")

    model, clip, vae = load_tiny(tiny_sd15_checkpoint.name)
    records, dcfg = make_dataset(tmp_path / "img")
    image_before = sample_image(model, clip, vae)
    state_before = base_state(model, clip)
    # Everything that patches modules at once: LoCon layers, the text encoder, gradient checkpointing,
    # and LoRA layers the trainer was told to keep.
    cfg = TrainConfig(rank=4, alpha=4, preset="all", steps=5, lr=5e-2, train_text_encoder=True,
                      gradient_checkpointing=True, seed=0)
    backend = ComfyBackend(model, clip, vae)
    with pytest.raises(RuntimeError, match="boom at step 2"):
        with torch.inference_mode(), backend.training_context():
            Trainer(backend, TrainData(records, dcfg), cfg, callbacks=FailAtStep2()).run(keep_injected=True)
    assert_same_state(state_before, base_state(model, clip))
    assert torch.equal(sample_image(model, clip, vae), image_before)


# ---- 4. ComfyUI's module machinery under the LoRA layers -------------------------------------------
def random_lora_for(backend, preset: str, seed: int = 5):
    """A LoRA with random (non-zero) weights on a preset's UNet layers, as a kohya state dict."""
    from lora_workbench.training.lora.files import LoraModule, LoraWeights, lora_state_dict

    g = torch.Generator().manual_seed(seed)
    unet = backend.roots()["unet"]
    modules = {}
    for target in backend.lora_targets(preset, text_encoder=False):
        w = unet.get_submodule(target.path).weight
        modules[target.kohya_name] = LoraModule(down=torch.randn(2, w.shape[1], generator=g) * 0.1,
                                                up=torch.randn(w.shape[0], 2, generator=g) * 0.1, alpha=2.0)
    return lora_state_dict(LoraWeights(modules, arch="sd1"))


def test_lowvram_weight_patches_still_apply_through_lora_layers(comfy_host, tiny_sd15_checkpoint):
    """A LoRA already on the MODEL (LoraLoader upstream) is applied by ComfyUI per call in lowvram
    mode (comfy_cast_weights + weight_function); peft's wrapper must leave that working."""
    import comfy.sd

    from lora_workbench.nodes.comfy.backend import ComfyBackend
    from lora_workbench.training.lora import network
    from lora_workbench.training.train.schedules import add_noise

    model, clip, vae = load_tiny(tiny_sd15_checkpoint.name)
    plain = ComfyBackend(model, clip, vae)
    with torch.inference_mode():
        patched_model, _ = comfy.sd.load_lora_for_models(model, clip, random_lora_for(plain, "attn"), 1.0, 0.0)
    backend = ComfyBackend(patched_model, clip, vae)
    x0, noise, t = probe_inputs(backend)
    cond = comfy_cond(clip, PROBE_PROMPT).repeat(len(t), 1, 1)
    with torch.inference_mode(), backend.training_context(), torch.no_grad():
        x_t = add_noise(x0, noise, backend.alphas_cumprod(), t)
        loaded = backend.predict(x_t, t, cond)  # patches merged into the weights by the load
        freed = patched_model.partially_unload(patched_model.offload_device, memory_to_free=1e15)
        targets = backend.lora_targets("attn", text_encoder=False)
        # zero up-weights: no change by itself
        network.inject(backend.roots(), targets, rank=4, alpha=4, devices=backend.compute_devices())
        wrapped = backend.roots()["unet"].get_submodule(targets[0].path)
        lowvram = backend.predict(x_t, t, cond)
    assert freed > 0 and patched_model.model.model_lowvram
    assert wrapped.base_layer.comfy_cast_weights and len(wrapped.base_layer.weight_function) == 1
    with torch.inference_mode(), plain.training_context(), torch.no_grad():
        unpatched = plain.predict(x_t, t, cond)
    tol = tolerance(backend)
    assert (loaded - unpatched).abs().max() > 100 * tol, "the upstream LoRA changed nothing"
    assert torch.allclose(lowvram, loaded, rtol=tol, atol=tol), (lowvram - loaded).abs().max()


def test_gradient_checkpointing_gives_the_same_gradients(comfy_host, tiny_sd15_checkpoint):
    from lora_workbench.nodes.comfy.backend import ComfyBackend
    from lora_workbench.training.lora import network
    from lora_workbench.training.train.schedules import add_noise

    model, clip, vae = load_tiny(tiny_sd15_checkpoint.name)
    backend = ComfyBackend(model, clip, vae)
    x0, noise, t = probe_inputs(backend, n=2)

    def lora_grads():
        loss = backend.predict(x_t, t, backend.encode_prompts([PROBE_PROMPT, "a red ball"])).float().square().mean()
        grads = torch.autograd.grad(loss, params)
        return loss.detach(), grads

    with torch.inference_mode(), backend.training_context():
        x_t = add_noise(x0, noise, backend.alphas_cumprod(), t)
        params = network.inject(backend.roots(), backend.lora_targets("all", text_encoder=True), rank=2, alpha=2,
                                seed=0)
        with torch.no_grad():
            for p in params:  # non-zero up-weights, so every LoRA parameter gets a gradient
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
        loss, grads = lora_grads()
        backend.enable_gradient_checkpointing()
        loss_ckpt, grads_ckpt = lora_grads()
    assert torch.equal(loss, loss_ckpt)
    assert all(g.abs().max() > 0 for g in grads)
    for g, gc in zip(grads, grads_ckpt):
        assert torch.allclose(g, gc, rtol=1e-4, atol=1e-7), (g - gc).abs().max()
