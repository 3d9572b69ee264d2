"""Saved ComfyUI workflows -> the API prompt the editor would queue, without ComfyUI.

The node definitions are a small hand-written ``/object_info`` (tests/fixtures/object_info_small.json).
Every expected prompt in ``CASES`` was also produced by ComfyUI's own editor (frontend 1.27.10,
``app.graphToPrompt()`` in headless Chromium, with those definitions served by a ComfyUI), and
``frontend_export_*.json`` is one such export kept verbatim with the graph it came from.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path

import pytest

from lora_workbench.app.editor_text import dynamic_prompt
from lora_workbench.app.workflow import (
    MissingNodeError,
    WorkflowError,
    is_api_format,
    load_workflow,
    ui_to_api,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
OBJECT_INFO = json.loads((FIXTURES / "object_info_small.json").read_text())


def node(id, type, values=None, inputs=(), outputs=(), mode=0, title=None, properties=None):
    """A node as the editor saves it. inputs: (name, type, link[, "widget"]); outputs: (name, type, links)."""
    n = {"id": id, "type": type, "pos": [100 * id, 0], "size": [200, 100], "flags": {}, "order": id, "mode": mode,
         "inputs": [{"name": i[0], "type": i[1], "link": i[2], **({"widget": {"name": i[0]}} if i[3:] else {})}
                    for i in inputs],
         "outputs": [{"name": o[0], "type": o[1], "links": list(o[2]), "slot_index": k} for k, o in enumerate(outputs)],
         "properties": properties if properties is not None else {"Node name for S&R": type}}
    if values is not None:
        n["widgets_values"] = values
    if title:
        n["title"] = title
    return n


def graph(nodes, links):
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": max((lk[0] for lk in links), default=0),
            "nodes": nodes, "links": [list(lk) for lk in links], "groups": [], "config": {}, "extra": {},
            "version": 0.4}


LOADER = node(1, "TestLoader", ["b.safetensors"], outputs=[("MODEL", "MODEL", [1]), ("CLIP", "CLIP", [2])])
ENCODE = node(2, "TestEncode", ["a photo"], inputs=[("clip", "CLIP", 2)], outputs=[("CONDITIONING", "CONDITIONING", [3])])
LINKS = [(1, 1, 0, 3, 0, "MODEL"), (2, 1, 1, 2, 0, "CLIP"), (3, 2, 0, 3, 1, "CONDITIONING")]
SAMPLER_IO = [("model", "MODEL", 1), ("positive", "CONDITIONING", 3)]


def api(class_type, title, **inputs):
    return {"class_type": class_type, "_meta": {"title": title}, "inputs": inputs}


LOADER_API = api("TestLoader", "Test Loader", ckpt_name="b.safetensors")
ENCODE_API = api("TestEncode", "Test Encode", text="a photo", clip=["1", 1])

CASES = {
    # Values fill widgets by position; the control_after_generate value after a seed-like INT
    # (named seed, or control_after_generate: true) and the control + filter pair after a COMBO
    # with control_after_generate hold a place but never reach the prompt. A forceInput input has
    # no widget and so no value; a short list leaves the rest at their defaults.
    "widget values in definition order, control values skipped": (
        graph([LOADER, ENCODE,
               node(3, "TestSampler", [77, "fixed", 12, 6.5, "ddim", 5, "increment", "karras", "randomize", ""],
                    inputs=SAMPLER_IO, outputs=[("LATENT", "LATENT", [])])], LINKS),
        {"1": LOADER_API, "2": ENCODE_API,
         "3": api("TestSampler", "Test Sampler", seed=77, steps=12, cfg=6.5, sampler_name="ddim", noise=5,
                  scheduler="karras", denoise=1.0, model=["1", 0], positive=["2", 0])}),
    # A widget turned into an input and linked: the link wins; its value slot is still consumed.
    "converted widget takes the link": (
        graph([LOADER, ENCODE, node(4, "TestInt", [30], outputs=[("INT", "INT", [4])]),
               node(3, "TestSampler", [77, "fixed", 12, 6.5, "ddim", 5, "fixed", "normal", "fixed", ""],
                    inputs=SAMPLER_IO + [("steps", "INT", 4, "widget")], outputs=[("LATENT", "LATENT", [])])],
              LINKS + [(4, 4, 0, 3, 2, "INT")]),
        {"1": LOADER_API, "2": ENCODE_API, "4": api("TestInt", "Test Int", value=30),
         "3": api("TestSampler", "Test Sampler", seed=77, steps=["4", 0], cfg=6.5, sampler_name="ddim", noise=5,
                  scheduler="normal", denoise=1.0, model=["1", 0], positive=["2", 0])}),
    # A bypassed node hands each consumer what feeds its input of the same type: MODEL out 0 <- in 0,
    # CLIP out 1 <- in 1. A consumer whose type the bypassed node has no input for gets nothing.
    "bypassed node re-routes its consumers": (
        graph([LOADER,
               node(5, "TestPatch", [0.7], mode=4, inputs=[("model", "MODEL", 1), ("clip", "CLIP", 2)],
                    outputs=[("MODEL", "MODEL", [5]), ("CLIP", "CLIP", [6])]),
               node(2, "TestEncode", ["a photo"], inputs=[("clip", "CLIP", 6)],
                    outputs=[("CONDITIONING", "CONDITIONING", [3])]),
               node(3, "TestSampler", [1, "fixed", 20, 8, "euler", 0, "fixed", "normal", "fixed", ""],
                    inputs=[("model", "MODEL", 5), ("positive", "CONDITIONING", 3)], outputs=[("LATENT", "LATENT", [7])]),
               node(6, "TestDecode", [], mode=4, inputs=[("samples", "LATENT", 7)], outputs=[("IMAGE", "IMAGE", [8])]),
               node(7, "SaveImage", ["out"], inputs=[("images", "IMAGE", 8)], outputs=[])],
              [(1, 1, 0, 5, 0, "MODEL"), (2, 1, 1, 5, 1, "CLIP"), (5, 5, 0, 3, 0, "MODEL"), (6, 5, 1, 2, 0, "CLIP"),
               (3, 2, 0, 3, 1, "CONDITIONING"), (7, 3, 0, 6, 0, "LATENT"), (8, 6, 0, 7, 0, "IMAGE")]),
        {"1": LOADER_API, "2": ENCODE_API,
         "3": api("TestSampler", "Test Sampler", seed=1, steps=20, cfg=8, sampler_name="euler", noise=0,
                  scheduler="normal", denoise=1.0, model=["1", 0], positive=["2", 0]),
         "7": api("SaveImage", "Save Image", filename_prefix="out")}),
    # A muted node is left out, and so is every link out of it (the consumer then lacks that input,
    # which ComfyUI's validation reports: exactly what the editor would send).
    "muted node and its links are left out": (
        graph([LOADER, ENCODE,
               node(3, "TestSampler", [1, "fixed", 20, 8, "euler", 0, "fixed"], mode=2, inputs=SAMPLER_IO,
                    outputs=[("LATENT", "LATENT", [4])]),
               node(4, "TestDecode", [], inputs=[("samples", "LATENT", 4)], outputs=[("IMAGE", "IMAGE", [])])],
              LINKS + [(4, 3, 0, 4, 0, "LATENT")]),
        {"1": LOADER_API, "2": ENCODE_API, "4": api("TestDecode", "Test Decode")}),
    # Reroute nodes (even chained) pass their link through and vanish; so do notes.
    "reroutes pass links through, notes vanish": (
        graph([LOADER, ENCODE,
               node(8, "Reroute", None, inputs=[("", "*", 1)], outputs=[("", "MODEL", [5])],
                    properties={"showOutputText": False, "horizontal": False}),
               node(9, "Reroute", None, inputs=[("", "*", 5)], outputs=[("", "MODEL", [6])],
                    properties={"showOutputText": False, "horizontal": False}),
               node(3, "TestSampler", [1, "fixed", 20, 8, "euler", 0, "fixed"],
                    inputs=[("model", "MODEL", 6), ("positive", "CONDITIONING", 3)], outputs=[("LATENT", "LATENT", [])]),
               node(10, "Note", ["remember the milk"], properties={"text": ""}),
               node(11, "MarkdownNote", ["# Title"], properties={"text": ""})],
              [(1, 1, 0, 8, 0, "MODEL"), (5, 8, 0, 9, 0, "MODEL"), (6, 9, 0, 3, 0, "MODEL"),
               (2, 1, 1, 2, 0, "CLIP"), (3, 2, 0, 3, 1, "CONDITIONING")]),
        {"1": LOADER_API, "2": ENCODE_API,
         "3": api("TestSampler", "Test Sampler", seed=1, steps=20, cfg=8, sampler_name="euler", noise=0,
                  scheduler="normal", denoise=1.0, model=["1", 0], positive=["2", 0])}),
    # A PrimitiveNode writes its value into every widget it is linked to, and is not in the prompt.
    "primitive value goes into the linked widgets": (
        graph([LOADER, ENCODE,
               node(12, "PrimitiveNode", [4242, "fixed"], title="shared seed",
                    outputs=[("INT", "INT", [7, 8])], properties={"Run widget replace on values": False}),
               node(3, "TestSampler", [1, "fixed", 20, 8, "euler", 0, "fixed"],
                    inputs=SAMPLER_IO + [("seed", "INT", 7, "widget")], outputs=[("LATENT", "LATENT", [])]),
               node(4, "TestSampler", [2, "fixed", 10, 8, "ddim", 0, "fixed"],
                    inputs=[("model", "MODEL", 9), ("positive", "CONDITIONING", 10), ("seed", "INT", 8, "widget")],
                    outputs=[("LATENT", "LATENT", [])])],
              LINKS + [(7, 12, 0, 3, 2, "INT"), (8, 12, 0, 4, 2, "INT"), (9, 1, 0, 4, 0, "MODEL"),
                       (10, 2, 0, 4, 1, "CONDITIONING")]),
        {"1": LOADER_API, "2": ENCODE_API,
         "3": api("TestSampler", "Test Sampler", seed=4242, steps=20, cfg=8, sampler_name="euler", noise=0,
                  scheduler="normal", denoise=1.0, model=["1", 0], positive=["2", 0]),
         "4": api("TestSampler", "Test Sampler", seed=4242, steps=10, cfg=8, sampler_name="ddim", noise=0,
                  scheduler="normal", denoise=1.0, model=["1", 0], positive=["2", 0])}),
    # An image combo gets an upload button whose stored value ("image") stays out of the prompt;
    # titles come from the workflow, else from the definition's display name.
    "upload button value and titles": (
        graph([node(13, "TestLoadImage", ["b.png", "image"], title="My photo", outputs=[("IMAGE", "IMAGE", [11])]),
               node(7, "SaveImage", ["shots/%My photo.image%"], inputs=[("images", "IMAGE", 11)])],
              [(11, 13, 0, 7, 0, "IMAGE")]),
        {"13": api("TestLoadImage", "My photo", image="b.png"),
         "7": api("SaveImage", "Save Image", filename_prefix="shots/b.png", images=["13", 0])}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_conversion_matches_what_the_editor_queues(name):
    workflow, expected = CASES[name]
    assert ui_to_api(workflow, OBJECT_INFO) == expected


def test_a_real_editor_export_is_reproduced_exactly():
    """A graph with every feature at once, exported by ComfyUI's editor (1.27.10) against a real
    ComfyUI 0.3.64's node definitions: core nodes, and a probe node whose widgets mix an image
    upload, a combo with control_after_generate, forceInput/defaultInput and optional widgets."""
    workflow = json.loads((FIXTURES / "frontend_export_ui.json").read_text())
    object_info = json.loads((FIXTURES / "frontend_export_object_info.json").read_text())
    expected = json.loads((FIXTURES / "frontend_export_api.json").read_text())
    assert ui_to_api(workflow, object_info) == expected
    assert list(ui_to_api(workflow, object_info)["3"]["inputs"]) == list(expected["3"]["inputs"])  # key order too


def test_missing_node_class_names_the_class_and_the_pack():
    wf = graph([LOADER, node(3, "FancySampler", [1], inputs=[("model", "MODEL", 1)],
                             properties={"cnr_id": "comfyui-fancy-pack", "ver": "1.2.0"}),
                node(4, "OtherMissing", [], mode=2)],  # muted: never sent, so not needed
               [(1, 1, 0, 3, 0, "MODEL")])
    with pytest.raises(MissingNodeError) as e:
        ui_to_api(wf, OBJECT_INFO)
    msg = str(e.value)
    assert e.value.classes == ["FancySampler"]
    assert "FancySampler" in msg and "comfyui-fancy-pack" in msg and "Install" in msg and "OtherMissing" not in msg


def test_a_bypassed_unknown_node_is_passed_through_without_its_definition():
    wf = graph([LOADER, ENCODE,
                node(5, "SomePackPatch", [0.5], mode=4, inputs=[("model", "MODEL", 1)], outputs=[("MODEL", "MODEL", [5])]),
                node(3, "TestSampler", [1, "fixed", 20, 8, "euler", 0, "fixed"],
                     inputs=[("model", "MODEL", 5), ("positive", "CONDITIONING", 3)], outputs=[])],
               [(1, 1, 0, 5, 0, "MODEL"), (5, 5, 0, 3, 0, "MODEL"), (2, 1, 1, 2, 0, "CLIP"), (3, 2, 0, 3, 1, "CONDITIONING")])
    assert ui_to_api(wf, OBJECT_INFO)["3"]["inputs"]["model"] == ["1", 0]


def test_dynamic_prompts_and_filename_replacements():
    wf = graph([LOADER, node(2, "TestEncode", ["a {red|blue} ball // not sent\nin a /* gone */park"],
                             inputs=[("clip", "CLIP", 2)], outputs=[("CONDITIONING", "CONDITIONING", [])]),
                node(7, "SaveImage", ["%date:yyyy-MM-dd%/%TestLoader.ckpt_name%"], inputs=[("images", "IMAGE", None)])],
               [(2, 1, 1, 2, 0, "CLIP")])
    seen = {ui_to_api(wf, OBJECT_INFO, rng=random.Random(i))["2"]["inputs"]["text"] for i in range(20)}
    assert seen == {"a red ball \nin a park", "a blue ball \nin a park"}
    out = ui_to_api(wf, OBJECT_INFO, now=dt.datetime(2025, 3, 7, 9, 5))
    assert out["7"]["inputs"]["filename_prefix"] == "2025-03-07/b.safetensors"
    assert dynamic_prompt(r"keep \{braces\} and {a|{b|b}}", random.Random(1)) in ("keep {braces} and a",
                                                                                  "keep {braces} and b")


def test_list_values_are_boxed_so_they_do_not_read_as_links():
    wf = graph([node(4, "TestInt", [[1, 2]], outputs=[("INT", "INT", [])])], [])
    assert ui_to_api(wf, OBJECT_INFO)["4"]["inputs"]["value"] == {"__value__": [1, 2]}


def test_subgraphs_and_loops_get_clear_errors():
    wf = graph([node(1, "0a1b2c3d-uuid", [])], [])
    wf["definitions"] = {"subgraphs": [{"id": "0a1b2c3d-uuid"}]}
    with pytest.raises(WorkflowError, match="Unpack Subgraph"):
        ui_to_api(wf, OBJECT_INFO)
    loop = graph([node(8, "Reroute", None, inputs=[("", "*", 2)], outputs=[("", "*", [1])]),
                  node(9, "Reroute", None, inputs=[("", "*", 1)], outputs=[("", "*", [2, 3])]),
                  node(4, "TestDecode", [], inputs=[("samples", "LATENT", 3)], outputs=[])],
                 [(1, 8, 0, 9, 0, "*"), (2, 9, 0, 8, 0, "*"), (3, 9, 0, 4, 0, "LATENT")])
    with pytest.raises(WorkflowError, match="loop"):
        ui_to_api(loop, OBJECT_INFO)


def test_formats_are_told_apart_and_bad_files_named(tmp_path):
    ui, expected = CASES["muted node and its links are left out"]
    assert is_api_format(expected) and not is_api_format(ui) and not is_api_format({})
    (tmp_path / "ui.json").write_text(json.dumps(ui))
    assert load_workflow(tmp_path / "ui.json") == ui
    with pytest.raises(WorkflowError, match="already an API prompt"):
        ui_to_api(expected, OBJECT_INFO)
    (tmp_path / "bad.json").write_text('{"nodes": [')
    with pytest.raises(WorkflowError, match="bad.json"):
        load_workflow(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"hello": 1}')
    with pytest.raises(WorkflowError, match="not a ComfyUI workflow"):
        load_workflow(tmp_path / "other.json")
