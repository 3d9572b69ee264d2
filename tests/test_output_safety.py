"""A run never replaces what it did not write, and every refusal comes before a model loads."""

import hashlib

import pytest

from lora_workbench.training.model import single_file
from lora_workbench.app.cli import main
from lora_workbench.training.config import TrainConfig
from lora_workbench.app.folder_training import train_folder
from lora_workbench.training.model.tiny import save_tiny_pipeline
from lora_workbench.training.train.trainer import TrainCallbacks

from helpers import make_images, tiny_backend, tiny_dataset_cfg

SMALL = ["--resolution", "32", "--bucket-step", "16", "--min-bucket-side", "16", "--max-bucket-side", "64",
         "--rank", "4", "--alpha", "4", "--trigger", "sks"]


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


class CrashAt(TrainCallbacks):
    def __init__(self, step):
        self.step = step

    def on_step(self, step, total, loss, lr):
        if step == self.step:
            raise KeyboardInterrupt


@pytest.fixture
def setup(tmp_path, monkeypatch):
    imgs = make_images(tmp_path / "img", n=2)
    model = save_tiny_pipeline(tmp_path / "model")
    out = tmp_path / "out"
    loads = []
    real = single_file.load_model

    def counting_load(*a, **kw):
        loads.append(a[0])
        return real(*a, **kw)

    monkeypatch.setattr(single_file, "load_model", counting_load)
    return imgs, model, out, loads


def interrupted_run(imgs, out, name, at=2, steps=4):
    """Run ``name`` that was stopped at step ``at``: a state, a step file, no final LoRA."""
    tcfg = TrainConfig(rank=4, alpha=4, steps=steps, output_name=name, save_dtype="fp32")
    with pytest.raises(KeyboardInterrupt):
        train_folder(tiny_dataset_cfg(imgs), tcfg, tiny_backend, out, callbacks=CrashAt(at))
    assert (out / f"{name}-state").is_dir() and not (out / f"{name}.safetensors").exists()


def test_resume_under_another_name_keeps_the_other_runs_file(setup, capsys):
    imgs, model, out, loads = setup
    assert main(["train", str(imgs), "--model", str(model), "--out", str(out), "--steps", "2",
                 "--output-name", "same", *SMALL]) == 0
    theirs = out / "same.safetensors"
    before = sha256(theirs)
    interrupted_run(imgs, out, "n")
    loads.clear()
    capsys.readouterr()
    code = main(["train", str(imgs), "--model", str(model), "--out", str(out), "--steps", "4",
                 "--output-name", "same", "--resume", str(out / "n-state"), *SMALL])
    err = capsys.readouterr().err
    assert code == 2 and sha256(theirs) == before
    assert "--overwrite" in err and "'n'" in err and "Traceback" not in err, err
    assert loads == [], "the refusal must come before the model loads"


def test_resume_refuses_a_final_file_it_did_not_write(setup, capsys):
    imgs, model, out, loads = setup
    interrupted_run(imgs, out, "n")
    other = out / "n.safetensors"
    other.write_bytes(b"another run's LoRA")
    loads.clear()
    capsys.readouterr()
    code = main(["train", str(imgs), "--model", str(model), "--out", str(out), "--steps", "4",
                 "--resume", str(out / "n-state"), *SMALL])
    err = capsys.readouterr().err
    assert code == 2 and other.read_bytes() == b"another run's LoRA"
    assert str(other) in err and "--overwrite" in err, err
    assert loads == []


def test_resume_continues_its_own_files_under_its_own_name(setup, capsys):
    imgs, model, out, loads = setup
    interrupted_run(imgs, out, "n")
    # No --output-name: the state's own name is used, and its own step file may be rewritten.
    assert main(["train", str(imgs), "--model", str(model), "--out", str(out), "--steps", "4",
                 "--resume", str(out / "n-state"), *SMALL]) == 0
    assert (out / "n.safetensors").is_file()


def test_leftover_step_files_and_state_are_refused_before_the_model_loads(setup, capsys):
    imgs, model, out, loads = setup
    interrupted_run(imgs, out, "x")
    step_file = out / "x-step000002.safetensors"
    before = sha256(step_file)
    loads.clear()
    capsys.readouterr()
    code = main(["train", str(imgs), "--model", str(model), "--out", str(out), "--steps", "2",
                 "--output-name", "x", *SMALL])
    err = capsys.readouterr().err
    assert code == 2 and loads == [] and sha256(step_file) == before
    assert str(step_file) in err and "x-state" in err and "--overwrite" in err and "--resume" in err, err
    # --overwrite replaces them.
    assert main(["train", str(imgs), "--model", str(model), "--out", str(out), "--steps", "2",
                 "--output-name", "x", "--overwrite", *SMALL]) == 0


def test_a_bad_resume_path_fails_before_the_model_loads(setup, capsys):
    imgs, model, out, loads = setup
    code = main(["train", str(imgs), "--model", str(model), "--out", str(out), "--steps", "2",
                 "--resume", str(out / "nope-state"), *SMALL])
    err = capsys.readouterr().err
    assert code == 2 and loads == [] and "nope-state" in err and "Traceback" not in err, err


def test_a_finished_run_removes_its_state_unless_asked_to_keep_it(setup):
    imgs, model, out, loads = setup
    args = ["train", str(imgs), "--model", str(model), "--out", str(out), "--steps", "3", "--save-state-every", "1",
            *SMALL]
    assert main([*args, "--output-name", "a"]) == 0
    assert (out / "a.safetensors").is_file() and not (out / "a-state").exists()
    assert main([*args, "--output-name", "b", "--keep-state"]) == 0
    assert (out / "b-state" / "trainer.pt").is_file()
