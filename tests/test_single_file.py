"""Single-file checkpoints: a tiny SD1/SD2 model written in the LDM layout loads back exactly, offline.

The checkpoints are made here from the tiny diffusers components by the inverse of the renaming
diffusers' converters apply (UNet through ``unet_keys``, CLIP with ``cond_stage_model.*`` prefixes,
the VAE by hand), so a load that reproduces the original outputs shows the whole path is right.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch

from lora_workbench.training.model.backend import DiffusersBackend, ModelLoadError
from lora_workbench.training.model.single_file import (
    SHIPPED_CONFIGS,
    build_components,
    detect_prediction_type,
    load_model,
    load_single_file,
)
from lora_workbench.training.model.tokenizers import CLIP_L_REPO
from lora_workbench.training.model.tiny import (
    TINY_SCHEDULER,
    TINY_TEXT,
    TINY_UNET,
    TINY_VAE,
    tiny_vocab_size,
    write_tiny_tokenizer,
)
from lora_workbench.training.model.keys import layout_from_diffusers_config

from helpers import make_images, unet_diffusers_to_ldm

# ---- diffusers -> LDM (the inverse of diffusers' single-file converters) --------------------------


def unet_to_ldm(unet) -> dict:
    names = unet_diffusers_to_ldm(layout_from_diffusers_config(unet.config))
    out = {}
    for key, value in unet.state_dict().items():
        module, param = key.rsplit(".", 1)
        out[f"model.diffusion_model.{names[module]}.{param}"] = value
    return out


def clip_to_ldm(text_encoder) -> dict:
    # Real SD1 files use the (pre-transformers-5.6) ``text_model.`` level and carry position_ids.
    out = {"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v
           for k, v in text_encoder.state_dict().items()}
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return out


def open_clip_to_ldm(text_encoder, seed: int = 1) -> dict:
    """SD2's OpenCLIP layout: fused q/k/v, resblocks, plus the last block SD2 skips and the projection."""
    p = "cond_stage_model.model."
    sd = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out = {
        p + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        p + "positional_embedding": sd["embeddings.position_embedding.weight"],
        p + "ln_final.weight": sd["final_layer_norm.weight"],
        p + "ln_final.bias": sd["final_layer_norm.bias"],
    }
    parts = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    n = text_encoder.config.num_hidden_layers
    for i in range(n):
        hf, ldm = f"encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[ldm + f"attn.in_proj_{kind}"] = torch.cat([sd[hf + f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
            for a, b in parts.items():
                out[ldm + f"{b}.{kind}"] = sd[hf + f"{a}.{kind}"]
    g = torch.Generator().manual_seed(seed)
    last = f"{p}transformer.resblocks.{n - 1}."
    for k in [k for k in out if k.startswith(last)]:  # the 24th block SD2 does not use
        v = out[k]
        out[k.replace(last, f"{p}transformer.resblocks.{n}.")] = (
            torch.empty_like(v) if v.is_meta else torch.randn(v.shape, generator=g))
    width = text_encoder.config.hidden_size
    out[p + "text_projection"] = torch.empty(width, width, device=sd["final_layer_norm.weight"].device)
    out[p + "logit_scale"] = torch.ones((), device=sd["final_layer_norm.weight"].device)
    return out


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_name(key: str, levels: int) -> str:
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    rules = [
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
        (r"encoder\.down_blocks\.(\d+)\.resnets\.", lambda m: f"encoder.down.{m[1]}.block."),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: f"encoder.down.{m[1]}.downsample."),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block."),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample."),
    ]
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key)
    if m:
        key = f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
    return key


def vae_to_ldm(vae) -> dict:
    levels = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        name = _vae_name(key, levels)
        if ".mid.attn_1." in name and name.endswith(".weight") and name.split(".")[-2] != "norm":
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convs
        out["first_stage_model." + name] = value
    return out


def to_ldm(c: dict, sd2: bool = False) -> dict:
    te = open_clip_to_ldm(c["text_encoder"]) if sd2 else clip_to_ldm(c["text_encoder"])
    return {**unet_to_ldm(c["unet"]), **te, **vae_to_ldm(c["vae"])}


