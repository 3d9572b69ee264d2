"""The shipped example workflows: valid as shipped, and they run headless on the CPU.

Each ``example_workflows/*.json`` is what a user drags into ComfyUI. It is converted to the
prompt the editor would queue (``app.workflow.ui_to_api``, against this ComfyUI's own
``/object_info``), checked by ComfyUI's ``validate_prompt`` as shipped, then shrunk for a CPU
(tiny checkpoint, 64 px, a few steps: overrides chosen by node class, never by id) and run.
The checkpoint and the LoRA files an example names are the user's to pick, so the tests swap them,
again by node class, for a tiny checkpoint and small random LoRAs made for it. Examples named
``*_sdxl`` get the tiny SDXL-family checkpoint (built only when such an example runs), the others
the tiny SD1.5 one.
"""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from comfy_harness import REPO_ROOT

EXAMPLES = sorted((REPO_ROOT / "example_workflows").glob("*.json"))
TRAINERS = {"LW_TrainLoRA", "LW_ResumeTraining"}
# The LoRA files the examples' stacks and grids are pointed at: name under models/loras -> trigger phrase.
EXAMPLE_LORAS = {"lw_examples/character.safetensors": "chrctr", "lw_examples/style.safetensors": "wtrclr",
                 "lw_examples/lighting.safetensors": "gldnhr"}

# node class -> widget values that make the example quick on a CPU with the tiny checkpoint
CPU_OVERRIDES = {
    "LW_LoadImageDataset": {"resolution": 64, "bucket_step": 64, "min_bucket_side": 64, "max_bucket_side": 64},
    "LW_TrainLoRA": {"steps": 3, "preview_every": 2},
    "KSampler": {"steps": 2},
    "EmptyLatentImage": {"width": 64, "height": 64},
    "EmptySD3LatentImage": {"width": 64, "height": 64},
    "EmptyFlux2LatentImage": {"width": 64, "height": 64},
    "LW_LoraGrid": {"steps": 2, "width": 64, "height": 64},
}


@pytest.fixture(scope="session")
def object_info(comfy_host) -> dict:
    """GET /object_info as the editor receives it: the server's own route handler, JSON and all."""
    route = next(r for r in comfy_host.server.routes if r.method == "GET" and r.path == "/object_info")
    response = comfy_host.loop.run_until_complete(route.handler(None))  # the handler reads nothing from the request
    return json.loads(response.body)


@pytest.fixture(scope="module")
def example_loras(comfy_host, tiny_sd15_checkpoint) -> list[str]:
    """EXAMPLE_LORAS written as random rank-4 LoRAs on the tiny checkpoint's own module names, so
    ComfyUI loads every key and each one visibly changes the image."""
    import nodes

    from lora_workbench.nodes.comfy.backend import ComfyBackend
    from lora_workbench.training.lora.files import LoraModule, LoraWeights, save_lora
    from lora_workbench.training.lora.metadata import kohya_metadata

    with torch.inference_mode():
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(tiny_sd15_checkpoint.name)[:3]
    backend = ComfyBackend(model, clip, vae)
    roots = backend.roots()
    rank = 4
    for seed, (name, trigger) in enumerate(EXAMPLE_LORAS.items(), start=1):
        path = comfy_host.base_directory / "models" / "loras" / name
        if path.exists():
            continue
        g = torch.Generator().manual_seed(seed)
        modules = {}
        for t in backend.lora_targets("attn", True):
            layer = roots[t.component].get_submodule(t.path)
            down = torch.randn(rank, layer.in_features, generator=g) / math.sqrt(layer.in_features)
            up = torch.randn(layer.out_features, rank, generator=g) * 0.5 / math.sqrt(rank)
            modules[t.kohya_name] = LoraModule(down, up, alpha=float(rank))
        path.parent.mkdir(parents=True, exist_ok=True)
        save_lora(path, LoraWeights(modules, kohya_metadata(arch="sd1", title=path.stem, trigger_phrase=trigger),
                                    "sd1"), dtype="fp32")
    return list(EXAMPLE_LORAS)


# examples named *_<family> load a tiny set through UNETLoader & co. (flux2 before flux: "_flux" is in its name)
DIT_FAMILIES = ("flux2", "flux", "chroma", "zimage", "qwen_image")
# family -> its ss_base_model_version
BASE_VERSIONS = {"sd1": "sd_v1", "sdxl": "sdxl_base_v1-0", "flux": "flux1", "chroma": "chroma", "sd3": "sd3",
                 "zimage": "zimage", "flux2": "flux2", "qwen_image": "qwen_image"}
# examples named *_<family> whose checkpoint is one all-in-one file -> the fixture of its tiny checkpoint
CHECKPOINT_FIXTURES = {"sdxl": "tiny_sdxl_checkpoint", "sd3": "tiny_sd3_checkpoint"}


