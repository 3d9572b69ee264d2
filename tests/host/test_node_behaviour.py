"""What a user relies on when training inside ComfyUI, checked through real prompts.

* The LoRA file a run writes, loaded by ComfyUI's own LoraLoader, loads every key and samples the
  same image as the trained MODEL/CLIP the node outputs.
* Cancel mid-run leaves a resumable state, the LoRA so far and an untouched base model, and
  Resume Training finishes the remaining steps.
* Bad inputs to each node get an error that names the problem and the fix.

Images are compared as the sampler's latents, written by ComfyUI's SaveLatent node in fp32: a
PNG (8 bits per channel) would hide the small changes a few training steps make. Every prompt runs
on the session's one PromptExecutor, whose cache keeps the checkpoint loader's MODEL/CLIP between
prompts as a running ComfyUI does; that cached base is the one training must leave untouched.
"""

from __future__ import annotations

import json
import logging
import sys

import pytest

from test_nodes import _images

NEGATIVE = {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a ball", "clip": ["1", 1]}}
LATENT = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}


def _checkpoint(ckpt: str) -> dict:
    return {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}


def _dataset(folder) -> dict:
    return {"class_type": "LW_LoadImageDataset", "inputs": {
        "folder": str(folder), "trigger_word": "sks", "default_caption": "", "resolution": 64,
        "aspect_buckets": True, "bucket_step": 64, "min_bucket_side": 64, "max_bucket_side": 64,
        "repeats": 1, "shuffle_tags": False, "keep_tokens": 0, "caption_dropout": 0.0, "flip": False}}


def _train(name: str, steps: int, train_text_encoder: bool = True, model=("1", 0), **changes) -> dict:
    inputs = {
        "model": list(model), "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0],
        "steps": steps, "rank": 4, "alpha": 4.0, "target": "attn",
        # A high rate for 3-6 steps, so the LoRA visibly moves the sampled latents.
        "learning_rate": 1e-2, "lr_schedule": "constant", "warmup_steps": 0, "batch_size": 1, "seed": 0,
        "train_text_encoder": train_text_encoder, "prior_loss_weight": 1.0, "precision": "no",
        "gradient_checkpointing": False, "save_every": 0, "preview_every": 0, "preview_prompt": "",
        "output_name": name}
    inputs.update(changes)
    return {"class_type": "LW_TrainLoRA", "inputs": inputs}


