"""Auto-captioning: a tiny random BLIP and a tiny ONNX tagger, both built here, caption real folders.

The tagger's scores are exact by construction (a per-channel mean through a Linear whose weights are
zero except where a test needs the image to matter, biases set to logit(p)), so thresholds, order,
exclusions and spelling are checked to the tag. BLIP's random weights write gibberish: its tests
check structure (one non-empty caption per image, the trigger, the start text, the files).
"""

from __future__ import annotations

import csv
import logging
import math
import sys
import warnings
from pathlib import Path

import pytest
from PIL import Image

from lora_workbench.training.data.blip import BlipCaptioner, BlipOptions
from lora_workbench.training.data.captions import CaptionError, MissingModelError, place_trigger
from lora_workbench.training.data.wd14 import TaggerOptions, WD14Tagger
from lora_workbench.training.data.captioners import check_model, load_captioner
from lora_workbench.training.data.caption_files import (CaptionEdit, CaptionFormat, caption_folder,
                                                        edit_caption_folder, edit_captions)
from lora_workbench.app.cli import main

# (name, category, confidence); None: decided by the image (see tagger_weights)
TAGS = [
    ("general", 9, 0.80),
    ("sensitive", 9, 0.15),
    ("1girl", 0, 0.95),
    ("solo", 0, 0.90),
    ("hatsune_miku", 4, 0.88),
    ("star_(symbol)", 0, 0.75),
    ("original_(series)", 4, 0.65),  # a character under 0.85 but over the general threshold
    ("long_hair", 0, 0.60),
    ("^_^", 0, 0.50),
    ("looking_at_viewer", 0, 0.40),
    ("smile", 0, 0.30),
    ("blue_theme", 0, None),  # the blue channel (BGR index 0) is high
    ("white_background", 0, None),  # the green channel's mean is high, e.g. white padding
]
RED_SQUARE_DEFAULT = ["1girl", "solo", "hatsune miku", r"star \(symbol\)", "long hair", "^_^", "looking at viewer"]


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def write_tiny_tagger(folder: Path, name: str | None = None, size: int = 32) -> Path:
    """A WD14-shaped ONNX tagger: NHWC float32 0..255 in, sigmoid per tag out, plus its tags csv.

    ``name=None`` writes SmilingWolf's layout (``folder/model.onnx`` + ``selected_tags.csv``), else
    ComfyUI-WD14-Tagger's (``folder/<name>.onnx`` + ``<name>.csv``). Returns the folder or the .onnx.
    """
    import torch

    class Tagger(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(3, len(TAGS))

        def forward(self, x):  # [N, H, W, 3] BGR 0..255
            return torch.sigmoid(self.head(x.mean(dim=(1, 2))))

    model = Tagger().eval()
    with torch.no_grad():
        model.head.weight.zero_()
        for i, (tag, _cat, p) in enumerate(TAGS):
            model.head.bias[i] = _logit(p) if p is not None else 0.0
        blue, white = [t for t, _c, _p in TAGS].index("blue_theme"), [t for t, _c, _p in TAGS].index("white_background")
        model.head.weight[blue, 0], model.head.bias[blue] = 0.1, -20.0  # B=255: p=0.996, B<=128: p<0.001
        model.head.weight[white, 1], model.head.bias[white] = 0.1, -6.0  # G=0: p=0.0025, G=128: p=0.999
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = folder / (f"{name}.onnx" if name else "model.onnx")
    csv_path = folder / (f"{name}.csv" if name else "selected_tags.csv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (torch.zeros(1, size, size, 3),), str(onnx_path), dynamo=False,
                          input_names=["input_1"], output_names=["predictions_sigmoid"],
                          dynamic_axes={"input_1": {0: "batch"}, "predictions_sigmoid": {0: "batch"}})
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["tag_id", "name", "category", "count"])
        for i, (tag, cat, _p) in enumerate(TAGS):
            w.writerow([1000 + i, tag, cat, 100 - i])
    return onnx_path if name else folder


