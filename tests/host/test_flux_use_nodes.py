"""Using Flux.1 and Chroma LoRAs inside ComfyUI: LoRA Stack + Apply LoRA Stack (row strengths, double / single
block weights), Prompt LoRAs, the LoRA Grid, Merge LoRAs into Checkpoint, Merge LoRAs / Resize LoRA, and the
family check (a Flux LoRA on Chroma loads, an SD1.5 LoRA on Flux stops with the family error).

On the tiny sets of ``fixtures/tiny_flux.py`` (ComfyUI detects them as Flux.1 dev and Chroma), one family
resident at a time as in ``test_flux_nodes.py``. The LoRAs are random, on the tiny model's own kohya names
(``comfy_backend(...).lora_targets("attn_ff", False)``, the names the trainer writes), so every key loads.
They have no text-encoder modules, so the CLIP is unchanged and one T5 encode of the prompt per family
(~30-45 s on a 2-core CPU) serves every comparison: images are compared as the sampler's latents (2 euler
steps at 64 px), as ``test_use_nodes.py`` does.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
from pathlib import Path

import pytest
import torch

from comfy_harness import assert_every_lora_key_loaded

RANK = 4
TEXT = "a photo of red ball"
SEED = 7
TRIGGER = "fluxsks"
ROW_DEFAULTS = {"lora": "None", "enabled": True, "model_strength": 1.0, "clip_strength": 1.0}
NO_SINGLE = ",".join(["1"] * 20 + ["0"] * 38)  # 58 values: BASE, D00..D18 on, S00..S37 off
LABELS = {"flux": "Flux.1", "chroma": "Chroma"}


@pytest.fixture(scope="module", params=["flux", "chroma"])
def dit(request, comfy_host, tiny_dit_files):
    """(family, MODEL, CLIP, VAE) loaded as a user's graph loads them (UNETLoader, DualCLIPLoader /
    CLIPLoader, VAELoader); unloaded before the next family loads."""
    from comfy_harness import load_tiny_dit, release_models

    family = request.param
    files = tiny_dit_files(family)
    model, clip, vae = load_tiny_dit(family, files)
    yield family, model, clip, vae
    del model, clip, vae
    release_models()


@pytest.fixture(scope="module")
def cond(dit):
    """CLIPTextEncode's conditioning of TEXT: the one T5 encode of the module per family."""
    _, _, clip, _ = dit
    with torch.inference_mode():
        return clip.encode_from_tokens_scheduled(clip.tokenize(TEXT))


@pytest.fixture(scope="module")
def base(dit, cond) -> torch.Tensor:
    """The model's own sample (no LoRA), shared by the tests."""
    return sample(dit[1], cond)


def _random_modules(targets, shapes, seed: int, keep=lambda name: True) -> dict:
    from lora_workbench.training.lora.files import LoraModule

    g = torch.Generator().manual_seed(seed)
    modules = {}
    for t in targets:
        if not keep(t.kohya_name):
            continue
        out_f, in_f = shapes[t.kohya_name]
        down = torch.randn(RANK, in_f, generator=g) / math.sqrt(in_f)
        up = torch.randn(out_f, RANK, generator=g) * 0.5 / math.sqrt(RANK)
        modules[t.kohya_name] = LoraModule(down, up, alpha=float(RANK))
    return modules


