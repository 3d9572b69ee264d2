"""Caption Images, Caption Dataset Folder and Edit Captions: widgets -> ``training.data.caption_files`` / ``captioners``.

Models are picked from ComfyUI's ``models/blip/<name>/`` (a transformers BLIP folder) and
``models/wd14_tagger/<name>/`` (``model.onnx`` + ``selected_tags.csv``, or ``<name>.onnx`` +
``<name>.csv``); both folder kinds are registered with ``folder_paths`` when nobody did, so
``extra_model_paths.yaml`` entries of those names count too. The last model used stays loaded
(keyed by its files' sizes and times); BLIP waits on the offload device between runs so the GPU is
free for sampling and training.
"""

from __future__ import annotations

import os
from contextlib import ExitStack, contextmanager

from comfy_api.latest import io, ui

from ..training.data.blip import BLIP_EXAMPLE, BlipCaptioner
from ..training.data.wd14 import WD14_EXAMPLE, WD14_MODEL, WD14_TAGS
from ..training.data.captions import MissingModelError
from ..training.data.captioners import check_model, load_captioner, options_for
from ..training.data.caption_files import CaptionEdit, CaptionFormat, caption_folder, edit_caption_folder, edit_captions
from ..training.data.images import array_to_pil, split_batch
from .comfy.paths import input_folder

MODEL_FOLDERS = {"blip": "blip", "wd14_tagger": "wd14"}  # models/<folder> -> captioner kind
NO_MODELS = "(no models in models/blip or models/wd14_tagger)"
_LOADED: dict = {}  # {(kind, path, file stamps, device): captioner}, the last one used


def _model_roots(folder_name: str) -> list[str]:
    import folder_paths

    if folder_name not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(folder_name, os.path.join(folder_paths.models_dir, folder_name))
    return folder_paths.get_folder_paths(folder_name)


def caption_models() -> list[str]:
    """``blip/<folder>``, ``wd14_tagger/<folder>`` and ``wd14_tagger/<name>.onnx`` entries found."""
    names = set()
    for folder_name in MODEL_FOLDERS:
        for root in _model_roots(folder_name):
            if not os.path.isdir(root):
                continue
            for entry in os.listdir(root):
                full = os.path.join(root, entry)
                onnx = folder_name == "wd14_tagger" and entry.lower().endswith(".onnx") and os.path.isfile(full)
                if not entry.startswith(".") and (os.path.isdir(full) or onnx):
                    names.add(f"{folder_name}/{entry}")
    return sorted(names) or [NO_MODELS]


def _where_models_go() -> str:
    blip, wd14 = _model_roots("blip")[0], _model_roots("wd14_tagger")[0]
    return (f"put a BLIP model folder (the files of {BLIP_EXAMPLE}) in {os.path.join(blip, '<name>')}, or a "
            f"WD14 tagger's {WD14_MODEL} + {WD14_TAGS} (e.g. {WD14_EXAMPLE}) in {os.path.join(wd14, '<name>')}, "
            "then refresh the node list (R)")


def resolve_model(name: str) -> tuple[str, str]:
    """(captioner kind, path) of a ``model`` widget value."""
    folder_name, _, entry = (name or "").partition("/")
    if folder_name not in MODEL_FOLDERS or not entry:
        raise MissingModelError(f"no captioning model chosen ({name!r}); {_where_models_go()}")
    roots = _model_roots(folder_name)
    for root in roots:
        if os.path.exists(os.path.join(root, entry)):
            return MODEL_FOLDERS[folder_name], os.path.join(root, entry)
    raise MissingModelError(f"model {name!r} is not in {' or '.join(roots)}; {_where_models_go()}")


def _stamp(path: str) -> tuple:
    """What identifies the files of a model: names, sizes and modification times."""
    files = [path] if os.path.isfile(path) else [os.path.join(path, n) for n in sorted(os.listdir(path))]
    if os.path.isfile(path) and path.lower().endswith(".onnx"):
        files.append(os.path.splitext(path)[0] + ".csv")
    return tuple((f, st.st_size, st.st_mtime_ns) for f in files if os.path.isfile(f) for st in [os.stat(f)])


