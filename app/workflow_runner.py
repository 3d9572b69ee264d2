"""Run a saved ComfyUI workflow headless, once or once per variant: ``lora-workbench run``.

Host-free like ``workflow.py``: a *host* runs API prompts and knows its node definitions. Two
hosts exist, both in ``app/``: ComfyUI booted in this process (``app.headless``) and a running
ComfyUI server reached over HTTP (``app.comfy_client``). Everything a user types on the command
line is handled here:

- the workflow file in either format (a UI workflow is converted with ``ui_to_api`` against the
  host's own ``/object_info``, as the editor does when you press Queue);
- ``--set NODE.INPUT=VALUE``: NODE is a node id, a node title or a node class (each must name
  exactly one node); VALUE is read as JSON (``2``, ``0.5``, ``true``, ``"text"``) else as text;
- variants (a CSV or JSON list of rows): each row is a set of ``NODE.INPUT`` columns plus the
  convenience columns in ``CONVENIENCE``, rendered one after the other with a summary at the end;
- progress: node start and finish, LoRA Workbench training steps, previews and saves, errors.
"""

from __future__ import annotations

import copy
import csv
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from ..nodes.comfy import events as lw_events
from ..training.errors import LoraWorkbenchError
from .workflow import WorkflowError, is_api_format, load_workflow, ui_to_api

Message = tuple[str, dict]  # (event, data) as ComfyUI sends it to its client


@dataclass
class PromptRun:
    """What one prompt produced, as ComfyUI's HTTP API reports it."""

    prompt_id: str
    success: bool
    outputs: dict  # node id -> ui output, e.g. {"9": {"images": [{"filename": ..., "type": "output"}]}}
    history: dict  # {"outputs": ..., "meta": ...} (in-process) or the /history entry (server)
    status_messages: list  # (event, data): execution_start/cached/success/error/interrupted
    messages: list = field(default_factory=list)  # (event, data) sent to the client while it ran

    def events(self, name: str) -> list:
        return [data for event, data in self.messages if event == name]

    def error(self) -> dict | None:
        for event, data in self.status_messages:
            if event in ("execution_error", "execution_interrupted"):
                return {"event": event, **data}
        return None

    def files(self) -> list[dict]:
        """Every file the outputs name: {"node", "filename", "subfolder", "type"}."""
        found = []
        for node_id, output in self.outputs.items():
            for items in output.values():
                for item in items if isinstance(items, list) else ():
                    if isinstance(item, dict) and "filename" in item:
                        found.append({"node": node_id, "subfolder": "", "type": "output", **item})
        return found


class PromptInvalidError(LoraWorkbenchError, ValueError):
    """ComfyUI refused the prompt before running it (POST /prompt would answer 400)."""

    def __init__(self, error: dict, node_errors: dict):
        self.error = error or {}
        self.node_errors = node_errors or {}
        lines = [f"{self.error.get('message', 'invalid prompt')}: {self.error.get('details', '')}".rstrip(": ")]
        for node_id, info in self.node_errors.items():
            for err in info.get("errors", []):
                lines.append(f"  node {node_id} ({info.get('class_type')}): {err.get('message')}: "
                             f"{err.get('details')}")
        super().__init__("\n".join(lines))


class Host(Protocol):
    def object_info(self) -> dict: ...

    def run_prompt(self, prompt: dict, on_message: Callable[[str, dict], None] | None = None) -> PromptRun: ...

    def file_location(self, ref: dict) -> str: ...