def _sample(model, clip, text: str, seed: int, prefix: str, ids: tuple[str, str, str]) -> dict:
    """CLIPTextEncode -> KSampler (2 euler steps, cfg 1) -> SaveLatent, under the node ids given."""
    enc, ksampler, save = ids
    return {
        enc: {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": list(clip)}},
        ksampler: {"class_type": "KSampler", "inputs": {
            "model": list(model), "positive": [enc, 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        save: {"class_type": "SaveLatent", "inputs": {"samples": [ksampler, 0], "filename_prefix": prefix}},
    }


def _latent(comfy_host, run, node: str):
    """The latent a SaveLatent node of ``run`` wrote (fp32, as the sampler returned it)."""
    import safetensors.torch

    (saved,) = run.outputs[node]["latents"]
    path = comfy_host.base_directory / "output" / saved["subfolder"] / saved["filename"]
    return safetensors.torch.load_file(str(path))["latent_tensor"]


def _steps(run) -> list[int]:
    return [d["step"] for d in run.events("lw.train.step")]


def _cached(run) -> list[str]:
    (cached,) = [d["nodes"] for e, d in run.status_messages if e == "execution_cached"]
    return cached


def _our_module(node_id: str):
    """The module ComfyUI loaded a node of ours from (not the pip-installed ``lora_workbench`` copy)."""
    import nodes

    return sys.modules[nodes.NODE_CLASS_MAPPINGS[node_id].__module__]


def _keys_not_loaded(caplog) -> list[str]:
    """ComfyUI's warnings (comfy/lora.py) for LoRA keys that matched no layer, as captured so far."""
    return [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]


# ---- 1. the saved file reproduces the trained MODEL/CLIP in ComfyUI's LoraLoader ----------------
def test_saved_lora_in_comfyui_loraloader_loads_every_key_and_samples_the_trained_image(
        comfy_host, run_prompt, tiny_sd15_checkpoint, tmp_path, caplog):
    import safetensors.torch
    import torch

    name = "lw_reload"
    text, seed = "a photo of sks ball", 5
    trained = {
        "1": _checkpoint(tiny_sd15_checkpoint.name), "2": _dataset(_images(tmp_path / "subject")),
        "3": NEGATIVE, "4": LATENT, "8": _train(name, steps=3),
        "9": {"class_type": "LW_SaveLoRA", "inputs": {"lora": ["8", 2], "filename": f"lw_behaviour/{name}_fp32",
                                                      "dtype": "fp32"}},
        **_sample(("8", 0), ("8", 1), text, seed, "lw_behaviour/trained", ("11", "12", "13")),
    }
    with caplog.at_level(logging.WARNING):
        run = run_prompt(trained)
    assert run.success, run.error()
    assert not _keys_not_loaded(caplog)  # the node's MODEL/CLIP output goes through the same loader code
    loras = comfy_host.base_directory / "models" / "loras"
    node_file = f"lora_workbench/{name}.safetensors"  # the Train LoRA node's own file (save_dtype fp16)
    fp32_file = f"lw_behaviour/{name}_fp32.safetensors"  # the same LoRA through Save LoRA, fp32
    assert (loras / node_file).is_file() and (loras / fp32_file).is_file()
    keys = safetensors.torch.load_file(str(loras / node_file)).keys()
    assert any(k.startswith("lora_te_") for k in keys) and any(k.startswith("lora_unet_") for k in keys)
    trained_latent = _latent(comfy_host, run, "13")

    reload = {"1": _checkpoint(tiny_sd15_checkpoint.name), "3": NEGATIVE, "4": LATENT}
    for i, lora_name in enumerate((node_file, fp32_file)):
        loader = f"2{i}0"
        reload[loader] = {"class_type": "LoraLoader", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "lora_name": lora_name, "strength_model": 1.0, "strength_clip": 1.0}}
        reload.update(_sample((loader, 0), (loader, 1), text, seed, f"lw_behaviour/reloaded{i}",
                              (f"2{i}1", f"2{i}2", f"2{i}3")))
    reload.update(_sample(("1", 0), ("1", 1), text, seed, "lw_behaviour/base", ("31", "32", "33")))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run = run_prompt(reload)
    assert run.success, run.error()
    assert not _keys_not_loaded(caplog)
    from_node_file, from_fp32_file = _latent(comfy_host, run, "203"), _latent(comfy_host, run, "213")
    base = _latent(comfy_host, run, "33")

    effect = (trained_latent - base).abs().max().item()
    assert effect > 1.0, "the LoRA barely changes the sample; this test could not tell files apart"
    # The MODEL output applies the LoRA in one dtype; Save LoRA wrote it in fp32 and the node's own file
    # is fp16 (save_dtype). The file holding the very weights the MODEL applies samples the same latent
    # bit for bit (today: the fp32 one). The other differs only by fp16 rounding: each LoRA factor moves
    # by at most 2**-11 of its size, so the LoRA's contribution, and to first order its effect on the
    # sample, by at most ~2 * 2**-11 of that effect (measured: ~2.5e-5 of it).
    assert torch.equal(from_fp32_file, trained_latent) or torch.equal(from_node_file, trained_latent)
    for latent in (from_node_file, from_fp32_file):
        assert (latent - trained_latent).abs().max().item() <= 2 * 2**-11 * effect

    # The capture above sees ComfyUI's warning: the same file with one key no layer has does warn.
    tensors = safetensors.torch.load_file(str(loras / node_file))
    tensors["lora_unet_no_such_layer.alpha"] = torch.tensor(4.0)
    safetensors.torch.save_file(tensors, str(loras / "lw_behaviour" / f"{name}_bogus.safetensors"))
    bogus = {**reload, "200": {**reload["200"]}}
    bogus["200"]["inputs"] = {**reload["200"]["inputs"], "lora_name": f"lw_behaviour/{name}_bogus.safetensors"}
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run = run_prompt(bogus)
    assert run.success, run.error()
    assert _keys_not_loaded(caplog) == ["lora key not loaded: lora_unet_no_such_layer.alpha"]


# ---- 2. Cancel mid-run: resumable state, LoRA so far, untouched base; Resume finishes the run ---
def test_cancel_mid_training_keeps_a_resumable_state_and_the_base_model_untouched(
        comfy_host, run_prompt, tiny_sd15_checkpoint, tmp_path, monkeypatch):
    import comfy.model_management
    import torch

    name, steps, cancel_at = "lw_cancel", 6, 2
    folder = _images(tmp_path / "subject")
    base = {"1": _checkpoint(tiny_sd15_checkpoint.name), "3": NEGATIVE, "4": LATENT}

    def sample_base(prefix):
        return run_prompt({**base, **_sample(("1", 0), ("1", 1), "a photo of sks ball", 11, prefix,
                                             ("31", "32", "33"))})

    before = sample_base("lw_behaviour/base_before")
    assert before.success, before.error()

    # Press Cancel during step 2: what the Cancel button does (sets ComfyUI's interrupt flag), at the
    # moment our progress callback reports the step; ComfyUI's progress hook then raises.
    train_nodes = _our_module("LW_TrainLoRA")
    on_step = train_nodes.ComfyCallbacks.on_step

    def cancel_during(self, step, total, loss, lr):
        if step == cancel_at:
            comfy.model_management.interrupt_current_processing(True)
        return on_step(self, step, total, loss, lr)

    monkeypatch.setattr(train_nodes.ComfyCallbacks, "on_step", cancel_during)
    training = {**base, "2": _dataset(folder), "8": _train(name, steps),
                "10": {"class_type": "LW_LossGraph", "inputs": {"loss": ["8", 3], "smoothing": 0.5,
                                                                "width": 256, "height": 128}}}
    run = run_prompt(training)
    monkeypatch.undo()

    assert not run.success
    error = run.error()
    assert error["event"] == "execution_interrupted" and error["node_id"] == "8", error
    assert _steps(run) == [1, 2]
    state = comfy_host.base_directory / "output" / "lora_workbench_states" / f"{name}-state"
    assert (state / "trainer.pt").is_file() and (state / "lora.safetensors").is_file()
    assert json.loads((state / "state.json").read_text())["step"] == cancel_at
    runs = comfy_host.base_directory / "models" / "loras" / "lora_workbench"
    assert (runs / f"{name}-step{cancel_at:06d}.safetensors").is_file(), sorted(runs.iterdir())
    assert not (runs / f"{name}.safetensors").exists()

    after = sample_base("lw_behaviour/base_after")
    assert after.success, after.error()
    # The base MODEL/CLIP are the very objects the training used (the loader's cached output), and
    # the sampler really ran again (the training prompt pushed its earlier result out of the cache).
    assert "1" in _cached(after) and "32" not in _cached(after), _cached(after)
    assert torch.equal(_latent(comfy_host, after, "33"), _latent(comfy_host, before, "33"))

    # Resume: the state is offered in Resume Training's list. ComfyUI builds a V3 schema anew for
    # object_info (what the frontend lists) and for each validation, so no list goes stale.
    resume_cls = _our_module("LW_ResumeTraining").ResumeTraining
    for inputs in (resume_cls.GET_NODE_INFO_V1()["input"], resume_cls.INPUT_TYPES()):
        assert f"{name}-state" in inputs["required"]["state"][1]["options"]
    resumed = run_prompt({**base, "2": _dataset(folder),
                          "40": {"class_type": "LW_ResumeTraining", "inputs": {
                              "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0],
                              "state": f"{name}-state", "steps": 0}},
                          "10": {"class_type": "LW_LossGraph", "inputs": {"loss": ["40", 3], "smoothing": 0.5,
                                                                          "width": 256, "height": 128}}})
    assert resumed.success, resumed.error()
    assert _steps(resumed) == list(range(cancel_at + 1, steps + 1))
    assert (runs / f"{name}.safetensors").is_file()

    # ... along the curve the run would have drawn without the Cancel.
    full = run_prompt({**training, "8": _train(f"{name}_uninterrupted", steps)})
    assert full.success, full.error()
    losses = [d["loss"] for d in run.events("lw.train.step") + resumed.events("lw.train.step")]
    assert losses == [d["loss"] for d in full.events("lw.train.step")]


# ---- 3. bad inputs: an error that names the problem and the fix -----------------------------------
def _sdxl_shaped_unet(comfy_host) -> str:
    """A diffusion-model file ComfyUI detects as SDXL: SDXL's pinned shapes (320 channels, depths
    0/0/2/2/10/10, 2048-wide context, 2816 ADM input) on three levels of 320 channels, all zeros.
    246M parameters: written in ~1 s, loaded by UNETLoader in ~4 s; never run."""
    import safetensors.torch
    import torch

    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    path = comfy_host.base_directory / "models" / "diffusion_models" / "lw_sdxl_shaped.safetensors"
    if not path.exists():
        unet = UNetModel(
            image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
            channel_mult=[1, 1, 1], transformer_depth=[0, 0, 2, 2, 10, 10],
            transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=-2,
            context_dim=2048, num_heads=-1, num_head_channels=64, use_spatial_transformer=True,
            use_linear_in_transformer=True, legacy=False, adm_in_channels=2816, num_classes="sequential",
            device="meta", operations=comfy.ops.disable_weight_init)
        path.parent.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file({k: torch.zeros(v.shape, dtype=torch.float16)
                                     for k, v in unet.state_dict().items()}, str(path))
    return path.name


def _training_prompt(ckpt: str, folder, **train_changes) -> dict:
    """A 1-step Train LoRA (UNet only) with a Loss Graph as its output."""
    train = _train("lw_bad", **{"steps": 1, "train_text_encoder": False, **train_changes})
    return {"1": _checkpoint(ckpt), "2": _dataset(folder), "8": train,
            "10": {"class_type": "LW_LossGraph", "inputs": {"loss": ["8", 3], "smoothing": 0.5, "width": 256,
                                                            "height": 128}}}


def _bad_empty_folder(comfy_host, ckpt, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("not an image")
    prompt = {"2": _dataset(empty), "5": {"class_type": "PreviewImage", "inputs": {"images": ["2", 1]}}}
    return prompt, "2", [str(empty), "0 images", ".png", "put training images there"]


def _bad_steps(comfy_host, ckpt, tmp_path):
    return _training_prompt(ckpt, _images(tmp_path / "s"), steps=0), "8", ["steps=0", "at least 1 step"]


def _bad_class_images(comfy_host, ckpt, tmp_path):
    prompt = _training_prompt(ckpt, _images(tmp_path / "s"), class_images=["7", 0])
    prompt["7"] = {"class_type": "LW_ClassImages", "inputs": {"class_prompt": "a photo of a ball"}}
    return prompt, "7", ["needs images", "VAE Decode", "or a folder"]


def _bad_save_name(comfy_host, ckpt, tmp_path):
    prompt = _training_prompt(ckpt, _images(tmp_path / "s"))
    del prompt["10"]  # Save LoRA is the only output: a prompt whose other outputs are valid runs those
    prompt["9"] = {"class_type": "LW_SaveLoRA", "inputs": {"lora": ["8", 2], "filename": "../../x", "dtype": "fp16"}}
    return prompt, "9", ["'../../x.safetensors'", "leaves the loras folder", "use a plain name or a sub-folder"]


def _bad_sdxl_model(comfy_host, ckpt, tmp_path):
    prompt = _training_prompt(ckpt, _images(tmp_path / "s"), model=["6", 0])
    prompt["6"] = {"class_type": "UNETLoader", "inputs": {"unet_name": _sdxl_shaped_unet(comfy_host),
                                                         "weight_dtype": "default"}}
    # SDXL trains, but not with the SD1.5 checkpoint's CLIP that this graph connects.
    return prompt, "8", ["SD1ClipModel", "not the SDXL CLIP-L + CLIP-G text encoders",
                         "connect the CLIP output of the same checkpoint loader"]


def _bad_resume_state(comfy_host, ckpt, tmp_path):
    prompt = {"1": _checkpoint(ckpt), "2": _dataset(_images(tmp_path / "s")),
              "40": {"class_type": "LW_ResumeTraining", "inputs": {
                  "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0],
                  "state": "no_such_run-state", "steps": 0}},
              "10": {"class_type": "LW_LossGraph", "inputs": {"loss": ["40", 3], "smoothing": 0.5, "width": 256,
                                                              "height": 128}}}
    return prompt, "40", ["no_such_run-state", "not a training state"]


@pytest.mark.parametrize("case", [_bad_empty_folder, _bad_steps, _bad_class_images, _bad_save_name,
                                  _bad_sdxl_model, _bad_resume_state], ids=lambda f: f.__name__[5:])
def test_bad_input_gets_an_error_naming_the_problem_and_the_fix(comfy_host, run_prompt, tiny_sd15_checkpoint,
                                                               tmp_path, case):
    from comfy_harness import PromptInvalidError

    prompt, node, expected = case(comfy_host, tiny_sd15_checkpoint.name, tmp_path)
    try:
        run = run_prompt(prompt)
    except PromptInvalidError as e:  # refused before anything ran, the best place for it
        assert list(e.node_errors) == [node], e.node_errors
        text = "\n".join(err["details"] for err in e.node_errors[node]["errors"])
    else:
        error = run.error()
        assert error and error["event"] == "execution_error" and error["node_id"] == node, error
        text = error["exception_message"]
    missing = [part for part in expected if part not in text]
    assert not missing, f"{missing} not in the error: {text}"
    assert not (comfy_host.base_directory / "x.safetensors").exists()  # where '../../x' would have gone


def test_train_lora_inputs_out_of_their_declared_range_are_refused_before_running(comfy_host, tiny_sd15_checkpoint,
                                                                                  tmp_path):
    import execution

    prompt = _training_prompt(tiny_sd15_checkpoint.name, _images(tmp_path / "s"), learning_rate=5.0)  # max 1.0
    valid, _error, _outputs, node_errors = comfy_host.loop.run_until_complete(
        execution.validate_prompt("lw-range-check", prompt, None))
    assert not valid
    assert [e["details"] for e in node_errors["8"]["errors"]] == ["learning_rate"], node_errors


def test_masked_loss_on_the_dataset_node_learns_only_where_the_masks_allow(comfy_host, run_prompt,
                                                                           tiny_sd15_checkpoint, tmp_path):
    """Load Image Dataset's masked_loss with a black <name>_mask.png beside every photo: the masks are not trained
    as photos, and the whole image is ignored, so every step's loss is 0; without masked_loss the same folder
    trains the masks as photos and its loss is not 0."""
    from PIL import Image

    folder = _images(tmp_path / "masked", n=2)
    for photo in sorted(folder.glob("*.png")):
        Image.new("L", Image.open(photo).size, 0).save(photo.with_name(f"{photo.stem}_mask.png"))
    dataset = _dataset(folder)
    dataset["inputs"]["masked_loss"] = True
    prompt = {"1": _checkpoint(tiny_sd15_checkpoint.name), "2": dataset,
              "5": _train("lw_masked", 2, train_text_encoder=False),
              "9": {"class_type": "LW_LossGraph", "inputs": {"loss": ["5", 3], "smoothing": 0.9, "width": 256,
                                                              "height": 128}}}
    run = run_prompt(prompt)
    assert run.success, run.error()
    assert [d["loss"] for d in run.events("lw.train.step")] == [0.0, 0.0]
    plain = run_prompt({**prompt, "2": _dataset(folder), "5": _train("lw_unmasked", 2, train_text_encoder=False)})
    assert plain.success, plain.error()
    assert all(d["loss"] > 0 for d in plain.events("lw.train.step"))


def test_ema_on_the_train_node_saves_the_average_of_its_steps_beside_the_lora(comfy_host, run_prompt,
                                                                               tiny_sd15_checkpoint, tmp_path):
    """Train LoRA's ema_decay: <name>-ema.safetensors lands beside the LoRA (and <name>-ema-stepN beside each
    step save), carries its averaging in lw_ema, and its weights are the average of the run's steps: with decay
    0.5 from step 0, ema_4 = w4/2 + w3/4 + w2/8 + w1/16 + w0/16, where every up weight starts at zero (w0 = 0).
    The node's outputs stay the trained weights."""
    import torch

    from lora_workbench.training.lora.formats import load_lora

    name = "lw_ema_node"
    prompt = {"1": _checkpoint(tiny_sd15_checkpoint.name), "2": _dataset(_images(tmp_path / "ema", n=2)),
              "8": _train(name, 4, train_text_encoder=False, save_every=1, ema_decay=0.5),
              "9": {"class_type": "LW_SaveLoRA", "inputs": {"lora": ["8", 2], "filename": f"saved/{name}",
                                                            "dtype": "fp32"}}}
    run = run_prompt(prompt)
    assert run.success, run.error()
    loras = comfy_host.base_directory / "models" / "loras"
    runs = loras / "lora_workbench"
    ema = load_lora(runs / f"{name}-ema.safetensors")
    assert json.loads(ema.metadata["lw_ema"]) == {"decay": 0.5, "start_step": 0, "every": 1}
    assert (runs / f"{name}-ema-step000002.safetensors").is_file()
    steps = [load_lora(runs / f"{name}-step{s:06d}.safetensors") for s in (1, 2, 3)]
    steps.append(load_lora(loras / "saved" / f"{name}.safetensors"))  # the node's LoRA output: step 4's weights
    assert set(ema.modules) == set(steps[-1].modules)
    for key, module in ema.modules.items():
        # Step saves are fp16 (the default save dtype): the hand average is as exact as they are.
        expected = sum(w * s.modules[key].up.float() for w, s in zip((1 / 16, 1 / 8, 1 / 4, 1 / 2), steps))
        assert module.up.abs().max() > 0, key
        assert (module.up.float() - expected).abs().max() <= 2e-3 * expected.abs().max() + 1e-6, key
        assert not torch.equal(module.up.float(), steps[-1].modules[key].up.float()), key


def test_validation_dataset_keep_best_and_its_resume_on_the_train_node(comfy_host, run_prompt, tiny_sd15_checkpoint,
                                                                        tmp_path, monkeypatch):
    """A second Load Image Dataset as Train LoRA's validation_dataset: the node reports a validation loss at every
    validation, keep_best writes <name>-best with the lowest one's step in lw_best_step, and the file's curve is the
    one the node reported. Cancelled, the run resumes only with the same validation images."""
    import comfy.model_management
    import torch

    from lora_workbench.training.lora.formats import load_lora

    name, steps = "lw_val_node", 6
    prompt = {"1": _checkpoint(tiny_sd15_checkpoint.name), "2": _dataset(_images(tmp_path / "train", n=2)),
              "3": _dataset(_images(tmp_path / "held_out", n=2)),
              "8": _train(name, steps, train_text_encoder=False, validation_dataset=["3", 0], keep_best=True,
                          save_every=1),
              "9": {"class_type": "LW_LossGraph", "inputs": {"loss": ["8", 3], "smoothing": 0.5, "width": 256,
                                                              "height": 128}}}
    run = run_prompt(prompt)
    assert run.success, run.error()
    reported = [(d["step"], d["loss"]) for d in run.events("lw.train.validation")]
    assert [s for s, _ in reported] == list(range(1, steps + 1)), reported  # every steps // 20 = 1 step
    best_step = min(reported, key=lambda v: v[1])[0]
    runs = comfy_host.base_directory / "models" / "loras" / "lora_workbench"
    best = load_lora(runs / f"{name}-best.safetensors")
    assert int(best.metadata["lw_best_step"]) == best_step
    # the step's save (the last step's is the LoRA itself)
    at_best = load_lora(runs / (f"{name}-step{best_step:06d}.safetensors" if best_step < steps else f"{name}.safetensors"))
    assert best.modules.keys() == at_best.modules.keys()
    assert all(torch.equal(best.modules[k].up, at_best.modules[k].up) for k in best.modules)
    final = load_lora(runs / f"{name}.safetensors")
    curve = json.loads(final.metadata["lw_validation_loss"])
    assert [(s, pytest.approx(v, rel=1e-6)) for s, v, *_ in curve] == reported

    # Cancel during step 2, then Resume Training without the validation images: refused, naming the fix.
    train_nodes = _our_module("LW_TrainLoRA")
    on_step = train_nodes.ComfyCallbacks.on_step

    def cancel_during(self, step, total, loss, lr):
        if step == 2:
            comfy.model_management.interrupt_current_processing(True)
        return on_step(self, step, total, loss, lr)

    monkeypatch.setattr(train_nodes.ComfyCallbacks, "on_step", cancel_during)
    cancelled = run_prompt({**prompt, "8": _train(f"{name}_c", steps, train_text_encoder=False,
                                                   validation_dataset=["3", 0])})
    monkeypatch.undo()
    assert not cancelled.success

    def resume(**more):
        return {k: v for k, v in prompt.items() if k != "8"} | {
            "9": {"class_type": "LW_LossGraph", "inputs": {"loss": ["40", 3], "smoothing": 0.5, "width": 256,
                                                           "height": 128}},
            "40": {"class_type": "LW_ResumeTraining", "inputs": {
                "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0], "state": f"{name}_c-state",
                "steps": 0, **more}}}

    refused = run_prompt(resume())
    assert not refused.success
    assert "validation images changed" in refused.error()["exception_message"], refused.error()
    resumed = run_prompt(resume(validation_dataset=["3", 0]))
    assert resumed.success, resumed.error()
    assert _steps(resumed) == list(range(3, steps + 1))