def write_tiny_blip(folder: Path) -> Path:
    """A random BLIP captioner with a BERT tokenizer from a generated vocabulary, saved like the Hub's."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder.mkdir(parents=True, exist_ok=True)
    words = "a photo of the cat dog red ball on grass in with and sitting blue sky man woman tree".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *words, *(f"w{i}" for i in range(40))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]", model_max_length=64)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    ids = dict(bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
               eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id)
    config = BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, **ids),
        projection_dim=32)
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def make_photos(folder: Path, colors: dict[str, tuple], size=(64, 64)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, color in colors.items():
        Image.new("RGB", size, color).save(folder / name)
    return folder


@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory) -> Path:
    return write_tiny_tagger(tmp_path_factory.mktemp("wd14") / "tiny-tagger")


@pytest.fixture(scope="module")
def tagger(tagger_dir) -> WD14Tagger:
    return WD14Tagger(tagger_dir, device="cpu")


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory) -> Path:
    return write_tiny_blip(tmp_path_factory.mktemp("blip") / "tiny-blip")


class Recording:
    """A captioner wrapper that remembers how many images it was asked to caption."""

    def __init__(self, inner):
        self.inner, self.seen = inner, 0

    def caption(self, images, options=None):
        self.seen += len(images)
        return self.inner.caption(images, options)


# ---------------------------------------------------------------- WD14 tagger


def test_tagger_thresholds_order_and_spelling(tagger):
    red = Image.new("RGB", (64, 64), (255, 0, 0))
    (tags,) = tagger.tags([red])
    assert [t for t, _ in tags] == RED_SQUARE_DEFAULT  # general >= 0.35, character >= 0.85, by confidence
    assert [round(s, 4) for _, s in tags] == [0.95, 0.90, 0.88, 0.75, 0.60, 0.50, 0.40]

    def caption(**kw):
        return tagger.caption([red], TaggerOptions(**kw))[0]

    # a lower character threshold lets the character in; a higher general one drops tags under it
    assert caption(character_threshold=0.6, general_threshold=0.55) == \
        r"1girl, solo, hatsune miku, star \(symbol\), original \(series\), long hair"
    assert caption(character_threshold=0.6, general_threshold=0.55, character_tags_first=True) == \
        r"hatsune miku, original \(series\), 1girl, solo, star \(symbol\), long hair"
    assert caption(general_threshold=0.29).endswith("looking at viewer, smile")
    assert caption(general_threshold=0.96, character_threshold=0.96) == ""
    # exclusion in any spelling; kaomoji keep their underscore; spelling switches
    assert caption(exclude_tags=("SOLO", "long_hair, star (symbol)")) == "1girl, hatsune miku, ^_^, looking at viewer"
    assert caption(underscores_to_spaces=False, escape_parentheses=False, max_tags=4) == \
        "1girl, solo, hatsune_miku, star_(symbol)"
    assert caption(include_rating=True, max_tags=1) == "general, 1girl"


def test_tagger_reads_bgr_and_pads_with_white(tagger):
    blue = Image.new("RGB", (64, 64), (0, 0, 255))
    red = Image.new("RGB", (64, 64), (255, 0, 0))
    black_square = Image.new("RGB", (64, 64), (0, 0, 0))
    black_wide = Image.new("RGB", (64, 32), (0, 0, 0))  # half of its square is white padding
    caps = tagger.caption([blue, red, black_square, black_wide], TaggerOptions(batch_size=3))
    assert ["blue theme" in c for c in caps] == [True, False, False, False]
    assert ["white background" in c for c in caps] == [False, False, False, True]
    assert tagger.size == 32 and tagger.prepare(black_wide).shape == (32, 32, 3)


def test_comfyui_wd14_layout_and_missing_files_name_the_paths(tmp_path):
    onnx = write_tiny_tagger(tmp_path / "wd14_tagger", name="wd-tiny")
    assert check_model("wd14", onnx) is None
    assert WD14Tagger(tmp_path / "wd14_tagger" / "wd-tiny", device="cpu").model_path == onnx  # name without .onnx

    (tmp_path / "wd14_tagger" / "wd-tiny.csv").unlink()
    with pytest.raises(MissingModelError) as e:
        check_model("wd14", onnx)
    assert str(tmp_path / "wd14_tagger" / "wd-tiny.csv") in str(e.value)

    with pytest.raises(MissingModelError) as e:
        WD14Tagger(tmp_path / "nowhere")
    msg = str(e.value)
    assert f"{tmp_path / 'nowhere'} does not exist" in msg and "model.onnx" in msg and "selected_tags.csv" in msg

    half = tmp_path / "half"
    half.mkdir()
    (half / "model.onnx").write_bytes(b"x")
    with pytest.raises(MissingModelError, match=rf"{half} is missing selected_tags.csv;"):
        WD14Tagger(half)


def test_tags_csv_that_does_not_match_the_model_is_refused(tmp_path):
    folder = write_tiny_tagger(tmp_path / "t")
    rows = (folder / "selected_tags.csv").read_text().splitlines()
    (folder / "selected_tags.csv").write_text("\n".join(rows[:-2]) + "\n")
    with pytest.raises(CaptionError, match="lists 11 tags but .* scores 13"):
        WD14Tagger(folder, device="cpu")


def test_without_onnxruntime_the_error_says_what_to_install(tagger_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(CaptionError, match=r"pip install onnxruntime \(CPU\) or onnxruntime-gpu"):
        WD14Tagger(tagger_dir)


# ---------------------------------------------------------------- captioning a folder


def test_every_image_of_a_folder_gets_a_caption_with_the_trigger_first(tagger, tmp_path):
    folder = make_photos(tmp_path / "data", {"a.png": (255, 0, 0), "b.jpg": (0, 0, 255)})
    make_photos(folder / "10_concept", {"c.webp": (255, 0, 0)})
    (folder / "notes.txt").write_text("not a caption")  # no image of that name: left alone
    report = caption_folder(folder, tagger, TaggerOptions(exclude_tags=("solo",)), CaptionFormat(trigger="sks"))
    assert sorted(p.name for p in report.written) == ["a.png", "b.jpg", "c.webp"]
    assert not report.kept and not report.failed
    a = (folder / "a.txt").read_text().strip()
    assert a == "sks, 1girl, hatsune miku, star \\(symbol\\), long hair, ^_^, looking at viewer"
    assert (folder / "b.txt").read_text().startswith("sks, blue theme, 1girl,")  # the blue image, most confident first
    assert (folder / "10_concept" / "c.txt").read_text().strip() == a
    assert (folder / "notes.txt").read_text() == "not a caption"
    assert "10_concept/c.webp | sks, 1girl" in report.table()


def test_trigger_placeholder_prefix_suffix_and_dedupe(tagger, tmp_path):
    folder = make_photos(tmp_path / "data", {"a.png": (255, 0, 0)})
    fmt = CaptionFormat(trigger="sks woman", prefix="photo of [trigger], 1GIRL,", suffix="looking_at_viewer, best")
    caption_folder(folder, tagger, TaggerOptions(max_tags=3), fmt)
    expected = "photo of sks woman, 1GIRL, solo, hatsune miku, looking_at_viewer, best"  # 1girl given once
    assert (folder / "a.txt").read_text().strip() == expected

    assert CaptionFormat(trigger="sks").apply("sks, dog, Dog, sks") == "sks, dog"
    assert CaptionFormat(trigger="sks", dedupe=False).apply("a dog") == "sks, a dog"
    assert CaptionFormat(prefix="[trigger], photo").apply("dog") == "photo, dog"  # empty trigger: placeholder goes
    assert place_trigger("Sks, dog", "sks") == "Sks, dog"  # already first


def test_a_caption_file_holding_the_trigger_anywhere_does_not_get_it_again():
    """The caption files a captioner writes follow the trainer's rule: "a photo of sks dog" stays as written."""
    assert CaptionFormat(trigger="sks").apply("a photo of sks dog") == "a photo of sks dog"
    assert CaptionFormat(trigger="sks").apply("a photo of a SKS dog") == "a photo of a SKS dog"
    assert CaptionFormat(trigger="sks").apply("a photo of skschool") == "sks, a photo of skschool"  # a word, not a part


