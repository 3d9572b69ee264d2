"""Flux.1 and Chroma inside ComfyUI: train on the MODEL / CLIP / VAE that UNETLoader, DualCLIPLoader /
CLIPLoader and VAELoader give, load the file with LoraLoader and with diffusers, stack it with block
weights, merge it, and render it in the grid.

All on the tiny sets of ``fixtures/tiny_flux.py``, which ComfyUI detects as Flux.1 dev and Chroma. One
family's models are resident at a time (the module fixture is parametrised by family and unloads its
models before the next family loads), since each set carries a full-size fp8 T5-XXL (4.7 GB in RAM).
Every prompt costs a T5 encode (~30-45 s on a 2-core CPU), so the tests share a few captions.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from comfy_harness import assert_every_lora_key_loaded

CAPTION = "a photo of a red ball"  # the dataset's caption (with the trigger: "sks, a photo of a red ball")
STEPS = 12
ENCODED: dict = {}  # prompt -> conditioning of the family loaded now (a T5 encode costs ~30-45 s on this CPU)


def share_encodings(be):
    """``be`` encodes each prompt once per family and module: the conditioning does not depend on the MODEL."""
    encode = be.encode_prompts

    def encode_prompts(prompts):
        for p in dict.fromkeys(prompts):
            if p not in ENCODED:
                ENCODED[p] = encode([p]).detach()
        return be.cat_cond([ENCODED[p] for p in prompts])

    be.encode_prompts = encode_prompts
    return be


@pytest.fixture(scope="module", params=["flux", "chroma"])
def dit(request, comfy_host, tiny_dit_files):
    """(family, MODEL, CLIP, VAE, file names) loaded as a user's graph loads them."""
    from comfy_harness import load_tiny_dit, release_models

    family = request.param
    files = tiny_dit_files(family)
    model, clip, vae = load_tiny_dit(family, files)
    yield family, model, clip, vae, files
    ENCODED.clear()
    del model, clip, vae
    release_models()


def make_dataset(folder, n: int = 2):
    from comfy_harness import make_photos

    from lora_workbench.training.config import DatasetConfig
    from lora_workbench.training.data.dataset import scan_folder

    make_photos(folder, n=n, size=64, caption=CAPTION)
    dcfg = DatasetConfig(path=str(folder), trigger="sks", resolution=64, bucket_step=64, min_bucket_side=64)
    return scan_folder(dcfg), dcfg


def pixels(records) -> torch.Tensor:
    """The records' 64 px images as the engine feeds them: [B, 3, H, W] in [-1, 1]."""
    import numpy as np
    from PIL import Image

    arr = np.stack([np.asarray(Image.open(r.path).convert("RGB"), dtype=np.float32) / 127.5 - 1 for r in records])
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def trained(dit, tmp_path_factory):
    """A LoRA trained on the tiny model through the node's own code path (``run_training``), with the loss
    of a fixed set (fixed noise and sigmas) before and after, and the trained MODEL's raw output."""
    from lora_workbench.nodes.comfy.backend import comfy_backend
    from lora_workbench.training.config import TrainConfig
    from lora_workbench.training.train.trainer import TrainData, Trainer
    from lora_workbench.training.train.schedules import flow_add_noise, flow_target

    family, model, clip, vae, files = dit
    records, dcfg = make_dataset(tmp_path_factory.mktemp(f"{family}_photos"))
    backend = share_encodings(comfy_backend(model, clip, vae, model_name=files["dit"]))
    cfg = TrainConfig(rank=4, alpha=4, preset="attn_ff", steps=STEPS, lr=3e-3, seed=0, output_name=f"tiny_{family}")
    trainer = Trainer(backend, TrainData(records, dcfg), cfg)
    g = torch.Generator().manual_seed(7)
    with torch.inference_mode(), backend.training_context():  # as ComfyUI runs a node
        x0 = backend.encode_images(pixels(records))
        noise = torch.randn(x0.shape, generator=g)
        sigma = torch.tensor([0.3, 0.7])[: len(records)]
        cond = backend.encode_prompts([f"sks, {CAPTION}"] * len(records))
        target = flow_target(x0, noise)

        def fixed_loss():
            with torch.no_grad():
                return float(((backend.predict(flow_add_noise(x0, noise, sigma), sigma, cond).float() - target) ** 2).mean())

        before = fixed_loss()
        result = trainer.run(keep_injected=True)
        after = fixed_loss()
        with torch.no_grad():
            x_t = flow_add_noise(x0, noise, sigma)
            trained_out = backend.predict(x_t, sigma, cond).float()
    return dict(family=family, backend=backend, result=result, before=before, after=after, x_t=x_t, sigma=sigma,
                cond=cond, trained_out=trained_out, trainer=trainer)


