"""LoRA layers through peft as a library: inject, load a LoRA back in, remove them again."""

import pytest
import torch

from lora_workbench.training.lora import network
from lora_workbench.training.lora.files import LoraModule, LoraWeights

from helpers import tiny_backend


def _random_like(lora: LoraWeights, alpha: float, seed: int = 0) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    mods = {n: LoraModule(torch.randn(m.down.shape, generator=g), torch.randn(m.up.shape, generator=g), alpha,
                          None if m.dora_scale is None else torch.rand(m.dora_scale.shape, generator=g) + 0.5)
            for n, m in lora.modules.items()}
    return LoraWeights(mods)


def _model_state(roots):
    return {c: ({k: v.clone() for k, v in r.state_dict().items()}, [(p, type(m)) for p, m in r.named_modules()])
            for c, r in roots.items()}


@pytest.mark.parametrize("use_dora", [False, True])
def test_load_into_then_extract_gives_the_lora_back_and_remove_restores_the_model(use_dora):
    be = tiny_backend()
    roots, targets = be.roots(), be.lora_targets("attn", True)
    before = _model_state(roots)
    network.inject(roots, targets, rank=4, alpha=4.0, use_dora=use_dora, seed=0)
    lora = _random_like(network.extract(roots, targets), alpha=2.0)  # not the injected alpha
    network.load_into(roots, targets, lora)
    back = network.extract(roots, targets)
    assert back.modules.keys() == lora.modules.keys()
    for name, m in lora.modules.items():
        b = back.modules[name]
        assert torch.equal(b.down, m.down) and torch.equal(b.up, m.up) and b.alpha == pytest.approx(2.0)
        if use_dora:
            assert torch.allclose(b.dora_scale, m.dora_scale)
    assert network.remove(roots) == len(targets)
    after = _model_state(roots)
    for comp, (tensors, types) in before.items():
        assert after[comp][1] == types, f"{comp}: module structure changed"
        assert after[comp][0].keys() == tensors.keys()
        assert all(torch.equal(after[comp][0][k], v) for k, v in tensors.items())
        assert "peft_config" not in roots[comp].__dict__


def test_load_into_keeps_the_loras_alpha_which_peft_state_dicts_do_not_carry():
    """Why load_into calls peft's ``set_scale``: ``set_peft_model_state_dict`` sets the weights only, the
    scale stays the injected ``lora_alpha / r``."""
    from peft import set_peft_model_state_dict

    be = tiny_backend()
    roots, targets = be.roots(), be.lora_targets("attn", False)
    network.inject(roots, targets, rank=4, alpha=4.0, seed=0)
    unet = roots["unet"]
    path, layer = next(network._lora_layers(unet))
    set_peft_model_state_dict(unet, {f"{path}.lora_A.weight": torch.zeros_like(layer.lora_A["lw"].weight)},
                              adapter_name="lw")
    assert layer.scaling["lw"] == 1.0  # alpha 4 / rank 4, whatever the file's alpha was
    lora = _random_like(network.extract(roots, targets), alpha=1.0)
    network.load_into(roots, targets, lora)
    assert layer.scaling["lw"] == pytest.approx(0.25)
    network.remove(roots)


def test_load_into_refuses_other_ranks_and_missing_modules():
    be = tiny_backend()
    roots, targets = be.roots(), be.lora_targets("attn", False)
    network.inject(roots, targets, rank=4, alpha=4.0, seed=0)
    lora = network.extract(roots, targets)
    name = next(iter(lora.modules))
    m = lora.modules[name]
    wrong = LoraWeights({**lora.modules, name: LoraModule(m.down[:2], m.up[:, :2], m.alpha)})
    with pytest.raises(ValueError, match="ranks differ"):
        network.load_into(roots, targets, wrong)
    with pytest.raises(ValueError, match="lacks 1 trained modules"):
        network.load_into(roots, targets, LoraWeights({k: v for k, v in lora.modules.items() if k != name}))
    network.remove(roots)
