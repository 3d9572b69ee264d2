"""Training options wired into the loop: each changes what the run does, as documented."""

import pytest
import torch

from lora_workbench.training.config import DatasetError, TrainConfig
from lora_workbench.training.data.dataset import scan_folder
from lora_workbench.training.lora.formats import load_lora
from lora_workbench.training.train.trainer import TrainData, Trainer

from helpers import make_images, tiny_backend, tiny_dataset_cfg


@pytest.fixture
def data(tmp_path):
    dcfg = tiny_dataset_cfg(make_images(tmp_path / "img", n=2))
    return dcfg, scan_folder(dcfg)


def _te_ups(lora):
    return {k: m.up.clone() for k, m in lora.modules.items() if k.startswith("lora_te_")}


def test_noise_offset_shifts_the_per_channel_noise_mean(data):
    dcfg, records = data
    plain = Trainer(tiny_backend(), TrainData(records, dcfg), TrainConfig(steps=1))
    offset = Trainer(tiny_backend(), TrainData(records, dcfg), TrainConfig(steps=1, noise_offset=0.5))
    for t in (plain, offset):
        t._n_train_t = 1000
    shape = (256, 4, 8, 8)
    n0, _ = plain._noise(torch.Generator().manual_seed(0), shape, torch.device("cpu"))
    n1, _ = offset._noise(torch.Generator().manual_seed(0), shape, torch.device("cpu"))
    # Offset noise adds one N(0, 0.5^2) value per (sample, channel): the spatial means spread out.
    assert n0.mean(dim=(2, 3)).std() < 0.2
    assert 0.4 < n1.mean(dim=(2, 3)).std() < 0.65


def test_text_encoder_lr_zero_and_freeze_after_n_steps(data):
    dcfg, records = data
    base = dict(steps=6, lr=5e-3, train_text_encoder=True, seed=1)
    frozen = Trainer(tiny_backend(), TrainData(records, dcfg), TrainConfig(**base, text_encoder_lr=0.0)).run()
    assert all(torch.count_nonzero(u) == 0 for u in _te_ups(frozen.lora).values()), "TE LoRA moved at lr 0"
    assert any(torch.count_nonzero(m.up) for k, m in frozen.lora.modules.items() if k.startswith("lora_unet_"))

    at3 = Trainer(tiny_backend(), TrainData(records, dcfg), TrainConfig(**{**base, "steps": 3})).run()
    freeze3 = Trainer(tiny_backend(), TrainData(records, dcfg), TrainConfig(**base, text_encoder_train_steps=3)).run()
    full = Trainer(tiny_backend(), TrainData(records, dcfg), TrainConfig(**base)).run()
    for k, u in _te_ups(freeze3.lora).items():
        torch.testing.assert_close(u, _te_ups(at3.lora)[k])  # unchanged after step 3
    assert any(not torch.allclose(u, _te_ups(full.lora)[k]) for k, u in _te_ups(freeze3.lora).items())


def test_separate_unet_and_text_encoder_learning_rates(data):
    dcfg, records = data
    res = Trainer(tiny_backend(), TrainData(records, dcfg),
                  TrainConfig(steps=2, lr=1e-3, text_encoder_lr=1e-5, train_text_encoder=True)).run()
    te = max(m.up.abs().max().item() for k, m in res.lora.modules.items() if k.startswith("lora_te_"))
    unet = max(m.up.abs().max().item() for k, m in res.lora.modules.items() if k.startswith("lora_unet_"))
    # Adam's first steps move each weight by about lr: the two groups differ by the lr ratio.
    assert unet > 20 * te > 0
    assert res.lora.metadata["ss_text_encoder_lr"] == "1e-05" and res.lora.metadata["ss_unet_lr"] == "0.001"


@pytest.mark.parametrize("opt", [dict(min_snr_gamma=5.0), dict(loss_type="huber"), dict(loss_type="l1"),
                                 dict(pyramid_noise_iterations=4)])
