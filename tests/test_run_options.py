"""``lora-workbench run`` without ComfyUI: --set, variants, progress lines and the batch summary.

A fake host stands in for ComfyUI (in-process or a server): it has node definitions and records
the prompts it is asked to run, so what the runner would queue can be checked exactly.
"""

from __future__ import annotations

import json

import pytest

from lora_workbench.app.workflow_runner import (
    ProgressPrinter,
    PromptInvalidError,
    PromptRun,
    apply_row,
    load_variants,
    parse_assignment,
    run_workflow,
    set_input,
)

OBJECT_INFO = {
    "CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["a.safetensors", "b.safetensors"]]}}},
    "CLIPTextEncode": {"input": {"required": {"text": ["STRING", {"multiline": True}], "clip": ["CLIP"]}}},
    "LoraLoader": {"input": {"required": {"model": ["MODEL"], "clip": ["CLIP"], "lora_name": [["x.safetensors"]],
                                          "strength_model": ["FLOAT", {}], "strength_clip": ["FLOAT", {}]}}},
    "KSampler": {"input": {"required": {"model": ["MODEL"], "seed": ["INT", {}], "steps": ["INT", {}],
                                        "positive": ["CONDITIONING"], "negative": ["CONDITIONING"]}}},
    "SaveImage": {"input": {"required": {"images": ["IMAGE"], "filename_prefix": ["STRING", {}]}}},
}


def prompt() -> dict:
    def node(class_type, title, **inputs):
        return {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}

    return {
        "1": node("CheckpointLoaderSimple", "Load Checkpoint", ckpt_name="a.safetensors"),
        "2": node("LoraLoader", "Load LoRA", model=["1", 0], clip=["1", 1], lora_name="x.safetensors",
                  strength_model=1.0, strength_clip=1.0),
        "3": node("CLIPTextEncode", "Prompt", text="a dog", clip=["2", 1]),
        "4": node("CLIPTextEncode", "Negative v1.5", text="blurry", clip=["2", 1]),
        "5": node("KSampler", "KSampler", model=["2", 0], seed=1, steps=20, positive=["3", 0], negative=["4", 0]),
        "6": node("SaveImage", "Save", images=["5", 0], filename_prefix="out"),
        "7": node("SaveImage", "Save", images=["5", 0], filename_prefix="out2"),
    }


class FakeHost:
    def __init__(self, fail_on_seed=None):
        self.prompts = []
        self.fail_on_seed = fail_on_seed

    def object_info(self):
        return OBJECT_INFO

    def run_prompt(self, prompt, on_message=None):
        self.prompts.append(prompt)
        seed = prompt["5"]["inputs"]["seed"]
        if seed == self.fail_on_seed:
            raise PromptInvalidError({"message": "Prompt outputs failed validation"},
                                {"5": {"class_type": "KSampler", "errors": [{"message": "bad seed", "details": "seed"}]}})
        for event, data in [("execution_start", {}), ("executing", {"node": "5"}),
                            ("executed", {"node": "6"}), ("executing", {"node": None})]:
            on_message(event, data)
        return PromptRun("pid", True, {"6": {"images": [{"filename": f"out_{seed}.png", "subfolder": "",
                                                         "type": "output"}]}}, {}, [])

    def file_location(self, ref):
        return f"/out/{ref['filename']}"


def test_set_takes_a_node_id_title_or_class_and_reads_json_values():
    p = prompt()
    set_input(p, OBJECT_INFO, *parse_assignment("5.steps=4"))
    set_input(p, OBJECT_INFO, *parse_assignment("Negative v1.5.text=ugly, text"))  # a title with a dot
    set_input(p, OBJECT_INFO, *parse_assignment("LoraLoader.strength_model=0.25"))
    set_input(p, OBJECT_INFO, *parse_assignment('Prompt.text="42"'))
    set_input(p, OBJECT_INFO, *parse_assignment("CheckpointLoaderSimple.ckpt_name=[1, 2]"))
    assert p["5"]["inputs"]["steps"] == 4
    assert p["4"]["inputs"]["text"] == "ugly, text"
    assert p["2"]["inputs"]["strength_model"] == 0.25
    assert p["3"]["inputs"]["text"] == "42"  # quoted: a string, not the number
    assert p["1"]["inputs"]["ckpt_name"] == {"__value__": [1, 2]}  # a list would read as a link


@pytest.mark.parametrize("text, message", [
    ("KSampler.steps", "NODE.INPUT=VALUE"),
    ("steps=3", "NODE.INPUT=VALUE"),
    ("Nope.steps=3", "no node 'Nope'"),
    ("Save.filename_prefix=x", "2 nodes are named 'Save' (ids 6, 7)"),
    ("KSampler.stepz=3", "has no input 'stepz'; its inputs: model, seed, steps"),
])
def test_bad_set_names_the_problem(text, message):
    with pytest.raises(ValueError, match=None) as e:
        set_input(prompt(), OBJECT_INFO, *parse_assignment(text))
    assert message in str(e.value)
    if "no node" in message:  # the available nodes are listed, with their titles
        assert "5: KSampler (KSampler)" in str(e.value) and "4: Negative v1.5 (CLIPTextEncode)" in str(e.value)


