"""The benchmark harness runs end to end and reports what it measured (no timing asserts here:
speed targets are ratios in bench/RESULTS.md)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def bench_main():
    sys.path.insert(0, str(REPO))
    try:
        from bench.__main__ import main

        yield main
    finally:
        sys.path.remove(str(REPO))


def test_engine_only_bench_writes_a_table_with_step_time_flops_and_memory(bench_main, tmp_path, capsys):
    out = tmp_path / "RESULTS.md"
    code = bench_main(["train", "--sizes", "tiny", "--runs", "1", "--only", "engine-attn", "--threads", "1",
                       "--comfyui", str(tmp_path / "no-comfyui"), "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "running the standalone engine only" in printed  # no ComfyUI: said once, not a crash
    text = out.read_text()
    assert "Machine:" in text and "Command: `python -m bench train --sizes tiny" in text
    row = next(line for line in text.splitlines() if line.startswith("| engine-attn |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    step, rss, growth, params, gflop, share = (cells[1], cells[4], cells[6], cells[7], cells[8], cells[9])
    assert 0 < float(step) < 60
    assert float(rss) > 100  # MiB: the model is loaded
    assert float(growth) >= 0
    assert int(params.replace(",", "")) == 288_768  # rank 16 on q/k/v/out of the 3 transformer blocks
    # A step of the tiny UNet is a few GFLOP (forward + backward); the share is of the measured peak.
    assert 1 < float(gflop) < 20
    assert re.fullmatch(r"\d+%", share)


def test_a_missing_diffusers_checkout_is_named(bench_main, tmp_path):
    with pytest.raises(SystemExit):
        bench_main(["train", "--diffusers-src", str(tmp_path), "--out", str(tmp_path / "r.md")])
