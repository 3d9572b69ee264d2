"""``lora-workbench run``: every SD example workflow, as shipped (UI format), through the headless runner.

In process (``app.headless``: the ComfyUI the other host tests boot), as a command in a fresh
Python (``--comfyui``), and against a real ComfyUI server started on 127.0.0.1 (``--server``).
What a user would type is what the tests pass: ``--set NODE.INPUT=VALUE`` for the checkpoint and
LoRA files the examples leave to the user, and for the CPU-sized steps and resolutions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from comfy_harness import REPO_ROOT, make_photos, start_server
import test_example_workflows
from test_example_workflows import CPU_OVERRIDES, EXAMPLE_LORAS, EXAMPLES

example_loras = test_example_workflows.example_loras  # the same small LoRAs the examples' stacks are pointed at

SERVER_WAIT_SECONDS = 240
RUN_TIMEOUT_SECONDS = 900


def cli_sets(prompt: dict, ckpt_name: str, lora_names: list[str], photos: Path) -> list[str]:
    """The --set options that point an example at this host's files and shrink it for a CPU."""
    sets = []

    def put(node_id, name, value):
        if not isinstance(prompt[node_id]["inputs"].get(name), list):  # a linked input stays linked
            sets.append(f"{node_id}.{name}={json.dumps(value)}")

    for node_id, node in prompt.items():
        cls, inputs = node["class_type"], node["inputs"]
        if cls == "CheckpointLoaderSimple":
            put(node_id, "ckpt_name", ckpt_name)
        if cls == "LW_LoraStack":
            rows = [k for k, v in inputs.items() if k.startswith("lora_") and k[5:].isdigit() and v != "None"]
            for row, name in zip(rows, lora_names * len(rows)):
                put(node_id, row, name)
        if cls == "LW_LoraGrid":
            put(node_id, "loras", "\n".join(lora_names))
        if cls == "LW_LoadImageDataset":
            put(node_id, "folder", str(photos))
        for name, value in CPU_OVERRIDES.get(cls, {}).items():
            put(node_id, name, value)
    return sets


@pytest.fixture(scope="module")
def object_info(comfy_host):
    return comfy_host.object_info()


def shipped_prompt(path: Path, object_info: dict) -> dict:
    from lora_workbench.app.workflow import load_workflow, ui_to_api

    return ui_to_api(load_workflow(path), object_info)


# The Flux / Chroma examples run headless in test_example_workflows (same executor, same files); through the
# runner their --set plumbing is the same as the SD examples', and each costs minutes of CPU for its T5-XXL.
RUNNER_EXAMPLES = [p for p in EXAMPLES if not any(f"_{f}" in p.stem for f in test_example_workflows.DIT_FAMILIES)]


@pytest.mark.parametrize("path", RUNNER_EXAMPLES, ids=[p.stem for p in RUNNER_EXAMPLES])
def test_every_example_runs_through_the_runner(comfy_host, example_loras, object_info, tmp_path, path, request):
    from lora_workbench.app.workflow_runner import run_workflow

    workflow = json.loads(path.read_text())
    assert "nodes" in workflow, f"{path.name} is not in the editor's (UI) format"
    # the tiny checkpoint of the example's model family, as test_example_workflows picks it
    ckpt = request.getfixturevalue("tiny_sdxl_checkpoint" if "_sdxl" in path.stem else "tiny_sd15_checkpoint")
    prompt = shipped_prompt(path, object_info)
    sets = cli_sets(prompt, ckpt.name, example_loras, make_photos(tmp_path / "photos"))
    lines = []
    (result,) = run_workflow(comfy_host.host, path, sets=sets, write=lines.append)
    log = "\n".join(lines)
    assert result.ok, f"{result.error}\n{log}"

    outputs = [node_id for node_id, node in prompt.items() if node["class_type"] == "SaveImage"]
    assert outputs, f"{path.name} saves no image"
    for node_id in outputs:
        files = result.run.outputs[node_id]["images"]
        for ref in files:
            location = Path(comfy_host.file_location(ref))
            assert location.is_file() and location.parent.is_relative_to(comfy_host.output_directory)
            assert f"wrote {location}" in log
    for node_id in prompt:  # every node ran, or came from the cache of an earlier run ("cached: #1 ...")
        assert f"#{node_id} " in log, (node_id, log)
    if any(n["class_type"] == "LW_TrainLoRA" for n in prompt.values()):
        steps = CPU_OVERRIDES["LW_TrainLoRA"]["steps"]
        assert f"step 1/{steps}" in log and f"step {steps}/{steps}" in log and "preview at step 2" in log, log


