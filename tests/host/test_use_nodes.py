"""Using LoRAs inside ComfyUI: stacks, prompt tags, block weights, merges and the grid, through real prompts.

Three random LoRAs are made for the tiny SD1.5 checkpoint on its own kohya module names (those the
trainer would use), so ComfyUI loads every key. Images are compared as the sampler's latents, which
ComfyUI's SaveLatent writes in fp32: equal latents mean the same image bit for bit.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

FOLDER = "lw_use"
RANK = 4
TEXT = "a photo of red ball"
SEED = 7
ROW_DEFAULTS = {"lora": "None", "enabled": True, "model_strength": 1.0, "clip_strength": 1.0}


# ---- LoRA files ------------------------------------------------------------------------------------
def _random_lora(targets, shapes, seed: int, metadata: dict, keep=lambda name: True):
    from lora_workbench.training.lora.files import LoraModule, LoraWeights

    g = torch.Generator().manual_seed(seed)
    modules = {}
    for t in targets:
        if not keep(t.kohya_name):
            continue
        out_f, in_f = shapes[t.kohya_name]
        down = torch.randn(RANK, in_f, generator=g) / math.sqrt(in_f)
        up = torch.randn(out_f, RANK, generator=g) * 0.5 / math.sqrt(RANK)
        modules[t.kohya_name] = LoraModule(down, up, alpha=float(RANK))
    return LoraWeights(modules, metadata, "sd1")


@pytest.fixture(scope="module")
def loras(comfy_host, tiny_sd15_checkpoint) -> dict[str, str]:
    """Names (as LoraLoader lists them) of the test LoRAs in models/loras/lw_use/."""
    import nodes
    import safetensors.torch

    from lora_workbench.nodes.comfy.backend import ComfyBackend
    from lora_workbench.training.lora.files import save_lora
    from lora_workbench.training.lora.metadata import kohya_metadata

    with torch.inference_mode():
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(tiny_sd15_checkpoint.name)[:3]
    backend = ComfyBackend(model, clip, vae)
    targets = backend.lora_targets("attn", True)
    roots = backend.roots()
    shapes = {}
    for t in targets:
        layer = roots[t.component].get_submodule(t.path)
        shapes[t.kohya_name] = (layer.out_features, layer.in_features)
    folder = comfy_host.base_directory / "models" / "loras" / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    tags = {"5_things": {"btag": 5, "ball": 3, "red": 2, "rare": 1}}
    files = {
        "a": _random_lora(targets, shapes, 1, kohya_metadata(arch="sd1", title="a", trigger_phrase="sks")),
        "b": _random_lora(targets, shapes, 2, kohya_metadata(arch="sd1", title="b", tag_frequency=tags)),
        "c": _random_lora(targets, shapes, 3, {}),
        # Modules LBW can place in SD1's blocks: the text encoder (BASE) and the down-path attention
        # (IN01). The tiny UNet's up-path attention sits in output_blocks.0/1, which SD1 has no
        # attention in, so LBW has no weight for it.
        "a_lbw": _random_lora(targets, shapes, 1, {},
                              keep=lambda n: n.startswith(("lora_te_", "lora_unet_down_blocks_"))),
    }
    names = {}
    for key, lora in files.items():
        path = folder / f"{key}.safetensors"
        if not path.exists():
            save_lora(path, lora, dtype="fp32")
        names[key] = f"{FOLDER}/{key}.safetensors"
    # An SDXL LoRA (second text encoder; 2048-wide cross-attention context).
    xl = folder / "xl.safetensors"
    if not xl.exists():
        safetensors.torch.save_file({
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(RANK, 1280),
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(1280, RANK),
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(RANK, 2048),
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(640, RANK),
        }, str(xl))
    names["xl"] = f"{FOLDER}/xl.safetensors"
    return names


# ---- graph pieces ----------------------------------------------------------------------------------
def _base() -> dict:
    return {
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "lat": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }


def _ckpt(name: str, node: str = "ckpt") -> dict:
    return {node: {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}}}


def _sample(tag: str, model, clip, text=TEXT) -> dict:
    """CLIPTextEncode -> KSampler (2 euler steps, cfg 1) -> SaveLatent as nodes <tag>_enc/_ks/_save."""
    return {
        f"{tag}_enc": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": list(clip)}},
        f"{tag}_ks": {"class_type": "KSampler", "inputs": {
            "model": list(model), "positive": [f"{tag}_enc", 0], "negative": ["neg", 0], "latent_image": ["lat", 0],
            "seed": SEED, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        f"{tag}_save": {"class_type": "SaveLatent", "inputs": {"samples": [f"{tag}_ks", 0],
                                                                "filename_prefix": f"{FOLDER}/{tag}"}},
    }


def _stack(rows: list[dict], chain=None) -> dict:
    inputs = {} if chain is None else {"lora_stack": list(chain)}
    for i in range(1, 7):
        row = {**ROW_DEFAULTS, **(rows[i - 1] if i <= len(rows) else {})}
        inputs.update({f"lora_{i}": row["lora"], f"enabled_{i}": row["enabled"],
                       f"model_strength_{i}": row["model_strength"], f"clip_strength_{i}": row["clip_strength"]})
    return {"class_type": "LW_LoraStack", "inputs": inputs}


def _apply(stack, block_weights: str = "", model=("ckpt", 0), clip=("ckpt", 1)) -> dict:
    return {"class_type": "LW_ApplyLoraStack", "inputs": {
        "model": list(model), "clip": list(clip), "lora_stack": list(stack), "block_weights": block_weights}}


def _loader(name: str, ms: float, cs: float, model=("ckpt", 0), clip=("ckpt", 1)) -> dict:
    return {"class_type": "LoraLoader", "inputs": {"model": list(model), "clip": list(clip), "lora_name": name,
                                                   "strength_model": ms, "strength_clip": cs}}


def _latent(comfy_host, run, tag: str) -> torch.Tensor:
    import safetensors.torch

    (saved,) = run.outputs[f"{tag}_save"]["latents"]
    path = comfy_host.base_directory / "output" / saved["subfolder"] / saved["filename"]
    return safetensors.torch.load_file(str(path))["latent_tensor"]


def _run(run_prompt, prompt: dict):
    run = run_prompt(prompt)
    assert run.success, run.error()
    return run


def _error(run_prompt, prompt: dict) -> str:
    run = run_prompt(prompt)
    assert not run.success, "the prompt should have failed"
    return str(run.error().get("exception_message"))


def _stacked_graph(loras, ckpt) -> dict:
    """Two chained LoRA Stacks (a disabled row between) applied, and the same LoRAs through LoraLoaders."""
    return {
        **_ckpt(ckpt), **_base(),
        "s1": _stack([{"lora": loras["a"], "model_strength": 0.8, "clip_strength": 0.6},
                      {"lora": loras["a_lbw"], "enabled": False}]),
        "s2": _stack([{"lora": loras["b"], "model_strength": 0.5, "clip_strength": 1.0},
                      {"lora": loras["c"], "model_strength": 1.2, "clip_strength": -0.7}], chain=("s1", 0)),
        "ap": _apply(("s2", 0)),
        **_sample("stacked", ("ap", 0), ("ap", 1)),
    }


# ---- tests -----------------------------------------------------------------------------------------
def test_stack_of_three_loras_samples_what_a_loraloader_chain_samples(comfy_host, run_prompt, loras,
                                                                     tiny_sd15_checkpoint):
    prompt = {
        **_stacked_graph(loras, tiny_sd15_checkpoint.name),
        "l1": _loader(loras["a"], 0.8, 0.6),
        "l2": _loader(loras["b"], 0.5, 1.0, ("l1", 0), ("l1", 1)),
        "l3": _loader(loras["c"], 1.2, -0.7, ("l2", 0), ("l2", 1)),
        **_sample("chained", ("l3", 0), ("l3", 1)),
        **_sample("base", ("ckpt", 0), ("ckpt", 1)),
    }
    run = _run(run_prompt, prompt)
    stacked, chained, base = (_latent(comfy_host, run, t) for t in ("stacked", "chained", "base"))
    assert (stacked - base).abs().max().item() > 0.1, "the LoRAs barely change the sample; the test cannot tell"
    assert torch.equal(stacked, chained)
    (summary,) = run.outputs["ap"]["text"]
    assert "a_lbw" not in summary  # the row switched off
    # Trigger words: a's trigger phrase, then b's three most frequent tags; c has no metadata.
    assert summary.splitlines()[-1] == "trigger words: sks, btag, ball, red", summary


def test_merged_checkpoint_reloads_and_samples_the_stacked_image(comfy_host, run_prompt, loras,
                                                                tiny_sd15_checkpoint):
    import safetensors

    graph = _stacked_graph(loras, tiny_sd15_checkpoint.name)
    merge = {"class_type": "LW_MergeLorasToCheckpoint", "inputs": {
        "model": ["ap", 0], "clip": ["ap", 1], "vae": ["ckpt", 2], "filename": f"{FOLDER}/merged", "dtype": "fp32"}}
    run = _run(run_prompt, {**graph, "merge": merge})
    stacked = _latent(comfy_host, run, "stacked")
    checkpoints = comfy_host.base_directory / "models" / "checkpoints"
    path = checkpoints / FOLDER / "merged.safetensors"
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    with safetensors.safe_open(str(path), "pt") as f:
        merged_loras = json.loads(f.metadata()["lw_merged_loras"])
    assert [(m["name"], m["model_strength"], m["clip_strength"]) for m in merged_loras] == [
        (loras["a"], 0.8, 0.6), (loras["b"], 0.5, 1.0), (loras["c"], 1.2, -0.7)]

    reload = {**_ckpt(tiny_sd15_checkpoint.name), **_base(), **_ckpt(f"{FOLDER}/merged.safetensors", "merged"),
              **_sample("reloaded", ("merged", 0), ("merged", 1))}
    run = _run(run_prompt, reload)
    assert torch.equal(_latent(comfy_host, run, "reloaded"), stacked)

    # Saving again never replaces the file: a counter is added (and bf16 is what is written).
    before = path.stat().st_mtime_ns
    run = _run(run_prompt, {**graph, "merge": {**merge, "inputs": {**merge["inputs"], "dtype": "bf16"}}})
    second = checkpoints / FOLDER / "merged_00001.safetensors"
    assert path.stat().st_mtime_ns == before and second.is_file()
    with safetensors.safe_open(str(second), "pt") as f:
        key = next(k for k in f.keys() if k.endswith("attn2.to_k.weight"))
        assert f.get_tensor(key).dtype == torch.bfloat16


def test_merge_without_clip_and_vae_saves_the_diffusion_model_that_load_diffusion_model_reloads(
        comfy_host, run_prompt, loras, tiny_sd15_checkpoint):
    import safetensors

    ckpt = tiny_sd15_checkpoint.name
    merge = {"class_type": "LW_MergeLorasToCheckpoint", "inputs": {
        "model": ["ckpt", 0], "lora_stack": ["s", 0], "filename": f"{FOLDER}/unet_only", "dtype": "fp32"}}
    folder = comfy_host.base_directory / "models" / "diffusion_models" / FOLDER
    # a's text-encoder half (clip strength 0.6) would not be in the file: refused before anything is written.
    graph = {**_ckpt(ckpt), **_base(), "s": _stack([{"lora": loras["a"], "model_strength": 0.8, "clip_strength": 0.6}])}
    message = _error(run_prompt, {**graph, "merge": merge})
    assert loras["a"] in message and "clip strength 0.6" in message and "Connect clip and vae" in message, message
    # The same LoRA applied upstream (Apply LoRA Stack) rather than stacked here: the model records it.
    upstream = {k: v for k, v in merge["inputs"].items() if k != "lora_stack"}
    message = _error(run_prompt, {**graph, "ap": _apply(("s", 0)),
                                  "merge": {**merge, "inputs": {**upstream, "model": ["ap", 0]}}})
    assert loras["a"] in message and "clip strength 0.6" in message, message
    assert not folder.exists() or not list(folder.iterdir())
    # One of the two connected is a mistake, named with the fix.
    message = _error(run_prompt, {**graph, "merge": {**merge, "inputs": {**merge["inputs"], "clip": ["ckpt", 1]}}})
    assert "clip is connected but vae is not" in message and "neither" in message, message

    # At clip strength 0 the UNet part is all there is: Load Diffusion Model lists the file and samples as the
    # stack applied to the checkpoint's model.
    graph["s"] = _stack([{"lora": loras["a"], "model_strength": 0.8, "clip_strength": 0.0}])
    run = _run(run_prompt, {**graph, "ap": _apply(("s", 0)), **_sample("unet_lora", ("ap", 0), ("ckpt", 1)),
                            "merge": merge})
    stacked = _latent(comfy_host, run, "unet_lora")
    path = folder / "unet_only.safetensors"
    assert run.outputs["merge"]["text"][0].startswith(f"saved diffusion_models/{FOLDER}/unet_only.safetensors")
    with safetensors.safe_open(str(path), "pt") as f:
        assert {k.split(".")[0] for k in f.keys()} == {"model"}, "only the diffusion model is in the file"
    reload = {**_ckpt(ckpt), **_base(),
              "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": f"{FOLDER}/unet_only.safetensors",
                                                              "weight_dtype": "default"}},
              **_sample("unet_reloaded", ("unet", 0), ("ckpt", 1))}
    run = _run(run_prompt, reload)
    assert torch.equal(_latent(comfy_host, run, "unet_reloaded"), stacked)


def test_sdxl_lora_on_an_sd15_model_is_a_clear_error(run_prompt, loras, tiny_sd15_checkpoint):
    prompt = {**_ckpt(tiny_sd15_checkpoint.name), **_base(), "s": _stack([{"lora": loras["xl"]}]),
              "ap": _apply(("s", 0)), **_sample("xl", ("ap", 0), ("ap", 1))}
    message = _error(run_prompt, prompt)
    assert loras["xl"] in message and "SDXL" in message and "SD1.x" in message and "SD15" in message, message


def test_prompt_tags_apply_the_loras_like_the_stack_and_unknown_names_get_suggestions(
        comfy_host, run_prompt, loras, tiny_sd15_checkpoint):
    # <lora:NAME:TE:UNET>: text encoder 0.6, UNet 0.8; names without folder/extension resolve.
    text = "a photo of <lora:a:0.6:0.8> red ball, <lora:lw_use/b.safetensors:0.5>"
    prompt = {
        **_ckpt(tiny_sd15_checkpoint.name), **_base(),
        "pl": {"class_type": "LW_PromptLoras", "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1], "prompt": text}},
        **_sample("tagged", ("pl", 0), ("pl", 1), text=["pl", 2]),
        "s": _stack([{"lora": loras["a"], "model_strength": 0.8, "clip_strength": 0.6},
                     {"lora": loras["b"], "model_strength": 0.5, "clip_strength": 0.5}]),
        "ap": _apply(("s", 0)),
        **_sample("stack", ("ap", 0), ("ap", 1)),
    }
    run = _run(run_prompt, prompt)
    assert torch.equal(_latent(comfy_host, run, "tagged"), _latent(comfy_host, run, "stack"))
    assert run.outputs["pl"]["text"][0].splitlines()[-1] == "trigger words: sks, btag, ball, red"

    prompt["pl"]["inputs"]["prompt"] = "a photo of <lora:lw_use/aa:1> red ball"
    message = _error(run_prompt, prompt)
    assert "'lw_use/aa' not found" in message and "did you mean" in message and loras["a"] in message, message


def test_block_weights_all_is_plain_none_is_the_base_and_a_zeroed_block_changes_the_image(
        comfy_host, run_prompt, loras, tiny_sd15_checkpoint):
    in01_off = ",".join(["1", "0"] + ["1"] * 15)  # 17 values: BASE, IN01, IN02 ... OUT11
    prompt = {**_ckpt(tiny_sd15_checkpoint.name), **_base(), "s": _stack([{"lora": loras["a_lbw"]}]),
              **_sample("base", ("ckpt", 0), ("ckpt", 1))}
    for tag, spec in (("plain", ""), ("all", "ALL"), ("none", "none"), ("in01_off", in01_off)):
        prompt[f"ap_{tag}"] = _apply(("s", 0), spec)
        prompt.update(_sample(tag, (f"ap_{tag}", 0), (f"ap_{tag}", 1)))
    run = _run(run_prompt, prompt)
    lat = {t: _latent(comfy_host, run, t) for t in ("base", "plain", "all", "none", "in01_off")}
    assert torch.equal(lat["all"], lat["plain"])
    assert torch.equal(lat["none"], lat["base"])
    assert (lat["plain"] - lat["base"]).abs().max().item() > 0.1
    assert (lat["in01_off"] - lat["plain"]).abs().max().item() > 1e-3
    assert (lat["in01_off"] - lat["base"]).abs().max().item() > 1e-3  # the text encoder part is still on

    prompt["ap_plain"]["inputs"]["block_weights"] = "1,2,3"
    message = _error(run_prompt, prompt)
    assert "3 values" in message and "17" in message, message


def test_grid_renders_every_lora_and_strength_into_a_labelled_grid(comfy_host, run_prompt, loras,
                                                                  tiny_sd15_checkpoint):
    import numpy as np
    from PIL import Image

    def save(tag, images):
        return {tag: {"class_type": "SaveImage",
                      "inputs": {"images": list(images), "filename_prefix": f"{FOLDER}/{tag}"}}}

    prompt = {
        **_ckpt(tiny_sd15_checkpoint.name),
        "grid": {"class_type": "LW_LoraGrid", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "loras": f"{loras['a']}\n# skipped\nNone",
            "strengths": "0.5, 1", "positive": TEXT, "negative": "", "seed": SEED, "steps": 2, "cfg": 1.0,
            "sampler_name": "euler", "scheduler": "normal", "width": 64, "height": 64}},
        **save("grid_image", ("grid", 0)), **save("grid_cells", ("grid", 1)),
        # The cell for LoRA a at 1.0, rendered by ComfyUI's own nodes.
        "l": _loader(loras["a"], 1.0, 1.0),
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": TEXT, "clip": ["l", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["l", 1]}},
        "lat": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "ks": {"class_type": "KSampler", "inputs": {
            "model": ["l", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["lat", 0],
            "seed": SEED, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["ks", 0], "vae": ["ckpt", 2]}},
        **save("reference", ("dec", 0)),
    }
    run = _run(run_prompt, prompt)

    def pngs(node):
        out = comfy_host.base_directory / "output"
        return [np.asarray(Image.open(out / i["subfolder"] / i["filename"])) for i in run.outputs[node]["images"]]

    cells, (grid,), (reference,) = pngs("grid_cells"), pngs("grid_image"), pngs("reference")
    assert len(cells) == 4 and all(c.shape == (64, 64, 3) for c in cells)
    top, left = grid.shape[0] - 2 * 64, grid.shape[1] - 2 * 64
    assert top > 0 and left > 0, grid.shape  # room for the labels
    for i, cell in enumerate(cells):
        r, c = divmod(i, 2)
        assert np.array_equal(grid[top + r * 64: top + (r + 1) * 64, left + c * 64: left + (c + 1) * 64], cell)
    assert not np.array_equal(grid[:top, left:], np.full_like(grid[:top, left:], 255)), "no column labels"
    assert not np.array_equal(grid[top:, :left], np.full_like(grid[top:, :left], 255)), "no row labels"
    assert np.array_equal(cells[1], reference)  # row a, strength 1
    assert np.array_equal(cells[2], cells[3]) and not np.array_equal(cells[1], cells[3])  # None row: base


def test_svd_merge_at_full_rank_matches_the_exact_concat_merge(comfy_host, run_prompt, loras):
    from lora_workbench.training.lora.formats import load_lora

    stack = _stack([{"lora": loras["a"]}, {"lora": loras["b"], "model_strength": 0.5, "clip_strength": 0.25}])
    prompt = {"s": stack}
    for mode in ("concat", "svd"):
        prompt[mode] = {"class_type": "LW_MergeLoras", "inputs": {
            "lora_stack": ["s", 0], "mode": mode, "rank": 2 * RANK, **{f"weight_{i}": 1.0 for i in range(1, 5)}}}
        prompt[f"save_{mode}"] = {"class_type": "LW_SaveLoRA", "inputs": {
            "lora": [mode, 0], "filename": f"{FOLDER}/merged_{mode}", "dtype": "fp32"}}
    prompt["resize"] = {"class_type": "LW_ResizeLora", "inputs": {
        "lora": ["concat", 0], "method": "energy", "rank": 2 * RANK, "value": 0.9}}
    prompt["save_resized"] = {"class_type": "LW_SaveLoRA", "inputs": {
        "lora": ["resize", 0], "filename": f"{FOLDER}/resized", "dtype": "fp32"}}
    run = _run(run_prompt, prompt)
    folder = comfy_host.base_directory / "models" / "loras"

    def newest(stem):
        return load_lora(max((folder / FOLDER).glob(f"{stem}*.safetensors"), key=lambda p: p.stat().st_mtime_ns))

    concat, svd, resized = newest("merged_concat"), newest("merged_svd"), newest("resized")
    a, b = load_lora(folder / loras["a"]), load_lora(folder / loras["b"])
    assert set(concat.modules) == set(svd.modules) == set(a.modules)
    for name, m in concat.modules.items():
        w = 0.5 if name.startswith("lora_unet_") else 0.25  # model strength for the UNet, clip for the TE
        expected = a.modules[name].delta() + w * b.modules[name].delta()
        torch.testing.assert_close(m.delta(), expected, rtol=1e-4, atol=1e-6)
        scale = expected.abs().max().item()
        torch.testing.assert_close(svd.modules[name].delta(), expected, rtol=1e-3, atol=1e-4 * scale)
    assert "kept energy 100.0000% overall" in run.outputs["svd"]["text"][0]
    report = run.outputs["resize"]["text"][0]
    assert report.startswith("energy:") and "kept energy" in report
    assert max(m.rank for m in resized.modules.values()) <= 2 * RANK