@pytest.fixture(scope="module")
def loras(comfy_host, dit) -> dict[str, str]:
    """Names (as LoraLoader lists them, under models/loras/lw_<family>_use/) of the test LoRAs:
    a (with a trigger phrase), a_nosingle (a without its single-block modules), b (another random one),
    other (the compatible family's LoRA: for Chroma a Flux LoRA that also trains a modulation layer Chroma
    lacks; for Flux one whose metadata says Chroma) and sd15 (an SD1.5 LoRA)."""
    import safetensors.torch

    from lora_workbench.nodes.comfy.backend import comfy_backend
    from lora_workbench.training.lora.files import LoraModule, LoraWeights, save_lora
    from lora_workbench.training.lora.metadata import kohya_metadata

    family, model, clip, vae = dit
    backend = comfy_backend(model, clip, vae)
    targets = backend.lora_targets("attn_ff", False)
    root = backend.roots()["unet"]
    shapes = {t.kohya_name: (root.get_submodule(t.path).out_features, root.get_submodule(t.path).in_features)
              for t in targets}
    folder_name = f"lw_{family}_use"
    folder = comfy_host.base_directory / "models" / "loras" / folder_name
    folder.mkdir(parents=True, exist_ok=True)

    def meta(arch, title, **kw):
        return kohya_metadata(arch=arch, title=title, network_dim=RANK, network_alpha=RANK, prediction_type="flow",
                              **kw)

    a = _random_modules(targets, shapes, 1)
    files = {
        "a": LoraWeights(a, meta(family, "a", trigger_phrase=TRIGGER), family),
        "a_nosingle": LoraWeights({k: m for k, m in a.items() if "_single_blocks_" not in k}, meta(family, "a_ns"),
                                  family),
        "b": LoraWeights(_random_modules(targets, shapes, 2), meta(family, "b"), family),
    }
    other = {"flux": "chroma", "chroma": "flux"}[family]
    other_modules = _random_modules(targets, shapes, 3)
    if family == "chroma":  # a Flux-only layer: ComfyUI skips it on Chroma
        hidden = shapes["lora_unet_double_blocks_0_img_attn_proj"][0]
        g = torch.Generator().manual_seed(4)
        other_modules["lora_unet_double_blocks_0_img_mod_lin"] = LoraModule(
            torch.randn(RANK, hidden, generator=g) / math.sqrt(hidden), torch.randn(6 * hidden, RANK, generator=g) * 0.1,
            alpha=float(RANK))
    files["other"] = LoraWeights(other_modules, meta(other, "other"), other)
    names = {}
    for key, lw in files.items():
        path = folder / f"{key}.safetensors"
        if not path.exists():
            save_lora(path, lw, dtype="fp32")
        names[key] = f"{folder_name}/{key}.safetensors"
    sd15 = folder / "sd15.safetensors"
    if not sd15.exists():
        safetensors.torch.save_file({
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(RANK, 768),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(320, RANK),
        }, str(sd15))
    names["sd15"] = f"{folder_name}/sd15.safetensors"
    return names


def sample(model, conditioning) -> torch.Tensor:
    """What EmptySD3LatentImage (16 channels, 64 px) + KSampler (2 euler steps, cfg 1) give: the latent."""
    import nodes

    latent = {"samples": torch.zeros([1, 16, 8, 8])}
    with torch.inference_mode():
        (out,) = nodes.common_ksampler(model, SEED, 2, 1.0, "euler", "simple", conditioning, conditioning, latent)
    return out["samples"].float()


def stack_rows(rows: list[dict], chain=None) -> list:
    """LoRA Stack's output for ``rows`` (missing rows: None)."""
    from lora_workbench.nodes.stack_nodes import ROWS, LoraStackNode

    inputs = {} if chain is None else {"lora_stack": chain}
    for i in range(1, ROWS + 1):
        row = {**ROW_DEFAULTS, **(rows[i - 1] if i <= len(rows) else {})}
        inputs.update({f"lora_{i}": row["lora"], f"enabled_{i}": row["enabled"],
                       f"model_strength_{i}": row["model_strength"], f"clip_strength_{i}": row["clip_strength"]})
    return LoraStackNode.execute(**inputs).result[0]


def apply_stack(model, clip, stack, block_weights: str = ""):
    from lora_workbench.nodes.stack_nodes import ApplyLoraStack

    with torch.inference_mode():
        return ApplyLoraStack.execute(model, stack, clip, block_weights).result


def lora_file(name: str):
    from lora_workbench.nodes.comfy.loras import load_lora_file, lora_path
    from lora_workbench.training.lora.formats import load_lora

    f = load_lora_file(lora_path(name))
    return load_lora(f.state_dict, f.metadata)


# ---- stack and block weights -----------------------------------------------------------------------
def test_stack_rows_sample_what_a_loraloader_chain_samples(dit, cond, base, loras, caplog):
    import nodes

    family, model, clip, _ = dit
    s1 = stack_rows([{"lora": loras["a"], "model_strength": 0.8, "clip_strength": 0.6},
                     {"lora": loras["a_nosingle"], "enabled": False}])
    s2 = stack_rows([{"lora": loras["b"], "model_strength": -0.5, "clip_strength": 1.0}], chain=s1)
    with caplog.at_level(logging.WARNING):
        m, c, triggers = apply_stack(model, clip, s2)
    with torch.inference_mode():
        chained = nodes.LoraLoader().load_lora(model, clip, loras["a"], 0.8, 0.6)
        chained = nodes.LoraLoader().load_lora(*chained, loras["b"], -0.5, 1.0)
    assert_every_lora_key_loaded(caplog.text, m, c, lora_file(loras["a"]))
    assert triggers == TRIGGER
    stacked = sample(m, cond)
    assert (stacked - base).abs().max() > 0.05, "the LoRAs barely change the sample; the test cannot tell"
    assert torch.equal(stacked, sample(chained[0], cond))


