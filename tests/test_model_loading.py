"""Models load in the dtype asked for, and a tokenizer's absurd model_max_length is clamped."""

import json
import logging

import torch
from diffusers import UNet2DConditionModel

from lora_workbench.training.model.backend import DiffusersBackend
from lora_workbench.training.model.tiny import save_tiny_pipeline


def test_a_diffusers_folder_loads_in_the_requested_dtype(tmp_path, monkeypatch):
    model = save_tiny_pipeline(tmp_path / "model")
    seen = []
    real = UNet2DConditionModel.from_pretrained.__func__

    def spy(cls, *a, **kw):
        unet = real(cls, *a, **kw)
        seen.append(next(unet.parameters()).dtype)  # as read, before any cast
        return unet

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", classmethod(spy))
    be = DiffusersBackend.from_pretrained(model, weight_dtype=torch.bfloat16)
    assert seen == [torch.bfloat16]
    assert {p.dtype for m in (be.unet, be.text_encoder, be.vae) for p in m.parameters()} == {torch.bfloat16}


def test_an_absurd_tokenizer_length_is_clamped_with_a_warning(tmp_path, caplog):
    model = save_tiny_pipeline(tmp_path / "model")
    cfg_path = model / "tokenizer" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_max_length"] = 8192  # as ComfyUI's sd1_tokenizer declares
    cfg_path.write_text(json.dumps(cfg))
    with caplog.at_level(logging.WARNING):
        be = DiffusersBackend.from_pretrained(model)
    positions = be.text_encoder.config.max_position_embeddings
    assert be.tokenizer.model_max_length == positions
    assert "model_max_length 8192" in caplog.text
    assert be.encode_prompts(["a photo of sks dog"]).shape[1] == positions