def _family(name: str) -> str:
    return next((f for f in (*CHECKPOINT_FIXTURES, *DIT_FAMILIES) if f"_{f}" in name), "sd1")


def _checkpoint(name: str, request) -> Path:
    """The tiny checkpoint of the example's model family (a DiT example loaded through UNETLoader has none:
    the SD1.5 one stands in for any CheckpointLoaderSimple it may have)."""
    return request.getfixturevalue(CHECKPOINT_FIXTURES.get(_family(name), "tiny_sd15_checkpoint"))


def _dit_files(name: str, request) -> dict | None:
    """The tiny DiT set's file names for a *_flux / *_chroma example (``tiny_dit_files`` skips, one line, on a
    host that cannot hold it)."""
    family = _family(name)
    if family not in DIT_FAMILIES:
        return None
    if family in ("zimage", "flux2", "qwen_image"):
        return request.getfixturevalue(f"tiny_{family}_files")
    return request.getfixturevalue("tiny_dit_files")(family)


def _photos(folder: Path) -> Path:
    from comfy_harness import make_photos

    return make_photos(folder, caption="a photo of a red ball")


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


def _with_host_files(prompt: dict, ckpt_name: str, lora_names: list[str], dit: dict | None = None) -> dict:
    """The prompt with this host's checkpoint (or tiny DiT set), and its LoRA files in place of the example's,
    in order."""
    prompt = json.loads(json.dumps(prompt))
    for node in _nodes(prompt, "CheckpointLoaderSimple").values():
        node["inputs"]["ckpt_name"] = ckpt_name
    if dit is not None:
        for node in _nodes(prompt, "UNETLoader").values():
            node["inputs"]["unet_name"] = dit["dit"]
        for node in _nodes(prompt, "DualCLIPLoader").values():
            node["inputs"].update(clip_name1=dit["clip_l"], clip_name2=dit["t5xxl"])
        for node in _nodes(prompt, "CLIPLoader").values():
            node["inputs"]["clip_name"] = dit.get("te") or dit["t5xxl"]
        for node in _nodes(prompt, "VAELoader").values():
            node["inputs"]["vae_name"] = dit["vae"]
    for node in _nodes(prompt, "LW_LoraStack").values():
        rows = sorted(k for k, v in node["inputs"].items() if k.startswith("lora_") and k[5:].isdigit()
                      and isinstance(v, str) and v != "None")
        for row, name in zip(rows, lora_names * len(rows)):
            node["inputs"][row] = name
    for node in _nodes(prompt, "LW_LoraGrid").values():
        if not isinstance(node["inputs"]["loras"], list):
            node["inputs"]["loras"] = "\n".join(lora_names)
    return prompt


def _for_cpu(prompt: dict, ckpt_name: str, lora_names: list[str], folder: Path, dit: dict | None = None) -> dict:
    prompt = _with_host_files(prompt, ckpt_name, lora_names, dit)
    for node in prompt.values():
        overrides = dict(CPU_OVERRIDES.get(node["class_type"], {}))
        if node["class_type"] == "LW_LoadImageDataset":
            overrides["folder"] = str(folder)
        for name, value in overrides.items():
            if not isinstance(node["inputs"].get(name), list):  # a linked input stays linked
                node["inputs"][name] = value
    return prompt


def _release(comfy_host) -> None:
    """Drop the executor's cached node outputs and every loaded model (the next test loads its own)."""
    import gc

    import comfy.model_management as mm

    comfy_host.executor.reset()
    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()


class _Converted(dict):
    """Each example in API format, converted when a test first asks for it: an example of a family this host lacks
    (FLUX.2's EmptyFlux2LatentImage on 0.3.64) is never converted, its tests skip with the host limit."""

    def __init__(self, object_info):
        super().__init__()
        self.object_info = object_info

    def __missing__(self, name):
        from lora_workbench.app.workflow import load_workflow, ui_to_api

        self[name] = ui_to_api(load_workflow(REPO_ROOT / "example_workflows" / name), self.object_info)
        return self[name]


@pytest.fixture(scope="module")
def converted(object_info):
    return _Converted(object_info)


def test_there_is_an_example_workflow_with_a_thumbnail():
    assert EXAMPLES, "example_workflows/ has no workflow"
    for path in EXAMPLES:
        assert path.with_suffix(".jpg").is_file(), f"{path.name} has no {path.stem}.jpg for the template browser"


@pytest.mark.parametrize("name", [p.name for p in EXAMPLES])
def test_example_is_valid_as_shipped(comfy_host, example_loras, converted, name, request):
    """Every value of the shipped graph passes ComfyUI's validation; only the checkpoint and LoRA
    files, which the user picks, are swapped for ones this ComfyUI has."""
    import execution

    prompt = _with_host_files(converted[name], _checkpoint(name, request).name, example_loras,
                              _dit_files(name, request))
    valid, error, outputs, node_errors = comfy_host.loop.run_until_complete(
        execution.validate_prompt(str(uuid.uuid4()), prompt, None))
    assert valid, (error, node_errors)
    assert outputs, "the example has no output node"


