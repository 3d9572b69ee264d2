"""SD3.5 inside ComfyUI: train on the MODEL / CLIP / VAE that CheckpointLoaderSimple gives for an all-in-one
SD3.5 file, save the LoRA in diffusers' key format, load it with LoraLoader and with diffusers'
StableDiffusion3Pipeline, and use it through LoRA Stack (block weights), Prompt LoRAs, the LoRA Grid and the
merges.

On the tiny SD3.5 medium checkpoint of ``fixtures/tiny_sd3.py`` (ComfyUI detects it as ``SD3`` with MMDiT-X
layers and RMS q/k norms; CLIP-L + CLIP-G, no T5, as ComfyUI runs SD3 without one). It exists on both hosts.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os

import pytest
import torch

from comfy_harness import assert_every_lora_key_loaded

CAPTION = "a photo of a red ball"
STEPS = 12
RANK, ALPHA = 4, 2.0  # alpha != rank: the file folds alpha / rank into lora_B, which every reader must agree on
TRIGGER = "sks"  # make_dataset's trigger
SEED = 7
FOLDER = "lw_sd3"


@pytest.fixture(scope="module")
def sd3(tiny_sd3_checkpoint):
    """(MODEL, CLIP, VAE, checkpoint path) of the tiny SD3.5 medium file, loaded by CheckpointLoaderSimple."""
    import nodes
    from comfy_harness import release_models

    with torch.inference_mode():
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(tiny_sd3_checkpoint.name)[:3]
    yield model, clip, vae, tiny_sd3_checkpoint
    del model, clip, vae
    release_models()


@pytest.fixture(scope="module")
def trained(sd3, tmp_path_factory):
    """A LoRA trained through the node's code path on every Linear of the blocks (preset "all": the pre-only
    block's modulation too), with a fixed set's loss (fixed noise and sigmas) before and after."""
    import comfy.model_management as mm

    from comfy_harness import train_on_fixed_set
    from lora_workbench.nodes.comfy.backend import comfy_backend
    from lora_workbench.training.config import TrainConfig
    from lora_workbench.training.train.trainer import TrainCallbacks
    from test_flux_nodes import make_dataset

    model, clip, vae, path = sd3
    records, dcfg = make_dataset(tmp_path_factory.mktemp("sd3_photos"))
    backend = comfy_backend(model, clip, vae, model_name=path.name)
    cfg = TrainConfig(rank=RANK, alpha=ALPHA, preset="all", steps=STEPS, lr=3e-3, seed=0, output_name="tiny_sd3",
                      preview_every=STEPS, preview_steps=2)
    encodes, released_after, previews = [], [], []
    encode, release = backend.encode_prompts, backend.release_text_encoders
    backend.encode_prompts = lambda prompts: (encodes.append(list(prompts)), encode(prompts))[1]
    backend.release_text_encoders = lambda: (released_after.append(len(encodes)), release())[1]

    class Seen(TrainCallbacks):
        def on_preview(self, step, images, prompt):
            previews.append((step, images))

    out = train_on_fixed_set(backend, records, dcfg, cfg, f"{TRIGGER}, {CAPTION}", Seen())
    # the fixed set's conditioning was encoded before the run: nothing after it loads the CLIP again
    clip_loaded = any(m.model is clip.patcher for m in mm.current_loaded_models)
    return dict(out, backend=backend, encodes=encodes, released_after=released_after, clip_loaded=clip_loaded,
                previews=previews)


@pytest.fixture(scope="module")
def saved(comfy_host, trained) -> str:
    """The trained LoRA saved as the nodes save it (fp32), as LoraLoader names it."""
    from comfy_harness import save_trained

    lora = trained["result"].lora
    lora.metadata.update(trained["trainer"].metadata(STEPS))
    return save_trained(comfy_host, lora, FOLDER)


def test_tiny_checkpoint_trains_as_sd35_medium(sd3, trained):
    import comfy.supported_models

    from lora_workbench.nodes.comfy.dit_backend import ComfyDiTBackend

    model = sd3[0]
    be = trained["backend"]
    assert type(model.model.model_config) is comfy.supported_models.SD3
    assert isinstance(be, ComfyDiTBackend) and be.arch == "sd3" and not be.untested
    assert be.variant == "3.5-medium" and be.timestep_sampling_default == "logit_normal"
    assert be.flow_shift == pytest.approx(3.0) and be.preview_guidance == 4.5
    names = set(trained["result"].lora.modules)
    depth = len(model.model.diffusion_model.joint_blocks)
    # every Linear of the blocks, the MMDiT-X second attention and the last block's pre-only modulation included
    assert {"lora_unet_joint_blocks_0_x_block_attn2_qkv",
            f"lora_unet_joint_blocks_{depth - 1}_context_block_adaLN_modulation_1"} <= names
    assert f"lora_unet_joint_blocks_{depth - 1}_context_block_mlp_fc1" not in names  # pre-only: no MLP


def test_text_encoders_leave_once_every_prompt_is_encoded(trained):
    """The captions and the preview's prompts (cfg 4.5: its negative too) are encoded before the loop, then the
    CLIP leaves through ComfyUI's model management; no encode happens after that, previews included."""
    assert trained["released_after"] == [len(trained["encodes"])], trained["encodes"]
    assert not trained["clip_loaded"]
    assert not trained["backend"].text_encoders_resident
    # the baseline before step 1, then the last step's; both from the cached prompts
    assert [s for s, _ in trained["previews"]] == [0, STEPS] and float(trained["previews"][-1][1].std()) > 0
    encoded = {p for batch in trained["encodes"] for p in batch}
    assert {"", f"{TRIGGER}, {CAPTION}"} <= encoded


