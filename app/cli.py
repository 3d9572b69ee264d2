"""``lora-workbench``: train, inspect and demo from the command line (no ComfyUI needed).

Every ``TrainConfig`` and ``DatasetConfig`` field is an option (``--rank 16``, ``--lr 1e-4``,
``--trigger sks``...), so the CLI never drifts from the engine's defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing
from pathlib import Path

log = logging.getLogger("lora_workbench")
# The demo's own folder, in the home directory: never inside a checkout where git would see it.
DEMO_DIR = Path("~/lora_workbench_demo").expanduser()


def _base_type(hint):
    """int for ``int | None``, tuple for ``tuple[float, float]``..."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin is tuple:
        return tuple, (args[0] if args else str)
    if args and origin is not None and origin is not tuple:
        return _base_type(args[0])
    return hint, None


def field_docs(cls) -> dict[str, str]:
    """Each field's trailing ``# comment`` in the dataclass source: the one description of an option,
    shown by ``--help`` (a test checks that every option has one)."""
    import inspect
    import re

    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # no source shipped: options keep their defaults and choices
        return {}
    return {m[1]: m[2].strip().replace("``", "'") for m in re.finditer(r"^    (\w+): [^\n]*?\s#\s*(.+)$", source, re.M)}


def _add_dataclass_options(parser: argparse.ArgumentParser, cls, skip: set[str], choices: dict | None = None) -> None:
    """One option per field: help from the field's comment, allowed values from ``choices`` (the table the
    dataclass validates with), and the default."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or typing.get_origin(hints[f.name]) is dict:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        typ, item = _base_type(hints[f.name])
        allowed = [c for c in (choices or {}).get(f.name, ()) if c is not None] or None
        doc = docs.get(f.name, "")
        if typ is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{doc} (default: {'on' if default else 'off'})")
        elif typ is tuple:
            parser.add_argument(flag, dest=f.name, nargs="+", type=item, default=None,
                                help=f"{doc} (default: {' '.join(map(str, default or ())) or 'none'})")
        elif typ in (int, float, str):
            parser.add_argument(flag, dest=f.name, type=typ, default=None, choices=allowed,
                                help=f"{doc}{' (one of: %(choices)s)' if allowed else ''} (default: {default!r})")


def _pick(ns: argparse.Namespace, cls, skip: set[str] = frozenset()) -> dict:
    return {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)
            if f.name not in skip and getattr(ns, f.name, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    from ..training.config import CHOICES, DatasetConfig, TrainConfig

    p = argparse.ArgumentParser(prog="lora-workbench", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log every step")
    p.add_argument("--debug", action="store_true", help="log every step and show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="train a LoRA on a folder of images")
    tr.add_argument("images", help="folder of images with optional .txt captions (kohya N_name sub-folders ok)")
    tr.add_argument("--model", required=True,
                    help="base model: an SD1.x/SD2.x single-file checkpoint (.safetensors/.ckpt) or a diffusers folder "
                         "(SD1.x/SD2.x, SDXL, Flux.1 dev/schnell, Chroma, SD3.5, Z-Image, FLUX.2 klein, Qwen-Image)")
    tr.add_argument("--tokenizer", default=None,
                    help="folder with the CLIP vocab.json + merges.txt, for a single-file --model "
                         "(default: ComfyUI's comfy/sd1_tokenizer or the Hugging Face cache)")
    tr.add_argument("--model-config", default=None,
                    help="advanced: diffusers config folder (unet/ vae/ text_encoder/ scheduler/) for a "
                         "single-file --model (default: the shipped SD1.5/SD2 configs)")
    tr.add_argument("--out", default="output", help="folder for the LoRA files (default: ./output)")
    tr.add_argument("--device", default=None, help="cuda, cpu, mps (default: cuda if available)")
    tr.add_argument("--weight-dtype", default=None, choices=["fp32", "fp16", "bf16", "fp8"],
                    help="dtype of the frozen base weights (default: fp16 on CUDA, bf16 for Flux/Chroma; fp32 on "
                         "CPU); fp8 (Flux/Chroma only): stored in float8 e4m3fn, computed in bf16")
    tr.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    tr.add_argument("--class-dir", default=None,
                    help="DreamBooth prior preservation: folder of class images (missing ones up to "
                         "--num-class-images are generated with the base model and kept)")
    tr.add_argument("--class-prompt", default="", help="caption of the class images, e.g. 'a photo of a dog'")
    tr.add_argument("--resume", default=None, help="continue a stopped run from its '<name>-state' folder")
    tr.add_argument("--validation-dir", default=None,
                    help="folder of held-out images (and captions) for the validation loss, instead of "
                         "--validation-split's share of the training images")
    tr.add_argument("--keep-state", action="store_true",
                    help="keep the '<name>-state' folder (its last periodic save) when the run finishes")
    tr.add_argument("--optimizer-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="extra optimizer option, e.g. d_coef=1.0 for prodigy (repeatable)")
    # The old spelling (it was accepted and ignored): kept working for saved commands, not shown.
    tr.add_argument("--optimizer-args", dest="optimizer_arg", action="append", help=argparse.SUPPRESS)
    _add_dataclass_options(tr, TrainConfig, skip=set(), choices=CHOICES)
    _add_dataclass_options(tr, DatasetConfig, skip={"path"})

    ins = sub.add_parser("inspect", help="show a LoRA file's modules and metadata")
    ins.add_argument("file", help="a LoRA file (.safetensors, or .pt/.bin/.ckpt read as plain tensors)")

    _add_caption_parser(sub)

    de = sub.add_parser("demo", help="train a tiny model on generated images (about a minute on a CPU)")
    de.add_argument("--out", default=str(DEMO_DIR),
                    help=f"folder for everything the demo writes (default: {DEMO_DIR}, outside any checkout)")
    de.add_argument("--steps", type=int, default=100, help="training steps (default: 100)")

    ru = sub.add_parser("run", help="run a ComfyUI workflow (UI or API format) headless, or against a server",
                        description="Runs a saved ComfyUI workflow without the browser. A workflow in the editor's "
                                    "format is converted to the prompt the editor would queue, with the node "
                                    "definitions of the ComfyUI that runs it. Outputs go where that ComfyUI "
                                    "writes them.")
    ru.add_argument("workflow", help="workflow .json: as saved by the editor, or exported with 'Export (API)'")
    ru.add_argument("--set", dest="sets", action="append", default=[], metavar="NODE.INPUT=VALUE",
                    help="change one input before running (repeatable); NODE is a node id, title or class that "
                         "names one node; VALUE is JSON (20, 0.5, true, \"text\") or plain text")
    ru.add_argument("--variants", metavar="FILE", default=None,
                    help="a .csv or .json of rows to render one after the other; columns are NODE.INPUT, or "
                         "prompt, negative, seed, strength (see README), or name (a label)")
    where = ru.add_mutually_exclusive_group()
    where.add_argument("--comfyui", metavar="PATH", default=None,
                       help="ComfyUI folder to boot in this process (default: COMFYUI_PATH or ~/comfy/ComfyUI)")
    where.add_argument("--server", metavar="URL", default=None,
                       help="a running ComfyUI to queue on instead, e.g. http://127.0.0.1:8188")
    ru.add_argument("--base-directory", default=None,
                    help="in-process runs: ComfyUI's --base-directory (models/, input/, output/, custom_nodes/)")
    ru.add_argument("--output-directory", default=None,
                    help="in-process runs: ComfyUI's --output-directory (default: its output/ folder)")
    ru.add_argument("--cpu", action="store_true", help="in-process runs: ComfyUI's --cpu")
    ru.add_argument("--timeout", type=float, default=None, help="--server runs: seconds one prompt may take")
    return p


def _device_and_dtype(device: str | None, weight_dtype: str | None, model: str | None = None):
    import torch

    from ..training.lora.files import torch_dtype
    from ..training.model.flux import pipeline_family
    from ..training.model.sd3 import is_sd3_pipeline

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if weight_dtype is None:
        # Flux/Chroma/SD3 overflow in fp16: bf16 is what they are released and run in.
        dit = model is not None and (pipeline_family(model) is not None or is_sd3_pipeline(model))
        weight_dtype = ("bf16" if dit else "fp16") if dev.type == "cuda" else "fp32"
    if weight_dtype == "fp8":
        return dev, torch.float8_e4m3fn
    return dev, torch_dtype(weight_dtype)


def cmd_train(ns: argparse.Namespace) -> int:
    from .cli_messages import last_good, stopped_message
    from ..training.config import DatasetConfig, TrainConfig
    from ..training.interrupt import Interrupted
    from .folder_training import TqdmCallbacks, train_folder
    from ..training.model.single_file import load_model
    from ..training.train.state import read_state_info
    from ..training.train.trainer import TrainCallbacks

    from ..training.train.distributed import current

    options = _pick(ns, TrainConfig, {"optimizer_args"})
    if ns.resume and "output_name" not in options:
        # A resume continues its own files: the state's name unless another is asked for.
        options["output_name"] = read_state_info(ns.resume)["output_name"] or TrainConfig.output_name
    tcfg = TrainConfig.from_dict({**options, "optimizer_args": _parse_kv(ns.optimizer_arg)})
    dcfg = DatasetConfig(path=ns.images, **_pick(ns, DatasetConfig, {"path"}))
    dev, wdt = _device_and_dtype(ns.device, ns.weight_dtype, ns.model)
    # Under `accelerate launch`, each process trains on its own device and its share of every batch.
    dist = current(cpu=dev.type == "cpu")
    if dist.device is not None:
        dev = dist.device
    cb = TqdmCallbacks() if dist.is_main else TrainCallbacks()
    try:
        result, path = train_folder(dcfg, tcfg, lambda: load_model(ns.model, dev, wdt, ns.tokenizer, ns.model_config),
                                    Path(ns.out), overwrite=ns.overwrite, callbacks=cb,
                                    class_dir=Path(ns.class_dir) if ns.class_dir else None,
                                    class_prompt=ns.class_prompt, resume_from=Path(ns.resume) if ns.resume else None,
                                    dist=dist, keep_state=ns.keep_state,
                                    validation_dir=Path(ns.validation_dir) if ns.validation_dir else None)
    except Interrupted as e:
        if dist.is_main:
            print(f"lora-workbench train: {stopped_message(e, cb, ns)}", file=sys.stderr)
        return e.exit_code
    except BaseException:
        ns.last_good = last_good(cb, ns)  # for the error boundary in main()
        raise
    finally:
        if isinstance(cb, TqdmCallbacks):
            cb.close()
    if dist.is_main:
        k = max(1, len(result.losses) // 10)
        print(f"trained {result.steps_done} steps; loss {sum(result.losses[:k]) / k:.4f} -> "
              f"{sum(result.losses[-k:]) / k:.4f} (mean of first/last {k})")
        if result.validation:
            curve = ", ".join(f"{v[0]}: {v[1]:.4f}" for v in result.validation)
            best = min(result.validation, key=lambda v: v[1])
            print(f"validation loss by step: {curve}")
            print(f"lowest validation loss {best[1]:.4f} at step {best[0]}"
                  + (f" (saved as {Path(ns.out) / (tcfg.output_name + '-best.safetensors')})" if tcfg.keep_best else ""))
        print(f"saved {path}")
    return 0


def _parse_kv(items: list[str]) -> dict:
    import json

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--optimizer-arg {item!r} is not KEY=VALUE; e.g. --optimizer-arg d_coef=1.0")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def cmd_inspect(ns: argparse.Namespace) -> int:
    from ..training.lora.describe import describe_lora

    print(describe_lora(ns.file))
    return 0


def _add_caption_parser(sub) -> None:
    from ..training.data.captioners import CAPTIONERS
    from ..training.data.blip import BlipOptions
    from ..training.data.wd14 import TaggerOptions
    from ..training.data.caption_files import CaptionFormat

    ca = sub.add_parser("caption", help="write a caption .txt beside every image of a folder (BLIP or a WD14 tagger)",
                        description="Captions the images of a folder (and its kohya N_name sub-folders) with a local "
                                    "model. Existing captions are kept unless --overwrite (then saved as .bak).")
    ca.add_argument("folder", help="folder of images")
    ca.add_argument("--captioner", required=True, choices=CAPTIONERS, help="blip: sentences; wd14: booru tags")
    ca.add_argument("--model", required=True,
                    help="blip: the model folder (config.json, model.safetensors, preprocessor_config.json, "
                         "tokenizer files); wd14: a folder with model.onnx + selected_tags.csv, or <name>.onnx "
                         "beside <name>.csv")
    ca.add_argument("--device", default=None, help="cuda, cpu (default: cuda if available)")
    ca.add_argument("--overwrite", action="store_true",
                    help="re-caption images that have a caption (the old file is kept as name.txt.bak)")
    ca.add_argument("--extension", default=".txt", help="caption file extension (default: .txt)")
    _add_dataclass_options(ca.add_argument_group(
        "caption text", "the trigger goes first (or where --prefix/--suffix say [trigger]); repeated tags are "
        "dropped"), CaptionFormat, skip=set())
    _add_dataclass_options(ca.add_argument_group(
        "blip", "--prompt 'a photo of' starts every caption; --num-beams 1 is greedy; lengths in tokens"),
        BlipOptions, skip=set())
    _add_dataclass_options(ca.add_argument_group(
        "wd14", "tags at or above the thresholds, most confident first; --exclude-tags 'solo, simple background'"),
        TaggerOptions, skip={"batch_size"})


def cmd_caption(ns: argparse.Namespace) -> int:
    from ..training.data.blip import BlipOptions
    from ..training.data.wd14 import TaggerOptions
    from ..training.data.captioners import check_model, load_captioner
    from ..training.data.caption_files import CaptionFormat, caption_folder

    check_model(ns.captioner, ns.model)  # a missing file fails before any image is read
    cls = BlipOptions if ns.captioner == "blip" else TaggerOptions
    report = caption_folder(ns.folder, lambda: load_captioner(ns.captioner, ns.model, ns.device),
                            cls(**_pick(ns, cls)), CaptionFormat(**_pick(ns, CaptionFormat)),
                            overwrite=ns.overwrite, extension=ns.extension)
    print(report.table())
    print(report.summary())
    for image, why in report.failed.items():
        print(f"lora-workbench caption: failed: {image}: {why}", file=sys.stderr)
    return 1 if report.failed else 0


def cmd_demo(ns: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(ns.out), steps=ns.steps)
    return 0


def cmd_run(ns: argparse.Namespace) -> int:
    from .workflow_runner import load_variants, parse_assignment, run_workflow
    from .workflow import load_workflow

    # A bad file or option fails before ComfyUI boots (node names are checked once it has).
    workflow = load_workflow(ns.workflow)
    for text in ns.sets:
        parse_assignment(text)
    variants = load_variants(ns.variants) if ns.variants else None
    if ns.server:
        if ns.output_directory or ns.base_directory or ns.cpu:
            raise ValueError("--base-directory, --output-directory and --cpu are the server's own options; "
                             "start it with them")
        from .comfy_client import ServerHost

        host = ServerHost(ns.server, timeout=ns.timeout)
    else:
        from .headless import boot

        try:
            host = boot(ns.comfyui, base_directory=ns.base_directory, output_directory=ns.output_directory,
                        cpu=ns.cpu)
        except ImportError as e:
            raise RuntimeError(f"ComfyUI cannot be imported with this Python ({sys.executable}): {e}; install its "
                               "requirements here (pip install -r ComfyUI/requirements.txt) or use --server URL") from e
    try:
        results = run_workflow(host, workflow, sets=ns.sets, variants=variants,
                               write=lambda line: print(line, flush=True))
    finally:
        host.close()
    failed = [r for r in results if not r.ok]
    for r in failed if not variants else ():
        print(f"lora-workbench run: failed: {r.error}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .cli_messages import error_message

    from ..training.interrupt import Interrupted, raise_on_signals

    argv = sys.argv[1:] if argv is None else list(argv)
    ns = build_parser().parse_args(argv)
    ns.argv = argv
    logging.basicConfig(level=logging.DEBUG if ns.verbose or ns.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("diffusers", "transformers", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    command = {"train": cmd_train, "inspect": cmd_inspect, "demo": cmd_demo, "run": cmd_run,
               "caption": cmd_caption}[ns.command]
    # SIGTERM (docker stop, systemd, Slurm, timeout) and Ctrl-C take the same path: Interrupted.
    # Log lines are written above the progress bars instead of through them.
    with raise_on_signals(), logging_redirect_tqdm():
        try:
            return command(ns)
        except KeyboardInterrupt as e:
            if ns.debug:
                raise
            e = e if isinstance(e, Interrupted) else Interrupted(2)
            print(f"lora-workbench {ns.command}: stopped by {e.signame}", file=sys.stderr)
            return e.exit_code
        except Exception as e:  # noqa: BLE001 - the one error boundary: known errors get one line
            message = error_message(e, ns)
            if message is None or ns.debug:
                raise
            print(f"lora-workbench {ns.command}: error: {message}", file=sys.stderr)
            if getattr(ns, "last_good", None):
                print(f"lora-workbench {ns.command}: {ns.last_good}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
