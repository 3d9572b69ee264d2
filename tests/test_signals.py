"""SIGTERM and Ctrl-C take one path: the run keeps a resumable state and says how to continue."""

import os
import random
import shlex
import signal
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import load_file

from lora_workbench.training.train import class_images
from lora_workbench.training.train.class_images import existing_class_images
from lora_workbench.app.cli import main
from lora_workbench.training.interrupt import Interrupted, raise_on_signals, signals_held
from lora_workbench.training.model.tiny import save_tiny_pipeline

from helpers import make_images

ARGS = ["--resolution", "32", "--bucket-step", "16", "--min-bucket-side", "16", "--max-bucket-side", "64",
        "--rank", "4", "--alpha", "4", "--trigger", "sks", "--steps", "40", "--batch-size", "2", "--lr", "1e-3",
        "--save-dtype", "fp32", "--flip", "--shuffle-tags", "--output-name", "run"]


def cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "lora_workbench.app.cli", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sigterm_at_a_random_step_then_resume_gives_the_uninterrupted_lora(tmp_path):
    imgs = make_images(tmp_path / "img", n=4)
    model = save_tiny_pipeline(tmp_path / "model")
    full_out, out = tmp_path / "full", tmp_path / "out"
    assert main(["train", str(imgs), "--model", str(model), "--out", str(full_out), *ARGS]) == 0

    at = random.Random().randint(3, 20)
    proc = cli("-v", "train", str(imgs), "--model", str(model), "--out", str(out), *ARGS)
    for line in proc.stderr:  # -v logs each finished step
        if f"step {at}/40 " in line:
            proc.send_signal(signal.SIGTERM)
            break
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 143, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("lora-workbench train: stopped by SIGTERM at step ") and "Traceback" not in stderr, stderr
    command = last.split("continue with: ", 1)[1]
    assert f"--resume {out / 'run-state'}" in command
    resumed = cli(*shlex.split(command)[1:])
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert "resumed from" in stderr

    a, b = load_file(full_out / "run.safetensors"), load_file(out / "run.safetensors")
    assert a.keys() == b.keys() and all(a[k].dtype == torch.float32 for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), f"stopped at step {at}: the resumed LoRA differs"


def test_ctrl_c_during_class_images_keeps_the_finished_ones(tmp_path, monkeypatch, capsys):
    imgs = make_images(tmp_path / "img", n=2)
    model = save_tiny_pipeline(tmp_path / "model")

    def renderer(backend, resolution, **kw):
        def render(prompt, seed, index):
            from PIL import Image

            if index == 2:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the third image renders
            return Image.new("RGB", (32, 32), (index * 40, 0, 0))
        return render

    monkeypatch.setattr(class_images, "diffusers_renderer", renderer)
    cls = tmp_path / "class"
    code = main(["train", str(imgs), "--model", str(model), "--out", str(tmp_path / "out"), *ARGS,
                 "--class-dir", str(cls), "--class-prompt", "a photo of a ball", "--num-class-images", "4"])
    err = capsys.readouterr().err
    assert code == 130
    assert [p.name for p in existing_class_images(cls)] == ["class_00000.png", "class_00001.png"]
    assert sorted(p.name for p in cls.iterdir()) == ["class_00000.png", "class_00000.txt", "class_00001.png",
                                                    "class_00001.txt"]  # no temp file left
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"lora-workbench train: stopped by SIGINT while generating class images: "
                                            f"the 2 finished ones are kept in {cls}; run the same command again "
                                            "to make the rest and train")


def test_a_signal_during_the_optimizer_update_waits_for_the_step_to_end():
    order = []
    with raise_on_signals():
        with pytest.raises(Interrupted) as e:
            with signals_held():
                os.kill(os.getpid(), signal.SIGTERM)
                order.append("update finished")
        assert e.value.exit_code == 143
    assert order == ["update finished"]


def test_outside_the_main_thread_nothing_changes():
    seen = []
    t = threading.Thread(target=lambda: seen.append(signals_held().__enter__() is None))
    t.start()
    t.join()
    assert seen == [True]