def test_loss_of_a_fixed_set_falls(trained):
    assert trained["after"] < 0.8 * trained["before"], (trained["before"], trained["after"])
    assert len(trained["result"].losses) == STEPS and all(math.isfinite(v) for v in trained["result"].losses)


def test_predict_is_comfyui_sampling(trained, sd3):
    """The backend's raw output is what ComfyUI's ``apply_model`` samples with: denoised = x_t - sigma * out."""
    from comfy_harness import comfy_denoised

    be = trained["backend"]
    x_t, sigma, cond = trained["x_t"], trained["sigma"], trained["cond"]
    denoised = comfy_denoised(sd3[0], x_t, sigma, cond)
    with torch.inference_mode(), be.training_context(), torch.no_grad():
        ours = be.predict(x_t, sigma, cond).float()
    assert torch.allclose(x_t - sigma.view(-1, 1, 1, 1) * ours, denoised, atol=1e-5)


def test_file_is_diffusers_format_and_names_the_family(comfy_host, saved):
    import safetensors

    from lora_workbench.training.lora.metadata import trigger_words

    path = comfy_host.base_directory / "models" / "loras" / saved
    with safetensors.safe_open(path, "pt") as f:
        keys, md = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in keys
    assert "transformer.transformer_blocks.0.attn2.to_v.lora_B.weight" in keys
    assert md["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora" and md["ss_base_model_version"] == "sd3"
    assert md["ss_network_module"] == "networks.lora_sd3" and md["lw_key_format"] == "diffusers"
    assert md["ss_network_alpha"] == md["ss_network_dim"] == str(RANK)  # alpha / rank folded into lora_B
    assert trigger_words(md) == [TRIGGER]


def test_loraloader_loads_every_key_and_matches_the_trained_model(trained, sd3, saved, caplog):
    from comfy_harness import loraloader_output

    model, clip, vae, _ = sd3
    with caplog.at_level(logging.WARNING):
        m, c, patched = loraloader_output(model, clip, vae, saved, trained["x_t"], trained["sigma"], trained["cond"])
    assert_every_lora_key_loaded(caplog.text, m, c, trained["result"].lora)
    assert torch.allclose(patched, trained["trained_out"], atol=1e-5), (patched - trained["trained_out"]).abs().max()


def test_diffusers_pipeline_loads_the_file_and_reproduces_the_trained_model(trained, sd3, comfy_host, saved):
    """diffusers' ``StableDiffusion3Pipeline.load_lora_weights`` takes the file as it is, on the same transformer
    in diffusers' classes, and gives the trained model's output to 1e-5."""
    import safetensors.torch
    from diffusers import StableDiffusion3Pipeline
    from fixtures import tiny_sd3

    _, _, _, ckpt = sd3
    dit = {k[len("model.diffusion_model."):]: v for k, v in safetensors.torch.load_file(str(ckpt)).items()
           if k.startswith("model.diffusion_model.")}
    transformer = tiny_sd3.to_diffusers_sd3(dit, dtype=torch.float32)
    pipe = StableDiffusion3Pipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                                    text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
                                    transformer=transformer)
    x_t, sigma, cond = trained["x_t"], trained["sigma"], trained["cond"]
    kw = dict(hidden_states=x_t.float(), encoder_hidden_states=torch.cat(cond.contexts).float(),
              pooled_projections=torch.cat(cond.pooled).float(), timestep=sigma * 1000)
    with torch.no_grad():
        base = transformer(**kw).sample
        pipe.load_lora_weights(str(comfy_host.base_directory / "models" / "loras" / saved))
        theirs = transformer(**kw).sample
    assert (theirs - base).abs().max() > 1e-3, "the LoRA did not change diffusers' output"
    ours = trained["trained_out"]
    assert torch.allclose(theirs, ours, atol=1e-5), (theirs - ours).abs().max()


