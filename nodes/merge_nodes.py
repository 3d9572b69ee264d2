"""Merging: LoRAs into a checkpoint (ComfyUI's own weight patching), LoRAs into one LoRA, resizing a LoRA.

The math of Merge LoRAs and Resize LoRA is ``training.merge``; the checkpoint is written the way
ComfyUI's CheckpointSave writes one (``comfy_extras.nodes_model_merging.save_checkpoint`` ->
``comfy.sd.save_checkpoint``), plus a dtype choice, an atomic write and our metadata.

Merged checkpoints go to ``models/checkpoints`` (not ``output/checkpoints`` as CheckpointSave does), so
they appear in Load Checkpoint at once, as Save LoRA's files appear in the LoRA loaders. Without CLIP and VAE
the file holds the diffusion model alone, as ComfyUI's ModelSave writes it, in ``models/diffusion_models``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping

import torch
from comfy_api.latest import io, ui

from ..training.fsutil import atomic_write, unique_path
from ..training.config import SAVE_DTYPES
from ..training.lora.files import LoraWeights, torch_dtype
from ..training.lora.formats import load_lora
from ..training.lora.merge import concat_merge, resize_lora, svd_merge
from ..training.model.archs import ARCH_TABLE, modelspec_architecture
from .comfy import host as comfy_host
from .comfy.families import family_variant, model_family
from .comfy.loras import APPLIED_KEY, NONE, apply_loras, load_lora_file, lora_names, lora_path, stack_uses
from .comfy.paths import checkpoint_target_path, diffusion_model_target_path
from .types import Lora, LoraStack

log = logging.getLogger(__name__)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _cast(sd: dict, dtype: torch.dtype) -> dict:
    """Floating tensors in ``dtype`` (fp8 / integer tensors and markers as they are); ``sd`` holds plain CPU
    tensors (``host.checkpoint_state_dict``)."""
    return {k: t.to(dtype) if t.dtype in _FLOAT_DTYPES and t.dtype != dtype else t for k, t in sd.items()}


def checkpoint_state_dict(model, clip, vae) -> dict:
    """The MODEL/CLIP/VAE with their patches (LoRAs) merged in, keyed as a checkpoint file, plus what
    CheckpointSave adds beside the weights so the file samples the same way when reloaded."""
    import comfy.model_sampling

    sd = comfy_host.checkpoint_state_dict(model, clip, vae)
    sampling = model.get_model_object("model_sampling")
    if isinstance(sampling, comfy.model_sampling.ModelSamplingContinuousEDM) and isinstance(
            sampling, comfy.model_sampling.V_PREDICTION):
        sd["edm_vpred.sigma_max"] = torch.tensor(sampling.sigma_max).float()
        sd["edm_vpred.sigma_min"] = torch.tensor(sampling.sigma_min).float()
    if getattr(sampling, "zsnr", False):
        sd["ztsnr"] = torch.tensor([])
    return sd


class _FileTensors(Mapping):
    """A safetensors file as a read-only mapping that loads a tensor only when one is asked for: model
    detection reads the shapes of a few dozen weights, not the whole checkpoint."""

    def __init__(self, handle):
        self._handle = handle
        self._keys = list(handle.keys())
        self._known = set(self._keys)

    def __getitem__(self, key):
        if key not in self._known:
            raise KeyError(key)
        return self._handle.get_tensor(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)

    def __contains__(self, key):
        return key in self._known


def verify_checkpoint(path, model, expected_keys) -> None:
    """Read the written file back: every key that was meant to be written is there, and ComfyUI detects it
    as the MODEL's own architecture (same model class and UNet config). Raises ``RuntimeError`` otherwise."""
    import comfy.model_detection
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        keys = set(f.keys())
        missing, extra = set(expected_keys) - keys, keys - set(expected_keys)
        if missing or extra:
            raise RuntimeError(f"{path} does not hold the merged weights: {len(missing)} keys missing "
                               f"(e.g. {sorted(missing)[:3]}), {len(extra)} unexpected (e.g. {sorted(extra)[:3]})")
        tensors = _FileTensors(f)
        prefix = comfy.model_detection.unet_prefix_from_state_dict(tensors)
        detected = comfy.model_detection.model_config_from_unet(tensors, prefix)
    want = model.model.model_config
    if detected is None or type(detected) is not type(want):
        found = "no known model" if detected is None else type(detected).__name__
        raise RuntimeError(f"ComfyUI detects {found} in {path}, not the {type(want).__name__} that was merged")
    differing = {k for k, v in want.unet_config.items() if k in detected.unet_config and detected.unet_config[k] != v}
    if differing:
        raise RuntimeError(f"{path} reloads as a {type(want).__name__} of another shape: {sorted(differing)} differ")


