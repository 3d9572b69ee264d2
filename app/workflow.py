"""ComfyUI workflows: the UI format a user saves and drags in -> the API prompt ComfyUI runs.

A saved workflow (``nodes``, ``links``, ``widgets_values`` ...) is what the editor shows; the
``/prompt`` endpoint takes the API format ``{"<id>": {"class_type", "inputs", "_meta"}}``. The
editor converts one into the other each time you press Queue (``graphToPrompt`` in
ComfyUI_frontend's ``src/utils/executionUtil.ts``, resolving links through
``ExecutableNodeDTO`` in litegraph). ``ui_to_api`` does the same here, without a browser, so the
shipped example workflows can be run and tested headless.

Host-free: node definitions come in as data, the ``/object_info`` dict of a running ComfyUI.
What the frontend does, and so what this does (1.27 behaviour):

- Widgets are built per node from its definition: inputs in ``input_order`` (required, then
  optional), sockets for non-widget types, one widget per INT/FLOAT/STRING/BOOLEAN/COMBO... input.
  ``widgets_values`` fill them by position. Some widgets only live in the editor and take a
  position without reaching the prompt: the ``control_after_generate`` combo after a seed-like
  INT (``control_after_generate`` option, or an INT named ``seed``/``noise_seed``), its filter
  text after a COMBO with that option, and the ``upload`` button after an image/video combo.
- A linked input wins over its widget value ("converted widget"); links become ``[str(id), slot]``.
- Muted nodes (mode 2) are left out, and inputs linked to them are dropped. Bypassed nodes (mode 4)
  are left out and their consumers are linked to what feeds the bypassed node's input of the
  matching type. Reroute nodes pass their link through; a PrimitiveNode writes its value into the
  widgets it is linked to; Note/MarkdownNote vanish.
- STRING widgets with ``dynamicPrompts`` lose ``//`` and ``/* */`` comments and pick one of
  ``{a|b|c}``; ``filename_prefix`` of Save nodes gets ``%date:...%`` and ``%Node.widget%``
  replaced.
"""

from __future__ import annotations

import datetime as _dt
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from ..training.errors import LoraWorkbenchError
from .editor_text import dynamic_prompt, format_date, js_str
from .widgets import Widget, build_widgets, declared_inputs, migrate_values, ordered_inputs

MODE_NEVER = 2  # "muted" in the editor
MODE_BYPASS = 4
FRONTEND_ONLY = frozenset({"Reroute", "PrimitiveNode", "Note", "MarkdownNote"})  # the editor's virtual nodes
# Input types the frontend builds a widget for (ComfyWidgets in src/scripts/widgets.ts). A custom
# node pack's JavaScript can register more; pass them as ``extra_widget_types``.
WIDGET_TYPES = frozenset({"INT", "FLOAT", "BOOLEAN", "STRING", "MARKDOWN", "COMBO", "IMAGEUPLOAD", "FILEUPLOAD",
                          "COLOR", "IMAGECOMPARE", "TREESELECT", "MULTISELECT", "CHART", "GALLERIA",
                          "SELECTBUTTON", "TEXTAREA"})
# Nodes whose filename_prefix gets %...% replacements (Comfy.SaveImageExtraOutput).
SAVE_NODES = frozenset({"SaveImage", "SaveAnimatedWEBP", "SaveWEBM", "SaveAudio", "SaveGLB", "SaveAnimatedPNG",
                        "CLIPSave", "VAESave", "ModelSave", "LoraSave", "SaveLatent"})
# Widget names of the virtual nodes, for %Title.widget% lookups (a Primitive's value widget is "value").
VIRTUAL_WIDGETS = {"PrimitiveNode": ("value", "control_after_generate", "control_filter_list"),
                   "Note": ("text",), "MarkdownNote": ("text",)}
SR_PROPERTY = "Node name for S&R"
REPLACE_PROPERTY = "Run widget replace on values"  # a PrimitiveNode's own %...% switch


class WorkflowError(LoraWorkbenchError, ValueError):
    """The workflow cannot be converted; the message names the node and the fix."""


class MissingNodeError(WorkflowError):
    """The workflow uses node classes this ComfyUI does not have."""

    def __init__(self, message: str, classes: list[str]):
        super().__init__(message)
        self.classes = classes


def is_api_format(d) -> bool:
    """True for an API prompt: a non-empty dict of node id -> {"class_type": ..., "inputs": {...}}."""
    return (isinstance(d, dict) and bool(d) and "nodes" not in d
            and all(isinstance(v, dict) and isinstance(v.get("class_type"), str) and isinstance(v.get("inputs"), dict)
                    for v in d.values()))


