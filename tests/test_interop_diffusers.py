"""A LoRA the engine saves loads in diffusers' own ``load_lora_weights`` with the same effect."""

import pytest
import torch

from lora_workbench.training.config import TrainConfig
from lora_workbench.training.data.dataset import scan_folder
from lora_workbench.training.lora.files import save_lora
from lora_workbench.training.lora.formats import load_lora
from lora_workbench.training.model.tiny import build_tiny_components
from lora_workbench.training.train.trainer import TrainData, Trainer

from helpers import make_images, tiny_backend, tiny_dataset_cfg


@pytest.mark.parametrize("preset", ["attn", "attn_ff", "all"])
def test_diffusers_load_lora_weights_reproduces_engine_outputs(tmp_path, preset):
    from diffusers import StableDiffusionPipeline

    dcfg = tiny_dataset_cfg(make_images(tmp_path / "img", n=2))
    be = tiny_backend(seed=0)
    cfg = TrainConfig(rank=4, alpha=2, preset=preset, steps=4, lr=5e-3, train_text_encoder=True,
                      save_dtype="fp32")
    # Large lr, few steps: the LoRA must move the outputs visibly, or equality would prove nothing.
    result = Trainer(be, TrainData(scan_folder(dcfg), dcfg), cfg).run(keep_injected=True)
    path = save_lora(tmp_path / "l.safetensors", result.lora, dtype="fp32")

    pipe = StableDiffusionPipeline(**build_tiny_components(seed=0), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    g = torch.Generator().manual_seed(0)
    ids = pipe.tokenizer(["a photo of sks ball"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    x = torch.randn(1, 4, 8, 8, generator=g)
    t = torch.tensor([500])
    with torch.no_grad():
        base_te = pipe.text_encoder(ids)[0]
        base_unet = pipe.unet(x, t, encoder_hidden_states=base_te).sample
        pipe.load_lora_weights(str(path))
        ours_te = be.text_encoder(ids)[0]
        ours_unet = be.unet(x, t, encoder_hidden_states=ours_te).sample
        theirs_te = pipe.text_encoder(ids)[0]
        theirs_unet = pipe.unet(x, t, encoder_hidden_states=theirs_te).sample

    assert (ours_unet - base_unet).abs().max() > 1e-3, "training did not change the UNet output"
    assert (ours_te - base_te).abs().max() > 1e-3, "training did not change the text encoder output"
    torch.testing.assert_close(theirs_te, ours_te, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs_unet, ours_unet, atol=1e-5, rtol=1e-5)


def test_saved_file_reads_back_to_the_same_tensors(tmp_path):
    dcfg = tiny_dataset_cfg(make_images(tmp_path / "img", n=2))
    result = Trainer(tiny_backend(), TrainData(scan_folder(dcfg), dcfg),
                     TrainConfig(steps=2, preset="all", train_text_encoder=True, lr=1e-3)).run()
    path = save_lora(tmp_path / "a.safetensors", result.lora, dtype="fp32")
    back = load_lora(path)
    assert back.modules.keys() == result.lora.modules.keys()
    for k, m in result.lora.modules.items():
        assert torch.equal(back.modules[k].down, m.down) and torch.equal(back.modules[k].up, m.up), k
        assert back.modules[k].alpha == pytest.approx(m.alpha)