def _captioner(kind: str, path: str, device: str):
    """The loaded captioner for (kind, path, device), loading it (and dropping the previous) if needed."""
    import comfy.model_management as mm

    key = (kind, os.path.realpath(path), _stamp(path), device)
    if key not in _LOADED:
        _LOADED.clear()  # one model at a time
        if kind == "blip":
            import torch

            target = mm.get_torch_device() if device == "auto" else torch.device("cpu")
            dtype = torch.float16 if target.type == "cuda" else torch.float32
            home = torch.device("cpu") if device == "cpu" else mm.unet_offload_device()  # between runs
            _LOADED[key] = BlipCaptioner(path, device=home, dtype=dtype)
        else:
            use_gpu = device == "auto" and mm.get_torch_device().type == "cuda"
            _LOADED[key] = load_captioner(kind, path, "auto" if use_gpu else "cpu")
    return _LOADED[key]


@contextmanager
def _ready(captioner, device: str):
    """BLIP on the sampling device for the run (room made through ComfyUI), back to offload after."""
    import comfy.model_management as mm

    target = mm.get_torch_device() if device == "auto" else None
    if captioner.kind != "blip" or target is None or target.type == "cpu":
        yield captioner
        return
    mm.free_memory(int(captioner.nbytes * 1.3), target)
    captioner.to(target)
    try:
        yield captioner
    finally:
        captioner.to(mm.unet_offload_device())
        mm.soft_empty_cache()


def _progress(total: int):
    import comfy.utils

    bar = comfy.utils.ProgressBar(max(total, 1))
    return lambda done, n: bar.update_absolute(done, n)


def captioner_inputs() -> list:
    """The model choice and its settings, shared by Caption Images and Caption Dataset Folder."""
    return [
        io.Combo.Input("model", options=caption_models(),
                       tooltip="blip/<name>: a BLIP folder in models/blip (sentences). wd14_tagger/<name>: a WD14 "
                               "tagger in models/wd14_tagger (booru tags). Nothing is downloaded."),
        io.String.Input("trigger_word", default="", tooltip="Put first in every caption (or where a prefix or "
                        "suffix says [trigger]), e.g. 'sks'."),
        io.String.Input("prefix", default="", tooltip="Text put before every caption, e.g. 'photo of [trigger],'."),
        io.String.Input("suffix", default="", tooltip="Text put after every caption."),
        io.Combo.Input("device", options=["auto", "cpu"], default="auto",
                       tooltip="auto: ComfyUI's GPU (WD14 needs onnxruntime-gpu for it, else runs on the CPU)."),
        io.Int.Input("batch_size", default=4, min=1, max=64, optional=True, tooltip="Images per model call."),
        io.Float.Input("general_threshold", default=0.35, min=0.0, max=1.0, step=0.01, optional=True,
                       tooltip="WD14: general tags with at least this confidence are written."),
        io.Float.Input("character_threshold", default=0.85, min=0.0, max=1.0, step=0.01, optional=True,
                       tooltip="WD14: character tags with at least this confidence are written."),
        io.String.Input("exclude_tags", default="", optional=True,
                        tooltip="WD14: comma-separated tags never written, e.g. 'solo, simple background'."),
        io.Boolean.Input("underscores_to_spaces", default=True, optional=True,
                         tooltip="WD14: long_hair -> long hair (kaomoji such as ^_^ keep theirs)."),
        io.Boolean.Input("escape_parentheses", default=True, optional=True,
                         tooltip="WD14: (series) -> \\(series\\), so the tag is not read as prompt weighting."),
        io.Boolean.Input("include_rating", default=False, optional=True,
                         tooltip="WD14: put the most likely rating tag (general, sensitive ...) first."),
        io.Int.Input("max_tags", default=0, min=0, max=200, optional=True,
                     tooltip="WD14: keep only the most confident tags (0 = all above the thresholds)."),
        io.String.Input("blip_prompt", default="", optional=True,
                        tooltip="BLIP: start text the caption continues, e.g. 'a photo of'."),
        io.Boolean.Input("blip_strip_prompt", default=False, optional=True,
                         tooltip="BLIP: leave the start text out of the caption."),
        io.Int.Input("num_beams", default=3, min=1, max=16, optional=True,
                     tooltip="BLIP: beam search width (1 = greedy, fastest)."),
        io.Int.Input("max_length", default=40, min=1, max=256, optional=True,
                     tooltip="BLIP: most new tokens per caption."),
        io.Int.Input("min_length", default=5, min=0, max=256, optional=True,
                     tooltip="BLIP: fewest new tokens per caption."),
    ]


