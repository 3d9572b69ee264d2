"""Every difference between the ComfyUI versions this pack supports, in one module.

Supported: ComfyUI 0.3.64 (October 2025) and later; CI runs the host suite on 0.3.64 and 0.33.0.
Each function below names one difference, the version that brought it, and does what ComfyUI's
own code does on that version (its ``main.py``, ``comfy.sd.save_checkpoint``, ``CLIP.encode_from_tokens``
and ``comfy_extras/nodes_train.py``). Versions are told apart by the feature itself (a parameter, an
attribute), never by a version string, so a ComfyUI between the two tested ones takes the right path.
Nothing else in the pack asks which ComfyUI it runs on.

| difference | since | handled by |
|---|---|---|
| ``PromptExecutor(cache_size=)`` renamed ``cache_args``; every prompt reads ``cache_args["ram"]`` | 0.3.67 / 0.18 | ``prompt_executor`` |
| ``main.py`` re-applies its cuDNN benchmark policy after custom nodes load | by 0.33 | ``after_custom_nodes`` |
| dynamic VRAM (comfy-aimdo) set up by ``main.py``, the default on NVIDIA | Feb 2026 (after 0.3.64) | ``setup_dynamic_vram`` |
| ``ModelPatcher.state_dict_for_saving`` patches lazily; ``BaseModel.state_dict_for_saving(unet_sd, ...)`` takes the UNet first; ``CLIP.state_dict_for_saving`` | 0.11.1 | ``checkpoint_state_dict`` |
| ``force_patch_weights`` asserted off by ``ModelPatcherDynamic.partially_load`` | with dynamic VRAM | ``checkpoint_state_dict`` |
| prompt encoding sets the CLIP's ``execution_device`` inside ``cuda_device_context`` | by 0.33 | ``encode_token_weights`` |
| ``comfy.model_management.in_training``: DiT kernels keep gradients only while it is set | after 0.3.64 | ``in_training`` |
| dynamic patchers cannot be trained in place: the host's trainer works on a non-dynamic clone | with dynamic VRAM | ``trainable`` |
| a loaded MODEL remembers its file (``ModelPatcher.cached_patcher_init``); before, a MODEL has no file name | with dynamic VRAM | ``model_file_name`` |
| scaled-fp8 / mixed-precision weights are ``comfy.quant_ops.QuantizedTensor``s, wrapped in a new Parameter at every ``.to()``: one that left inference mode cannot be wrapped again in it ("Cannot set version_counter for inference tensor"), so models are loaded and unloaded in inference mode | after 0.3.64 | ``reloads_after_unload`` |
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Iterator

import torch

log = logging.getLogger(__name__)

SUPPORTED_RANGE = ">=0.3.64"  # also in pyproject.toml's [tool.comfy] and the README
TESTED_VERSIONS = ("0.3.64", "0.33.0")


# ---- running prompts ---------------------------------------------------------------------------------
def prompt_executor(server):
    """``execution.PromptExecutor`` with the classic cache, as ``main.py --cache-classic`` builds it.

    0.3.67 renamed the ``cache_size`` argument ``cache_args``; since 0.18 every ``execute`` reads
    ``cache_args["ram"]`` and ``["ram_inactive"]`` (0 = no RAM-pressure release: the classic cache keeps
    node outputs until the next prompt replaces them, which headless batches rely on).
    """
    import execution

    params = inspect.signature(execution.PromptExecutor.__init__).parameters
    if "cache_args" in params:
        return execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC,
                                        cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
    return execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC)


def dynamic_vram_enabled(args) -> bool:
    """What ``main.py`` decides from the command line: dynamic VRAM on unless ``--cpu``, ``--highvram``,
    ``--gpu-only``, ``--novram`` or ``--disable-dynamic-vram`` (0.3.64 has no dynamic VRAM)."""
    import comfy.cli_args

    check = getattr(comfy.cli_args, "enables_dynamic_vram", None)
    return bool(check and check())


def setup_dynamic_vram(args, stage: str) -> None:
    """``main.py``'s comfy-aimdo set-up, in its two places: ``stage="early"`` before
    ``comfy.model_management`` is imported (``comfy_aimdo.control.init``), ``stage="devices"`` after it
    (``init_devices``, then ``ModelPatcherDynamic`` becomes the core patcher). Since February 2026 this is the
    default on NVIDIA GPUs; under ``--cpu`` (the tests) it stays off, as in ``main.py``.
    """
    if not dynamic_vram_enabled(args):
        return
    import comfy_aimdo.control

    if stage == "early":
        headroom = None if args.reserve_vram is None else int(args.reserve_vram * 1024 ** 3)
        _first_accepted(comfy_aimdo.control.init,
                        dict(simple_vram_headroom=headroom, nvml_pressure=not args.disable_nvml_pressure),
                        dict(simple_vram_headroom=headroom), {})
        return
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher

    supported = mm.is_nvidia() or (mm.is_amd() and getattr(mm, "rocm_version", (0, 0)) >= (7, 14))
    if not (args.enable_dynamic_vram or supported) or (not args.enable_dynamic_vram
                                                        and mm.torch_version_numeric < (2, 8)):
        return
    devices = mm.get_all_torch_devices()
    try:
        ready = comfy_aimdo.control.init_devices((d.index, int(args.vram_headroom * 1024 ** 3)) for d in devices)
    except TypeError:  # comfy-aimdo 0.4.9's protocol
        ready = comfy_aimdo.control.init_devices(d.index for d in devices)
    if ready:
        comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
        comfy.memory_management.aimdo_enabled = True
        log.info("dynamic VRAM enabled, as ComfyUI's main.py does on this GPU")
    else:
        log.warning("comfy-aimdo did not start: dynamic VRAM stays off (ComfyUI's legacy model patcher)")


def after_custom_nodes() -> None:
    """What ``main.py`` does once custom nodes are imported: on 0.33 it re-applies ComfyUI's cuDNN
    benchmark policy, which a custom node may have changed at import (0.3.64 has no such step)."""
    import comfy.model_management as mm

    policy = getattr(mm, "set_cudnn_benchmark", None)
    if policy is not None:
        policy()


def _first_accepted(call, *keyword_sets):
    """Call with the first keyword set this version accepts (comfy-aimdo changed its ``init`` twice)."""
    for i, kwargs in enumerate(keyword_sets):
        try:
            return call(**kwargs)
        except TypeError:
            if i == len(keyword_sets) - 1:
                raise
    return None


# ---- saving a checkpoint -----------------------------------------------------------------------------
def checkpoint_state_dict(model, clip, vae) -> dict[str, torch.Tensor]:
    """MODEL + CLIP + VAE with their patches (LoRAs) in the weights, keyed as a checkpoint file, every
    tensor a plain contiguous CPU tensor. The steps of ``comfy.sd.save_checkpoint`` on this host.

    Since 0.11.1 ``ModelPatcher.state_dict_for_saving`` returns ``LazyCastingParam``s that patch each
    weight when it is moved to the CPU, and is loaded without ``force_patch_weights`` (a dynamic
    patcher asserts it off). Before, the patches were forced into the weights by the load and
    ``BaseModel.state_dict_for_saving(clip_sd, vae_sd, clip_vision_sd)`` read them from the modules.
    """
    import comfy.model_management as mm

    load = [model]
    clip_sd = None
    lazy = hasattr(model, "state_dict_for_saving")
    if clip is not None:
        load.append(clip.load_model())
        clip_sd = clip.state_dict_for_saving() if hasattr(clip, "state_dict_for_saving") else clip.get_sd()
    vae_sd = vae.get_sd() if vae is not None else None
    if lazy:
        mm.load_models_gpu(load)
        sd = model.state_dict_for_saving(clip_sd, vae_sd, None)
    else:
        mm.load_models_gpu(load, force_patch_weights=True)
        sd = model.model.state_dict_for_saving(clip_sd, vae_sd, None)
    return {k: materialize(t) for k, t in sd.items()}


def materialize(t: torch.Tensor) -> torch.Tensor:
    """A plain CPU tensor with the value a saver writes.

    A ``LazyCastingParam`` (0.11.1+) patches its weight only in ``.to(...)``, ignores the dtype it is
    given, and its ``.detach()`` is the *unpatched* weight: so move it to the CPU first, and nothing else.
    """
    t = t.to("cpu")
    if isinstance(t, torch.nn.Parameter):
        t = t.data
    return t.contiguous()


# ---- training ----------------------------------------------------------------------------------------
def model_file_name(model) -> str:
    """The file a MODEL was loaded from (Load Checkpoint / Load Diffusion Model), as its base name; "" where the
    host does not keep it (0.3.64) or the MODEL did not come from a file."""
    import os

    init = getattr(model, "cached_patcher_init", None)
    try:
        path = init[1][0]
    except (TypeError, IndexError):
        return ""
    return os.path.basename(path) if isinstance(path, (str, os.PathLike)) else ""


def trainable(model, clip):
    """The MODEL and CLIP to wrap with LoRA layers: the graph's own ones, or private clones where the host
    needs them.

    A dynamic-VRAM patcher (2026 hosts on NVIDIA) streams weights through comfy-aimdo and cannot hold trainable
    wrappers; ComfyUI's own trainer works on ``model.clone(force_deepcopy=True)``, a non-dynamic copy.
    We take the same non-dynamic clone (``disable_dynamic=True``) for such patchers only; classic
    patchers (0.3.64, the CPU, ``--disable-dynamic-vram``) are trained in place and restored afterwards,
    with ComfyUI's lowvram/offload as it loaded them, so no second copy is made there.
    """
    if _is_dynamic(model):
        log.info("the MODEL uses dynamic VRAM: training a non-dynamic clone of it, as ComfyUI's trainer does")
        model = model.clone(disable_dynamic=True)
    if clip is not None and _is_dynamic(clip.patcher):
        clip = clip.clone(disable_dynamic=True)
        clip.cond_stage_model = clip.patcher.model  # CLIP.clone keeps the old encoder object otherwise
    return model, clip


def _is_dynamic(patcher) -> bool:
    check = getattr(patcher, "is_dynamic", None)
    return bool(check and check())


@contextlib.contextmanager
def in_training() -> Iterator[None]:
    """``comfy.model_management.in_training`` set while training, as ComfyUI's trainer sets it.

    DiT model code (Flux's rope, Lumina's qk-norm, LTXV ...) uses kernels without gradients unless it
    is set. The flag does not exist on 0.3.64, where nothing reads it.
    """
    import comfy.model_management as mm

    if not hasattr(mm, "in_training"):
        yield
        return
    before = mm.in_training
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = before


def reloads_after_unload(patcher) -> bool:
    """Whether ComfyUI can unload this model and load it again in a later node (which runs in inference mode).

    Not when it holds a quantized weight (``comfy.quant_ops.QuantizedTensor``: a scaled-fp8 Qwen2.5-VL, Comfy-Org's
    ``*_fp8_scaled`` files) that is no longer an inference tensor. ``comfy.ops._quantized_apply`` (0.33.0
    ``comfy/ops.py:1093``) wraps each such weight in a new Parameter at every ``.to()``: outside inference mode it
    first clones one made in inference mode into a normal tensor (line 1102; the whole 7 GB of fp8 matrices on a
    CPU), and in inference mode torch's ``Parameter.__new__`` detaches a normal one that ``.to()`` returned
    unchanged (no device change: ``--cpu``, an offload device that is the load device) into an inference tensor
    and fails ("Cannot set version_counter for inference tensor", line 1104). ComfyUI's nodes all run in inference
    mode, so the weights only leave it when a model is loaded or unloaded outside it: we never do
    (``ComfyModels.training_context`` loads, ``release_text_encoders`` unloads in inference mode), and this tells
    a model that something else moved that way. 0.3.64 has no quantized ops."""
    try:
        from comfy.quant_ops import QuantizedTensor
    except ImportError:  # 0.3.64: no quantized ops
        return True
    model = getattr(patcher, "model", None)
    return model is None or not any(isinstance(p, QuantizedTensor) and not p.is_inference()
                                    for p in model.parameters())


def encode_token_weights(clip, tokens):
    """What ``CLIP.encode_from_tokens`` does after its ``load_model()``: the encoder runs on the CLIP's load
    device. On 0.33 that device is passed as the ``execution_device`` clip option inside
    ``cuda_device_context`` (the weights may live elsewhere under dynamic VRAM); before, the encoder took
    the device of its embedding weights, and the option is ignored.
    """
    import comfy.model_management as mm

    encoder = clip.cond_stage_model
    device = clip.patcher.load_device
    encoder.set_clip_options({"execution_device": device})
    context = getattr(mm, "cuda_device_context", None)
    with context(device) if context is not None else contextlib.nullcontext():
        return encoder.encode_token_weights(tokens)
