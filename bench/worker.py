"""One benchmark contender in its own process: loads its model once, then trains on command.

The orchestrator (``python -m bench``) starts one worker per contender kind and size, and sends
them JSON commands on stdin, one at a time, alternating between contenders; each answer is one
JSON line on stdout. A process of its own gives each contender an honest peak RSS (reset before
every run through ``/proc/self/clear_refs``) and keeps ComfyUI's globals out of the others' way.

Kinds:
- ``native``: ComfyUI's own ``TrainLoraNode`` (comfy_extras/nodes_train.py), called as ComfyUI
  calls nodes (under ``torch.inference_mode``), on latents and conditioning it is given (VAEEncode and
  CLIPTextEncode of the same images and caption, once). 0.3.64's node is a V1 class (``train``), 0.33's
  a V3 one (``execute``, every input a list); both are driven with the same settings.
- ``node``: our Train LoRA node's code path (``nodes.train_nodes.run_training``) on the same
  ComfyUI MODEL/CLIP/VAE.
- ``engine``: our engine standalone (``DiffusersBackend``), on the same shapes in diffusers classes.
- ``use``: LoRA stacks, sampling and merging in ComfyUI.

The device is the CPU (``--device cpu``: ComfyUI's ``--cpu``) or CUDA (``--device cuda``: ComfyUI picks
the GPU itself, the engine is put there); on CUDA each run also reports the peak of
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.models import SIZES, comfy_state_dict, diffusers_components, write_images

SEND = sys.stdout  # answers only; everything else printed goes to stderr
DEVICE = "cpu"  # set by main: cpu | cuda
sys.stdout = sys.stderr


def reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _status_bytes(field: str) -> int | None:
    """A ``/proc/self/status`` size (VmRSS, VmHWM) in bytes; None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss() -> int:
    return _status_bytes("VmRSS") or 0


def peak_rss() -> int:
    """Bytes: VmHWM since the last reset (Linux), else the process' lifetime maximum."""
    return _status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class StepClock:
    """Timestamps at the end of every optimizer step."""

    def __init__(self):
        self.stamps: list[float] = []

    def tick(self, *_args, **_kw):
        self.stamps.append(time.perf_counter())

    def durations(self, warmup: int) -> list[float]:
        d = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
        return d[max(0, warmup - 1):]