def _setup(model, trigger_word, prefix, suffix, kw):
    kind, path = resolve_model(model)
    options = options_for(kind, batch_size=kw.get("batch_size"), general_threshold=kw.get("general_threshold"),
                          character_threshold=kw.get("character_threshold"), exclude_tags=kw.get("exclude_tags"),
                          underscores_to_spaces=kw.get("underscores_to_spaces"),
                          escape_parentheses=kw.get("escape_parentheses"), include_rating=kw.get("include_rating"),
                          max_tags=kw.get("max_tags"), prompt=kw.get("blip_prompt"),
                          strip_prompt=kw.get("blip_strip_prompt"), num_beams=kw.get("num_beams"),
                          max_length=kw.get("max_length"), min_length=kw.get("min_length"))
    fmt = CaptionFormat(trigger=trigger_word, prefix=prefix, suffix=suffix)
    return kind, path, options, fmt


class CaptionImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LW_CaptionImages",
            display_name="Caption Images (LoRA Workbench)",
            category="LoRA Workbench/dataset",
            description="Writes a caption for each image of a batch with a local BLIP model (a sentence) or WD14 "
                        "tagger (tags), trigger word first. The text output (one caption per line) plugs into Load "
                        "Image Dataset's captions.",
            inputs=[io.Image.Input("images", tooltip="The images to caption (an IMAGE batch)."),
                    *captioner_inputs()],
            outputs=[io.String.Output(display_name="captions", is_output_list=True,
                                      tooltip="One caption per image, as a list."),
                     io.String.Output(display_name="text", tooltip="All captions, one per line.")],
        )

    @classmethod
    def execute(cls, images, model, trigger_word, prefix, suffix, device, **kw) -> io.NodeOutput:
        kind, path, options, fmt = _setup(model, trigger_word, prefix, suffix, kw)
        pil = [item if hasattr(item, "convert") else array_to_pil(item) for item in split_batch(images)]
        progress = _progress(len(pil))
        captions = []
        with _ready(_captioner(kind, path, device), device) as captioner:
            for i in range(0, len(pil), options.batch_size):
                captions += [fmt.apply(t) for t in captioner.caption(pil[i:i + options.batch_size], options)]
                progress(len(captions), len(pil))
        text = "\n".join(captions)
        return io.NodeOutput(captions, text, ui=ui.PreviewText(text))


