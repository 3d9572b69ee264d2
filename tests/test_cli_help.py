"""Every CLI option says what it does and which values it takes, from the tables that validate them."""

import argparse

import pytest

from lora_workbench.app.cli import build_parser, main
from lora_workbench.training.config import CHOICES, ConfigError, TrainConfig


def subcommands():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


@pytest.mark.parametrize("command", ["train", "inspect", "caption", "demo", "run"])
def test_every_option_has_a_description(command):
    missing = [a.option_strings[0] if a.option_strings else a.dest for a in subcommands()[command]._actions
               if a.help != argparse.SUPPRESS and not (a.help or "").split("(default")[0].strip()]
    assert not missing, f"{command}: options without a description: {missing}"


def test_allowed_values_are_the_ones_the_config_validates():
    actions = {a.dest: a for a in subcommands()["train"]._actions}
    for name, allowed in CHOICES.items():
        assert list(actions[name].choices) == [c for c in allowed if c is not None], name
        assert "one of:" in actions[name].help
    with pytest.raises(ConfigError, match="choose one of attn, attn_ff, all"):
        TrainConfig(preset="everything")


def test_one_spelling_per_option_and_the_old_one_still_works(monkeypatch):
    from lora_workbench.app import cli

    flags = [s for a in subcommands()["train"]._actions if a.help != argparse.SUPPRESS for s in a.option_strings]
    assert "--optimizer-args" not in flags and "--optimizer-arg" in flags
    assert len(flags) == len(set(flags))
    seen = {}
    monkeypatch.setitem(cli.__dict__, "cmd_train", lambda ns: seen.setdefault("args", ns.optimizer_arg) and 0)
    main(["train", "x", "--model", "m", "--optimizer-args", "d_coef=2", "--optimizer-arg", "safeguard_warmup=true"])
    assert seen["args"] == ["d_coef=2", "safeguard_warmup=true"]