# ---- overrides: --set NODE.INPUT=VALUE and variant columns ------------------------------------------------
def parse_value(text: str):
    """JSON when it parses (2, 0.5, true, null, "quoted", [..]), else the text itself."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return text


def parse_assignment(text: str) -> tuple[str, str, object]:
    """'NODE.INPUT=VALUE' -> (NODE, INPUT, value). NODE may contain dots; INPUT never does."""
    key, sep, value = text.partition("=")
    node, dot, name = key.strip().rpartition(".")
    if not sep or not dot or not node or not name:
        raise ValueError(f"--set {text!r} is not NODE.INPUT=VALUE; e.g. --set KSampler.steps=20 or "
                         "--set '6.text=a photo of a cat' (NODE: a node id, title or class)")
    return node, name, parse_value(value)


def _title(entry: dict) -> str:
    return (entry.get("_meta") or {}).get("title") or entry["class_type"]


def find_node(prompt: dict, name: str) -> str:
    """The id of the one node that ``name`` names: its id, else its title, else its class."""
    name = str(name)
    if name in prompt:
        return name
    for key in (_title, lambda e: e["class_type"]):
        hits = [k for k, v in prompt.items() if key(v) == name]
        if len(hits) == 1:
            return hits[0]
        if hits:
            raise ValueError(f"{len(hits)} nodes are named {name!r} (ids {', '.join(hits)}); use one of those ids")
    listing = "\n  ".join(f"{k}: {_title(v)} ({v['class_type']})" for k, v in prompt.items())
    raise ValueError(f"no node {name!r} in this workflow; use a node id, title or class:\n  {listing}")


def _declared(class_def: dict) -> list[str]:
    section = class_def.get("input") or {}
    return [*(section.get("required") or {}), *(section.get("optional") or {})]


def set_input(prompt: dict, object_info: dict, node: str, name: str, value) -> str:
    """Set one input of one node (a link there is replaced by the value); returns the node id."""
    node_id = find_node(prompt, node)
    entry = prompt[node_id]
    declared = _declared(object_info.get(entry["class_type"]) or {})
    if declared and name not in declared:
        raise ValueError(f"node {node_id} ({_title(entry)}, {entry['class_type']}) has no input {name!r}; "
                         f"its inputs: {', '.join(declared)}")
    # A list would read as a link [node id, slot]; the backend unwraps this box (as the editor sends it).
    entry["inputs"][name] = {"__value__": value} if isinstance(value, list) else value
    return node_id


# Convenience columns of a variants file: column -> what it sets, by node class.
SEED_INPUTS = {"KSampler": "seed", "KSamplerAdvanced": "noise_seed", "SamplerCustom": "noise_seed",
               "RandomNoise": "noise_seed", "LW_LoraGrid": "seed"}
STRENGTH_INPUTS = {"LoraLoader": ("strength_model", "strength_clip"), "LoraLoaderModelOnly": ("strength_model",)}
TEXT_ENCODERS = {"CLIPTextEncode": "text"}
CONVENIENCE = {
    "prompt": "the text of every CLIP Text Encode wired to a 'positive' input (and LoRA Grid's positive)",
    "negative": "the text of every CLIP Text Encode wired to a 'negative' input (and LoRA Grid's negative)",
    "seed": "the seed of every sampler (" + ", ".join(SEED_INPUTS) + ")",
    "strength": "both strengths of every LoraLoader / LoraLoaderModelOnly and of every LoRA Stack row with a LoRA",
}
LABEL_COLUMNS = ("name", "label")  # a variant's name in the summary; sets nothing


def convenience_targets(prompt: dict, column: str) -> list[tuple[str, str]]:
    """(node id, input) pairs a convenience column sets in this prompt."""
    targets = []
    if column in ("prompt", "negative"):
        socket = "positive" if column == "prompt" else column
        for entry in prompt.values():
            link = entry["inputs"].get(socket)
            if isinstance(link, list) and link[0] in prompt:
                source = prompt[link[0]]
                text = TEXT_ENCODERS.get(source["class_type"])
                if text and isinstance(source["inputs"].get(text), str) and (link[0], text) not in targets:
                    targets.append((link[0], text))
        targets += [(k, socket) for k, v in prompt.items() if v["class_type"] == "LW_LoraGrid"]
    elif column == "seed":
        targets = [(k, SEED_INPUTS[v["class_type"]]) for k, v in prompt.items() if v["class_type"] in SEED_INPUTS]
    elif column == "strength":
        for k, v in prompt.items():
            targets += [(k, name) for name in STRENGTH_INPUTS.get(v["class_type"], ())]
            if v["class_type"] == "LW_LoraStack":
                for name, value in v["inputs"].items():
                    row = name[5:]
                    if name.startswith("lora_") and row.isdigit() and value not in (None, "", "None"):
                        targets += [(k, f"model_strength_{row}"), (k, f"clip_strength_{row}")]
    # A linked input stays linked: the column means the typed values.
    targets = [(k, n) for k, n in targets if not isinstance(prompt[k]["inputs"].get(n), list)]
    if not targets:
        raise ValueError(f"column {column!r} sets {CONVENIENCE[column]}, and this workflow has none; "
                         "name the input instead, as a NODE.INPUT column")
    return targets


def apply_row(prompt: dict, object_info: dict, row: dict) -> dict:
    """A copy of ``prompt`` with a variant row applied (empty cells change nothing)."""
    prompt = copy.deepcopy(prompt)
    for column, value in row.items():
        if column in LABEL_COLUMNS or value is None or value == "":
            continue
        if column in CONVENIENCE:
            for node_id, name in convenience_targets(prompt, column):
                set_input(prompt, object_info, node_id, name, value)
            continue
        node, dot, name = column.rpartition(".")
        if not dot or not node:
            raise ValueError(f"variant column {column!r} is neither NODE.INPUT nor one of "
                             f"{', '.join([*CONVENIENCE, *LABEL_COLUMNS])}")
        set_input(prompt, object_info, node, name, value)
    return prompt


def load_variants(path: str | Path) -> list[dict]:
    """Rows of a .csv (header row = columns; cells read as JSON else text) or .json (a list of objects)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read variants file {path}: {e}") from e
    if path.suffix.lower() == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"variants file {path} is not valid JSON: {e}") from e
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"variants file {path} must hold a list of objects, e.g. "
                             '[{"seed": 1, "prompt": "a cat"}, {"seed": 2}]')
    elif path.suffix.lower() == ".csv":
        rows = [{k.strip(): parse_value(v) if isinstance(v, str) and v.strip() else None
                 for k, v in r.items() if k is not None}
                for r in csv.DictReader(text.splitlines())]
    else:
        raise ValueError(f"variants file {path} must be .csv or .json")
    if not rows:
        raise ValueError(f"variants file {path} has no rows")
    return rows


