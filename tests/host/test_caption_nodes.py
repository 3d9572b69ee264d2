"""The captioning nodes inside ComfyUI: a tagger dropped into models/wd14_tagger captions a folder and a
batch, Edit Captions rewrites the sidecars, BLIP from models/blip captions a batch, and a model folder
missing files gets an error naming them.

The models are the engine tests' tiny ones (tests/test_captioning.py): the tagger's scores are exact,
so every tag it writes is known.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1]))  # tests/: the engine tests' model builders
from test_captioning import RED_SQUARE_DEFAULT, write_tiny_blip, write_tiny_tagger  # noqa: E402


@pytest.fixture(scope="module")
def wd14_models(comfy_host) -> Path:
    """Both layouts: models/wd14_tagger/tiny/{model.onnx,selected_tags.csv} and wd14_tagger/wd-tiny.onnx + .csv."""
    root = comfy_host.base_directory / "models" / "wd14_tagger"
    write_tiny_tagger(root / "tiny")
    write_tiny_tagger(root, name="wd-tiny")
    return root


def _photos(folder: Path, names=("a.png", "b.png", "c.png")) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (48, 40), (255 - 20 * i, 0, 0)).save(folder / name)  # red: no colour tags
    return folder


def _caption_folder(folder, model="wd14_tagger/tiny", **changes) -> dict:
    inputs = {"folder": str(folder), "model": model, "trigger_word": "sks", "prefix": "", "suffix": "",
              "device": "auto", "overwrite": False, "general_threshold": 0.55, "exclude_tags": "solo"}
    inputs.update(changes)
    return {"class_type": "LW_CaptionFolder", "inputs": inputs}


def _edit(folder_link=None, captions_link=None, **changes) -> dict:
    inputs = {"folder": folder_link or "", "find": "", "replace": "", "regex": False, "remove_tags": "",
              "add_tags_front": "", "add_tags_back": "", "trigger_word": "", "old_trigger_word": "", "dedupe": True,
              "dry_run": False, "backup": True}
    if captions_link is not None:
        inputs["captions"] = captions_link
    inputs.update(changes)
    return {"class_type": "LW_EditCaptions", "inputs": inputs}


def test_caption_folder_then_edit_captions_headless(comfy_host, run_prompt, wd14_models, tmp_path):
    import folder_paths

    assert str(wd14_models) in folder_paths.get_folder_paths("wd14_tagger")
    folder = _photos(tmp_path / "subject")
    (folder / "c.txt").write_text("my own caption, solo")
    prompt = {
        "1": _caption_folder(folder),
        "2": _edit(["1", 0], old_trigger_word="sks", trigger_word="ohwx", remove_tags="long hair, solo",
                   add_tags_back="photo"),
    }
    run = run_prompt(prompt)
    assert run.success, run.error()
    assert (folder / "a.txt").read_text().strip() == r"ohwx, 1girl, hatsune miku, star \(symbol\), photo"
    assert (folder / "b.txt").read_text().strip() == r"ohwx, 1girl, hatsune miku, star \(symbol\), photo"
    assert (folder / "c.txt").read_text().strip() == "ohwx, my own caption, photo"  # kept by Caption, then edited
    captioned = r"sks, 1girl, hatsune miku, star \(symbol\), long hair"
    assert (folder / "a.txt.bak").read_text().strip() == captioned  # Edit's backup
    (preview,) = run.outputs["1"]["text"]
    assert "2 captioned, 1 kept" in preview and f"a.png | {captioned}" in preview
    assert "c.png | (kept) my own caption, solo" in preview
    (report,) = run.outputs["2"]["text"]
    assert "changed 3 caption(s)" in report

    # overwrite re-captions everything and keeps the edited files as backups
    run = run_prompt({"1": _caption_folder(folder, overwrite=True, exclude_tags="", general_threshold=0.35)})
    assert run.success, run.error()
    assert (folder / "c.txt").read_text().strip() == "sks, " + ", ".join(RED_SQUARE_DEFAULT)
    assert (folder / "c.txt_00001.bak").read_text().strip() == "ohwx, my own caption, photo"


def test_caption_images_to_edit_captions(comfy_host, run_prompt, wd14_models):
    input_dir = comfy_host.base_directory / "input"
    _photos(input_dir, ("cap_a.png", "cap_b.png"))
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "cap_a.png"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "cap_b.png"}},
        "3": {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["2", 0]}},
        "4": {"class_type": "LW_CaptionImages", "inputs": {
            "images": ["3", 0], "model": "wd14_tagger/wd-tiny.onnx", "trigger_word": "", "prefix": "[trigger], a",
            "suffix": "", "device": "cpu", "include_rating": True, "max_tags": 2}},
        "5": _edit(captions_link=["4", 0], trigger_word="sks", add_tags_front="masterpiece"),
    }
    run = run_prompt(prompt)
    assert run.success, run.error()
    (report,) = run.outputs["5"]["text"]
    assert "changed 2 caption(s)" in report
    assert "a, general, 1girl, solo  ->  sks, masterpiece, a, general, 1girl, solo" in report


def test_a_model_folder_missing_files_names_them(comfy_host, run_prompt, tmp_path):
    blip = comfy_host.base_directory / "models" / "blip" / "half-blip"
    blip.mkdir(parents=True)
    (blip / "config.json").write_text("{}")
    run = run_prompt({"1": _caption_folder(_photos(tmp_path / "s"), model="blip/half-blip")})
    assert not run.success
    err = str(run.error())
    assert f"BLIP model folder {blip} is missing model.safetensors" in err and "preprocessor_config.json" in err


def test_blip_from_models_blip_captions_a_batch(comfy_host, run_prompt):
    write_tiny_blip(comfy_host.base_directory / "models" / "blip" / "tiny-blip")
    _photos(comfy_host.base_directory / "input", ("blip_a.png", "blip_b.png"))
    caption = {"class_type": "LW_CaptionImages", "inputs": {
        "images": ["3", 0], "model": "blip/tiny-blip", "trigger_word": "sks", "prefix": "", "suffix": "",
        "device": "auto", "blip_prompt": "a photo of", "num_beams": 1, "max_length": 6, "min_length": 2,
        "batch_size": 1}}
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "blip_a.png"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "blip_b.png"}},
        "3": {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["2", 0]}},
        "4": caption,
        "5": _edit(captions_link=["4", 0], find="a photo of", replace="a picture of"),
    }
    run = run_prompt(prompt)
    assert run.success, run.error()
    (text,) = run.outputs["4"]["text"]
    lines = text.splitlines()
    assert len(lines) == 2 and all(line.startswith("sks, a photo of ") and len(line) > 16 for line in lines)
    (report,) = run.outputs["5"]["text"]
    assert "changed 2 caption(s)" in report and "->  sks, a picture of " in report
