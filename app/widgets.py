"""What ComfyUI's editor builds for a node from its definition: the widgets (with the editor-only
ones that take a position in ``widgets_values`` but never reach the prompt) and the sockets. Part of
``workflow.ui_to_api``; the frontend's rules are described there."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import zip_longest

SEED_NAMES = ("seed", "noise_seed")  # INTs that get a control_after_generate widget without asking
UPLOAD_OPTIONS = ("image_upload", "video_upload", "animated_image_upload")


@dataclass(frozen=True)
class Input:
    name: str
    type: str  # socket type; "COMBO" for lists of choices
    options: dict
    optional: bool


@dataclass
class Widget:
    name: str
    value: object
    options: dict = field(default_factory=dict)
    kind: str = "value"  # value | control | filter | upload | toggle | button: only "value" reaches the prompt

    @property
    def to_prompt(self) -> bool:
        return self.kind == "value"


def as_input(name: str, spec, optional: bool) -> Input:
    spec = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    options = dict(spec[1]) if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(spec[0], list):
        return Input(name, "COMBO", {**options, "options": spec[0]}, optional)
    if spec[0] == "COMBO":
        return Input(name, "COMBO", {**options, "options": options.get("options") or []}, optional)
    return Input(name, str(spec[0]), options, optional)


def declared_inputs(class_def: dict) -> dict[str, Input]:
    """Inputs in definition order, as the frontend's node definition has them (hidden ones aside)."""
    section = class_def.get("input") or {}
    required, optional = section.get("required") or {}, section.get("optional") or {}
    out = {name: as_input(name, spec, False) for name, spec in required.items()}
    media = next((i for i in out.values() if i.type == "COMBO" and any(i.options.get(k) for k in UPLOAD_OPTIONS)),
                 None)
    if media is not None:  # Comfy.UploadImage adds an upload button input after the required ones
        out["upload"] = Input("upload", "IMAGEUPLOAD", {**media.options, "imageInputName": media.name}, False)
    for name, spec in optional.items():
        inp = as_input(name, spec, True)
        if inp.options.get("defaultInput"):  # deprecated spelling of forceInput on optional inputs
            inp = Input(name, inp.type, {**inp.options, "forceInput": True}, True)
        out[name] = inp
    return out


def ordered_inputs(class_def: dict, declared: dict[str, Input]) -> list[Input]:
    """getOrderedInputSpecs: input_order's required, then its optional, then the rest."""
    order = class_def.get("input_order")
    if not order:
        return list(declared.values())
    first = [declared[n] for n in order.get("required") or [] if n in declared and not declared[n].optional]
    first += [declared[n] for n in order.get("optional") or [] if n in declared and declared[n].optional]
    seen = {i.name for i in first}
    return first + [i for i in declared.values() if i.name not in seen]


def widget_type(inp: Input, widget_types) -> str | None:
    kind = inp.options.get("widgetType") or inp.type
    return None if kind not in widget_types or inp.options.get("forceInput") else kind


def default_value(kind: str, options: dict):
    if kind in ("INT", "FLOAT"):
        return 0 if options.get("default") is None else options["default"]
    if kind == "BOOLEAN":
        return bool(options.get("default") or False)
    if kind in ("STRING", "MARKDOWN", "TEXTAREA"):
        return options.get("default") or ""
    if kind == "COMBO":
        if options.get("multi_select"):
            return []
        if options.get("default"):
            return options["default"]
        return options["options"][0] if options.get("options") else None
    return options.get("default")


def build_widgets(ordered: list[Input], widget_types) -> list[Widget]:
    widgets = []
    for inp in ordered:
        kind = widget_type(inp, widget_types)
        if kind is None:
            continue
        if kind == "IMAGEUPLOAD":  # the upload button: stored in the workflow, never in the prompt
            widgets.append(Widget(inp.name, "image", inp.options, kind="upload"))
            continue
        widgets.append(Widget(inp.name, default_value(kind, inp.options), {**inp.options, "widget_type": kind}))
        control = inp.options.get("control_after_generate")
        if kind == "INT" and (control if control is not None else inp.name in SEED_NAMES):
            widgets.append(Widget("control_after_generate", "randomize", kind="control"))
        elif kind == "COMBO" and not inp.options.get("multi_select"):
            if inp.options.get("remote"):
                widgets.append(Widget("Auto-refresh after generation", False, kind="toggle"))
                if inp.options["remote"].get("refresh_button"):
                    widgets.append(Widget("refresh", "refresh", kind="button"))
            if control:
                widgets.append(Widget("control_after_generate", "randomize", kind="control"))
                widgets.append(Widget("control_filter_list", "", kind="filter"))
    return widgets


def migrate_values(declared: dict[str, Input], widgets: list[Widget], values: list) -> list:
    """Drop values that workflows from before frontend 1.16 stored for forceInput inputs."""
    names = {w.name for w in widgets}
    originals = [i for i in declared.values() if i.name in names or i.options.get("forceInput")]
    count = sum(2 if (i.options.get("control_after_generate") or i.name in SEED_NAMES) else 1 for i in originals)
    if count != len(values):
        return values
    # lodash's zip pads the shorter list, so values past the inputs are kept
    return [v for i, v in zip_longest(originals, values) if not (i and i.options.get("forceInput"))]
