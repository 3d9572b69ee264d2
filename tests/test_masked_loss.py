"""Masked loss (masked_loss / --masked-loss): a <name>_mask.png beside an image, or its alpha channel, weighs the loss
per latent pixel after the same fit to the bucket as the pixels; a masked-out region gives no gradient; a mask whose
size does not match its image fails at the scan, before any model loads."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lora_workbench.training.config import DatasetError, TrainConfig
from lora_workbench.training.data.buckets import load_mask
from lora_workbench.training.data.dataset import dataset_fingerprint, scan_folder
from lora_workbench.training.train import losses as L
from lora_workbench.training.train.trainer import TrainData, Trainer

from helpers import make_images, tiny_backend, tiny_dataset_cfg


def half_mask(path, size=(32, 32), left_white=True):
    w, h = size
    m = Image.new("L", size, 0)
    m.paste(255, (0, 0, w // 2, h) if left_white else (w // 2, 0, w, h))
    m.save(path)


def test_a_masked_out_region_gets_no_gradient():
    pred = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randn(2, 4, 8, 8)
    mask = torch.ones(2, 1, 8, 8)
    mask[:, :, :, 4:] = 0  # the right half ignored
    for loss_type, c in (("mse", None), ("l1", None), ("huber", 0.1)):
        pred.grad = None
        L.per_sample_loss(pred, target, loss_type, c, mask).sum().backward()
        assert torch.all(pred.grad[..., 4:] == 0) and torch.all(pred.grad[..., :4] != 0), loss_type
    full = L.per_sample_loss(pred, target)
    torch.testing.assert_close(L.per_sample_loss(pred, target, mask=torch.ones(2, 1, 8, 8)), full)


def test_mask_files_are_not_trained_and_fit_the_bucket_as_the_pixels_do(tmp_path):
    folder = make_images(tmp_path / "img", n=2, size=32)
    half_mask(folder / "img_00_mask.png")
    cfg = tiny_dataset_cfg(folder, masked_loss=True)
    records = scan_folder(cfg)
    assert [r.name for r in records] == ["img_00.png", "img_01.png"]  # the mask is not a training image
    assert records[0].mask_path.endswith("img_00_mask.png") and records[1].mask_path is None
    m = load_mask(records[0], cfg, flip=False, latent_size=(4, 4))
    assert m.shape == (1, 4, 4) and torch.all(m[..., :2] == 1) and torch.all(m[..., 2:] == 0)
    flipped = load_mask(records[0], cfg, flip=True, latent_size=(4, 4))
    torch.testing.assert_close(flipped, m.flip(-1))
    assert torch.all(load_mask(records[1], cfg, flip=False, latent_size=(4, 4)) == 1)  # no mask: everywhere
    # without masked_loss the file is just another image, as before
    assert len(scan_folder(tiny_dataset_cfg(folder))) == 3
    # the mask is part of the data: changing it changes the fingerprint a resume checks
    before = dataset_fingerprint(records)
    half_mask(folder / "img_00_mask.png", left_white=False)
    import os
    os.utime(folder / "img_00_mask.png", ns=(1, 1))
    assert dataset_fingerprint(scan_folder(cfg)) != before


def test_the_alpha_channel_is_the_mask_when_there_is_no_mask_file(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    rgba = Image.new("RGBA", (32, 32), (200, 30, 30, 255))
    rgba.paste((200, 30, 30, 0), (0, 16, 32, 32))  # the bottom half transparent
    rgba.save(folder / "a.png")
    cfg = tiny_dataset_cfg(folder, masked_loss=True)
    (record,) = scan_folder(cfg)
    m = load_mask(record, cfg, flip=False, latent_size=(4, 4))
    assert torch.all(m[:, :2] == 1) and torch.all(m[:, 2:] == 0)


def test_a_mask_of_another_size_fails_at_the_scan_naming_both(tmp_path):
    folder = make_images(tmp_path / "img", n=2, size=32)
    half_mask(folder / "img_01_mask.png", size=(48, 32))
    with pytest.raises(DatasetError, match=r"img_01_mask.png is 48x32 but img_01.png is 32x32"):
        scan_folder(tiny_dataset_cfg(folder, masked_loss=True))


def test_training_with_everything_masked_out_learns_nothing(tmp_path):
    folder = make_images(tmp_path / "img", n=2, size=32)
    for name in ("img_00", "img_01"):
        Image.new("L", (32, 32), 0).save(folder / f"{name}_mask.png")
    dcfg = tiny_dataset_cfg(folder, masked_loss=True)
    cfg = TrainConfig(rank=4, alpha=4, steps=3, lr=1e-2, weight_decay=0.0, seed=1)
    result = Trainer(tiny_backend(), TrainData(scan_folder(dcfg), dcfg), cfg).run()
    assert result.losses == [0.0, 0.0, 0.0]
    assert all(not m.up.any() for m in result.lora.modules.values())  # up starts at zero and got no gradient
    half = tiny_dataset_cfg(make_images(tmp_path / "img2", n=2, size=32), masked_loss=True)
    trained = Trainer(tiny_backend(), TrainData(scan_folder(half), half), cfg).run()
    assert any(m.up.any() for m in trained.lora.modules.values())  # no masks: it learns