def is_ui_format(d) -> bool:
    return isinstance(d, dict) and isinstance(d.get("nodes"), list)


def load_workflow(path: str | Path) -> dict:
    """A workflow file, UI or API format, as a dict; a clear error for anything else."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WorkflowError(f"cannot read workflow {path}: {e}") from e
    if not (is_ui_format(data) or is_api_format(data)):
        raise WorkflowError(f"{path} is not a ComfyUI workflow: expected a saved workflow (with 'nodes') or an "
                            "API prompt (node id -> class_type and inputs)")
    return data


# ---- the graph --------------------------------------------------------------------------------------------
@dataclass
class _Node:
    raw: dict
    id: str
    type: str
    mode: int
    title: str
    class_def: dict | None
    widgets: list[Widget]
    inputs: list[dict]  # the editor's live input slots: name, type, link
    outputs: list[dict]

    def widget(self, name: str) -> Widget | None:
        return next((w for w in self.widgets if w.name == name), None)

    @property
    def virtual(self) -> bool:
        return self.type in FRONTEND_ONLY


def _links(workflow: dict) -> dict[int, tuple]:
    """link id -> (origin id, origin slot, target id, target slot, type); 0.4 arrays or 1.0 objects."""
    out = {}
    for link in workflow.get("links") or []:
        if isinstance(link, dict):
            link = [link.get(k) for k in ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")]
        if link and link[0] is not None:
            out[link[0]] = tuple(link[1:6])
    return out


def _make_node(raw: dict, object_info: dict, widget_types) -> _Node:
    node_type = raw.get("type")
    class_def = object_info.get(node_type) if node_type not in FRONTEND_ONLY else None
    saved_inputs = [i for i in raw.get("inputs") or [] if isinstance(i, dict)]
    if class_def is None:  # virtual node, or a class this ComfyUI lacks: the saved slots are all we know
        title = raw.get("title") or ("Primitive" if node_type == "PrimitiveNode" else node_type)
        values = raw.get("widgets_values")
        names = VIRTUAL_WIDGETS.get(node_type, ())
        widgets = ([Widget(names[i] if i < len(names) else f"widget_{i}", v) for i, v in enumerate(values)]
                   if isinstance(values, list) else [])
        inputs = [{"name": i.get("name"), "type": i.get("type"), "link": i.get("link")} for i in saved_inputs]
        return _Node(raw, str(raw["id"]), node_type, raw.get("mode", 0), title, None, widgets, inputs,
                     raw.get("outputs") or [])

    declared = declared_inputs(class_def)
    ordered = ordered_inputs(class_def, declared)
    widgets = build_widgets(ordered, widget_types)
    values = raw.get("widgets_values")
    if isinstance(values, dict):  # some packs store widget values by name
        for w in widgets:
            if w.name in values:
                w.value = values[w.name]
    elif isinstance(values, list):
        for w, v in zip(widgets, migrate_values(declared, widgets, values)):
            w.value = v

    # Live slots as the editor has them after loading: sockets, then one per widget, then inputs
    # a pack's JavaScript added; links come from the saved slot of the same name.
    by_name = {i.get("name"): i for i in saved_inputs}
    has_widget = {w.name for w in widgets if w.kind in ("value", "upload")}
    slots = [i for i in ordered if i.name not in has_widget] + [i for i in ordered if i.name in has_widget]
    inputs = [{"name": i.name, "type": i.type, "link": (by_name.get(i.name) or {}).get("link")} for i in slots]
    inputs += [{"name": i.get("name"), "type": i.get("type"), "link": i.get("link")}
               for i in saved_inputs if i.get("name") not in declared]
    outputs = raw.get("outputs") or [{"name": n, "type": t} for n, t in
                                      zip(class_def.get("output_name") or [], class_def.get("output") or [])]
    title = raw.get("title") or class_def.get("display_name") or node_type
    return _Node(raw, str(raw["id"]), node_type, raw.get("mode", 0), title, class_def, widgets, inputs, outputs)


def _check_supported(workflow: dict, raw_nodes: list[dict], object_info: dict) -> None:
    subgraphs = {s.get("id") for s in (workflow.get("definitions") or {}).get("subgraphs") or []}
    for raw in raw_nodes:
        t = str(raw.get("type"))
        if t in subgraphs:
            raise WorkflowError(f"node {raw.get('id')} ({raw.get('title') or t}) is a subgraph, which this converter "
                                "does not expand; open the workflow in ComfyUI, right-click it, 'Unpack Subgraph' "
                                "and save again")
        if t.startswith(("workflow>", "workflow/")):
            raise WorkflowError(f"node {raw.get('id')} is a group node ({t}); open the workflow in ComfyUI, "
                                "right-click it, 'Convert to nodes' and save again")
    missing = [r for r in raw_nodes if r.get("type") not in object_info and r.get("type") not in FRONTEND_ONLY
               and r.get("mode", 0) not in (MODE_NEVER, MODE_BYPASS)]
    if missing:
        lines = []
        for r in missing:
            props = r.get("properties") or {}
            pack = props.get("cnr_id") or props.get("aux_id")
            where = (f"from the node pack '{pack}'" + (f" {props['ver']}" if props.get("ver") else "")
                     if pack else "from a custom node pack")
            lines.append(f"node {r.get('id')} ({r.get('title') or r.get('type')}): class {r.get('type')} {where}")
        classes = sorted({str(r.get("type")) for r in missing})
        raise MissingNodeError(
            "this ComfyUI does not have the node classes " + ", ".join(classes) + ":\n  " + "\n  ".join(lines)
            + "\nInstall the pack that provides them (ComfyUI-Manager: 'Install Missing Custom Nodes', or "
              "comfy node install <pack>) and restart ComfyUI.", classes)


class _Graph:
    def __init__(self, workflow: dict, object_info: dict, widget_types):
        raw_nodes = [n for n in workflow.get("nodes") or [] if isinstance(n, dict)]
        _check_supported(workflow, raw_nodes, object_info)
        self.nodes = {str(r["id"]): _make_node(r, object_info, widget_types) for r in raw_nodes}
        self.links = _links(workflow)

    def _origin(self, node: _Node, link_id) -> tuple[_Node, int]:
        link = self.links.get(link_id)
        if link is None:
            raise WorkflowError(f"node {node.id} ({node.title}) refers to link {link_id}, which the workflow lacks")
        origin = self.nodes.get(str(link[0]))
        if origin is None:
            raise WorkflowError(f"link {link_id} into node {node.id} ({node.title}) starts at node {link[0]}, "
                                "which the workflow lacks")
        return origin, link[1]

    def resolve_input(self, node: _Node, slot: int, visited: set, want_type=None):
        """(origin node id, output slot) feeding ``node.inputs[slot]``, through bypasses and reroutes."""
        key = f"{node.id}[I]{slot}"
        if key in visited:
            raise WorkflowError(f"links loop back into node {node.id} ({node.title}) input {slot}")
        visited.add(key)
        if slot >= len(node.inputs):
            return None
        inp = node.inputs[slot]
        if inp["link"] is None:
            return None
        origin, origin_slot = self._origin(node, inp["link"])
        return self.resolve_output(origin, origin_slot, want_type if want_type is not None else inp["type"], visited)

    def resolve_output(self, node: _Node, slot: int, want_type, visited: set):
        key = f"{node.id}[O]{slot}"
        if key in visited:
            raise WorkflowError(f"links loop back into node {node.id} ({node.title}) output {slot}")
        visited.add(key)
        if node.mode == MODE_BYPASS:
            index = self._bypass_slot(node, slot, want_type)
            return None if index < 0 else self.resolve_input(node, index, visited)
        if node.virtual:  # Reroute: input n feeds output n; a PrimitiveNode has no input and resolves to nothing
            return self.resolve_input(node, slot, visited, want_type) if slot < len(node.inputs) else None
        return node.id, slot

    @staticmethod
    def _bypass_slot(node: _Node, slot: int, want_type) -> int:
        """Which input of a bypassed node stands in for output ``slot`` (ExecutableNodeDTO's rule)."""
        inputs = node.inputs
        if want_type in ("*", "", None):
            return slot if len(inputs) > slot else (0 if inputs else -1)
        out_type = node.outputs[slot].get("type") if slot < len(node.outputs) else None
        if slot < len(inputs) and _compatible(inputs[slot]["type"], out_type) \
                and _compatible(inputs[slot]["type"], want_type):
            return slot
        for i, inp in enumerate(inputs):
            if inp["type"] == want_type:
                return i
        for i, inp in enumerate(inputs):
            if _compatible(inp["type"], out_type) and _compatible(inp["type"], want_type):
                return i
        return -1

    def apply_primitives(self, now) -> None:
        """PrimitiveNode.applyToGraph: each primitive's value goes into the widgets it is linked to."""
        for prim in self.nodes.values():
            if prim.type != "PrimitiveNode" or not prim.widgets:
                continue
            value = prim.widgets[0].value
            if value and (prim.raw.get("properties") or {}).get(REPLACE_PROPERTY):
                value = self.text_replacements(str(value), now)
            for link_id in (prim.outputs[0].get("links") or []) if prim.outputs else []:
                link = self.links.get(link_id)
                target = self.nodes.get(str(link[2])) if link else None
                if target is None:
                    continue
                # Links into an input are found by id: target_slot is renumbered when the editor loads.
                saved = next((i for i in target.raw.get("inputs") or [] if i.get("link") == link_id), None)
                name = ((saved or {}).get("widget") or {}).get("name")
                widget = target.widget(name) if name else None
                if widget is not None:
                    widget.value = value

    def text_replacements(self, text: str, now) -> str:
        """applyTextReplacements: %date:yyyy-MM-dd%, and %Node.widget% by S&R name or title."""
        def replace(m):
            part = m.group(1)
            split = part.split(".")
            if len(split) != 2:
                return format_date(split[0][5:], now) if split[0].startswith("date:") else m.group(0)
            node = next((n for n in self.nodes.values() if _sr_name(n) == split[0]), None) \
                or next((n for n in self.nodes.values() if n.title == split[0]), None)
            widget = node.widget(split[1]) if node else None
            if widget is None:
                return m.group(0)
            return re.sub(r'[/?<>\\:*|"\x00-\x1f\x7f]', "_", js_str(widget.value))

        return re.sub(r"%([^%]+)%", replace, text)


def _sr_name(node: _Node):
    props = node.raw.get("properties") or {}
    if SR_PROPERTY in props:
        return props[SR_PROPERTY]
    # The frontend gives every loaded ComfyUI node this property, except the Save nodes.
    return node.type if node.class_def is not None and node.type not in SAVE_NODES else None


def _compatible(a, b) -> bool:
    """LiteGraph.isValidConnection: wildcards, equal types, or comma lists that share a type."""
    if a in ("", "*", None, 0) or b in ("", "*", None, 0) or a == b:
        return True
    a, b = str(a).lower(), str(b).lower()
    if "," not in a and "," not in b:
        return a == b
    return any(_compatible(x, y) for x in a.split(",") for y in b.split(","))


# ---- the conversion ------------------------------------------------------------------------------------------
def ui_to_api(workflow: dict, object_info: dict, *, rng: random.Random | None = None,
              now: _dt.datetime | None = None, extra_widget_types=()) -> dict:
    """The API prompt ComfyUI's editor would queue for this saved workflow.

    ``object_info`` is ``GET /object_info`` of the ComfyUI that will run it. ``rng`` picks
    ``{a|b}`` choices and ``now`` fills ``%date:...%`` (defaults: fresh randomness, the current
    time, like the editor). Raises MissingNodeError for node classes ``object_info`` lacks and
    WorkflowError for what cannot be converted.
    """
    if is_api_format(workflow):
        raise WorkflowError("this is already an API prompt (node id -> class_type); queue it as it is")
    if not is_ui_format(workflow):
        raise WorkflowError("not a ComfyUI workflow: expected a dict with a 'nodes' list")
    rng = rng or random.Random()
    now = now or _dt.datetime.now()
    graph = _Graph(workflow, object_info, WIDGET_TYPES | frozenset(extra_widget_types))
    graph.apply_primitives(now)

    prompt = {}
    for node in sorted(graph.nodes.values(), key=lambda n: (n.raw.get("order", 0), n.raw["id"])):
        if node.virtual or node.mode in (MODE_NEVER, MODE_BYPASS):
            continue
        inputs = {}
        for w in node.widgets:
            if not w.to_prompt:
                continue
            value = w.value
            if node.type in SAVE_NODES and w.name == "filename_prefix" and isinstance(value, str):
                value = graph.text_replacements(value, now)
            elif w.options.get("dynamicPrompts") is True and w.options.get("widget_type") == "STRING" \
                    and isinstance(value, str):
                value = dynamic_prompt(value, rng)
            # A list value would read as a link; the backend unwraps this box.
            inputs[w.name] = {"__value__": value} if isinstance(value, list) else value
        for slot, inp in enumerate(node.inputs):
            origin = graph.resolve_input(node, slot, set())
            if origin is not None:
                inputs[inp["name"]] = [str(origin[0]), int(origin[1])]
        prompt[node.id] = {"inputs": inputs, "class_type": node.type, "_meta": {"title": node.title}}

    for entry in prompt.values():  # links into nodes that were left out (muted) go too
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and value[0] not in prompt:
                del entry["inputs"][name]
    return prompt
