"""Our nodes inside ComfyUI: schemas, a train-then-generate graph run headless, clear input errors."""

from __future__ import annotations

from pathlib import Path

import pytest


def _images(folder: Path, n: int = 3, size: int = 64) -> Path:
    from comfy_harness import make_photos

    return make_photos(folder, n, size)


def _our_nodes():
    import nodes

    return {k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items() if k.startswith("LW_")}


def test_every_node_schema_validates_and_documents_its_inputs(comfy_host):
    ours = _our_nodes()
    assert {"LW_LoadImageDataset", "LW_ClassImages", "LW_TrainLoRA", "LW_SaveLoRA", "LW_LossGraph",
            "LW_ResumeTraining"} <= set(ours)
    for node_id, cls in ours.items():
        schema = cls.GET_SCHEMA()
        schema.validate()
        assert schema.description, f"{node_id} has no description"
        for inp in schema.inputs:
            assert getattr(inp, "tooltip", None), f"{node_id}.{inp.id} has no tooltip"
            if type(inp).__qualname__.startswith(("Int.", "Float.")):
                assert inp.min is not None and inp.max is not None, f"{node_id}.{inp.id} has no min/max"


def train_graph(ckpt: str, folder: str, steps: int = 3, name: str = "host_lora") -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "LW_LoadImageDataset", "inputs": {
            "folder": folder, "trigger_word": "sks", "default_caption": "", "resolution": 64,
            "aspect_buckets": True, "bucket_step": 64, "min_bucket_side": 64, "max_bucket_side": 64,
            "repeats": 1, "shuffle_tags": False, "keep_tokens": 0, "caption_dropout": 0.0, "flip": False}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a ball", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["3", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": 1, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "LW_ClassImages", "inputs": {"class_prompt": "a photo of a ball", "images": ["6", 0]}},
        "8": {"class_type": "LW_TrainLoRA", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0], "class_images": ["7", 0],
            "steps": steps, "rank": 4, "alpha": 4.0, "target": "attn", "learning_rate": 1e-3,
            "lr_schedule": "constant", "warmup_steps": 0, "batch_size": 1, "seed": 0, "train_text_encoder": True,
            "prior_loss_weight": 1.0, "precision": "no", "gradient_checkpointing": False, "save_every": 0,
            "preview_every": 0, "preview_prompt": "", "output_name": name}},
        "9": {"class_type": "LW_SaveLoRA", "inputs": {"lora": ["8", 2], "filename": f"saved/{name}", "dtype": "fp16"}},
        "10": {"class_type": "LW_LossGraph", "inputs": {"loss": ["8", 3], "smoothing": 0.5, "width": 256,
                                                         "height": 128}},
        "11": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of sks ball", "clip": ["8", 1]}},
        "12": {"class_type": "KSampler", "inputs": {
            "model": ["8", 0], "positive": ["11", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": 5, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "13": {"class_type": "VAEDecode", "inputs": {"samples": ["12", 0], "vae": ["1", 2]}},
        "14": {"class_type": "SaveImage", "inputs": {"images": ["13", 0], "filename_prefix": "lw_trained"}},
    }


def test_train_then_generate_graph_runs_headless(comfy_host, run_prompt, tiny_sd15_checkpoint, tmp_path):
    folder = _images(tmp_path / "subject")
    run = run_prompt(train_graph(tiny_sd15_checkpoint.name, str(folder)))
    assert run.success, run.error()
    loras = comfy_host.base_directory / "models" / "loras"
    saved = sorted(p.relative_to(loras).as_posix() for p in loras.rglob("*.safetensors"))
    assert "lora_workbench/host_lora.safetensors" in saved and "saved/host_lora.safetensors" in saved
    from lora_workbench.training.lora.formats import load_lora

    lora = load_lora(loras / "saved" / "host_lora.safetensors")
    assert lora.metadata["modelspec.trigger_phrase"] == "sks"
    assert lora.metadata["ss_num_reg_images"] == "2"
    assert any(k.startswith("lora_te_") for k in lora.modules)
    assert run.outputs["14"]["images"], "no image generated with the trained LoRA"
    assert run.outputs["10"]["images"], "no loss graph"
    steps = [d for e, d in run.messages if e == "lw.train.step"]
    assert [d["step"] for d in steps] == [1, 2, 3] and all(d["node"] == "8" for d in steps)


@pytest.mark.parametrize("change, message", [
    ({"2": {"folder": "/nonexistent/lw_folder"}}, "does not exist"),
    ({"8": {"rank": 0}}, "rank"),
])
def test_bad_inputs_get_an_error_that_names_the_fix(comfy_host, run_prompt, tiny_sd15_checkpoint, tmp_path,
                                                    change, message):
    from comfy_harness import PromptInvalidError

    prompt = train_graph(tiny_sd15_checkpoint.name, str(_images(tmp_path / "s")), name="bad")
    for node, inputs in change.items():
        prompt[node]["inputs"].update(inputs)
    try:
        run = run_prompt(prompt)
    except PromptInvalidError as e:  # rejected by validation before anything ran
        text = str(e)
    else:
        assert not run.success
        text = str(run.error())
    assert message in text, text


def test_small_images_are_reported_before_training(comfy_host, run_prompt, tiny_sd15_checkpoint, tmp_path):
    folder = _images(tmp_path / "small", size=32)
    prompt = train_graph(tiny_sd15_checkpoint.name, str(folder), name="small")
    run = run_prompt(prompt)
    assert not run.success
    err = str(run.error())
    assert "img_0.png" in err and "smaller" in err, err