# ---- the tiny models -------------------------------------------------------------------------------


def tiny_components(seed: int = 0, sd2: bool = False) -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET, use_linear_projection=sd2)
    v = tiny_vocab_size()
    te_cfg = dict(TINY_TEXT, hidden_act="gelu") if sd2 else TINY_TEXT
    te = CLIPTextModel(CLIPTextConfig(vocab_size=v, bos_token_id=v - 2, eos_token_id=v - 1, pad_token_id=v - 1,
                                      **te_cfg))
    vae = AutoencoderKL(**TINY_VAE)
    # Random norms and biases too, so a swapped or dropped tensor cannot hide behind ones/zeros.
    with torch.no_grad():
        for m in (unet, te, vae):
            for p in m.parameters():
                if p.ndim == 1:
                    p.add_(0.1 * torch.randn_like(p))
    return dict(unet=unet.eval(), text_encoder=te.eval(), vae=vae.eval(), scheduler=DDPMScheduler(**TINY_SCHEDULER))


def write_configs(folder: Path, c: dict) -> Path:
    c["unet"].save_config(folder / "unet")
    c["vae"].save_config(folder / "vae")
    c["text_encoder"].config.save_pretrained(folder / "text_encoder")
    c["scheduler"].save_config(folder / "scheduler")
    return folder


class Tiny:
    def __init__(self, root: Path, sd2: bool = False, suffix: str = ".safetensors", extra: dict | None = None):
        self.components = tiny_components(sd2=sd2)
        self.tokenizer = write_tiny_tokenizer(root / "tok")
        self.config = write_configs(root / "cfg", self.components)
        self.state_dict = to_ldm(self.components, sd2)
        # What real files carry besides the three models: the DDPM buffers and (sometimes) EMA weights.
        self.state_dict["alphas_cumprod"] = torch.linspace(1, 0.01, 1000)
        self.state_dict["model_ema.decay"] = torch.tensor(0.9999)
        self.state_dict.update(extra or {})
        self.path = root / f"tiny{suffix}"
        save(self.path, self.state_dict)


