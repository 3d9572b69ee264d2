"""Boot ComfyUI in this process on the CPU with our pack linked into a temporary base directory.

The boot itself, and running prompts, is ``lora_workbench.app.headless`` (what ``lora-workbench run``
uses); this adds the test layout: a ``--base-directory`` with our repo linked into ``custom_nodes``,
checks that ComfyUI loaded the pack from there, and a ComfyUI server subprocess for the browser and
runner tests.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from lora_workbench.app.headless import InProcessHost, boot
from lora_workbench.app.workflow_runner import PromptInvalidError, PromptRun

REPO_ROOT = Path(__file__).resolve().parents[2]  # the pack: its __init__.py is what ComfyUI imports
PACK_FOLDER_NAME = "lora-workbench"
BASE_SUBFOLDERS = ("models/checkpoints", "models/loras", "input", "output", "custom_nodes")
__all__ = ["ComfyHost", "ComfyServer", "PromptInvalidError", "PromptRun", "boot_in_process", "make_base_directory",
           "make_photos", "start_server"]


def make_base_directory(base_directory: Path, repo_root: Path) -> Path:
    """Lay out a ComfyUI ``--base-directory`` with our repo linked into ``custom_nodes``.

    Returns the pack's path inside ``custom_nodes``.
    """
    for sub in BASE_SUBFOLDERS:
        (base_directory / sub).mkdir(parents=True, exist_ok=True)
    pack_dir = base_directory / "custom_nodes" / PACK_FOLDER_NAME
    if not pack_dir.exists():
        pack_dir.symlink_to(repo_root, target_is_directory=True)
    return pack_dir


@dataclass
class ComfyHost:
    """ComfyUI running in this process (``headless.InProcessHost``), our pack loaded from
    ``custom_nodes/lora-workbench``; every attribute of the host is reachable here."""

    host: InProcessHost
    pack_dir: Path
    pack_import_line: str  # ComfyUI's "Import times for custom nodes" line for our pack

    def __getattr__(self, name):
        if name == "host":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.host, name)


def boot_in_process(comfyui_path: Path, base_directory: Path, repo_root: Path) -> ComfyHost:
    """Start ComfyUI in this process (CPU, paths under ``base_directory``) with our pack loaded."""
    pack_dir = make_base_directory(base_directory, repo_root)
    host = boot(comfyui_path, base_directory=base_directory, cpu=True, extra_model_paths=False)
    import nodes

    pack_lines = [m for m in host.import_log if "seconds" in m and str(pack_dir) in m]
    assert pack_lines, f"ComfyUI did not try to load {pack_dir}; log:\n" + "\n".join(host.import_log)
    assert "IMPORT FAILED" not in pack_lines[0], "\n".join(
        m for m in host.import_log if "Traceback" in m or str(pack_dir) in m or "comfy_entrypoint" in m
    )
    assert nodes.LOADED_MODULE_DIRS.get(PACK_FOLDER_NAME) == str(pack_dir.absolute())
    return ComfyHost(host, pack_dir, pack_lines[0])


# ---- a real ComfyUI server ----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ComfyServer:
    process: subprocess.Popen
    url: str
    base_directory: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)


def start_server(comfyui_path: Path, base_directory: Path, repo_root: Path, *, checkpoints=(),
                 wait_seconds: float = 180) -> ComfyServer:
    """``main.py --cpu`` on a free port of 127.0.0.1, our pack in ``custom_nodes`` of ``base_directory``
    and ``checkpoints`` linked into its models/checkpoints. Waits (bounded) until /object_info answers;
    the caller must ``stop()`` it."""
    make_base_directory(base_directory, repo_root)
    for ckpt in checkpoints:
        target = base_directory / "models" / "checkpoints" / Path(ckpt).name
        if not target.exists():
            target.symlink_to(Path(ckpt).resolve())
    port = free_port()
    log_path = base_directory / "server.log"
    command = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--base-directory", str(base_directory), "--database-url", "sqlite:///:memory:",
               "--disable-api-nodes", "--disable-auto-launch"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, cwd=comfyui_path, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    server = ComfyServer(process, f"http://127.0.0.1:{port}", base_directory, log_path)
    deadline = time.monotonic() + wait_seconds
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {process.returncode} while starting:\n{server.log()[-4000:]}")
            try:
                with urllib.request.urlopen(server.url + "/object_info/LW_TrainLoRA", timeout=5) as r:
                    if b"LW_TrainLoRA" in r.read():
                        return server
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"ComfyUI did not answer within {wait_seconds:g} s:\n{server.log()[-4000:]}")
            time.sleep(0.5)
    except BaseException:
        server.stop()
        raise


def make_photos(folder: Path, n: int = 3, size: int = 64, caption: str = "a photo of a ball") -> Path:
    """n small captioned pictures (a red disc on varied backgrounds) to train on."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (size, size), tuple(rng.randint(0, 255) for _ in range(3)))
        ImageDraw.Draw(img).ellipse([size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill=(220, 20, 20))
        img.save(folder / f"img_{i}.png")
        (folder / f"img_{i}.txt").write_text(caption)
    return folder


def assert_every_lora_key_loaded(log_text: str, model, clip, lora) -> None:
    """ComfyUI's loader took every module of ``lora``: no "lora key not loaded" in the log, and one
    patch per UNet module on the MODEL and per text-encoder module on the CLIP."""
    assert "lora key not loaded" not in log_text, log_text
    n_unet = sum(name.startswith("lora_unet_") for name in lora.modules)
    assert len(model.patches) == n_unet
    assert len(clip.patcher.patches) == len(lora.modules) - n_unet


def train_on_fixed_set(backend, records, dcfg, cfg, caption: str, callbacks=None) -> dict:
    """Train ``backend`` as Train LoRA does (inference mode, the host's training context), with the loss of a
    fixed set (the records' latents, fixed noise, sigmas 0.3 / 0.7, ``caption``) before and after, and the trained
    model's raw output on it. Returns {trainer, result, before, after, x_t, sigma, cond, trained_out}."""
    import torch

    from lora_workbench.training.train.schedules import flow_add_noise, flow_target
    from lora_workbench.training.train.trainer import TrainData, Trainer
    from test_flux_nodes import pixels

    trainer = Trainer(backend, TrainData(records, dcfg), cfg, callbacks)
    g = torch.Generator().manual_seed(7)
    with torch.inference_mode(), backend.training_context():
        x0 = backend.encode_images(pixels(records))
        noise = torch.randn(x0.shape, generator=g)
        sigma = torch.tensor([0.3, 0.7])[: len(records)]
        cond = backend.encode_prompts([caption] * len(records))
        target = flow_target(x0, noise)
        x_t = flow_add_noise(x0, noise, sigma)

        def fixed_loss():
            with torch.no_grad():
                return float(((backend.predict(x_t, sigma, cond).float() - target) ** 2).mean())

        before = fixed_loss()
        result = trainer.run(keep_injected=True)
        after = fixed_loss()
        with torch.no_grad():
            trained_out = backend.predict(x_t, sigma, cond).float()
    return dict(trainer=trainer, result=result, before=before, after=after, x_t=x_t, sigma=sigma, cond=cond,
                trained_out=trained_out)


def train_family_lora(models, photos: Path, *, name: str, steps: int, rank: int, alpha: float, lr: float,
                      caption: str, callbacks=None, **options) -> dict:
    """A DiT family's LoRA trained through the node's code path on every Linear of its blocks (preset "all") from
    ``models`` = (MODEL, CLIP, VAE, file names or path) as a user's graph loads them, with a fixed set's loss
    before and after (``train_on_fixed_set``). Adds the backend, whether the CLIP is still loaded after the run
    (the text encoder should leave once the prompts are encoded), and the run's metadata on the LoRA."""
    import comfy.model_management as mm

    from lora_workbench.nodes.comfy.backend import comfy_backend
    from lora_workbench.training.config import TrainConfig
    from test_flux_nodes import make_dataset

    model, clip, vae, files = models
    records, dcfg = make_dataset(photos)
    backend = comfy_backend(model, clip, vae, model_name=files["dit"] if isinstance(files, dict) else files.name)
    cfg = TrainConfig(rank=rank, alpha=alpha, preset="all", steps=steps, lr=lr, seed=0, output_name=name, **options)
    out = train_on_fixed_set(backend, records, dcfg, cfg, caption, callbacks)
    out["clip_loaded"] = any(m.model is clip.patcher for m in mm.current_loaded_models)
    out["result"].lora.metadata.update(out["trainer"].metadata(steps))
    return dict(out, backend=backend)


def save_trained(comfy_host, lora, folder: str) -> str:
    """``lora`` saved as the nodes save it (fp32) in the host's loras/<folder>; the name LoraLoader lists."""
    from lora_workbench.training.lora.files import save_lora

    path = comfy_host.base_directory / "models" / "loras" / folder / "trained.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_lora(path, lora, dtype="fp32", overwrite=True)
    return f"{folder}/trained.safetensors"


def comfy_denoised(model, x_t, sigma, cond):
    """What ComfyUI's ``apply_model`` samples with for a DiT backend's ``cond`` (``DiTCond``): the model's own
    ``extra_conds`` of the text states, pooled output and guidance, then ``denoised`` at ``sigma``."""
    import comfy.model_management as mm
    import torch

    kwargs = {"cross_attn": torch.cat(cond.contexts)}
    if cond.pooled[0] is not None:
        kwargs["pooled_output"] = torch.cat(cond.pooled)
    if cond.guidance is not None:
        kwargs["guidance"] = cond.guidance
    with torch.inference_mode():
        mm.load_models_gpu([model])
        conds = {k: v.process_cond(batch_size=len(sigma), device=x_t.device, area=None).cond
                 for k, v in model.model.extra_conds(noise=x_t, device=x_t.device, **kwargs).items()}
        return model.model.apply_model(x_t, sigma, **conds).float()


def loraloader_output(model, clip, vae, lora_name: str, x_t, sigma, cond):
    """(MODEL, CLIP, raw output) after ComfyUI's LoraLoader applies ``lora_name`` at 1.0: the backend's
    prediction on the patched weights (patched in place, as sampling does)."""
    import comfy.model_management as mm
    import nodes
    import torch

    from lora_workbench.nodes.comfy.backend import comfy_backend

    with torch.inference_mode():
        m, c = nodes.LoraLoader().load_lora(model, clip, lora_name, 1.0, 1.0)
        mm.load_models_gpu([m], force_patch_weights=True)
    be = comfy_backend(m, c, vae)
    with torch.inference_mode(), be.training_context(), torch.no_grad():
        return m, c, be.predict(x_t, sigma, cond).float()


def assert_loraloader_reproduces(trained: dict, models, saved: str, caplog) -> None:
    """ComfyUI's LoraLoader given the ``saved`` file of a ``train_family_lora`` run loads every key, and the patched
    MODEL computes the trained model's output on the fixed set to 1e-5. ``models``: (MODEL, CLIP, VAE, ...)."""
    import logging

    import torch

    model, clip, vae = models[:3]
    with caplog.at_level(logging.WARNING):
        m, c, patched = loraloader_output(model, clip, vae, saved, trained["x_t"], trained["sigma"], trained["cond"])
    assert_every_lora_key_loaded(caplog.text, m, c, trained["result"].lora)
    assert torch.allclose(patched, trained["trained_out"], atol=1e-5), (patched - trained["trained_out"]).abs().max()


def load_tiny_dit(family: str, files: dict):
    """(MODEL, CLIP, VAE) of a tiny DiT set loaded as a user's graph loads it: UNETLoader, DualCLIPLoader (flux)
    or CLIPLoader (chroma), VAELoader."""
    import nodes
    import torch

    with torch.inference_mode():
        model = nodes.UNETLoader().load_unet(files["dit"], "default")[0]
        if family == "chroma":
            clip = nodes.CLIPLoader().load_clip(files["t5xxl"], "chroma")[0]
        else:
            clip = nodes.DualCLIPLoader().load_clip(files["clip_l"], files["t5xxl"], "flux")[0]
        vae = nodes.VAELoader().load_vae(files["vae"])[0]
    return model, clip, vae


def release_models() -> None:
    """Every model ComfyUI holds unloaded and freed (the next family's set loads after)."""
    import gc

    import comfy.model_management as mm

    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()


def set_folder(tmp_path_factory, name: str) -> Path:
    """The session's one folder for the tiny model set ``name``: the conftest fixtures and the modules that load
    a set themselves build into it (each file written once, an existing one kept) rather than each writing a
    copy of its GB-sized files (CI's host parts have about 12 GB of disk)."""
    folder = tmp_path_factory.getbasetemp() / "sets" / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def check_stack_grid_and_merges(comfy_host, model, clip, vae, saved: str, folder: str, sample, *, caption: str,
                                trigger: str, rank: int, seed: int, blocks_error: str, config_name: str,
                                caplog) -> None:
    """What a user does with a trained DiT LoRA, checked on one family's tiny set: LoRA Stack equals chained
    LoraLoaders and moves the sample; block weights NONE give the base image and a wrong count names the family's;
    the LoRA Grid renders None / the LoRA at strengths 0 and 1; a concat merge loads every key and samples as the
    stack; the diffusion-model merge (no clip, no vae) loads in Load Diffusion Model as ``config_name`` and samples
    as the stack. ``sample(model, cond)``: the family's 2-step render of a latent."""
    import gc
    import logging

    import comfy.model_management as mm
    import comfy.sd
    import nodes
    import pytest
    import safetensors
    import torch

    from lora_workbench.nodes.grid_nodes import LoraGrid
    from lora_workbench.nodes.merge_nodes import MergeLoras, MergeLorasToCheckpoint
    from lora_workbench.training.lora.block_weights import BlockWeightError
    from lora_workbench.training.lora.files import save_lora
    from test_flux_use_nodes import apply_stack, stack_rows

    with torch.inference_mode():
        cond = clip.encode_from_tokens_scheduled(clip.tokenize(caption))
    base = sample(model, cond)
    stack = stack_rows([{"lora": saved, "model_strength": 0.8}])
    with caplog.at_level(logging.WARNING):
        m, _, triggers = apply_stack(model, clip, stack)
    assert "lora key not loaded" not in caplog.text and triggers == trigger
    with torch.inference_mode():
        chained = nodes.LoraLoader().load_lora(model, clip, saved, 0.8, 1.0)[0]
    stacked = sample(m, cond)
    assert (stacked - base).abs().max() > 1e-3 and torch.equal(stacked, sample(chained, cond))
    full = stack_rows([{"lora": saved}])
    assert torch.equal(sample(apply_stack(model, clip, full, "NONE")[0], cond), base)
    with pytest.raises(BlockWeightError, match=blocks_error):
        apply_stack(model, clip, full, "1,2,3")

    with torch.inference_mode():
        grid, images = LoraGrid.execute(model, clip, vae, loras=f"None\n{saved}", strengths="0, 1", positive=caption,
                                        negative="", seed=seed, steps=2, cfg=1.0, sampler_name="euler",
                                        scheduler="simple", width=64, height=64).result
    assert images.shape == (4, 64, 64, 3) and torch.equal(images[0], images[2])
    assert (images[3] - images[0]).abs().max() > 1e-3

    concat = MergeLoras.execute("concat", rank, lora_stack=stack).result[0]
    save_lora(comfy_host.base_directory / "models" / "loras" / folder / "concat.safetensors", concat, dtype="fp32",
              overwrite=True)
    caplog.clear()
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        m2, c2 = nodes.LoraLoader().load_lora(model, clip, f"{folder}/concat.safetensors", 1.0, 1.0)
    assert_every_lora_key_loaded(caplog.text, m2, c2, concat)
    assert torch.allclose(sample(m2, cond), stacked, atol=1e-5)

    # The diffusion model alone (clip and vae unconnected), as these families are shared and loaded: their text
    # encoders are separate multi-GB files a merge has no reason to copy.
    with torch.inference_mode():
        merged_path = MergeLorasToCheckpoint.execute(model, None, None, f"{folder}/merged", "fp32",
                                                     lora_stack=stack).result[0]
    merged = None
    try:
        assert Path(merged_path).parent.parent.name == "diffusion_models", merged_path
        with safetensors.safe_open(merged_path, "pt") as f:
            assert {k.split(".")[0] for k in f.keys()} == {"model"}, "only the diffusion model is in the file"
        with torch.inference_mode():  # what Load Diffusion Model (UNETLoader) does
            merged = comfy.sd.load_diffusion_model(merged_path)
        assert type(merged.model.model_config).__name__ == config_name
        assert torch.allclose(sample(merged, cond), stacked, atol=1e-5)
    finally:
        merged = None
        mm.unload_all_models()
        gc.collect()
        os.unlink(merged_path)
