"""ComfyUI starts with LoRA Workbench installed, loads an SD1.5 checkpoint and renders on the CPU."""

from __future__ import annotations

import subprocess
import sys
import time

from comfy_harness import PACK_FOLDER_NAME, REPO_ROOT, make_base_directory


def text_to_image_prompt(ckpt_name: str, seed: int = 0) -> dict:
    """The default ComfyUI workflow in API format, shrunk to 64x64 and 2 steps."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a red fox", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
                "seed": seed, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "lw_host_t2i"}},
    }


def test_main_py_quick_test_loads_the_pack(comfyui_path, tmp_path):
    """`main.py --cpu --quick-test-for-ci` starts cleanly with our pack in custom_nodes."""
    base = tmp_path / "base"
    pack_dir = make_base_directory(base, REPO_ROOT)
    command = [
        sys.executable, "main.py", "--cpu", "--quick-test-for-ci",
        "--base-directory", str(base),
        "--database-url", "sqlite:///:memory:",  # keep ComfyUI's own user/ folder untouched
        "--disable-api-nodes",
    ]
    done = subprocess.run(command, cwd=comfyui_path, capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    assert "IMPORT FAILED" not in log, log
    assert "Cannot import" not in log, log
    pack_lines = [line for line in log.splitlines() if line.rstrip().endswith(f"custom_nodes/{PACK_FOLDER_NAME}")]
    assert pack_lines and "seconds:" in pack_lines[0], f"{pack_dir} not in the import list:\n{log}"


def test_pack_loads_in_process(comfy_host):
    import nodes

    assert "IMPORT FAILED" not in comfy_host.pack_import_line
    assert nodes.LOADED_MODULE_DIRS[PACK_FOLDER_NAME] == str(comfy_host.pack_dir)


def test_tiny_checkpoint_is_sd15_and_samples(comfy_host, tiny_sd15_checkpoint):
    import torch

    import nodes

    start = time.perf_counter()
    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(tiny_sd15_checkpoint.name)
    load_seconds = time.perf_counter() - start
    assert type(model.model.model_config).__name__ == "SD15"
    # Not a benchmark: a guard that the fixture stays tiny (a real SD1.5 takes far longer here).
    assert load_seconds < 30, f"tiny checkpoint took {load_seconds:.1f}s to load"

    with torch.inference_mode():  # as ComfyUI runs nodes
        (positive,) = nodes.CLIPTextEncode().encode(clip, "a photo of a red fox")
        (negative,) = nodes.CLIPTextEncode().encode(clip, "")
        (latent,) = nodes.EmptyLatentImage().generate(64, 64, 1)
        (sampled,) = nodes.common_ksampler(model, 0, 2, 5.0, "euler", "normal", positive, negative, latent)
        (image,) = nodes.VAEDecode().decode(vae, sampled)

    assert positive[0][0].shape == (1, 77, 768)
    assert sampled["samples"].shape == (1, 4, 8, 8)
    assert not torch.equal(sampled["samples"], latent["samples"])
    assert image.shape == (1, 64, 64, 3)
    assert torch.isfinite(image).all()


def test_prompt_executor_runs_text_to_image(comfy_host, run_prompt, tiny_sd15_checkpoint):
    from PIL import Image

    run = run_prompt(text_to_image_prompt(tiny_sd15_checkpoint.name))

    assert run.success, run.error()
    images = run.outputs["7"]["images"]
    assert len(images) == 1 and images[0]["type"] == "output"
    path = comfy_host.base_directory / "output" / images[0]["subfolder"] / images[0]["filename"]
    with Image.open(path) as image:
        assert image.size == (64, 64)
    assert [data["node"] for data in run.events("executed")] == ["7"]
    assert run.events("progress"), "KSampler reported no progress through ComfyUI's ProgressBar hook"