def release_memory() -> None:
    """Give freed memory back to the OS, so the next run's peak RSS starts from what is live."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cuda_in_use() -> bool:
    """True when this worker computes on a CUDA GPU (its ComfyUI is not ``--cpu``, or the engine is on CUDA)."""
    import torch

    return DEVICE == "cuda" and torch.cuda.is_available()


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


# ---- ComfyUI-side contenders --------------------------------------------------------------------
def boot_comfy(comfyui: Path, base: Path, device: str = "cpu"):
    """ComfyUI's modules with paths under ``base`` (no server, no custom-node scan), on the CPU
    (``--cpu``) or on the GPU ComfyUI finds by itself."""
    for sub in ("models/checkpoints", "models/loras", "input", "output"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(comfyui))
    import comfy.options  # noqa: F401
    from comfy.cli_args import args

    args.cpu = device == "cpu"
    # PyTorch's SDPA attention, which ComfyUI picks by itself on NVIDIA GPUs (on a CPU it would pick
    # sub-quadratic attention): the setting the GPU users this bench stands for train with.
    args.use_pytorch_cross_attention = True
    args.base_directory = str(base)
    import folder_paths  # noqa: F401
    import utils.extra_config  # noqa: F401
    import comfy.utils  # noqa: F401
    import nodes  # noqa: F401
    import comfy.model_management  # noqa: F401


class ComfyModels:
    def __init__(self, size: str):
        import torch

        import comfy.sd
        import folder_paths

        self.size = SIZES[size]
        if self.size.family == "flux":
            from bench import flux

            self.model, self.clip, self.vae = flux.load(Path(folder_paths.base_path))
        else:
            with torch.inference_mode():  # fp32 base weights on every device (a GPU would pick fp16)
                self.model, self.clip, self.vae, *_ = comfy.sd.load_state_dict_guess_config(
                    comfy_state_dict(size), model_options={"dtype": torch.float32})

        self.input_dir = Path(folder_paths.get_input_directory())
        self.images = write_images(self.input_dir / "bench_images", self.size.images, self.size.pixels)
        self.class_images = write_images(self.input_dir / "bench_class", self.size.images, self.size.pixels,
                                         caption="a photo of a ball")


class NativeWorker:
    def __init__(self, size: str):
        import torch

        import nodes

        self.m = ComfyModels(size)
        with torch.inference_mode():
            from PIL import Image
            import numpy as np

            pics = sorted(self.m.images.glob("*.png"))
            batch = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255)
                                 for p in pics])
            self.latents = nodes.VAEEncode().encode(self.m.vae, batch)[0]
            self.positive = nodes.CLIPTextEncode().encode(self.m.clip, "a photo of sks ball")[0]

    def train(self, variant: dict, steps: int, seed: int):
        import torch

        import comfy_extras.nodes_train as nt

        settings = dict(batch_size=1, steps=steps, grad_accumulation_steps=1, learning_rate=1e-4,
                        rank=variant["rank"], optimizer="AdamW", loss_function="MSE", seed=seed,
                        training_dtype="fp32", lora_dtype="fp32", algorithm="LoRA",
                        gradient_checkpointing=variant.get("gc", False), existing_lora="[None]")

        clock = StepClock()
        init = nt.TrainSampler.__init__

        def timed_init(sampler, *a, loss_callback=None, **kw):
            def cb(loss):
                if loss_callback:
                    loss_callback(loss)
                clock.tick()
            init(sampler, *a, loss_callback=cb, **kw)

        nt.TrainSampler.__init__ = timed_init
        try:
            with torch.inference_mode():
                if hasattr(nt.TrainLoraNode, "train"):  # 0.3.64: V1 node -> (model, lora, loss, steps)
                    lora = nt.TrainLoraNode().train(self.m.model, self.latents, self.positive, **settings)[1]
                else:  # 0.33: V3 node, every input a list (is_input_list) -> (lora, loss, steps)
                    extra = dict(quantized_backward=False, checkpoint_depth=1, offloading=False, bucket_mode=False,
                                 bypass_mode=False)
                    lists = {k: [v] for k, v in {**settings, **extra}.items()}
                    lora = nt.TrainLoraNode.execute(model=[self.m.model], latents=[self.latents],
                                                    positive=[self.positive], **lists).args[0]
        finally:
            nt.TrainSampler.__init__ = init
        trainable = sum(t.numel() for t in lora.values())
        return clock, trainable


def cache_encodes() -> None:
    """Each caption encoded once for the worker's life, as the native worker's CLIPTextEncode does once.

    A Flux caption costs a T5-XXL encode (~45 s on a 2-core CPU), which is not what the bench times:
    steps are timed after the first (where our trainer encodes its captions), so this saves wall time
    only, run after run."""
    from lora_workbench.nodes.comfy.dit_backend import ComfyDiTBackend

    encode, cache = ComfyDiTBackend.encode_prompts, {}

    def cached(backend, prompts):
        key = tuple(prompts)
        if key not in cache:
            cache[key] = encode(backend, prompts)
        return cache[key]

    ComfyDiTBackend.encode_prompts = cached


class NodeWorker:
    def __init__(self, size: str):
        from lora_workbench.nodes.dataset_nodes import LoadImageDataset

        self.m = ComfyModels(size)
        px = self.m.size.pixels
        common = dict(trigger_word="", default_caption="", resolution=px, aspect_buckets=False, bucket_step=64,
                      min_bucket_side=px, max_bucket_side=px, repeats=1, shuffle_tags=False, keep_tokens=0,
                      caption_dropout=0.0, flip=False)
        self.dataset = LoadImageDataset.execute(folder=str(self.m.images), **common).args[0]
        if self.m.size.family == "flux":
            cache_encodes()

    def train(self, variant: dict, steps: int, seed: int):
        import torch

        from lora_workbench.nodes import train_nodes
        from lora_workbench.nodes.types import ClassImagesPayload
        from lora_workbench.training.config import TrainConfig

        clock, trainable = StepClock(), []
        cls = train_nodes.ComfyCallbacks
        on_step, on_start = cls.on_step, cls.on_start

        def timed_step(cb, *a):
            on_step(cb, *a)
            clock.tick()

        cls.on_step = timed_step
        cls.on_start = lambda cb, total, n: trainable.append(n)
        cfg = TrainConfig(rank=variant["rank"], alpha=variant["rank"], preset=variant["preset"], steps=steps,
                          lr=1e-4, seed=seed, gradient_checkpointing=variant.get("gc", False),
                          mixed_precision=variant.get("precision", "no"), save_dtype="fp32",
                          output_name=f"bench_{seed}", prior_loss_weight=1.0)
        class_images = (ClassImagesPayload("a photo of a ball", folder=str(self.m.class_images))
                        if variant.get("prior") else None)
        try:
            with torch.inference_mode():
                train_nodes.run_training(self.m.model, self.m.clip, self.m.vae, self.dataset, class_images, cfg,
                                         node_id=None)
        finally:
            cls.on_step, cls.on_start = on_step, on_start
        return clock, trainable[0]


# ---- the standalone engine -----------------------------------------------------------------------
class EngineWorker:
    def __init__(self, size: str, device: str = "cpu"):
        from lora_workbench.training.model.backend import DiffusersBackend
        from lora_workbench.training.config import DatasetConfig
        from lora_workbench.training.data.dataset import scan_folder

        self.size = SIZES[size]
        self.tmp = Path(tempfile.mkdtemp(prefix="lw_bench_engine_"))
        self.backend = DiffusersBackend(**diffusers_components(size, self.tmp / "tokenizer"), device=device)
        px = self.size.pixels
        self.dcfg = DatasetConfig(path=str(write_images(self.tmp / "images", self.size.images, px)), resolution=px,
                                  enable_buckets=False, min_bucket_side=px, max_bucket_side=px)
        self.records = scan_folder(self.dcfg)
        ccfg = DatasetConfig(path=str(write_images(self.tmp / "class", self.size.images, px, "a photo of a ball")),
                             resolution=px, enable_buckets=False, min_bucket_side=px, max_bucket_side=px)
        self.class_records = scan_folder(ccfg)

    def train(self, variant: dict, steps: int, seed: int):
        from lora_workbench.training.config import TrainConfig
        from lora_workbench.training.train.trainer import TrainCallbacks, TrainData, Trainer

        clock, trainable = StepClock(), []

        class Callbacks(TrainCallbacks):
            def on_start(self, total_steps, trainable_params):
                trainable.append(trainable_params)

            def on_step(self, *a):
                clock.tick()

        cfg = TrainConfig(rank=variant["rank"], alpha=variant["rank"], preset=variant["preset"], steps=steps,
                          lr=1e-4, seed=seed, gradient_checkpointing=variant.get("gc", False),
                          mixed_precision=variant.get("precision", "no"), prior_loss_weight=1.0)
        prior = variant.get("prior")
        self._weights(variant.get("weights", "fp32"))
        data = TrainData(self.records, self.dcfg, self.class_records if prior else None,
                         "a photo of a ball" if prior else "")
        Trainer(self.backend, data, cfg, callbacks=Callbacks()).run()
        return clock, trainable[0]

    def _weights(self, name: str) -> None:
        """The frozen base in fp32, or in bf16 as GPU users run it (``--weight-dtype bf16``), converted
        in place between runs: one copy of the model, not one per dtype (the real size is 4 GB)."""
        import torch

        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        be = self.backend
        if be.weight_dtype != dtype:
            for m in (be.unet, be.text_encoder):
                m.to(dtype=dtype)
            be.weight_dtype = dtype
            release_memory()


# ---- using LoRAs: stacks, sampling, merging -------------------------------------------------------
class UseWorker:
    """3 random LoRAs of the model's attention layers; apply, sample and merge them."""

    def __init__(self, size: str):
        import torch

        self.m = ComfyModels(size)
        import folder_paths

        from lora_workbench.nodes.comfy.backend import ComfyBackend
        from lora_workbench.training.lora import network
        from lora_workbench.training.lora.files import save_lora

        lora_dir = Path(folder_paths.get_folder_paths("loras")[0])
        self.names = []
        backend = ComfyBackend(self.m.model, self.m.clip, self.m.vae)
        with torch.inference_mode(), backend.training_context():
            roots = backend.roots()
            targets = backend.lora_targets("attn_ff", False)
            for i in range(3):
                params = network.inject(roots, targets, 16, 16.0, seed=i, devices=backend.compute_devices())
                with torch.no_grad():
                    for p in params:
                        p.normal_(0, 0.02)
                lora = network.extract(roots, targets)
                network.remove(roots)
                path = lora_dir / f"bench_lora_{i}.safetensors"
                if not path.exists():
                    save_lora(path, lora, dtype="fp16")
                self.names.append(path.name)

    def apply_stack(self):
        import torch

        from lora_workbench.nodes.stack_nodes import ApplyLoraStack

        with torch.inference_mode():
            stack = [(name, 0.8, 0.8) for name in self.names]
            return ApplyLoraStack.execute(model=self.m.model, clip=self.m.clip, lora_stack=stack).args[:2]

    def chained(self):
        import torch

        import nodes

        with torch.inference_mode():
            m, c = self.m.model, self.m.clip
            for name in self.names:
                m, c = nodes.LoraLoader().load_lora(m, c, name, 0.8, 0.8)
            return m, c

    def merge(self, ours: bool) -> float:
        """Seconds to write a checkpoint with the 3 LoRAs merged in (ours, or ComfyUI's own way)."""
        import torch

        import nodes
        from comfy_extras.nodes_model_merging import CheckpointSave

        from lora_workbench.nodes.merge_nodes import MergeLorasToCheckpoint

        stack = [(name, 0.8, 0.8) for name in self.names]
        self.merges = getattr(self, "merges", 0) + 1
        t0 = time.perf_counter()
        with torch.inference_mode():
            if ours:
                MergeLorasToCheckpoint.execute(model=self.m.model, clip=self.m.clip, vae=self.m.vae,
                                               filename=f"bench/merged_{self.merges}", dtype="fp16", lora_stack=stack)
            else:
                m, c = self.chained()
                CheckpointSave().save(m, c, self.m.vae, filename_prefix=f"checkpoints/bench_native_{self.merges}")
        return time.perf_counter() - t0

    def sample(self, model, steps: int = 4):
        import torch

        import nodes

        with torch.inference_mode():
            pos = nodes.CLIPTextEncode().encode(self.m.clip, "a photo of sks ball")[0]
            neg = nodes.CLIPTextEncode().encode(self.m.clip, "")[0]
            px = self.m.size.pixels
            lat = nodes.EmptyLatentImage().generate(px, px, 1)[0]
            t0 = time.perf_counter()
            nodes.common_ksampler(model, 0, steps, 5.0, "euler", "normal", pos, neg, lat, denoise=1.0)
            return time.perf_counter() - t0