def test_tiny_models_are_the_family_comfyui_detects(dit):
    import comfy.supported_models

    from lora_workbench.nodes.comfy.dit_backend import ComfyDiTBackend
    from lora_workbench.nodes.comfy.backend import comfy_backend

    family, model, clip, vae, _ = dit
    expected = {"flux": comfy.supported_models.Flux, "chroma": comfy.supported_models.Chroma}[family]
    assert type(model.model.model_config) is expected
    backend = comfy_backend(model, clip, vae)
    assert isinstance(backend, ComfyDiTBackend) and backend.arch == family and not backend.untested
    assert backend.prediction_type == "flow" and backend.timestep_sampling_default == "flux_shift"
    assert (backend.variant, backend.train_guidance, backend.sample_guidance) == (
        ("dev", 1.0, 3.5) if family == "flux" else (None, None, None))


def test_loss_of_a_fixed_set_falls(trained):
    assert trained["after"] < 0.8 * trained["before"], (trained["before"], trained["after"])
    assert len(trained["result"].losses) == STEPS


def test_predict_is_comfyui_sampling(trained, dit):
    """The backend's raw output is what ComfyUI's ``apply_model`` samples with: denoised = x_t - sigma * out."""
    from comfy_harness import comfy_denoised

    family, model, *_ = dit
    be = trained["backend"]
    x_t, sigma, cond = trained["x_t"], trained["sigma"], trained["cond"]
    denoised = comfy_denoised(model, x_t, sigma, cond)
    with torch.inference_mode(), be.training_context(), torch.no_grad():
        ours = be.predict(x_t, sigma, cond).float()
    # without the LoRA (the context removed it): the base model
    assert torch.allclose(x_t - sigma.view(-1, 1, 1, 1) * ours, denoised, atol=1e-5)


def test_file_metadata_names_the_family(trained):
    from lora_workbench.training.lora.metadata import trigger_words

    md = trained["trainer"].metadata(STEPS)
    if trained["family"] == "flux":
        assert md["modelspec.architecture"] == "flux-1-dev/lora" and md["ss_base_model_version"] == "flux1"
        assert md["ss_guidance_scale"] == "1.0"
    else:
        assert md["modelspec.architecture"] == "chroma/lora" and md["ss_base_model_version"] == "chroma"
    assert md["ss_network_module"] == "networks.lora_flux" and md["ss_timestep_sampling"] == "flux_shift"
    assert trigger_words(md) == ["sks"]
    assert all(name.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_"))
               for name in trained["result"].lora.modules)


def test_loraloader_loads_every_key_and_matches_the_trained_model(trained, dit, comfy_host, caplog):
    """The saved file in ComfyUI's LoraLoader: no unloaded key, one patch per module, and the patched MODEL's
    output equals the trained MODEL's to 1e-5."""
    from comfy_harness import loraloader_output

    from lora_workbench.training.lora.files import save_lora

    family, model, clip, vae, _ = dit
    name = f"lw_{family}/trained.safetensors"
    path = comfy_host.base_directory / "models" / "loras" / name
    save_lora(path, trained["result"].lora, dtype="fp32")
    with caplog.at_level(logging.WARNING):
        m, c, patched = loraloader_output(model, clip, vae, name, trained["x_t"], trained["sigma"], trained["cond"])
    assert_every_lora_key_loaded(caplog.text, m, c, trained["result"].lora)
    assert torch.allclose(patched, trained["trained_out"], atol=1e-5), (patched - trained["trained_out"]).abs().max()