def test_existing_captions_survive_unless_overwrite_and_then_are_backed_up(tagger, tmp_path):
    folder = make_photos(tmp_path / "data", {"a.png": (255, 0, 0), "b.png": (255, 0, 0), "c.png": (255, 0, 0)})
    (folder / "a.txt").write_text("my careful caption\n")
    (folder / "b.caption").write_text("caption in the other extension")
    counting = Recording(tagger)
    report = caption_folder(folder, counting, TaggerOptions(), CaptionFormat(trigger="sks"))
    assert [p.name for p in report.kept] == ["a.png", "b.png"] and [p.name for p in report.written] == ["c.png"]
    assert counting.seen == 1
    assert (folder / "a.txt").read_text() == "my careful caption\n" and not (folder / "b.txt").exists()
    assert "a.png | (kept) my careful caption" in report.table()

    loads = []
    report = caption_folder(folder, lambda: loads.append(1) or tagger, TaggerOptions(), CaptionFormat())
    assert loads == [] and len(report.kept) == 3  # nothing to do: the model is not even loaded

    report = caption_folder(folder, tagger, TaggerOptions(), CaptionFormat(trigger="sks"), overwrite=True)
    assert len(report.written) == 3 and not report.kept
    assert (folder / "a.txt").read_text().startswith("sks, 1girl")
    assert (folder / "a.txt.bak").read_text() == "my careful caption\n"
    assert (folder / "b.caption.bak").read_text() == "caption in the other extension"
    assert not (folder / "b.caption").exists() and (folder / "b.txt").read_text().startswith("sks, 1girl")

    first = (folder / "a.txt").read_text()
    caption_folder(folder, tagger, TaggerOptions(), CaptionFormat(trigger="ohwx"), overwrite=True)
    assert (folder / "a.txt.bak").read_text() == "my careful caption\n"  # the older backup is never replaced
    assert (folder / "a.txt_00001.bak").read_text() == first
    assert (folder / "a.txt").read_text().startswith("ohwx, 1girl")