# ---- progress ---------------------------------------------------------------------------------------------
class ProgressPrinter:
    """Turns ComfyUI's client messages into a few readable lines: node start/finish, training steps."""

    def __init__(self, prompt: dict, write: Callable[[str], None] = print, max_step_lines: int = 20):
        self.prompt = prompt
        self.write = write
        self.max_step_lines = max_step_lines
        self.current: str | None = None
        self.started = 0.0

    def _name(self, node_id) -> str:
        entry = self.prompt.get(str(node_id))
        return f"#{node_id} {_title(entry)} ({entry['class_type']})" if entry else f"#{node_id}"

    def _finish(self) -> None:
        if self.current is not None:
            self.write(f"  done {self._name(self.current)} in {time.monotonic() - self.started:.1f}s")
            self.current = None

    def __call__(self, event: str, data: dict) -> None:
        data = data if isinstance(data, dict) else {}
        if event == "execution_cached" and data.get("nodes"):
            self.write(f"  cached: {', '.join(self._name(n) for n in data['nodes'])}")
        elif event == "executing":
            self._finish()
            if data.get("node") is not None:
                self.current, self.started = str(data["node"]), time.monotonic()
                self.write(f"  run  {self._name(data['node'])}")
        elif event == "executed" and data.get("node") is not None and str(data["node"]) != self.current:
            # A node whose output came from the cache mid-run: ComfyUI reports only its result.
            self.write(f"  cached: {self._name(data['node'])}")
        elif event == lw_events.TRAIN_STEP:
            step, total = int(data.get("step", 0)), int(data.get("total", 0)) or 1
            every = max(1, total // self.max_step_lines)
            if step == 1 or step == total or step % every == 0:
                self.write(f"       step {step}/{total}  loss {float(data.get('loss', 0)):.4f}  "
                           f"lr {float(data.get('lr', 0)):.2e}")
        elif event == lw_events.TRAIN_MEMORY:
            self.write(f"       {data.get('text')}")
        elif event == lw_events.TRAIN_PREVIEW:
            self.write(f"       preview at step {data.get('step')}")
        elif event == lw_events.TRAIN_SAVED:
            self.write(f"       saved step {data.get('step')}: {data.get('path')}")
        elif event == "execution_error":
            self._finish()
            self.write(f"  error in {self._name(data.get('node_id'))}: {data.get('exception_type')}: "
                       f"{data.get('exception_message')}".rstrip())
        elif event == "execution_interrupted":
            self.current = None
            self.write(f"  interrupted at {self._name(data.get('node_id'))}")
        elif event == "execution_success":
            self._finish()


# ---- running -----------------------------------------------------------------------------------------------
def prepare_prompt(workflow: dict, object_info: dict, *, rng: random.Random | None = None) -> dict:
    """The API prompt of a workflow in either format (a copy)."""
    if is_api_format(workflow):
        return copy.deepcopy(workflow)
    return ui_to_api(workflow, object_info, rng=rng)


@dataclass
class VariantResult:
    index: int
    label: str
    run: PromptRun | None
    seconds: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.run is not None and self.run.success


def _label(row: dict, index: int) -> str:
    for key in LABEL_COLUMNS:
        if row.get(key) not in (None, ""):
            return str(row[key])
    shown = ", ".join(f"{k}={v}" for k, v in row.items() if v not in (None, ""))
    return shown if len(shown) <= 60 else shown[:57] + "..."


def run_workflow(host: Host, workflow: dict | str | Path, *, sets: list[str] = (), variants: list[dict] | None = None,
                 write: Callable[[str], None] = print, rng: random.Random | None = None) -> list[VariantResult]:
    """Convert, override and run a workflow (once, or once per variant row), printing progress."""
    if not isinstance(workflow, dict):
        workflow = load_workflow(workflow)
    object_info = host.object_info()
    prompt = prepare_prompt(workflow, object_info, rng=rng)
    for text in sets:
        set_input(prompt, object_info, *parse_assignment(text))
    rows = variants if variants else [{}]
    prompts = [apply_row(prompt, object_info, row) for row in rows]  # every row checked before the first runs
    results = []
    for index, (row, variant) in enumerate(zip(rows, prompts), start=1):
        label = _label(row, index)
        if variants:
            write(f"variant {index}/{len(rows)}: {label}")
        started = time.monotonic()
        try:
            run = host.run_prompt(variant, on_message=ProgressPrinter(variant, write))
        except PromptInvalidError as e:
            results.append(VariantResult(index, label, None, time.monotonic() - started, str(e)))
            write(f"  refused by ComfyUI: {e}")
            continue
        seconds = time.monotonic() - started
        error = run.error()
        results.append(VariantResult(index, label, run, seconds,
                                     None if run.success else _describe_error(error)))
        for ref in run.files():
            if ref["type"] == "output":
                write(f"  wrote {host.file_location(ref)}")
    if variants:
        write("summary:")
        for r in results:
            files = sum(f["type"] == "output" for f in r.run.files()) if r.run else 0
            write(f"  {r.index:>3}  {'ok    ' if r.ok else 'FAILED'}  {r.seconds:7.1f}s  {files} file(s)  {r.label}"
                  + (f"  ({r.error})" if r.error else ""))
    return results


def _describe_error(error: dict | None) -> str:
    if not error:
        return "failed"
    if error["event"] == "execution_interrupted":
        return f"interrupted at node {error.get('node_id')}"
    return (f"node {error.get('node_id')} ({error.get('node_type')}): {error.get('exception_type')}: "
            f"{error.get('exception_message', '').strip()}")


__all__ = ["CONVENIENCE", "Host", "PromptInvalidError", "PromptRun", "ProgressPrinter", "VariantResult", "WorkflowError",
           "apply_row", "convenience_targets", "find_node", "load_variants", "parse_assignment", "parse_value",
           "prepare_prompt", "run_workflow", "set_input"]