def test_each_loss_option_changes_the_run(data, opt):
    dcfg, records = data
    plain = Trainer(tiny_backend(), TrainData(records, dcfg), TrainConfig(steps=3, seed=2)).run()
    other = Trainer(tiny_backend(), TrainData(records, dcfg), TrainConfig(steps=3, seed=2, **opt)).run()
    assert plain.losses != other.losses
    md = other.lora.metadata
    if "loss_type" in opt:
        assert md["ss_loss_type"] == opt["loss_type"]
    if "min_snr_gamma" in opt:
        assert md["ss_min_snr_gamma"] == "5.0"


def test_dora_trains_magnitudes_and_saves_dora_scale(tmp_path, data):
    dcfg, records = data
    res = Trainer(tiny_backend(), TrainData(records, dcfg), TrainConfig(steps=3, lr=1e-2, use_dora=True)).run()
    from lora_workbench.training.lora.files import save_lora

    path = save_lora(tmp_path / "d.safetensors", res.lora, dtype="fp32")
    back = load_lora(path)
    m = next(iter(back.modules.values()))
    assert m.dora_scale is not None and m.dora_scale.shape == (m.up.shape[0], 1)
    assert '"use_dora": true' in back.metadata["ss_network_args"]


def test_optimizer_choice_reaches_the_metadata(data):
    dcfg, records = data
    pytest.importorskip("prodigyopt")
    res = Trainer(tiny_backend(), TrainData(records, dcfg), TrainConfig(steps=2, lr=1.0, optimizer="prodigy")).run()
    assert "Prodigy" in res.lora.metadata["ss_optimizer"]


def test_too_few_class_images_says_how_many_are_missing(tmp_path, data):
    dcfg, records = data
    cls_cfg = tiny_dataset_cfg(make_images(tmp_path / "cls", n=3, seed=5), trigger="")
    with pytest.raises(DatasetError, match=r"needs 5 class images but 3 were given: 2 missing"):
        Trainer(tiny_backend(), TrainData(records, dcfg, scan_folder(cls_cfg), "a photo of a ball"),
                TrainConfig(num_class_images=5))


def test_class_images_are_cycled_and_fitted_to_the_instance_bucket(tmp_path):
    dcfg = tiny_dataset_cfg(make_images(tmp_path / "img", n=4))
    cls_cfg = tiny_dataset_cfg(make_images(tmp_path / "cls", n=3, seed=5, size=48), trigger="")
    tr = Trainer(tiny_backend(), TrainData(scan_folder(dcfg), dcfg, scan_folder(cls_cfg), "a photo of a ball"),
                 TrainConfig(batch_size=2))
    gen = tr.batches.micro_batches()
    seen = [c for _ in range(6) for c in next(gen).class_idx]
    assert len(seen) == 12 and all(seen[i:i + 3].count(j) == 1 for i in (0, 3, 6, 9) for j in range(3))
    mb = next(gen)
    x = tr.batches.latents(mb, [0, 1])
    assert x.shape[0] == 4  # instance and class samples stacked for one forward


def test_prior_preservation_run_reports_both_losses(tmp_path, data):
    dcfg, records = data
    cls_cfg = tiny_dataset_cfg(make_images(tmp_path / "cls", n=2, seed=5, captions=False), trigger="")
    res = Trainer(tiny_backend(), TrainData(records, dcfg, scan_folder(cls_cfg), "a photo of a ball"),
                  TrainConfig(steps=4, prior_loss_weight=0.5)).run()
    assert len(res.instance_losses) == len(res.prior_losses) == 4
    for total, inst, prior in zip(res.losses, res.instance_losses, res.prior_losses):
        assert total == pytest.approx(inst + 0.5 * prior, rel=1e-5)
    assert res.lora.metadata["ss_num_reg_images"] == "2"
    assert res.lora.metadata["lw_class_prompt"] == "a photo of a ball"