def test_batch_variants_render_every_row(comfy_host, tiny_sd15_checkpoint, example_loras, object_info,
                                         tmp_path):
    """stack_and_merge with its merge nodes muted, three rows: full strength, LoRAs off, another prompt."""
    from PIL import Image

    from lora_workbench.app.workflow_runner import load_variants, run_workflow

    path = REPO_ROOT / "example_workflows" / "stack_and_merge.json"
    workflow = json.loads(path.read_text())
    for node in workflow["nodes"]:
        if node["type"] in ("LW_MergeLorasToCheckpoint", "LW_MergeLoras", "LW_SaveLoRA"):
            node["mode"] = 2  # muted in the editor: left out of the prompt
    prompt = shipped_prompt(path, object_info)
    sets = cli_sets(prompt, tiny_sd15_checkpoint.name, example_loras, tmp_path)
    variants = tmp_path / "variants.csv"
    variants.write_text('name,seed,strength,"Prompt = trigger words, your text.string_b"\n'  # a title as NODE
                        "full,5,1.0,\n"
                        "off,5,0.0,\n"
                        'other prompt,5,1.0,"a red ball, studio light"\n')
    lines = []
    results = run_workflow(comfy_host.host, workflow, sets=sets, variants=load_variants(variants), write=lines.append)
    log = "\n".join(lines)
    assert [r.ok for r in results] == [True, True, True], log
    assert not any("LW_Merge" in line for line in lines), "a muted node ran"

    def image(result):
        (ref,) = [f for f in result.run.files() if f["type"] == "output"]
        return np.asarray(Image.open(comfy_host.file_location(ref)), dtype=np.int16)

    full, off, other = (image(r) for r in results)
    assert np.abs(full - off).max() > 0, "strength 0 gave the same image as strength 1"
    assert np.abs(full - other).max() > 0, "another prompt gave the same image"
    triggers = [r.run.outputs[k]["text"] for r in results for k, n in prompt.items()
                if n["class_type"] == "LW_ApplyLoraStack"]
    assert all(t in "".join(triggers[0]) for t in EXAMPLE_LORAS.values()) and "(none" in "".join(triggers[1])
    summary = lines[lines.index("summary:") + 1:]
    assert [s.split()[1] for s in summary] == ["ok", "ok", "ok"]
    assert summary[0].endswith("full") and summary[2].endswith("other prompt")


def _cli(args: list[str], cwd: Path, timeout: float = RUN_TIMEOUT_SECONDS) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_workbench.app.cli", "run", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_run_command_boots_comfyui_in_a_fresh_process(comfy_host, comfyui_path, tiny_sd15_checkpoint,
                                                      example_loras, object_info, tmp_path):
    path = REPO_ROOT / "example_workflows" / "epoch_strength_grid.json"
    sets = cli_sets(shipped_prompt(path, object_info), tiny_sd15_checkpoint.name, example_loras, tmp_path)
    out = tmp_path / "renders"
    done = _cli([str(path), "--comfyui", str(comfyui_path), "--base-directory", str(comfy_host.base_directory),
                 "--output-directory", str(out), "--cpu", *[a for s in sets for a in ("--set", s)]], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    grids = sorted(out.glob("lora_workbench/epoch_grid*.png"))
    assert grids, f"no grid in {out}:\n{done.stdout[-3000:]}"
    assert f"wrote {grids[0]}" in done.stdout
    assert "  run  #2 LoRA Grid: step saves x strengths (LW_LoraGrid)" in done.stdout


def test_run_command_reports_a_bad_set_before_booting(tmp_path, comfyui_path):
    path = REPO_ROOT / "example_workflows" / "train_then_generate.json"
    done = _cli([str(path), "--server", "http://127.0.0.1:9", "--set", "steps=3"], tmp_path, timeout=60)
    assert done.returncode == 2 and "is not NODE.INPUT=VALUE" in done.stderr, done.stderr
    done = _cli([str(tmp_path / "missing.json"), "--comfyui", str(comfyui_path)], tmp_path, timeout=60)
    assert done.returncode == 2 and "cannot read workflow" in done.stderr, done.stderr


@pytest.fixture(scope="module")
def comfy_server(comfyui_path, tiny_sd15_checkpoint, tmp_path_factory):
    server = start_server(comfyui_path, tmp_path_factory.mktemp("server_base"), REPO_ROOT,
                          checkpoints=[tiny_sd15_checkpoint], wait_seconds=SERVER_WAIT_SECONDS)
    try:
        yield server
    finally:
        server.stop()


def test_run_command_against_a_server_shows_training_progress(comfy_server, tiny_sd15_checkpoint, object_info,
                                                              tmp_path):
    """train_then_generate queued on a real ComfyUI over HTTP; progress comes over its websocket."""
    path = REPO_ROOT / "example_workflows" / "train_then_generate.json"
    photos = make_photos(tmp_path / "photos", caption="a photo of a red ball")
    sets = cli_sets(shipped_prompt(path, object_info), tiny_sd15_checkpoint.name, [], photos)
    done = _cli([str(path), "--server", comfy_server.url, "--timeout", str(RUN_TIMEOUT_SECONDS),
                 *[a for s in sets for a in ("--set", s)]], tmp_path)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:] + comfy_server.log()[-3000:]
    steps = CPU_OVERRIDES["LW_TrainLoRA"]["steps"]
    assert "  run  #11 Train LoRA (LoRA Workbench) (LW_TrainLoRA)" in log, log
    assert f"step {steps}/{steps}" in log and "preview at step 2" in log, log
    base = comfy_server.base_directory
    for prefix in ("with_lora", "without_lora"):
        files = sorted((base / "output" / "lora_workbench").glob(f"{prefix}_*.png"))
        assert files, f"the server wrote no {prefix} image"
        assert f"wrote {comfy_server.url}/view?filename={files[0].name}&subfolder=lora_workbench&type=output" in log
    assert sorted((base / "models" / "loras").glob("sks_person*.safetensors")), "Save LoRA wrote nothing"