def _family_metadata(model, family: str | None, sd: dict) -> dict[str, str]:
    """``modelspec.*`` naming the checkpoint's family (Flux.1 by its variant, dev or schnell) and, for eps / v
    models, the prediction key; flow models (Flux, Chroma) get none, as kohya writes none for them."""
    import comfy.model_sampling

    out = {}
    if not isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.CONST):
        out["modelspec.predict_key"] = "v" if "v_pred" in sd else "epsilon"
    if family in ARCH_TABLE:
        arch = ARCH_TABLE[family]
        out.update({"modelspec.sai_model_spec": "1.0.0",
                    "modelspec.architecture": modelspec_architecture(family, family_variant(model)),
                    "modelspec.implementation": "sgm" if arch.kind == "unet" else arch.implementation})
    return out


# Where a LoRA file's text-encoder keys start, in the formats ComfyUI's LoraLoader reads (comfy.lora's key map):
# kohya lora_te / lora_te1..3 (OneTrainer too), Stable Cascade's lora_prior_te, diffusers text_encoder(_2),
# the generic text_encoders.
_TE_KEY_PREFIXES = ("lora_te", "lora_prior_te", "text_encoder")
_MODULE_SUFFIX = re.compile(r"\.(lora_(down|up|A|B|mid)|alpha|dora_scale|hada_\w+|lokr_\w+|diff(_b)?|w_norm|b_norm)"
                            r"(\.weight)?$")


def _text_encoder_parts(uses) -> list[str]:
    """The LoRAs among ``uses`` (LoraUse or applied-LoRA records) that would change the text encoder: a
    non-zero clip strength and text-encoder keys in the file (read from the key names, so any file ComfyUI
    applies is checked, whether or not our own parser reads its format)."""
    found = []
    for use in uses:
        name = use["name"] if isinstance(use, dict) else use.name
        strength = use["clip_strength"] if isinstance(use, dict) else use.clip_strength
        if not strength:
            continue
        f = load_lora_file(lora_path(name))
        te = {_MODULE_SUFFIX.sub("", k) for k in f.state_dict if k.startswith(_TE_KEY_PREFIXES)}
        if te:
            found.append(f"{name!r} ({len(te)} text-encoder modules at clip strength {strength:g})")
    return found


class MergeLorasToCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LW_MergeLorasToCheckpoint",
            display_name="Merge LoRAs into Checkpoint (LoRA Workbench)",
            category="LoRA Workbench/merge",
            description="Saves the MODEL, CLIP and VAE as one checkpoint with the LoRAs baked into the weights: "
                        "connect the outputs of Apply LoRA Stack (or any LoRA loader), or the base model plus a "
                        "LoRA stack. Written to models/checkpoints so Load Checkpoint lists it at once. Leave clip "
                        "and vae unconnected to save the diffusion model alone (Flux, Z-Image, Qwen-Image ... whose "
                        "text encoders load on their own) to models/diffusion_models, for Load Diffusion Model. "
                        "The file names the merged LoRAs and strengths in its metadata and never replaces an "
                        "existing one.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model, with LoRAs applied or not."),
                io.Clip.Input("clip", optional=True,
                              tooltip="The text encoder, with LoRAs applied or not. Unconnected (with vae): only "
                                      "the diffusion model is saved, to models/diffusion_models."),
                io.Vae.Input("vae", optional=True,
                             tooltip="The VAE to store in the checkpoint; connect it with clip, or neither."),
                LoraStack.Input("lora_stack", optional=True,
                                tooltip="Optional LoRAs to apply before saving (after any already applied)."),
                io.String.Input("filename", default="lora_workbench/merged",
                                tooltip="Name under models/checkpoints (models/diffusion_models without clip and "
                                        "vae); sub-folders allowed. A counter is added when the file exists."),
                io.Combo.Input("dtype", options=list(SAVE_DTYPES), default="fp16",
                               tooltip="fp16 is what most checkpoints use; bf16 keeps range; fp32 is exact and "
                                       "twice the size."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Where the file was written.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip=None, vae=None, filename="lora_workbench/merged", dtype="fp16",
                lora_stack=None) -> io.NodeOutput:
        import comfy.utils
        import folder_paths

        if (clip is None) != (vae is None):
            given, missing = ("clip", "vae") if vae is None else ("vae", "clip")
            raise ValueError(f"{given} is connected but {missing} is not: connect both for a checkpoint "
                             "(models/checkpoints), or neither to save the diffusion model alone "
                             "(models/diffusion_models)")
        model_only = clip is None
        folder = "diffusion_models" if model_only else "checkpoints"
        target = unique_path((diffusion_model_target_path if model_only else checkpoint_target_path)(filename))
        uses = stack_uses(lora_stack) if lora_stack else []
        if model_only:  # checked before any work: a text-encoder change would be left out of the file
            lost = _text_encoder_parts([*(model.get_attachment(APPLIED_KEY) or ()), *uses])
            if lost:
                raise ValueError(
                    f"clip is not connected, so only the diffusion model is saved, but {', '.join(lost)} also "
                    "change the text encoder. Connect clip and vae to save a checkpoint with it, or set those "
                    "clip strengths to 0 to merge the diffusion-model part alone")
        if uses:
            model, clip, _ = apply_loras(model, clip, uses)
        merged = list(model.get_attachment(APPLIED_KEY) or ())
        family, config_name = model_family(model)
        log.info("merging %d LoRAs into %s at %s (%s)", len(merged),
                 "a diffusion model" if model_only else "a checkpoint", target, dtype)
        sd = _cast(checkpoint_state_dict(model, clip, vae), torch_dtype(dtype))
        metadata = {"lw_merged_loras": json.dumps(merged), "lw_base_model": config_name, "modelspec.title": target.stem}
        metadata.update(_family_metadata(model, family, sd))
        def write_and_check(tmp):
            comfy.utils.save_torch_file(sd, tmp, metadata=metadata)
            verify_checkpoint(tmp, model, sd.keys())  # a wrong file is an error and never takes the name

        atomic_write(target, write_and_check)
        roots = [os.path.realpath(r) for r in folder_paths.get_folder_paths(folder)]
        root = next((r for r in roots if os.path.commonpath([r, str(target)]) == r), roots[0])
        rel = os.path.relpath(target, root)
        log.info("saved %s %s", "diffusion model" if model_only else "checkpoint", target)
        names = ", ".join(f"{m['name']} ({m['model_strength']:g}/{m['clip_strength']:g})" for m in merged)
        loader = "Load Diffusion Model" if model_only else "Load Checkpoint"
        text = f"saved {folder}/{rel} ({dtype}) with {names or 'no recorded LoRAs'}; {loader} lists it"
        return io.NodeOutput(str(target), ui=ui.PreviewText(text))


# ---- LoRA -> LoRA ----------------------------------------------------------------------------------
def _stack_sources(stack) -> tuple[list[tuple[LoraWeights, float]], list[str]]:
    """(LoraWeights, weight) per stack entry. A LoRA whose model and clip strengths differ is passed as
    two sources, its UNet modules at the model strength and its text-encoder modules at the clip one."""
    sources, names = [], []
    for use in stack_uses(stack):
        f = load_lora_file(lora_path(use.name))
        lw = load_lora(f.state_dict, f.metadata)
        if use.model_strength == use.clip_strength:
            sources.append((lw, use.model_strength))
            names.append(use.name)
            continue
        for part, weight in (("unet", use.model_strength), ("te", use.clip_strength)):
            mods = {n: m for n, m in lw.modules.items() if (lw.component_of(n) == "unet") == (part == "unet")}
            if mods:
                sources.append((LoraWeights(mods, dict(lw.metadata), lw.arch), weight))
                names.append(f"{use.name} ({part})")
    return sources, names


def _progress(total_hint: int = 1):
    import comfy.utils

    bar = comfy.utils.ProgressBar(total_hint)
    return lambda done, total: bar.update_absolute(done, total)


def _ranks(lora: LoraWeights) -> str:
    ranks = [m.rank for m in lora.modules.values()]
    return f"{len(ranks)} modules, ranks {min(ranks)}-{max(ranks)}"