KINDS = {"native": NativeWorker, "node": NodeWorker, "engine": EngineWorker, "use": UseWorker}


def serve(kind: str, size: str, comfyui: str | None, device: str = "cpu") -> None:
    if kind in ("native", "node", "use"):
        boot_comfy(Path(comfyui), Path(tempfile.mkdtemp(prefix=f"lw_bench_{kind}_")), device)
    import torch

    torch.manual_seed(0)
    worker = KINDS[kind](size, device) if kind == "engine" else KINDS[kind](size)
    release_memory()
    SEND.write(json.dumps({"ready": True, "rss": peak_rss()}) + "\n")
    SEND.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            answer = handle(worker, cmd)
        except Exception as e:  # noqa: BLE001 - the orchestrator reports it and goes on
            import traceback

            traceback.print_exc()
            answer = {"error": f"{type(e).__name__}: {e}"}
        SEND.write(json.dumps(answer) + "\n")
        SEND.flush()


def handle(worker, cmd: dict) -> dict:
    op = cmd["op"]
    if op == "train":
        release_memory()
        cuda = cuda_in_use()
        if cuda:
            import torch

            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            vram_start = torch.cuda.memory_allocated()
        reset_peak_rss()
        start = current_rss()
        size = SIZES[cmd["size"]]
        clock, trainable = worker.train(cmd["variant"], size.warmup + size.measured, cmd["seed"])
        d = clock.durations(size.warmup)
        answer = {"step": statistics.median(d), "steps": d, "rss": peak_rss(), "rss_start": start,
                  "trainable": trainable}
        if cuda:
            answer.update(vram=torch.cuda.max_memory_allocated(), vram_start=vram_start)
        release_memory()  # an idle worker holds only what is live, beside the one that runs
        return answer
    if op == "flops":
        # One step's FLOPs: a 2-step run minus a 1-step run (set-up work such as encoding cancels).
        one = count_flops(lambda: worker.train(cmd["variant"], 1, 0))
        two = count_flops(lambda: worker.train(cmd["variant"], 2, 0))
        return {"flops": two - one}
    if op == "use":
        # Applying only adds patches (ComfyUI patches weights when it loads the model): quick and
        # noisy, so each way is timed 10 times, alternating, and the medians are kept.
        t_stack, t_chain = [], []
        for _ in range(10):
            t0 = time.perf_counter()
            m_stack, _ = worker.apply_stack()
            t_stack.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            m_chain, _ = worker.chained()
            t_chain.append(time.perf_counter() - t0)
        t_stack, t_chain = statistics.median(t_stack), statistics.median(t_chain)
        out = {"apply_stack": t_stack, "apply_chained": t_chain}
        # Each model sampled twice in a row, the second timed: the first pays for (un)patching weights.
        for key, model in (("base", worker.m.model), ("stack", m_stack), ("chained", m_chain)):
            worker.sample(model)
            out[f"sample_{key}"] = worker.sample(model)
        out["merge_ours"], out["merge_native"] = worker.merge(True), worker.merge(False)
        return out
    raise ValueError(f"unknown op {op!r}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=list(KINDS))
    p.add_argument("size", choices=list(SIZES))
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"))
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ns = p.parse_args()
    global DEVICE
    DEVICE = ns.device
    serve(ns.kind, ns.size, ns.comfyui, ns.device)


if __name__ == "__main__":
    main()