def test_block_weights_switch_double_and_single_blocks(dit, cond, base, loras):
    from lora_workbench.training.lora.block_weights import BlockWeightError

    family, model, clip, _ = dit
    stack = stack_rows([{"lora": loras["a"]}])
    lat = {tag: sample(apply_stack(model, clip, stack, spec)[0], cond)
           for tag, spec in (("plain", ""), ("none", "NONE"), ("no_single", NO_SINGLE), ("double", "DOUBLE"))}
    lat["base"] = base
    lat["file_without_singles"] = sample(apply_stack(model, clip, stack_rows([{"lora": loras["a_nosingle"]}]))[0], cond)
    assert torch.equal(lat["none"], lat["base"])
    # Zeroing S00..S37 is the LoRA without its single-block modules, and the DOUBLE preset.
    assert torch.equal(lat["no_single"], lat["file_without_singles"])
    assert torch.equal(lat["double"], lat["no_single"])
    for a, b in (("no_single", "plain"), ("no_single", "base")):
        assert (lat[a] - lat[b]).abs().max() > 1e-3, f"{a} equals {b}"

    with pytest.raises(BlockWeightError, match="3 values.*58"):
        apply_stack(model, clip, stack, "1,2,3")



def test_prompt_tags_apply_the_lora_like_the_stack(dit, cond, base, loras):
    from lora_workbench.nodes.stack_nodes import PromptLoras

    family, model, clip, _ = dit
    name = loras["a"].rsplit(".", 1)[0]  # without the extension, as users write it
    with torch.inference_mode():
        m, c, text, triggers = PromptLoras.execute(model, clip, f"a photo of <lora:{name}:0.8> red ball").result
    assert "<lora" not in text and text.startswith("a photo of") and text.endswith("red ball"), text
    assert triggers == TRIGGER
    stacked = apply_stack(model, clip, stack_rows([{"lora": loras["a"], "model_strength": 0.8,
                                                    "clip_strength": 0.8}]))[0]
    tagged = sample(m, cond)
    assert torch.equal(tagged, sample(stacked, cond))
    assert (tagged - base).abs().max() > 0.05


# ---- the family check -----------------------------------------------------------------------------
def test_compatible_family_lora_loads_and_sd15_lora_is_refused(dit, cond, base, loras, caplog):
    from lora_workbench.nodes.comfy.loras import LoraArchMismatchError

    family, model, clip, _ = dit
    other = lora_file(loras["other"])
    assert other.arch == {"flux": "chroma", "chroma": "flux"}[family]
    with caplog.at_level(logging.INFO), torch.inference_mode():
        m, _, _ = apply_stack(model, clip, stack_rows([{"lora": loras["other"]}]))
    assert "the blocks they share are patched" in caplog.text
    # Chroma has no modulation layers: ComfyUI skips the Flux LoRA's img_mod module, patches the rest.
    skipped = 1 if family == "chroma" else 0
    assert len(m.patches) == len(other.modules) - skipped
    assert (sample(m, cond) - base).abs().max() > 0.05

    with pytest.raises(LoraArchMismatchError, match=f"made for SD1.x.*the model is {LABELS[family]}") as e:
        apply_stack(model, clip, stack_rows([{"lora": loras["sd15"]}]))
    assert loras["sd15"] in str(e.value)


# ---- grid ------------------------------------------------------------------------------------------
def test_grid_renders_a_flux_model_in_16_channel_latents(dit, cond, loras):
    import nodes

    from lora_workbench.nodes.grid_nodes import LoraGrid

    family, model, clip, vae = dit
    with torch.inference_mode():
        out = LoraGrid.execute(model, clip, vae, loras=f"None\n{loras['a']}", strengths="0, 1", positive=TEXT,
                               negative="", seed=SEED, steps=2, cfg=1.0, sampler_name="euler", scheduler="simple",
                               width=64, height=64)
    grid, images = out.result
    assert images.shape == (4, 64, 64, 3)
    assert grid.shape[1] > 128 and grid.shape[2] > 128  # two cells each way plus the labels
    assert torch.equal(images[0], images[2]), "strength 0 should give the model without the LoRA"
    assert (images[3] - images[0]).abs().max() > 1e-3, "the LoRA did not change the image"
    # The LoRA cell at 1.0 is what LoraLoader -> CLIPTextEncode -> EmptySD3LatentImage -> KSampler -> VAEDecode give.
    with torch.inference_mode():
        m, _ = nodes.LoraLoader().load_lora(model, clip, loras["a"], 1.0, 1.0)
        reference = nodes.VAEDecode().decode(vae, {"samples": sample(m, cond)})[0]
    assert torch.equal(images[3:4], reference)


