"""What ``nodes/comfy/host.py`` does differently per ComfyUI version, checked on the host this run has.

Each test holds on every supported host; the comments say which host takes which path.
"""

from __future__ import annotations

import pytest
import torch

from test_comfy_backend import load_tiny
from test_host_boot import text_to_image_prompt


def test_headless_executor_keeps_node_outputs_between_prompts(comfy_host, run_prompt, tiny_sd15_checkpoint):
    """The classic cache: a second identical prompt re-runs nothing (0.33 reads ``cache_args`` in every
    prompt; a missing one failed every headless run with "'NoneType' object is not subscriptable")."""
    prompt = text_to_image_prompt(tiny_sd15_checkpoint.name)
    first = run_prompt(prompt)
    second = run_prompt(prompt)
    assert first.success and second.success, (first.error(), second.error())
    cached = [n for data in second.events("execution_cached") for n in data["nodes"]]
    assert set(cached) == set(prompt), f"re-executed {set(prompt) - set(cached)}"


def test_training_sets_in_training_and_puts_it_back(comfy_host, tiny_sd15_checkpoint, tmp_path):
    """DiT kernels keep gradients only while ``comfy.model_management.in_training`` is set (0.33); 0.3.64
    has no such flag, and none is made up there."""
    import comfy.model_management as mm

    from lora_workbench.nodes.comfy.backend import ComfyBackend

    model, clip, vae = load_tiny(tiny_sd15_checkpoint.name)
    backend = ComfyBackend(model, clip, vae)
    had_flag = hasattr(mm, "in_training")
    with pytest.raises(RuntimeError, match="stop"):
        with torch.inference_mode(), backend.training_context():
            assert getattr(mm, "in_training", None) is (True if had_flag else None)
            raise RuntimeError("stop")
    assert hasattr(mm, "in_training") == had_flag
    assert not getattr(mm, "in_training", False)


def test_a_classic_patcher_is_trained_in_place_without_a_second_copy(comfy_host, tiny_sd15_checkpoint):
    """Only a dynamic-VRAM patcher (0.33 on NVIDIA) gets a private non-dynamic clone, as ComfyUI's trainer
    makes; the CPU's classic patcher is trained in place (and restored), so no second copy is loaded."""
    from lora_workbench.nodes.comfy import host

    model, clip, _ = load_tiny(tiny_sd15_checkpoint.name)
    assert not (getattr(model, "is_dynamic", None) and model.is_dynamic())
    trained_model, trained_clip = host.trainable(model, clip)
    assert trained_model is model and trained_clip is clip


def test_prompt_encoding_equals_clip_text_encode(comfy_host, tiny_sd15_checkpoint, tmp_path):
    """The trainer's captions are encoded as ComfyUI's CLIPTextEncode encodes them, on either host's
    encoding path (0.33 passes the execution device)."""
    import nodes

    from lora_workbench.nodes.comfy.backend import ComfyBackend

    model, clip, vae = load_tiny(tiny_sd15_checkpoint.name)
    text = "a photo of a red ball on a table"
    with torch.inference_mode():
        (conditioning,) = nodes.CLIPTextEncode().encode(clip, text)
    backend = ComfyBackend(model, clip, vae)
    with torch.inference_mode(), backend.training_context():
        ours = backend.encode_prompts([text])
    torch.testing.assert_close(ours.float().cpu(), conditioning[0][0].float().cpu(), rtol=0, atol=1e-6)


def test_merged_file_check_refuses_a_file_comfyui_cannot_load_as_the_model(comfy_host, tiny_sd15_checkpoint,
                                                                         tmp_path):
    """A checkpoint missing its UNet (what 0.33's ``state_dict_for_saving(unet_sd, ...)`` made of the old
    positional call) or missing keys is an error naming the file, not a success."""
    import safetensors.torch

    from lora_workbench.nodes import merge_nodes

    model, clip, vae = load_tiny(tiny_sd15_checkpoint.name)
    sd = safetensors.torch.load_file(str(tiny_sd15_checkpoint))
    good = tmp_path / "good.safetensors"
    safetensors.torch.save_file(sd, str(good))
    merge_nodes.verify_checkpoint(good, model, sd.keys())  # the real checkpoint passes

    no_unet = {k: v for k, v in sd.items() if not k.startswith("model.diffusion_model.")}
    bad = tmp_path / "no_unet.safetensors"
    safetensors.torch.save_file(no_unet, str(bad))
    with pytest.raises(RuntimeError, match=r"detects no known model in .*no_unet\.safetensors, not the SD15"):
        merge_nodes.verify_checkpoint(bad, model, no_unet.keys())
    with pytest.raises(RuntimeError, match=r"1 keys missing"):
        merge_nodes.verify_checkpoint(good, model, [*sd.keys(), "model.diffusion_model.extra.weight"])