def save(path: Path, sd: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({"state_dict": sd, "global_step": 10, "epoch": 1}, str(path))
    return path


@pytest.fixture
def tiny(tmp_path) -> Tiny:
    return Tiny(tmp_path)


@pytest.fixture
def no_tokenizer_anywhere(tmp_path, monkeypatch):
    """Hide this machine's ComfyUI and Hugging Face cache from the tokenizer search."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path


def assert_same_model(loaded, original):
    a, b = loaded.state_dict(), original.state_dict()
    assert sorted(a) == sorted(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ: {different[:5]}"


@torch.no_grad()
def assert_same_outputs(be: DiffusersBackend, c: dict):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500])
    ctx = torch.randn(2, 77, TINY_TEXT["hidden_size"], generator=g)
    torch.testing.assert_close(be.unet(x, t, encoder_hidden_states=ctx).sample,
                               c["unet"](x, t, encoder_hidden_states=ctx).sample, rtol=0, atol=1e-6)
    ids = be.tokenizer(["a photo of sks"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    torch.testing.assert_close(be.text_encoder(ids)[0], c["text_encoder"](ids)[0], rtol=0, atol=1e-6)
    img = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    torch.testing.assert_close(be.vae.encode(img).latent_dist.mean, c["vae"].encode(img).latent_dist.mean,
                               rtol=0, atol=1e-6)
    z = torch.randn(1, 4, 4, 4, generator=g)
    torch.testing.assert_close(be.vae.decode(z).sample, c["vae"].decode(z).sample, rtol=0, atol=1e-6)


# ---- loading -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_tiny_sd1_checkpoint_loads_exactly(tmp_path, suffix):
    tiny = Tiny(tmp_path, suffix=suffix)
    be = load_single_file(tiny.path, tokenizer=tiny.tokenizer, config_dir=tiny.config)
    for name in ("unet", "text_encoder", "vae"):
        assert_same_model(getattr(be, name), tiny.components[name])
    assert_same_outputs(be, tiny.components)
    assert (be.arch, be.prediction_type, be.model_name) == ("sd1", "epsilon", tiny.path.name)
    assert be.tokenizer.model_max_length == 77 and be.tokenizer.pad_token == "<|endoftext|>"
    torch.testing.assert_close(be.alphas_cumprod(), tiny.components["scheduler"].alphas_cumprod.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_fp16_fp32_file_loads_in_one_requested_dtype(tiny, tmp_path, dtype):
    mixed = {k: v.half() if v.is_floating_point() and i % 2 else v for i, (k, v) in enumerate(tiny.state_dict.items())}
    path = save(tmp_path / "mixed.safetensors", mixed)
    be = load_single_file(path, tokenizer=tiny.tokenizer, config_dir=tiny.config, weight_dtype=dtype)
    assert {p.dtype for m in (be.unet, be.text_encoder, be.vae) for p in m.parameters()} == {dtype}
    conv_in = mixed["model.diffusion_model.input_blocks.0.0.weight"]
    assert torch.equal(be.unet.conv_in.weight, conv_in.to(dtype))


def test_tiny_sd2_checkpoint_loads_exactly_with_v_prediction_marker(tmp_path):
    tiny = Tiny(tmp_path, sd2=True, extra={"v_pred": torch.tensor([])})
    be = load_single_file(tiny.path, tokenizer=tiny.tokenizer, config_dir=tiny.config)
    for name in ("unet", "text_encoder", "vae"):
        assert_same_model(getattr(be, name), tiny.components[name])
    assert_same_outputs(be, tiny.components)
    assert be.prediction_type == "v_prediction"
    assert be.tokenizer.pad_token == "!"  # OpenCLIP pads with "!" (id 0), not <|endoftext|>
    ids = be.tokenizer(["a"], padding="max_length", max_length=6).input_ids[0]
    assert ids[-1] == be.tokenizer.convert_tokens_to_ids("!") == 0


def test_sd2_prediction_type_heuristic():
    key = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    g = torch.Generator().manual_seed(0)
    assert detect_prediction_type({key: 0.2 * torch.randn(320, generator=g)}, "sd2") == "v_prediction"
    assert detect_prediction_type({key: 0.01 * torch.randn(320, generator=g)}, "sd2") == "epsilon"
    assert detect_prediction_type({}, "sd2") is None  # the config decides
    assert detect_prediction_type({key: 0.2 * torch.randn(320, generator=g)}, "sd1") is None


def test_load_model_dispatches_on_file_or_folder(tiny, tmp_path):
    from lora_workbench.training.model.tiny import save_tiny_pipeline

    assert load_model(tiny.path, tokenizer=tiny.tokenizer, config_dir=tiny.config).model_name == "tiny.safetensors"
    folder = save_tiny_pipeline(tmp_path / "pipe")
    assert load_model(folder).model_name == "pipe"


# ---- the tokenizer search ----------------------------------------------------------------------------


def test_missing_tokenizer_says_what_to_pass(tiny, no_tokenizer_anywhere):
    with pytest.raises(ModelLoadError) as e:
        load_single_file(tiny.path, config_dir=tiny.config)
    msg = str(e.value)
    assert "--tokenizer" in msg and "vocab.json + merges.txt" in msg
    assert "comfy/sd1_tokenizer" in msg and "COMFYUI_PATH" in msg
    assert str(no_tokenizer_anywhere / "home" / "comfy" / "ComfyUI" / "comfy" / "sd1_tokenizer") in msg


def test_wrong_tokenizer_folder_is_named(tiny, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"tokenizer folder .*empty has no vocab.json"):
        load_single_file(tiny.path, tokenizer=tmp_path / "empty", config_dir=tiny.config)


def test_tokenizer_found_in_a_diffusers_folder_and_in_comfyui(tiny, no_tokenizer_anywhere, monkeypatch):
    # A diffusers model folder: its tokenizer/ sub-folder is used.
    model_dir = no_tokenizer_anywhere / "some-diffusers-model"
    write_tiny_tokenizer(model_dir / "tokenizer")
    be = load_single_file(tiny.path, tokenizer=model_dir, config_dir=tiny.config)
    assert len(be.tokenizer) == tiny_vocab_size()
    # ComfyUI's data folder through COMFYUI_PATH (read, never imported).
    comfy = no_tokenizer_anywhere / "ComfyUI"
    write_tiny_tokenizer(comfy / "comfy" / "sd1_tokenizer")
    monkeypatch.setenv("COMFYUI_PATH", str(comfy))
    be = load_single_file(tiny.path, config_dir=tiny.config)
    assert len(be.tokenizer) == tiny_vocab_size()


def test_tokenizer_found_in_the_hugging_face_cache(tiny, no_tokenizer_anywhere):
    repo = no_tokenizer_anywhere / "hf-cache" / ("models--" + CLIP_L_REPO.replace("/", "--"))
    commit = "0" * 40
    write_tiny_tokenizer(repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    be = load_single_file(tiny.path, config_dir=tiny.config)
    assert len(be.tokenizer) == tiny_vocab_size()


# ---- files that are not what we need -----------------------------------------------------------------


def test_sdxl_checkpoint_is_refused_before_anything_loads(tiny, tmp_path):
    path = save(tmp_path / "xl.safetensors", {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": torch.zeros(77, 768),
        "conditioner.embedders.1.model.positional_embedding": torch.zeros(77, 1280),
    })
    with pytest.raises(ModelLoadError, match="SDXL checkpoints are not supported by the CLI yet;") as e:
        load_single_file(path, tokenizer=tiny.tokenizer)
    assert str(path) in str(e.value)


def test_sd2_in_the_sgm_layout_is_not_called_sdxl(tiny, tmp_path):
    path = save(tmp_path / "sgm.safetensors", {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
        "conditioner.embedders.0.model.positional_embedding": torch.zeros(77, 1024),
    })
    with pytest.raises(ModelLoadError, match="sgm layout") as e:
        load_single_file(path, tokenizer=tiny.tokenizer)
    assert "SDXL" not in str(e.value)


def test_inpainting_checkpoint_is_refused(tiny, tmp_path):
    sd = dict(tiny.state_dict)
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 9, 3, 3)
    with pytest.raises(ModelLoadError, match="inpainting model: its UNet takes 9 input channels"):
        load_single_file(save(tmp_path / "inpaint.safetensors", sd), tokenizer=tiny.tokenizer, config_dir=tiny.config)


def test_unknown_file_names_its_first_keys(tiny, tmp_path):
    path = save(tmp_path / "other.safetensors", {"foo.weight": torch.zeros(2), "bar.bias": torch.zeros(2)})
    with pytest.raises(ModelLoadError, match=r"not an SD1.x/SD2.x checkpoint.*\['bar.bias', 'foo.weight'\]"):
        load_single_file(path, tokenizer=tiny.tokenizer)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_truncated_file_error_names_the_file(tmp_path, suffix):
    tiny = Tiny(tmp_path, suffix=suffix)
    data = tiny.path.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="damaged or incomplete") as e:
        load_single_file(cut, tokenizer=tiny.tokenizer, config_dir=tiny.config)
    assert str(cut) in str(e.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match=re.escape(str(tmp_path / "nope.safetensors"))):
        load_single_file(tmp_path / "nope.safetensors")


def test_ckpt_with_python_objects_is_refused(tiny, tmp_path):
    path = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": tiny.state_dict, "callback": Path("x")}, str(path))
    with pytest.raises(ModelLoadError, match="weights_only=True"):
        load_single_file(path, tokenizer=tiny.tokenizer, config_dir=tiny.config)


def test_tiny_file_with_the_sd15_configs_says_the_widths_differ(tiny):
    with pytest.raises(ModelLoadError, match=r"width 32, but the config .*sd15 has cross_attention_dim 768"):
        load_single_file(tiny.path, tokenizer=tiny.tokenizer)


def test_missing_weight_is_named(tiny, tmp_path):
    sd = dict(tiny.state_dict)
    del sd["first_stage_model.decoder.mid.attn_1.q.weight"]
    with pytest.raises(ModelLoadError, match=r"1 VAE weights are missing .*decoder.mid_block.attentions.0.to_q.weight"):
        load_single_file(save(tmp_path / "holey.safetensors", sd), tokenizer=tiny.tokenizer, config_dir=tiny.config)


# ---- the shipped SD1.5 / SD2 configs, at full size on the meta device -----------------------------------

# Reference figures of the released models, independent of this code.
SD15_PARAMS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
SD15_LDM_KEYS = {"model.diffusion_model.": 686, "first_stage_model.": 248, "cond_stage_model.transformer.": 197}
SD15_LDM_SHAPES = {
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
    "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
    "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
    "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
}
SD2_UNET_PARAMS = 865_910_724


def meta_components(config_dir: Path) -> dict:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():
        return dict(
            unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(config_dir / "unet"))),
            vae=AutoencoderKL.from_config(AutoencoderKL.load_config(str(config_dir / "vae"))),
            text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(str(config_dir / "text_encoder"))),
        )


def _shapes(model) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_shipped_sd15_configs_build_sd15_and_convert_its_key_set():
    ref = meta_components(SHIPPED_CONFIGS["sd1"])
    assert {k: sum(p.numel() for p in m.parameters()) for k, m in ref.items()} == SD15_PARAMS
    ldm = to_ldm(ref)
    assert {p: sum(k.startswith(p) for k in ldm) for p in SD15_LDM_KEYS} == SD15_LDM_KEYS
    assert {k: tuple(ldm[k].shape) for k in SD15_LDM_SHAPES} == SD15_LDM_SHAPES
    built = build_components(ldm, "sd1", SHIPPED_CONFIGS["sd1"], "meta SD1.5")  # meta in, meta out
    for name, model in ref.items():
        assert _shapes(built[name]) == _shapes(model)
    assert built["scheduler"].config.prediction_type == "epsilon"


def test_shipped_sd2_configs_build_sd2_and_convert_its_key_set():
    ref = meta_components(SHIPPED_CONFIGS["sd2"])
    assert sum(p.numel() for p in ref["unet"].parameters()) == SD2_UNET_PARAMS
    assert ref["text_encoder"].config.num_hidden_layers == 23  # OpenCLIP-H minus the last block
    ldm = to_ldm(ref, sd2=True)
    assert sum(k.startswith("cond_stage_model.model.transformer.resblocks.") for k in ldm) == 24 * 12
    built = build_components(ldm, "sd2", SHIPPED_CONFIGS["sd2"], "meta SD2")
    for name, model in ref.items():
        assert _shapes(built[name]) == _shapes(model)


def test_shipped_configs_are_offline_diffusers_folders():
    for folder in SHIPPED_CONFIGS.values():
        index = json.loads((folder / "model_index.json").read_text())
        assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
        assert not (folder / "tokenizer").exists()  # the vocabulary is found, never shipped


# ---- the CLI -----------------------------------------------------------------------------------------


def _train_args(images, tiny, out, *extra):
    return ["train", str(images), "--model", str(tiny.path), "--tokenizer", str(tiny.tokenizer),
            "--model-config", str(tiny.config), "--out", str(out), "--steps", "2", "--device", "cpu",
            "--resolution", "32", "--bucket-step", "16", "--min-bucket-side", "16", "--max-bucket-side", "64",
            *extra]


def test_cli_trains_a_lora_from_a_single_file(tiny, tmp_path):
    from lora_workbench.app.cli import main
    from lora_workbench.training.lora.formats import load_lora

    images = make_images(tmp_path / "img", n=2)
    assert main(_train_args(images, tiny, tmp_path / "out", "--rank", "4")) == 0
    out = tmp_path / "out" / "lora.safetensors"
    lora = load_lora(out)
    assert lora.modules and all(k.startswith("lora_unet_") for k in lora.modules)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ss_sd_model_name"] == "tiny.safetensors"


def test_cli_reports_an_sdxl_file_cleanly(tiny, tmp_path, capsys):
    from lora_workbench.app.cli import main

    tiny.path = save(tmp_path / "xl.safetensors", {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
        "conditioner.embedders.1.model.positional_embedding": torch.zeros(77, 1280),
    })
    assert main(_train_args(make_images(tmp_path / "img", n=1), tiny, tmp_path / "out")) == 2
    assert "SDXL checkpoints are not supported by the CLI yet" in capsys.readouterr().err