@pytest.mark.parametrize("name", [p.name for p in EXAMPLES])
def test_example_runs_headless_and_the_lora_changes_the_image(comfy_host, run_prompt, example_loras, converted,
                                                              tmp_path, name, request):
    import folder_paths
    from PIL import Image

    from lora_workbench.training.lora.formats import load_lora

    ckpt = _checkpoint(name, request)
    dit = _dit_files(name, request)
    if dit is not None:  # its models (a 4.7 GB T5) leave the executor's cache and RAM after the test
        request.addfinalizer(lambda: _release(comfy_host))
    prompt = _for_cpu(converted[name], ckpt.name, example_loras, _photos(tmp_path / "photos"), dit)
    loras = comfy_host.base_directory / "models" / "loras"
    checkpoints = comfy_host.base_directory / "models" / "checkpoints"
    before = set(loras.rglob("*.safetensors")) | set(checkpoints.rglob("*.safetensors"))
    run = run_prompt(prompt)
    assert run.success, run.error()

    def pixels(files: list[dict]) -> list[np.ndarray]:
        return [np.asarray(Image.open(Path(folder_paths.get_directory_by_type(f["type"])) / f["subfolder"]
                                      / f["filename"]), dtype=np.int16) for f in files]

    for node_id, node in _nodes(prompt, "LW_ApplyLoraStack").items():
        shown = "".join(run.outputs[node_id]["text"])
        for lora_name in example_loras:
            assert EXAMPLE_LORAS[lora_name] in shown, f"{lora_name}'s trigger word is not in {shown!r}"
    for node in _nodes(prompt, "LW_SaveLoRA").values():
        path = loras / f"{node['inputs']['filename']}.safetensors"
        assert path.is_file() and path not in before, f"Save LoRA did not write {path}"
        source = prompt[node["inputs"]["lora"][0]]
        if source["class_type"] == "LW_MergeLoras" and source["inputs"]["mode"] == "svd":
            ranks = {m.rank for m in load_lora(path).modules.values()}
            assert max(ranks) <= source["inputs"]["rank"], f"svd merge to rank {source['inputs']['rank']}: {ranks}"
    for node in _nodes(prompt, "LW_MergeLorasToCheckpoint").values():
        new = [p for p in checkpoints.rglob("*.safetensors") if p not in before]
        assert any(p.stem.startswith(Path(node["inputs"]["filename"]).name) for p in new), \
            f"no merged checkpoint {node['inputs']['filename']} in models/checkpoints (new: {new})"
    for grid_id, grid in _nodes(prompt, "LW_LoraGrid").items():
        rows = len(grid["inputs"]["loras"].splitlines())
        cols = len(grid["inputs"]["strengths"].split(","))
        for node_id in _nodes(prompt, "PreviewImage"):
            if prompt[node_id]["inputs"]["images"] == [grid_id, 1]:
                cells = pixels(run.outputs[node_id]["images"])
                assert len(cells) == rows * cols, f"{len(cells)} grid cells for {rows} LoRAs x {cols} strengths"
                assert np.abs(cells[0] - cells[cols - 1]).max() > 0, "the LoRA strength did not change the image"

    if any(v["class_type"] in TRAINERS for v in prompt.values()):
        new = sorted(set(loras.rglob("*.safetensors")) - before)
        assert new, "no LoRA file was written to models/loras"
        triggers = {n["inputs"]["trigger_word"] for n in _nodes(prompt, "LW_LoadImageDataset").values()}
        estimates = run.events("lw.train.memory")
        assert estimates and "expected peak memory" in estimates[0]["text"], "no memory estimate was shown"
        family = BASE_VERSIONS[_family(name)]
        for path in new:
            metadata = load_lora(path).metadata
            assert metadata["modelspec.trigger_phrase"] in triggers, path
            assert metadata["ss_base_model_version"] == family, path

    images = {}  # "with" / "without" the trained LoRA -> pixels of the SaveImage outputs
    for node_id in _nodes(prompt, "SaveImage"):
        files = run.outputs.get(node_id, {}).get("images")
        assert files, f"SaveImage {node_id} ({prompt[node_id]['_meta']['title']}) produced no image"
        branch = "with" if _ancestors(prompt, node_id) & TRAINERS else "without"
        images.setdefault(branch, []).extend(pixels(files))
    if {"with", "without"} <= set(images):
        for with_lora, without in zip(images["with"], images["without"]):
            assert with_lora.shape == without.shape
            assert np.abs(with_lora - without).max() > 0, "the trained LoRA did not change the generated image"