def test_convenience_columns_set_their_documented_targets():
    p = apply_row(prompt(), OBJECT_INFO, {"prompt": "a cat", "negative": "dark", "seed": 7, "strength": 0.5,
                                          "name": "label only", "6.filename_prefix": "cats", "steps": None})
    assert p["3"]["inputs"]["text"] == "a cat" and p["4"]["inputs"]["text"] == "dark"
    assert p["5"]["inputs"]["seed"] == 7 and p["5"]["inputs"]["steps"] == 20
    assert p["2"]["inputs"]["strength_model"] == p["2"]["inputs"]["strength_clip"] == 0.5
    assert p["6"]["inputs"]["filename_prefix"] == "cats"
    assert prompt()["3"]["inputs"]["text"] == "a dog"  # rows never change the base prompt
    with pytest.raises(ValueError, match="column 'strength' sets both strengths"):
        apply_row({k: v for k, v in prompt().items() if k != "2"}, OBJECT_INFO, {"strength": 1})
    with pytest.raises(ValueError, match="neither NODE.INPUT nor one of prompt"):
        apply_row(prompt(), OBJECT_INFO, {"cfg": 5})


def test_variants_files_csv_and_json(tmp_path):
    (tmp_path / "v.csv").write_text('name,seed,prompt,KSampler.steps\nfirst,1,"a cat, sitting",\nsecond,2,"a dog",8\n')
    assert load_variants(tmp_path / "v.csv") == [
        {"name": "first", "seed": 1, "prompt": "a cat, sitting", "KSampler.steps": None},
        {"name": "second", "seed": 2, "prompt": "a dog", "KSampler.steps": 8}]
    (tmp_path / "v.json").write_text(json.dumps([{"seed": 3}, {"seed": 4, "strength": 0.7}]))
    assert load_variants(tmp_path / "v.json") == [{"seed": 3}, {"seed": 4, "strength": 0.7}]
    (tmp_path / "bad.json").write_text('{"seed": 3}')
    with pytest.raises(ValueError, match="must hold a list of objects"):
        load_variants(tmp_path / "bad.json")
    (tmp_path / "v.txt").write_text("seed\n1\n")
    with pytest.raises(ValueError, match=r"must be \.csv or \.json"):
        load_variants(tmp_path / "v.txt")


def test_batch_runs_every_row_and_prints_a_summary():
    host, lines = FakeHost(fail_on_seed=2), []
    rows = [{"name": "one", "seed": 1, "strength": 0.5}, {"seed": 2}, {"name": "three", "seed": 3, "prompt": "x"}]
    results = run_workflow(host, prompt(), sets=["KSampler.steps=3"], variants=rows, write=lines.append)
    assert [p["5"]["inputs"]["seed"] for p in host.prompts] == [1, 2, 3]
    assert all(p["5"]["inputs"]["steps"] == 3 for p in host.prompts)  # --set applies to every row
    assert host.prompts[0]["2"]["inputs"]["strength_clip"] == 0.5 and host.prompts[2]["2"]["inputs"]["strength_clip"] == 1.0
    assert [r.ok for r in results] == [True, False, True]
    assert "bad seed" in results[1].error
    text = "\n".join(lines)
    assert "variant 1/3: one" in text and "variant 2/3: seed=2" in text
    assert "  run  #5 KSampler (KSampler)" in text and "wrote /out/out_3.png" in text
    summary = lines[lines.index("summary:") + 1:]
    assert summary[0].split()[:2] == ["1", "ok"] and summary[1].split()[:2] == ["2", "FAILED"]
    assert summary[2].endswith("1 file(s)  three")


def test_a_bad_row_fails_before_anything_runs():
    host = FakeHost()
    with pytest.raises(ValueError, match="no node 'Missing'"):
        run_workflow(host, prompt(), variants=[{"seed": 1}, {"Missing.text": "x"}], write=lambda _: None)
    assert host.prompts == []


def test_progress_lines_for_nodes_and_training_steps():
    lines = []
    show = ProgressPrinter({"8": {"class_type": "LW_TrainLoRA", "inputs": {}, "_meta": {"title": "Train"}}},
                           lines.append, max_step_lines=4)
    show("executing", {"node": "8"})
    for step in range(1, 9):
        show("lw.train.step", {"node": "8", "step": step, "total": 8, "loss": 0.5 / step, "lr": 1e-4})
    show("lw.train.preview", {"node": "8", "step": 4, "prompt": "p"})
    show("lw.train.saved", {"node": "8", "step": 8, "path": "/m/x.safetensors"})
    show("execution_error", {"node_id": "8", "exception_type": "RuntimeError", "exception_message": "boom"})
    assert lines[0] == "  run  #8 Train (LW_TrainLoRA)"
    assert [line.split()[1] for line in lines if "loss" in line] == ["1/8", "2/8", "4/8", "6/8", "8/8"]
    assert "       preview at step 4" in lines and "       saved step 8: /m/x.safetensors" in lines
    assert lines[-2].startswith("  done #8 Train") and lines[-1] == "  error in #8 Train (LW_TrainLoRA): RuntimeError: boom"


def test_run_command_errors_are_one_clear_line(tmp_path, capsys):
    from lora_workbench.app.cli import main

    path = tmp_path / "wf.json"
    path.write_text(json.dumps(prompt()))
    assert main(["run", str(path), "--server", "http://127.0.0.1:9", "--set", "steps=3"]) == 2
    assert "is not NODE.INPUT=VALUE" in capsys.readouterr().err
    assert main(["run", str(path), "--server", "http://127.0.0.1:9", "--cpu"]) == 2
    assert "the server's own options" in capsys.readouterr().err
    assert main(["run", str(path), "--server", "http://127.0.0.1:9"]) == 2  # nothing listens on port 9
    assert "cannot reach ComfyUI at http://127.0.0.1:9" in capsys.readouterr().err
    assert main(["run", str(path), "--comfyui", str(tmp_path)]) == 2
    assert f"{tmp_path} (--comfyui) is not a ComfyUI folder" in capsys.readouterr().err