def test_a_corrupt_image_is_reported_by_name_and_the_rest_are_captioned(tagger, tmp_path, caplog):
    folder = make_photos(tmp_path / "data", {"a.png": (255, 0, 0), "c.png": (0, 0, 255)})
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    good = (folder / "a.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    with caplog.at_level(logging.WARNING):
        report = caption_folder(folder, tagger, TaggerOptions(batch_size=2), CaptionFormat(trigger="sks"))
    assert sorted(p.name for p in report.failed) == ["broken.png", "truncated.png"]
    assert sorted(p.name for p in report.written) == ["a.png", "c.png"]
    assert (folder / "a.txt").exists() and (folder / "c.txt").exists() and not (folder / "broken.txt").exists()
    assert "broken.png" in report.summary() and "truncated.png" in report.summary()
    assert "broken.png | FAILED: cannot be read" in report.table()
    assert "broken.png" in caplog.text

    (folder / "c.jpg").write_bytes((folder / "c.png").read_bytes())  # would share c.txt with c.png
    report = caption_folder(folder, tagger, overwrite=True)
    assert "shares the caption file c.txt with c.jpg" in report.failed[folder / "c.png"]  # c.jpg sorts first
    assert (folder / "c.txt.bak").exists() and not (folder / "c.txt_00001.bak").exists()  # c.txt written once


def test_a_folder_without_images_is_an_error_that_names_it(tagger, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaptionError, match=rf"{tmp_path / 'empty'} has 0 images with extensions .bmp/"):
        caption_folder(tmp_path / "empty", tagger)
    with pytest.raises(CaptionError, match="does not exist"):
        caption_folder(tmp_path / "missing", tagger)


# ---------------------------------------------------------------- BLIP


def test_blip_captions_a_folder_batched_with_the_trigger(blip_dir, tmp_path):
    blip = load_captioner("blip", blip_dir, device="cpu")
    assert isinstance(blip, BlipCaptioner)
    folder = make_photos(tmp_path / "data", {f"{i}.png": (40 * i, 200 - 30 * i, 90) for i in range(5)}, (48, 40))
    report = caption_folder(folder, blip, BlipOptions(batch_size=2, num_beams=2, max_length=8, min_length=3),
                            CaptionFormat(trigger="sks"))
    assert len(report.written) == 5
    for i in range(5):
        text = (folder / f"{i}.txt").read_text().strip()
        assert text.startswith("sks, ") and len(text) > len("sks, ")


def test_blip_conditional_start_text_greedy_and_stripped(blip_dir):
    blip = BlipCaptioner(blip_dir, device="cpu")
    images = [Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (30, 50), (10, 200, 10))]
    caps = blip.caption(images, BlipOptions(prompt="a photo of", num_beams=1, max_length=6, min_length=2))
    assert len(caps) == 2 and all(c.startswith("a photo of ") and len(c) > len("a photo of ") for c in caps)
    stripped = blip.caption(images, BlipOptions(prompt="a photo of", strip_prompt=True, num_beams=1, max_length=6,
                                                min_length=2))
    assert stripped == [c[len("a photo of "):] for c in caps]


def test_blip_folder_missing_files_names_them_and_the_folder(blip_dir, tmp_path):
    partial = tmp_path / "blip-large"
    partial.mkdir()
    (partial / "config.json").write_text((blip_dir / "config.json").read_text())
    with pytest.raises(MissingModelError) as e:
        BlipCaptioner(partial)
    msg = str(e.value)
    assert f"BLIP model folder {partial} is missing model.safetensors (or pytorch_model.bin), " \
           "preprocessor_config.json (or processor_config.json), tokenizer.json (or vocab.txt)" in msg
    with pytest.raises(MissingModelError, match=f"{tmp_path / 'nope'} does not exist"):
        check_model("blip", tmp_path / "nope")
    with pytest.raises(CaptionError, match="num_beams=0"):
        BlipOptions(num_beams=0)