# ---- using the LoRA -----------------------------------------------------------------------------------
def sample(model, conditioning) -> torch.Tensor:
    """EmptySD3LatentImage (16 channels, 64 px) + KSampler (2 euler steps, cfg 1): the latent."""
    import nodes

    latent = {"samples": torch.zeros([1, 16, 8, 8])}
    with torch.inference_mode():
        (out,) = nodes.common_ksampler(model, SEED, 2, 1.0, "euler", "simple", conditioning, conditioning, latent)
    return out["samples"].float()


@pytest.fixture(scope="module")
def cond(sd3):
    clip = sd3[1]
    with torch.inference_mode():
        return clip.encode_from_tokens_scheduled(clip.tokenize(CAPTION))


@pytest.fixture(scope="module")
def base(sd3, cond):
    return sample(sd3[0], cond)


@pytest.fixture(scope="module")
def front_only(comfy_host, trained) -> str:
    """The trained LoRA without its modules past joint block 0 (what block weights BASE, J00 alone keep)."""
    from lora_workbench.training.lora.files import LoraWeights, save_lora

    lora = trained["result"].lora
    kept = {k: m for k, m in lora.modules.items() if not k.startswith("lora_unet_joint_blocks_")
            or k.startswith("lora_unet_joint_blocks_0_")}
    assert 0 < len(kept) < len(lora.modules)
    path = comfy_host.base_directory / "models" / "loras" / FOLDER / "front_only.safetensors"
    save_lora(path, LoraWeights(kept, dict(lora.metadata), "sd3"), dtype="fp32", overwrite=True)
    return f"{FOLDER}/front_only.safetensors"


def test_stack_block_weights_and_prompt_tags(sd3, cond, base, saved, front_only, caplog):
    import nodes

    from lora_workbench.nodes.stack_nodes import PromptLoras
    from lora_workbench.training.lora.block_weights import BlockWeightError
    from test_flux_use_nodes import apply_stack, stack_rows

    model, clip, _, _ = sd3
    stack = stack_rows([{"lora": saved, "model_strength": 0.8}])
    with caplog.at_level(logging.WARNING):
        m, _, triggers = apply_stack(model, clip, stack)
    assert "lora key not loaded" not in caplog.text and triggers == TRIGGER
    with torch.inference_mode():
        chained = nodes.LoraLoader().load_lora(model, clip, saved, 0.8, 1.0)[0]
    stacked = sample(m, cond)
    assert (stacked - base).abs().max() > 1e-3, "the LoRA barely changes the sample; the test cannot tell"
    assert torch.equal(stacked, sample(chained, cond))

    only_j00 = ",".join(["1", "1"] + ["0"] * 23)  # SD3.5 medium's 25 values: BASE, J00 on; J01..J23 off
    full = stack_rows([{"lora": saved}])
    assert torch.equal(sample(apply_stack(model, clip, full, "NONE")[0], cond), base)
    assert torch.equal(sample(apply_stack(model, clip, full, only_j00)[0], cond),
                      sample(apply_stack(model, clip, stack_rows([{"lora": front_only}]))[0], cond))
    with pytest.raises(BlockWeightError, match="3 values.*39 values"):
        apply_stack(model, clip, full, "1,2,3")

    name = saved.rsplit(".", 1)[0]
    with torch.inference_mode():
        tagged_model, _, text, tag_triggers = PromptLoras.execute(model, clip, f"a photo <lora:{name}:0.8> of a ball").result
    assert "<lora" not in text and tag_triggers == TRIGGER
    assert torch.equal(sample(tagged_model, cond), stacked)


