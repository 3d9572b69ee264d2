"""The shipped example workflows: valid as shipped, and they run headless on the CPU.

Each ``example_workflows/*.json`` is what a user drags into ComfyUI. It is converted to the
prompt the editor would queue (``training.workflow.ui_to_api``, against this ComfyUI's own
``/object_info``), checked by ComfyUI's ``validate_prompt`` as shipped, then shrunk for a CPU
(tiny checkpoint, 64 px, a few steps: overrides chosen by node class, never by id) and run.
"""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path

import numpy as np
import pytest

from comfy_harness import REPO_ROOT

EXAMPLES = sorted((REPO_ROOT / "example_workflows").glob("*.json"))
TRAINERS = {"LW_TrainLoRA", "LW_ResumeTraining"}

# node class -> widget values that make the example quick on a CPU with the tiny checkpoint
CPU_OVERRIDES = {
    "LW_LoadImageDataset": {"resolution": 64, "bucket_step": 64, "min_bucket_side": 64, "max_bucket_side": 64},
    "LW_TrainLoRA": {"steps": 3, "preview_every": 2},
    "KSampler": {"steps": 2},
    "EmptyLatentImage": {"width": 64, "height": 64},
}


@pytest.fixture(scope="session")
def object_info(comfy_host) -> dict:
    """GET /object_info as the editor receives it: the server's own route handler, JSON and all."""
    route = next(r for r in comfy_host.server.routes if r.method == "GET" and r.path == "/object_info")
    response = comfy_host.loop.run_until_complete(route.handler(None))  # the handler reads nothing from the request
    return json.loads(response.body)


def _photos(folder: Path, n: int = 3, size: int = 64) -> Path:
    from PIL import Image, ImageDraw

    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (size, size), tuple(rng.randint(0, 255) for _ in range(3)))
        ImageDraw.Draw(img).ellipse([16, 16, 48, 48], fill=(220, 20, 20))
        img.save(folder / f"img_{i}.png")
        (folder / f"img_{i}.txt").write_text("a photo of a red ball")
    return folder


def _nodes(prompt: dict, class_type: str) -> dict:
    return {k: v for k, v in prompt.items() if v["class_type"] == class_type}


def _ancestors(prompt: dict, node_id: str) -> set[str]:
    """Class types of every node upstream of node_id."""
    seen, todo, classes = set(), [node_id], set()
    while todo:
        for value in prompt[todo.pop()]["inputs"].values():
            if isinstance(value, list) and value[0] not in seen:
                seen.add(value[0])
                classes.add(prompt[value[0]]["class_type"])
                todo.append(value[0])
    return classes


def _with_checkpoint(prompt: dict, ckpt_name: str) -> dict:
    prompt = json.loads(json.dumps(prompt))
    for node in _nodes(prompt, "CheckpointLoaderSimple").values():
        node["inputs"]["ckpt_name"] = ckpt_name
    return prompt


def _for_cpu(prompt: dict, ckpt_name: str, folder: Path) -> dict:
    prompt = _with_checkpoint(prompt, ckpt_name)
    for node in prompt.values():
        overrides = dict(CPU_OVERRIDES.get(node["class_type"], {}))
        if node["class_type"] == "LW_LoadImageDataset":
            overrides["folder"] = str(folder)
        for name, value in overrides.items():
            if not isinstance(node["inputs"].get(name), list):  # a linked input stays linked
                node["inputs"][name] = value
    return prompt


@pytest.fixture(scope="module")
def converted(object_info):
    from lora_workbench.training.workflow import load_workflow, ui_to_api

    return {path.name: ui_to_api(load_workflow(path), object_info) for path in EXAMPLES}


def test_there_is_an_example_workflow_with_a_thumbnail():
    assert EXAMPLES, "example_workflows/ has no workflow"
    for path in EXAMPLES:
        assert path.with_suffix(".jpg").is_file(), f"{path.name} has no {path.stem}.jpg for the template browser"


@pytest.mark.parametrize("name", [p.name for p in EXAMPLES])
def test_example_is_valid_as_shipped(comfy_host, tiny_sd15_checkpoint, converted, name):
    """Every value of the shipped graph passes ComfyUI's validation; only the checkpoint, which
    the user picks, is swapped for one this ComfyUI has."""
    import execution

    prompt = _with_checkpoint(converted[name], tiny_sd15_checkpoint.name)
    valid, error, outputs, node_errors = comfy_host.loop.run_until_complete(
        execution.validate_prompt(str(uuid.uuid4()), prompt, None))
    assert valid, (error, node_errors)
    assert outputs, "the example has no output node"


@pytest.mark.parametrize("name", [p.name for p in EXAMPLES])
def test_example_runs_headless_and_the_lora_changes_the_image(comfy_host, run_prompt, tiny_sd15_checkpoint,
                                                              converted, tmp_path, name):
    from PIL import Image

    from lora_workbench.training.lora_io import load_lora

    prompt = _for_cpu(converted[name], tiny_sd15_checkpoint.name, _photos(tmp_path / "photos"))
    loras = comfy_host.base_directory / "models" / "loras"
    before = set(loras.rglob("*.safetensors"))
    run = run_prompt(prompt)
    assert run.success, run.error()

    if any(v["class_type"] in TRAINERS for v in prompt.values()):
        new = sorted(set(loras.rglob("*.safetensors")) - before)
        assert new, "no LoRA file was written to models/loras"
        triggers = {n["inputs"]["trigger_word"] for n in _nodes(prompt, "LW_LoadImageDataset").values()}
        for path in new:
            assert load_lora(path).metadata["modelspec.trigger_phrase"] in triggers, path

    images = {}  # "with" / "without" the trained LoRA -> pixels of the SaveImage outputs
    output_dir = comfy_host.base_directory / "output"
    for node_id in _nodes(prompt, "SaveImage"):
        files = run.outputs.get(node_id, {}).get("images")
        assert files, f"SaveImage {node_id} ({prompt[node_id]['_meta']['title']}) produced no image"
        branch = "with" if _ancestors(prompt, node_id) & TRAINERS else "without"
        images.setdefault(branch, []).extend(
            np.asarray(Image.open(output_dir / f["subfolder"] / f["filename"]), dtype=np.int16) for f in files)
    if {"with", "without"} <= set(images):
        for with_lora, without in zip(images["with"], images["without"]):
            assert with_lora.shape == without.shape
            assert np.abs(with_lora - without).max() > 0, "the trained LoRA did not change the generated image"