# ---------------------------------------------------------------- editing captions


def test_edit_captions_find_replace_tags_and_trigger():
    caps = ["ohwx, 1girl, solo, simple background, smile", "a photo of ohwx man, white background"]
    out, report = edit_captions(caps, CaptionEdit(old_trigger="ohwx", trigger="sks", remove_tags="solo, *background",
                                                  add_front="masterpiece", add_back=("smile", "outdoors")))
    assert out == ["masterpiece, sks, 1girl, smile, outdoors", "masterpiece, a photo of sks man, smile, outdoors"]
    assert len(report.changes) == 2
    out, _ = edit_captions(["a red dog, a red ball"], CaptionEdit(find=r"red (\w+)", replace=r"blue \1", regex=True))
    assert out == ["a blue dog, a blue ball"]
    out, _ = edit_captions(["1girl, 1girl, cat", "[trigger] in a park"], CaptionEdit(trigger="sks", dedupe=True))
    assert out == ["sks, 1girl, cat", "sks in a park"]
    out, report = edit_captions(["dog,cat"], CaptionEdit(find="horse", replace="pony"))
    assert out == ["dog,cat"] and report.unchanged == 1  # nothing asked of the tags: text kept as written
    with pytest.raises(CaptionError, match="not a valid regular expression"):
        CaptionEdit(find="(", regex=True)


def test_edit_caption_folder_dry_run_then_write_with_backup(tmp_path):
    folder = make_photos(tmp_path / "data", {"a.png": (1, 2, 3), "b.png": (4, 5, 6), "c.png": (7, 8, 9)})
    (folder / "a.txt").write_text("ohwx, dog, solo\n")
    (folder / "b.txt").write_text("cat\n")
    edit = CaptionEdit(old_trigger="ohwx", trigger="sks", remove_tags="solo")
    report = edit_caption_folder(folder, edit, dry_run=True)
    assert report.changes == [("a.txt", "ohwx, dog, solo", "sks, dog"), ("b.txt", "cat", "sks, cat")]
    assert (folder / "a.txt").read_text() == "ohwx, dog, solo\n" and "would change 2" in report.summary()
    report = edit_caption_folder(folder, edit)
    assert (folder / "a.txt").read_text().strip() == "sks, dog" and (folder / "b.txt").read_text().strip() == "sks, cat"
    assert (folder / "a.txt.bak").read_text() == "ohwx, dog, solo\n" and not (folder / "c.txt").exists()
    assert "a.txt | ohwx, dog, solo  ->  sks, dog" in report.table()


# ---------------------------------------------------------------- command line


def test_cli_caption_writes_sidecars_and_reports(tagger_dir, tmp_path, capsys):
    folder = make_photos(tmp_path / "data", {"a.png": (255, 0, 0), "b.png": (255, 0, 0)})
    (folder / "b.txt").write_text("kept caption")
    argv = ["caption", str(folder), "--captioner", "wd14", "--model", str(tagger_dir), "--trigger", "sks",
            "--general-threshold", "0.55", "--exclude-tags", "solo", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert (folder / "a.txt").read_text().strip() == r"sks, 1girl, hatsune miku, star \(symbol\), long hair"
    assert (folder / "b.txt").read_text() == "kept caption"
    assert "1 captioned, 1 kept" in out and "a.png | sks, 1girl" in out

    assert main([*argv, "--overwrite", "--no-escape-parentheses"]) == 0
    assert (folder / "b.txt").read_text().startswith("sks, 1girl") and (folder / "b.txt.bak").exists()
    assert "star (symbol)" in (folder / "a.txt").read_text()


def test_cli_missing_model_is_reported_before_any_image_is_read(tmp_path, capsys):
    folder = make_photos(tmp_path / "data", {"a.png": (255, 0, 0)})
    assert main(["caption", str(folder), "--captioner", "blip", "--model", str(tmp_path / "models/blip/large")]) == 2
    err = capsys.readouterr().err
    assert f"BLIP model folder {tmp_path / 'models/blip/large'} does not exist" in err
    assert not (folder / "a.txt").exists()
