"""Config validation a user meets: every bad value named at once, with its fix; old saved configs still load."""

from __future__ import annotations

import pytest

from lora_workbench.training.config import ConfigError, DatasetConfig, DatasetError, TrainConfig


def test_every_bad_training_option_is_named_in_one_error():
    with pytest.raises(ConfigError) as e:
        TrainConfig(rank=0, lr=0, preset="everything", warmup_steps=-1)
    msg = str(e.value)
    for part in ("rank=0", "lr=0", "preset='everything'", "choose one of attn, attn_ff, all", "warmup_steps=-1"):
        assert part in msg, part


def test_warmup_is_checked_against_steps_only_when_steps_is_valid():
    with pytest.raises(ConfigError, match=r"warmup_steps=600 \(use 0..steps \(500\)\)"):
        TrainConfig(warmup_steps=600)
    with pytest.raises(ConfigError) as e:
        TrainConfig(steps=0, warmup_steps=5)
    assert "steps=0" in str(e.value) and "warmup_steps" not in str(e.value)


def test_dataset_and_training_settings_are_reported_the_same_way():
    with pytest.raises(DatasetError, match=r"^invalid dataset setting: repeats=0 \(allowed: an integer >= 1\)$"):
        DatasetConfig("x", repeats=0)
    with pytest.raises(ConfigError, match=r"^invalid training option: steps=0 \(train for at least 1 step\)$"):
        TrainConfig(steps=0)


def test_a_config_saved_with_the_retired_extra_field_still_loads():
    saved = {**TrainConfig(rank=8).to_dict(), "extra": {}}  # what states and metadata held before
    assert TrainConfig.from_dict(saved) == TrainConfig(rank=8)
    assert "extra" not in TrainConfig().to_dict()
    with pytest.raises(ConfigError, match="unknown training option"):
        TrainConfig.from_dict({"extras": 1})
