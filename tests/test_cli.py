"""The command line as a user runs it: demo, train with class images, inspect, and clear errors."""

import pytest

from lora_workbench.training.train.class_images import diffusers_renderer, existing_class_images, generate_class_images
from lora_workbench.app.cli import main
from lora_workbench.training.lora.files import model_hash
from lora_workbench.training.lora.formats import load_lora
from lora_workbench.training.model.tiny import save_tiny_pipeline

from helpers import make_images, tiny_backend

SMALL = ["--resolution", "32", "--bucket-step", "16", "--min-bucket-side", "16", "--max-bucket-side", "64"]


def test_demo_trains_saves_and_reports(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "30"]) == 0
    out = capsys.readouterr().out
    lora = tmp_path / "demo" / "loras" / "demo_sks_ball.safetensors"
    assert lora.exists() and f"LoRA:         {lora}" in out
    assert "% lower)" in out and "sshs_model_hash" in out and "(ok)" in out
    assert load_lora(lora).metadata["modelspec.trigger_phrase"] == "sks"


def test_inspect_shows_metadata_and_a_matching_hash(tmp_path, capsys):
    main(["demo", "--out", str(tmp_path / "demo"), "--steps", "2"])
    capsys.readouterr()
    path = tmp_path / "demo" / "loras" / "demo_sks_ball.safetensors"
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    for key in ("ss_base_model_version", "ss_network_dim", "ss_network_alpha", "ss_tag_frequency",
                "ss_resolution", "ss_num_train_images", "modelspec.trigger_phrase", "ss_output_name",
                "ss_dataset_dirs", "modelspec.architecture"):
        assert key in out, key
    assert f"sshs_model_hash:  {model_hash(path)} (ok)" in out


def test_train_with_generated_class_images_then_resume_refuses_changes(tmp_path, capsys):
    imgs = make_images(tmp_path / "img", n=2)
    model = save_tiny_pipeline(tmp_path / "model")
    cls_dir = tmp_path / "class"
    args = ["train", str(imgs), "--model", str(model), "--out", str(tmp_path / "out"), "--steps", "3",
            "--class-dir", str(cls_dir), "--class-prompt", "a photo of a ball", "--num-class-images", "2",
            "--save-state-every", "1", "--trigger", "sks", "--keep-state", *SMALL]
    assert main(args) == 0
    assert len(existing_class_images(cls_dir)) == 2
    assert (cls_dir / "class_00000.txt").read_text() == "a photo of a ball"
    lora = load_lora(tmp_path / "out" / "lora.safetensors")
    assert lora.metadata["ss_num_reg_images"] == "2"
    capsys.readouterr()
    assert main([*args, "--resume", str(tmp_path / "out" / "lora-state"), "--rank", "8", "--steps", "5"]) == 2
    err = capsys.readouterr().err
    assert "rank: saved 16, now 8" in err and "Traceback" not in err


def test_class_image_generation_skips_what_is_there(tmp_path):
    calls = []

    def render(prompt, seed, index):
        from PIL import Image

        calls.append(index)
        return Image.new("RGB", (32, 32), (index * 40, 0, 0))

    folder = tmp_path / "cls"
    generate_class_images(render, "a photo of a dog", 2, folder)
    generate_class_images(render, "a photo of a dog", 3, folder)  # only the third is new
    assert calls == [0, 1, 2]
    assert [p.name for p in existing_class_images(folder)] == ["class_00000.png", "class_00001.png",
                                                             "class_00002.png"]
    with pytest.raises(ValueError, match="class prompt"):
        generate_class_images(render, " ", 4, folder)


def test_class_images_rendered_by_the_base_model(tmp_path):
    be = tiny_backend()
    render = diffusers_renderer(be, resolution=32, steps=2)
    a, b = render("a photo of a ball", 0, 0), render("a photo of a ball", 1, 1)
    assert a.size == (32, 32) and a.tobytes() != b.tobytes()


@pytest.mark.parametrize("argv, message", [
    (["train", "/nonexistent/images", "--model", "/nonexistent/model"], "does not exist"),
    (["train", "{img}", "--model", "{img}"], "is not a diffusers model folder"),
    (["train", "{img}", "--model", "{img}", "--rank", "0"], "rank=0"),
    (["inspect", "/nonexistent.safetensors"], "nonexistent.safetensors"),
])
def test_bad_input_prints_one_clear_line_not_a_traceback(tmp_path, capsys, argv, message):
    img = make_images(tmp_path / "img", n=1)
    argv = [a.replace("{img}", str(img)) for a in argv]
    assert main([*argv, *(SMALL if argv[0] == "train" else [])]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_the_demo_writes_outside_the_checkout_and_git_ignores_its_folder():
    from pathlib import Path

    from lora_workbench.app.cli import build_parser

    out = Path(build_parser().parse_args(["demo"]).out)
    repo = Path(__file__).resolve().parents[1]
    assert out.is_absolute() and out.name == "lora_workbench_demo"
    assert repo not in out.resolve().parents
    assert "lora_workbench_demo/" in (repo / ".gitignore").read_text().splitlines()


def test_cli_writes_baseline_and_step_previews_and_the_ema_beside_the_lora(tmp_path, capsys):
    from PIL import Image

    imgs = make_images(tmp_path / "img", n=2)
    model = save_tiny_pipeline(tmp_path / "model")
    out = tmp_path / "out"
    args = ["train", str(imgs), "--model", str(model), "--out", str(out), "--steps", "4", "--preview-every", "2",
            "--preview-steps", "2", "--ema-decay", "0.9", "--trigger", "sks", *SMALL]
    assert main(args) == 0
    shots = sorted(p.name for p in (out / "lora-previews").iterdir())
    assert shots == ["step000000.png", "step000002.png", "step000004.png"]  # step 0: before training
    before, after = (Image.open(out / "lora-previews" / n) for n in ("step000000.png", "step000004.png"))
    assert before.size == after.size and before.tobytes() != after.tobytes()
    ema = load_lora(out / "lora-ema.safetensors")
    assert "lw_ema" in ema.metadata and ema.modules.keys() == load_lora(out / "lora.safetensors").modules.keys()
    # a second run of the same name refuses the first one's previews too, naming them
    (out / "lora.safetensors").unlink()
    (out / "lora-ema.safetensors").unlink()
    capsys.readouterr()
    assert main(args) == 2
    assert "lora-previews" in capsys.readouterr().err