def test_diffusers_load_lora_weights_reproduces_comfyui(trained, dit, comfy_host, tmp_path):
    """The saved file through diffusers' own ``load_lora_weights`` (FluxPipeline / ChromaPipeline) on the same
    transformer in diffusers' classes gives ComfyUI's LoRA output to 1e-5.

    diffusers 0.42 splits ``single_blocks.N.linear1`` at FLUX.1's real widths only (hard-coded 3 x 3072 +
    12288), so on the tiny Flux (hidden 128) the file given to both sides leaves linear1 out; Chroma's tiny
    model is 3072 wide (ComfyUI pins it) and goes through whole."""
    import comfy.model_management as mm
    import nodes
    from diffusers import ChromaPipeline, FluxPipeline
    from fixtures import tiny_flux

    from lora_workbench.nodes.comfy.backend import comfy_backend
    from lora_workbench.training.lora.files import LoraWeights, save_lora

    family, model, clip, vae, files = dit
    lora = trained["result"].lora
    hidden = model.model.diffusion_model.hidden_size
    modules = {k: m for k, m in lora.modules.items() if hidden == 3072 or not k.endswith("_linear1")}
    assert len(modules) >= len(lora.modules) - 1
    name = f"lw_{family}/for_diffusers.safetensors"
    path = comfy_host.base_directory / "models" / "loras" / name
    save_lora(path, LoraWeights(modules, lora.metadata, lora.arch), dtype="fp32")
    with torch.inference_mode():
        m, c = nodes.LoraLoader().load_lora(model, clip, name, 1.0, 1.0)
        mm.load_models_gpu([m], force_patch_weights=True)
    be = comfy_backend(m, c, vae)
    x_t, sigma, cond = trained["x_t"], trained["sigma"], trained["cond"]
    with torch.inference_mode(), be.training_context(), torch.no_grad():
        ours = be.predict(x_t, sigma, cond).float()

    dit_path = comfy_host.base_directory / "models" / "diffusion_models" / files["dit"]
    h, w = x_t.shape[-2:]
    context = torch.cat(cond.contexts).float()
    kw = dict(hidden_states=tiny_flux.pack(x_t.float()), encoder_hidden_states=context, timestep=sigma,
              img_ids=tiny_flux.pack_ids(h, w), txt_ids=torch.zeros(context.shape[1], 3))
    if family == "flux":
        transformer = tiny_flux.to_diffusers_flux(dit_path)
        pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                            tokenizer_2=None, transformer=transformer)
        kw.update(pooled_projections=torch.cat(cond.pooled).float(), guidance=torch.full((len(sigma),), cond.guidance))
    else:
        transformer = tiny_flux.to_diffusers_chroma(dit_path)
        pipe = ChromaPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=transformer)
    with torch.no_grad():
        base = tiny_flux.unpack(transformer(**kw).sample, h, w)
        pipe.load_lora_weights(str(path))
        theirs = tiny_flux.unpack(transformer(**kw).sample, h, w)
    assert (theirs - base).abs().max() > 1e-3, "the LoRA did not change diffusers' output"
    assert torch.allclose(theirs, ours, atol=1e-5), (theirs - ours).abs().max()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fp8_weights_train_with_checkpointing_and_previews(dit, trained, tmp_path_factory, checkpointing):
    """The DiT loaded with UNETLoader's weight_dtype fp8_e4m3fn (as 12-16 GB users load Flux) trains: its weights
    stay fp8 (the estimate counts 1 byte each), gradient checkpointing gives the same losses as without, and
    the previews are rendered with the family's sampler."""
    import nodes

    from lora_workbench.nodes.comfy.backend import comfy_backend
    from lora_workbench.training.config import TrainConfig
    from lora_workbench.training.train.trainer import TrainCallbacks, TrainData, Trainer

    family, _, clip, vae, files = dit
    with torch.inference_mode():
        model = nodes.UNETLoader().load_unet(files["dit"], "fp8_e4m3fn")[0]
    be = share_encodings(comfy_backend(model, clip, vae))
    dm = model.model.diffusion_model
    linear_dtypes = {m.weight.dtype for m in dm.modules() if isinstance(m, torch.nn.Linear)}
    assert torch.float8_e4m3fn in linear_dtypes

    previews = []

    class Seen(TrainCallbacks):
        def on_preview(self, step, images, prompt):
            previews.append((step, images))

    records, dcfg = make_dataset(tmp_path_factory.mktemp(f"{family}_fp8"))
    cfg = TrainConfig(rank=4, alpha=4, preset="attn", steps=2, lr=1e-3, seed=0, preview_every=2, preview_steps=2,
                      gradient_checkpointing=checkpointing, output_name=f"fp8_{family}")
    trainer = Trainer(be, TrainData(records, dcfg), cfg, Seen())
    estimate = trainer.memory_estimate()
    held = sum(p.numel() * p.element_size() for p in dm.parameters())  # fp8 weights: mostly one byte each
    assert abs(estimate.parts["transformer"] - held) < 0.1 * held, (estimate.parts, held)
    with torch.inference_mode(), be.training_context():
        result = trainer.run(keep_injected=True)
    assert all(math.isfinite(v) for v in result.losses)
    losses = trained.setdefault("fp8_losses", {})
    losses[checkpointing] = result.losses
    if len(losses) == 2:
        assert torch.allclose(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-4), losses
    assert [s for s, _ in previews] == [0, 2]  # the baseline before step 1, then step 2's
    image = previews[-1][1]
    assert image.shape == (1, 64, 64, 3) and float(image.std()) > 0
    assert {m.weight.dtype for m in dm.modules() if isinstance(m, torch.nn.Linear)} == linear_dtypes