def test_grid_renders_sd3_and_its_lora_cell_is_the_loraloader_image(sd3, cond, saved):
    import nodes

    from lora_workbench.nodes.grid_nodes import LoraGrid

    model, clip, vae, _ = sd3
    with torch.inference_mode():
        grid, images = LoraGrid.execute(model, clip, vae, loras=f"None\n{saved}", strengths="0, 1", positive=CAPTION,
                                        negative="", seed=SEED, steps=2, cfg=1.0, sampler_name="euler",
                                        scheduler="simple", width=64, height=64).result
    assert images.shape == (4, 64, 64, 3)
    assert torch.equal(images[0], images[2]) and (images[3] - images[0]).abs().max() > 1e-3
    with torch.inference_mode():
        m, _ = nodes.LoraLoader().load_lora(model, clip, saved, 1.0, 1.0)
        reference = nodes.VAEDecode().decode(vae, {"samples": sample(m, cond)})[0]
    assert torch.equal(images[3:4], reference)


def test_merges_keep_the_family_and_the_format(comfy_host, sd3, cond, base, saved, front_only, caplog):
    import comfy.model_management as mm
    import comfy.sd
    import nodes
    import safetensors

    from lora_workbench.nodes.merge_nodes import MergeLoras, MergeLorasToCheckpoint
    from lora_workbench.training.lora.files import save_lora
    from lora_workbench.training.lora.formats import load_lora
    from test_flux_use_nodes import apply_stack, stack_rows

    model, clip, vae, _ = sd3
    stack = stack_rows([{"lora": saved, "model_strength": 0.7}, {"lora": front_only, "model_strength": 0.4}])
    concat = MergeLoras.execute("concat", 2 * RANK, lora_stack=stack).result[0]
    path = save_lora(comfy_host.base_directory / "models" / "loras" / FOLDER / "concat.safetensors", concat,
                     dtype="fp32", overwrite=True)
    assert load_lora(path).arch == "sd3"
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        m, c = nodes.LoraLoader().load_lora(model, clip, f"{FOLDER}/concat.safetensors", 1.0, 1.0)
    assert_every_lora_key_loaded(caplog.text, m, c, concat)
    expected = sample(apply_stack(model, clip, stack)[0], cond)
    assert torch.allclose(sample(m, cond), expected, atol=1e-5)

    with torch.inference_mode():
        merged_path = MergeLorasToCheckpoint.execute(model, clip, vae, f"{FOLDER}/merged", "fp32",
                                                     lora_stack=stack).result[0]
    try:
        with safetensors.safe_open(merged_path, "pt") as f:
            meta = f.metadata()
        assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium"
        assert [x["name"] for x in json.loads(meta["lw_merged_loras"])] == [saved, front_only]
        with torch.inference_mode():
            merged = comfy.sd.load_checkpoint_guess_config(merged_path, output_vae=False, output_clip=False)[0]
        assert type(merged.model.model_config) is type(model.model.model_config)
        reloaded = sample(merged, cond)
        assert (reloaded - base).abs().max() > 1e-3
        assert torch.allclose(reloaded, expected, atol=1e-5), (reloaded - expected).abs().max()
    finally:
        merged = None
        mm.unload_all_models()
        gc.collect()
        os.unlink(merged_path)


def test_a_turbo_checkpoint_is_named_in_the_train_notice(sd3):
    """Train LoRA learns the MODEL's file name from the host (0.33 keeps it) and warns on a Turbo file; on a host
    that keeps no file name (0.3.64) there is nothing to name."""
    from lora_workbench.nodes.comfy import host
    from lora_workbench.training.model.archs import distilled_notice

    model, _, _, path = sd3
    name = host.model_file_name(model)
    if getattr(model, "cached_patcher_init", None) is not None:
        assert name == path.name
    else:
        assert name == ""
    turbo = type("Patcher", (), {"cached_patcher_init": (None, ("/m/sd3.5_large_turbo.safetensors",))})()
    assert "Turbo" in distilled_notice(host.model_file_name(turbo))