class CaptionFolder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LW_CaptionFolder",
            display_name="Caption Dataset Folder (LoRA Workbench)",
            category="LoRA Workbench/dataset",
            description="Captions every image of a training folder (kohya '10_name' sub-folders too) into a .txt "
                        "beside it, with a local BLIP model or WD14 tagger. Existing captions are kept unless "
                        "overwrite is on (then the old file is kept as .bak). Unreadable images are listed, the rest "
                        "captioned. Wire 'folder' into Load Image Dataset to train on the result.",
            inputs=[
                io.String.Input("folder", default="", tooltip="A folder under ComfyUI's input folder, or an absolute "
                                "path."),
                *captioner_inputs(),
                io.Boolean.Input("overwrite", default=False, tooltip="Re-caption images that already have a "
                                 "caption; the old caption file is kept as name.txt.bak."),
            ],
            outputs=[io.String.Output(display_name="folder", tooltip="The folder captioned (full path)."),
                     io.String.Output(display_name="preview", tooltip="A 'file | caption' table and a summary.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, folder, model, trigger_word, prefix, suffix, device, overwrite, **kw) -> io.NodeOutput:
        path = input_folder(folder)
        kind, model_path, options, fmt = _setup(model, trigger_word, prefix, suffix, kw)
        check_model(kind, model_path)  # a model folder missing files fails before any image is read
        with ExitStack() as stack:
            def captioner():  # loaded only if some image needs a caption
                return stack.enter_context(_ready(_captioner(kind, model_path, device), device))

            report = caption_folder(path, captioner, options, fmt, overwrite=overwrite, progress=_progress(1))
        text = report.summary() + "\n\n" + report.table()
        return io.NodeOutput(path, text, ui=ui.PreviewText(text))


def _one(value, default=None):
    """A widget value of an is_input_list node (a list of one)."""
    if isinstance(value, list):
        return value[0] if value else default
    return default if value is None else value


class EditCaptions(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LW_EditCaptions",
            display_name="Edit Captions (LoRA Workbench)",
            category="LoRA Workbench/dataset",
            description="Changes many captions at once: find/replace (plain or regex), remove tags (* wildcards), add "
                        "tags at the front or back, set or replace the trigger word. Works on the .txt files of a "
                        "folder (old files kept as .bak) and/or on connected captions. Dry run shows the changes "
                        "without writing.",
            inputs=[
                io.String.Input("folder", default="", tooltip="Edit the caption files of this folder (under "
                                "ComfyUI's input folder, or absolute). Empty: only the connected captions."),
                io.String.Input("find", default="", tooltip="Text to replace (a regular expression if regex is on)."),
                io.String.Input("replace", default="", tooltip="What replaces it (\\1 ... groups with regex)."),
                io.Boolean.Input("regex", default=False, tooltip="Treat 'find' as a Python regular expression."),
                io.String.Input("remove_tags", default="", tooltip="Comma-separated tags to delete; * and ? are "
                                "wildcards, e.g. 'solo, *background'."),
                io.String.Input("add_tags_front", default="", tooltip="Comma-separated tags put first."),
                io.String.Input("add_tags_back", default="", tooltip="Comma-separated tags appended if missing."),
                io.String.Input("trigger_word", default="", tooltip="Put first in every caption that lacks it (or "
                                "at [trigger])."),
                io.String.Input("old_trigger_word", default="", tooltip="A previous trigger word replaced by "
                                "trigger_word everywhere (removed if trigger_word is empty)."),
                io.Boolean.Input("dedupe", default=True, tooltip="Remove repeated tags (first kept)."),
                io.Boolean.Input("dry_run", default=False, tooltip="Only show what would change; write nothing."),
                io.Boolean.Input("backup", default=True, tooltip="Keep each changed file's old text as name.txt.bak."),
                io.String.Input("captions", optional=True, force_input=True,
                                tooltip="Captions from the graph (e.g. Caption Images); each line is one caption."),
            ],
            outputs=[io.String.Output(display_name="captions", is_output_list=True,
                                      tooltip="The connected captions, edited."),
                     io.String.Output(display_name="text", tooltip="The edited captions, one per line."),
                     io.String.Output(display_name="report", tooltip="What changed: 'file | old -> new'.")],
            is_input_list=True,
            is_output_node=True,
        )

    @classmethod
    def execute(cls, folder, find, replace, regex, remove_tags, add_tags_front, add_tags_back, trigger_word,
                old_trigger_word, dedupe, dry_run, backup, captions=None) -> io.NodeOutput:
        edit = CaptionEdit(find=_one(find, ""), replace=_one(replace, ""), regex=_one(regex, False),
                           old_trigger=_one(old_trigger_word, ""), remove_tags=_one(remove_tags, ""),
                           add_front=_one(add_tags_front, ""), add_back=_one(add_tags_back, ""),
                           trigger=_one(trigger_word, ""), dedupe=_one(dedupe, True))
        folder, dry = _one(folder, "").strip(), _one(dry_run, False)
        lines = [line for text in (captions or []) for line in str(text).splitlines() if line.strip()]
        if not folder and captions is None:
            raise ValueError("Edit Captions has nothing to edit: type a folder or connect captions")
        parts, edited = [], []
        if captions is not None:
            edited, rep = edit_captions(lines, edit)
            parts.append(f"connected captions: {rep.summary()}\n{rep.table()}")
        if folder:
            rep = edit_caption_folder(input_folder(folder), edit, dry_run=dry, make_backup=_one(backup, True))
            parts.append(f"{input_folder(folder)}: {rep.summary()}\n{rep.table()}")
        report = "\n\n".join(parts)
        text = "\n".join(edited)
        return io.NodeOutput(edited, text, report, ui=ui.PreviewText(report))


NODES = [CaptionImages, CaptionFolder, EditCaptions]