# ---- merges ----------------------------------------------------------------------------------------
def test_merged_checkpoint_reloads_as_the_family_and_samples_the_applied_lora(comfy_host, dit, cond, base, loras):
    """Flux: a full checkpoint (its fp8 T5 kept as it is); Chroma: the diffusion model alone (clip and vae
    unconnected), which Load Diffusion Model reloads. Both sample as the applied stack."""
    import comfy.model_management as mm
    import comfy.sd
    import safetensors

    from lora_workbench.nodes.merge_nodes import MergeLorasToCheckpoint

    family, model, clip, vae = dit
    full = family == "flux"
    stack = stack_rows([{"lora": loras["a"], "model_strength": 0.7}, {"lora": loras["b"], "model_strength": 0.4}])
    with torch.inference_mode():
        path = MergeLorasToCheckpoint.execute(model, clip if full else None, vae if full else None,
                                              f"lw_{family}_use/merged", "fp32", lora_stack=stack).result[0]
    with safetensors.safe_open(path, "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["modelspec.architecture"] == {"flux": "flux-1-dev", "chroma": "chroma"}[family]
    assert "modelspec.predict_key" not in meta  # flow models: no eps / v
    assert [m["name"] for m in json.loads(meta["lw_merged_loras"])] == [loras["a"], loras["b"]]
    if full:
        te_prefix = model.model.model_config.text_encoder_key_prefix[0]  # Flux "text_encoders."
        assert any(k.startswith(f"{te_prefix}t5xxl.") for k in keys), sorted({k.split(".")[0] for k in keys})
        # The text encoder is the one saved (the LoRAs have no text-encoder part), T5's fp8 kept: read from the
        # file, since a second full-size T5 in RAM would take CI's host suite past its memory.
        te_sd = clip.cond_stage_model.state_dict()
        t5 = next(k for k in te_sd if k.endswith("DenseReluDense.wi_1.weight"))
        with safetensors.safe_open(path, "pt") as f:
            saved = f.get_tensor(next(k for k in keys if k.endswith(t5.split("t5xxl.", 1)[1]) and "t5xxl." in k))
        assert saved.dtype == te_sd[t5].dtype and torch.equal(saved.float(), te_sd[t5].float())
    else:
        assert Path(path).parent.parent.name == "diffusion_models", path
        assert {k.split(".")[0] for k in keys} == {"model"}, "only the diffusion model is in the file"
    applied = apply_stack(model, clip, stack)[0]
    expected = sample(applied, cond)
    del applied
    gc.collect()
    merged = None
    try:
        with torch.inference_mode():  # CheckpointLoaderSimple without the CLIP and VAE / Load Diffusion Model
            merged = (comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=False)[0] if full
                      else comfy.sd.load_diffusion_model(path))
        assert type(merged.model.model_config) is type(model.model.model_config)
        reloaded = sample(merged, cond)
        assert (reloaded - base).abs().max() > 0.05
        assert torch.allclose(reloaded, expected, atol=1e-5), (reloaded - expected).abs().max()
    finally:
        merged = None
        mm.unload_all_models()
        gc.collect()
        os.unlink(path)  # with Flux's full-size fp8 T5 in it: 5 GB


def test_merge_and_resize_flux_files_load_every_key(comfy_host, dit, loras, caplog):
    import nodes

    from lora_workbench.nodes.merge_nodes import MergeLoras, ResizeLora
    from lora_workbench.training.lora.files import save_lora
    from lora_workbench.training.lora.formats import load_lora

    family, model, clip, _ = dit
    stack = stack_rows([{"lora": loras["a"]}, {"lora": loras["b"], "model_strength": 0.5, "clip_strength": 0.5}])
    concat = MergeLoras.execute("concat", 2 * RANK, lora_stack=stack).result[0]
    svd, report = MergeLoras.execute("svd", 2 * RANK, lora_stack=stack).result
    resized, resize_report = ResizeLora.execute("fixed", 2, 0.95, lora_name=loras["a"]).result
    a, b = lora_file(loras["a"]), lora_file(loras["b"])
    assert "kept energy 100.0000% overall" in report and "kept energy" in resize_report
    for name, m in concat.modules.items():
        expected = a.modules[name].delta() + 0.5 * b.modules[name].delta()
        torch.testing.assert_close(m.delta(), expected, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(svd.modules[name].delta(), expected, rtol=1e-3,
                                   atol=1e-4 * expected.abs().max().item())
    assert set(concat.modules) == set(svd.modules) == set(resized.modules) == set(a.modules)
    assert {m.rank for m in resized.modules.values()} == {2}
    folder = comfy_host.base_directory / "models" / "loras" / f"lw_{family}_use"
    for tag, lw in (("concat", concat), ("svd", svd), ("resized", resized)):
        path = save_lora(folder / f"{tag}.safetensors", lw, dtype="fp32", overwrite=True)
        back = load_lora(path)
        assert back.arch == family, (tag, back.arch)  # the merged file still names the family
        assert back.metadata["ss_network_module"] == "networks.lora_flux"
        caplog.clear()
        with caplog.at_level(logging.WARNING), torch.inference_mode():
            m, c = nodes.LoraLoader().load_lora(model, clip, f"lw_{family}_use/{tag}.safetensors", 1.0, 1.0)
        assert_every_lora_key_loaded(caplog.text, m, c, lw)