class MergeLoras(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        inputs = [LoraStack.Input("lora_stack", optional=True,
                                  tooltip="LoRA files to merge, each at its strength (e.g. from LoRA Stack).")]
        for i in range(1, 5):
            inputs += [
                Lora.Input(f"lora_{i}", optional=True, tooltip="A LoRA from the graph (Train LoRA, Resize LoRA ...)."),
                io.Float.Input(f"weight_{i}", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip=f"Weight of lora_{i} in the sum."),
            ]
        inputs += [
            io.Combo.Input("mode", options=["concat", "svd"], default="concat",
                           tooltip="concat: exact, the ranks add up. svd: the best approximation of the summed "
                                   "change at the given rank (smaller file)."),
            io.Int.Input("rank", default=32, min=1, max=1024,
                         tooltip="svd only: rank of the merged LoRA (concat keeps the sum of the ranks)."),
        ]
        return io.Schema(
            node_id="LW_MergeLoras",
            display_name="Merge LoRAs (LoRA Workbench)",
            category="LoRA Workbench/merge",
            description="Merges several LoRAs into one whose change is the weighted sum of theirs - exactly (concat) "
                        "or compressed to a rank by SVD, with the kept energy in the report. Save it with Save LoRA.",
            inputs=inputs,
            outputs=[Lora.Output(display_name="lora"),
                     io.String.Output(display_name="report", tooltip="Ranks and, for svd, the kept energy.")],
        )

    @classmethod
    def execute(cls, mode, rank, lora_stack=None, **kw) -> io.NodeOutput:
        sources, names = _stack_sources(lora_stack)
        for i in range(1, 5):
            if kw.get(f"lora_{i}") is not None:
                sources.append((kw[f"lora_{i}"], float(kw.get(f"weight_{i}", 1.0))))
                names.append(f"lora_{i}")
        if not sources:
            raise ValueError("nothing to merge: connect a LoRA stack or at least one lora_N input")
        if mode == "concat":
            merged = concat_merge(sources, names=names)
            report = f"concat of {len(sources)} sources (exact): {_ranks(merged)}"
        else:
            merged, rep = svd_merge(sources, rank, names=names, progress=_progress())
            report = rep.summary()
        return io.NodeOutput(merged, report, ui=ui.PreviewText(report))


class ResizeLora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LW_ResizeLora",
            display_name="Resize LoRA (LoRA Workbench)",
            category="LoRA Workbench/merge",
            description="Lowers a LoRA's rank (a smaller file) keeping as much of its change as possible, like "
                        "kohya's resize_lora: a fixed rank, or per layer the rank that keeps a share of the energy "
                        "or the singular values within a ratio. The report gives the energy kept.",
            inputs=[
                Lora.Input("lora", optional=True, tooltip="A LoRA from the graph; or pick a file below."),
                io.Combo.Input("lora_name", options=[NONE, *lora_names()], default=NONE, optional=True,
                               tooltip="A LoRA file from models/loras (used when no lora is connected)."),
                io.Combo.Input("method", options=["fixed", "energy", "ratio"], default="fixed",
                               tooltip="fixed: every layer to rank. energy: per layer the smallest rank keeping "
                                       "'value' of its energy (e.g. 0.95). ratio: singular values >= largest/value."),
                io.Int.Input("rank", default=16, min=1, max=1024,
                             tooltip="The new rank (fixed) or the largest rank allowed (energy, ratio)."),
                io.Float.Input("value", default=0.95, min=0.0, max=1000.0, step=0.01,
                               tooltip="energy: share to keep, in (0, 1]. ratio: >= 1, e.g. 10. Ignored by fixed."),
            ],
            outputs=[Lora.Output(display_name="lora"),
                     io.String.Output(display_name="report", tooltip="Ranks and the energy kept.")],
        )

    @classmethod
    def execute(cls, method, rank, value, lora=None, lora_name=NONE) -> io.NodeOutput:
        if lora is not None and lora_name not in (None, "", NONE):
            raise ValueError(f"both a connected lora and the file {lora_name!r} were given; use one of them")
        if lora is None:
            if lora_name in (None, "", NONE):
                raise ValueError("no LoRA to resize: connect a lora or pick a lora_name")
            f = load_lora_file(lora_path(lora_name))
            lora = load_lora(f.state_dict, f.metadata)
        resized, rep = resize_lora(lora, rank, method, None if method == "fixed" else value, progress=_progress())
        report = rep.summary()
        return io.NodeOutput(resized, report, ui=ui.PreviewText(report))


NODES = [MergeLorasToCheckpoint, MergeLoras, ResizeLora]
