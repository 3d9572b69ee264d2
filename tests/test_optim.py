"""Optimizers by name: they train, optional packages are optional, and a missing one says how to get it."""

import logging
import sys

import pytest
import torch

from lora_workbench.training.train.optim import OPTIMIZERS, OptimizerUnavailableError, make_optimizer, optimizer_label


def quadratic(n: int = 64, seed: int = 0, device: str = "cpu"):
    """A parameter, and the loss ||p - target||^2 (minimum 0)."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(n, generator=g).to(device)
    p = torch.nn.Parameter(torch.randn(n, generator=g).to(device))
    return p, lambda: ((p - target) ** 2).sum()


def run(opt, loss_fn, steps: int) -> tuple[float, float]:
    with torch.no_grad():
        first = float(loss_fn())
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    with torch.no_grad():
        return first, float(loss_fn())


def test_adamw_reduces_a_quadratic():
    p, loss_fn = quadratic()
    opt = make_optimizer("adamw", [{"params": [p], "lr": 0.05}], lr=0.05, weight_decay=0.0)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults.get("fused")  # one fused kernel for all tensors, on the CPU too
    first, last = run(opt, loss_fn, 300)
    assert last < 0.01 * first


def test_fused_adamw_takes_the_same_steps_as_the_default_one():
    torch.manual_seed(0)
    start = [torch.randn(16, 320), torch.randn(320, 16)]
    grads = [[torch.randn_like(t) for t in start] for _ in range(5)]
    ends = []
    for fused in (True, False):
        ps = [torch.nn.Parameter(t.clone()) for t in start]
        opt = (make_optimizer("adamw", ps, lr=1e-3, weight_decay=1e-2) if fused
               else torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2))
        assert bool(opt.defaults.get("fused")) is fused
        for g in grads:
            for p, gi in zip(ps, g):
                p.grad = gi.clone()
            opt.step()
        ends.append([p.detach() for p in ps])
    for a, b in zip(*ends):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_param_group_learning_rates_are_kept():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = make_optimizer("adamw", [{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 0.0}], lr=1e-3,
                         weight_decay=0.0)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 0.0]
    run(opt, lambda: (a**2).sum() + (b**2).sum(), 5)
    assert torch.equal(b.detach(), torch.ones(3)) and not torch.equal(a.detach(), torch.ones(3))


def test_sgd_reduces_a_quadratic():
    p, loss_fn = quadratic()
    first, last = run(make_optimizer("sgd", [p], lr=0.1, momentum=0.5), loss_fn, 50)
    assert last < 0.01 * first


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_adamw_is_fused_on_cuda():
    p = torch.nn.Parameter(torch.randn(8, device="cuda"))
    assert make_optimizer("adamw", [p], lr=1e-3).defaults["fused"] is True


def test_unknown_name_or_option_lists_the_choices():
    p = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="'lion'.*adamw, adamw8bit, prodigy, sgd"):
        make_optimizer("lion", [p], lr=1e-4)
    with pytest.raises(ValueError, match=r"'adamw' does not take option\(s\) \['d_coef'\]"):
        make_optimizer("adamw", [p], lr=1e-4, d_coef=2.0)
    with pytest.raises(ValueError, match="no parameters"):
        make_optimizer("adamw", [], lr=1e-4)


@pytest.mark.parametrize("name, module, pip", [("prodigy", "prodigyopt", "pip install prodigyopt"),
                                               ("adamw8bit", "bitsandbytes", "pip install bitsandbytes")])
def test_missing_package_names_the_pip_command(monkeypatch, name, module, pip):
    # None in sys.modules makes `import module` raise ImportError, as when it is not installed.
    for mod in [m for m in list(sys.modules) if m == module or m.startswith(module + ".")] + [module, module + ".optim"]:
        monkeypatch.setitem(sys.modules, mod, None)
    p = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(OptimizerUnavailableError, match=pip) as e:
        make_optimizer(name, [p], lr=1.0)
    assert isinstance(e.value, RuntimeError)
    if module == "bitsandbytes":
        assert "CUDA GPU" in str(e.value)
    # the optimizers that need nothing extra still work
    assert isinstance(make_optimizer("adamw", [p], lr=1e-3), torch.optim.AdamW)


def test_labels_are_kohya_ss_optimizer_strings():
    assert optimizer_label("adamw") == "torch.optim.adamw.AdamW"
    assert optimizer_label("prodigy", {"d_coef": 2.0, "decouple": True}) == \
        "prodigyopt.prodigy.Prodigy(d_coef=2.0,decouple=True)"
    assert set(OPTIMIZERS) == {"adamw", "adamw8bit", "prodigy", "sgd"}
    for name, cls in [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)]:
        assert optimizer_label(name) == f"{cls.__module__}.{cls.__name__}"
    with pytest.raises(ValueError, match="choose one of"):
        optimizer_label("adam")


def test_prodigy_raises_its_step_size_on_a_toy_problem():
    prodigyopt = pytest.importorskip("prodigyopt")
    p, loss_fn = quadratic()
    opt = make_optimizer("prodigy", [p], lr=1.0, weight_decay=0.0, d_coef=1.0)
    assert isinstance(opt, prodigyopt.Prodigy) and opt.param_groups[0]["decouple"] is True
    d0 = opt.param_groups[0]["d"]
    first, last = run(opt, loss_fn, 200)
    assert opt.param_groups[0]["d"] > 1000 * d0  # from 1e-6 up towards the scale of the problem
    assert last < 0.05 * first
    assert optimizer_label("prodigy") == f"{type(opt).__module__}.{type(opt).__name__}"


def test_prodigy_warns_about_a_small_lr(caplog):
    pytest.importorskip("prodigyopt")
    p = torch.nn.Parameter(torch.zeros(2))
    with caplog.at_level(logging.WARNING, logger="lora_workbench.training.train.optim"):
        make_optimizer("prodigy", [p], lr=1e-4)
    assert "use lr 1.0" in caplog.text


def test_adamw8bit_trains_and_keeps_8bit_state():
    bnb = pytest.importorskip("bitsandbytes")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    p, loss_fn = quadratic(n=8192, device=dev)  # 8-bit state is used for tensors of 4096+ elements
    opt = make_optimizer("adamw8bit", [p], lr=0.05, weight_decay=0.0)
    assert isinstance(opt, bnb.optim.AdamW8bit)
    assert optimizer_label("adamw8bit") == f"{type(opt).__module__}.{type(opt).__name__}"
    try:
        first, last = run(opt, loss_fn, 100)
    except (RuntimeError, NotImplementedError) as e:  # older bitsandbytes builds are CUDA-only
        pytest.skip(f"bitsandbytes {bnb.__version__} cannot step on {dev}: {e}")
    assert opt.state[p]["state1"].dtype == torch.uint8
    assert last < 0.1 * first