def test_a_flow_model_without_a_family_entry_trains_untested(dit, trained, comfy_host, monkeypatch, caplog):
    """A flow-matching MODEL ComfyUI loads but the family table lacks (here the family's entry taken out)
    still trains: every Linear of its preset, named ``lora_unet_<module path>``, which ComfyUI's LoraLoader
    loads whole; the node marks the family untested."""
    import nodes

    from lora_workbench.nodes.comfy import families
    from lora_workbench.nodes.comfy.backend import comfy_backend
    from lora_workbench.training.config import TrainConfig
    from lora_workbench.training.lora.files import save_lora
    from lora_workbench.training.train.trainer import TrainData, Trainer

    family, model, clip, vae, _ = dit
    monkeypatch.setattr(families, "MODEL_CONFIGS", tuple(c for c in families.MODEL_CONFIGS if c[1] != family))
    be = comfy_backend(model, clip, vae)
    assert be.untested and be.arch == "other_flow" and be.timestep_sampling_default == "logit_normal"
    targets = be.lora_targets("attn", False)
    assert targets and all(t.kohya_name == "lora_unet_" + t.path.replace(".", "_") for t in targets)
    share_encodings(be)
    records, dcfg = make_dataset(comfy_host.base_directory / f"other_flow_photos_{family}")
    cfg = TrainConfig(rank=4, alpha=4, preset="attn", steps=2, lr=1e-3, seed=0, output_name="other_flow")
    trainer = Trainer(be, TrainData(records, dcfg), cfg)
    with torch.inference_mode(), be.training_context():
        lora = trainer.run(keep_injected=True).lora
    assert trainer.metadata(2)["modelspec.architecture"] == "unknown-flow/lora"
    name = f"lw_other/untested_{family}.safetensors"
    save_lora(comfy_host.base_directory / "models" / "loras" / name, lora, dtype="fp32")
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        m, c = nodes.LoraLoader().load_lora(model, clip, name, 1.0, 1.0)
    assert "lora key not loaded" not in caplog.text and len(m.patches) == len(lora.modules) == len(targets)
