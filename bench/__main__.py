"""``python -m bench train``: our trainer against ComfyUI's native one and diffusers' script.

Every contender runs in a worker process of its own (bench/worker.py) that loads its model once;
the runs alternate A B A B between contenders so that the load of this shared machine falls on
all of them alike, and each ratio is taken pair by pair (run i of A against run i of B, adjacent
in time). With ``--sequential`` one worker is alive at a time (its runs still alternate with the
other contenders of its kind): for models whose set does not fit twice in this machine's memory.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.models import SIZES, write_diffusers_folder, write_images

REPO = Path(__file__).resolve().parents[1]
RANK = 16
GPU_SIZES = ("real512", "sdxl", "flux512")
FLUX_SIZES = ("flux", "flux512")
COMFY_SIZES = ("tiny", "real", "flux") + GPU_SIZES  # where the ComfyUI contenders run


@dataclass
class Contender:
    name: str
    kind: str  # worker kind: native | node | engine | diffusers
    variant: dict
    what: str
    reference: str | None = None  # the contender its ratio is taken against
    sizes: tuple = ("tiny", "real")  # where it runs (the slowest variants only where they tell something)
    count_flops: tuple = ("tiny", "real")
    results: list[dict] = field(default_factory=list)
    flops: int | None = None


# What each side trains on a Flux-shaped DiT, where it differs from the UNet wording.
FLUX_WHAT = {
    "native": "ComfyUI TrainLoraNode: every Linear of the DiT (blocks incl. modulation, and img_in, txt_in, "
              "time/vector/guidance embedders, final layer) + norm/bias diffs, gradient checkpointing (its default)",
    "native-nogc": "ComfyUI TrainLoraNode: every Linear of the DiT (blocks incl. modulation, and img_in, txt_in, "
                   "time/vector/guidance embedders, final layer) + norm/bias diffs, no checkpointing",
    "ours-all": "our Train LoRA node, preset all: every Linear in the double/single blocks incl. modulation "
                "(kohya lora_flux's default; not the outer layers)",
    "ours-all-gc": "our Train LoRA node, preset all (block Linears), gradient checkpointing",
    "ours-attn": "our Train LoRA node, preset attn (our default): qkv/proj of both streams, single-block linear1/linear2",
    "ours-all-bf16": "our Train LoRA node, preset all (block Linears), bf16 autocast (LoRA fp32)",
}


def what(c: Contender, size: str) -> str:
    return FLUX_WHAT.get(c.name, c.what) if SIZES[size].family == "flux" else c.what


def contenders(with_native: bool, with_diffusers: bool) -> list[Contender]:
    out = []
    if with_native:
        out += [
            Contender("native", "native", {"rank": RANK, "gc": True},
                      "ComfyUI TrainLoraNode, all layers + norm/bias diffs, gradient checkpointing (its default)",
                      sizes=("tiny", "flux") + GPU_SIZES),
            Contender("native-nogc", "native", {"rank": RANK, "gc": False},
                      "ComfyUI TrainLoraNode, all layers + norm/bias diffs, no checkpointing", count_flops=("tiny",),
                      sizes=COMFY_SIZES),
        ]
    nat, nat_gc = ("native-nogc", "native") if with_native else (None, None)
    out += [
        Contender("ours-all", "node", {"rank": RANK, "preset": "all"},
                  "our Train LoRA node, preset all (every Linear/Conv)", nat, sizes=COMFY_SIZES),
        Contender("ours-all-gc", "node", {"rank": RANK, "preset": "all", "gc": True},
                  "our Train LoRA node, preset all, gradient checkpointing", nat_gc,
                  sizes=("tiny", "flux") + GPU_SIZES),
        Contender("ours-attn", "node", {"rank": RANK, "preset": "attn"},
                  "our Train LoRA node, preset attn (our default)", nat, sizes=COMFY_SIZES),
        Contender("ours-attn-pp", "node", {"rank": RANK, "preset": "attn", "prior": True},
                  "our Train LoRA node, preset attn, prior preservation", "ours-attn", sizes=("tiny",)),
        Contender("ours-all-bf16", "node", {"rank": RANK, "preset": "all", "precision": "bf16"},
                  "our Train LoRA node, preset all, bf16 autocast (LoRA fp32)", nat, sizes=COMFY_SIZES),
        Contender("engine-attn", "engine", {"rank": RANK, "preset": "attn"},
                  "our engine standalone (diffusers backend), preset attn", "diffusers" if with_diffusers else None,
                  sizes=("tiny", "real", "real512")),
        Contender("engine-attn-bf16", "engine", {"rank": RANK, "preset": "attn", "precision": "bf16"},
                  "our engine standalone, preset attn, bf16 autocast (LoRA fp32)",
                  "diffusers" if with_diffusers else None, sizes=("tiny", "real", "real512")),
        Contender("engine-attn-bf16w", "engine", {"rank": RANK, "preset": "attn", "precision": "bf16", "weights": "bf16"},
                  "our engine standalone, preset attn, base weights in bf16 (--weight-dtype bf16), LoRA fp32",
                  "diffusers" if with_diffusers else None, sizes=("tiny", "real", "real512")),
        Contender("engine-all", "engine", {"rank": RANK, "preset": "all"},
                  "our engine standalone (diffusers backend), preset all", nat, sizes=("tiny",)),
    ]
    if with_diffusers:
        out.append(Contender("diffusers", "diffusers", {"rank": RANK},
                             "diffusers train_dreambooth_lora.py, attention, --pre_compute_text_embeddings",
                             sizes=("tiny",)))
    return out


# ---- workers -------------------------------------------------------------------------------------
class Worker:
    def __init__(self, kind: str, size: str, comfyui: str | None, env: dict, device: str = "cpu"):
        cmd = ([sys.executable, "-m", "bench.worker", kind, size, "--device", device]
               + (["--comfyui", comfyui] if comfyui else []))
        self.log = open(Path(tempfile.gettempdir()) / f"lw_bench_{kind}_{size}.log", "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)
        hello = self._read()
        if not hello.get("ready"):
            raise RuntimeError(f"worker {kind}/{size} did not start; see {self.log.name}")

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited (code {self.proc.poll()}); see {self.log.name}")
        return json.loads(line)

    def ask(self, cmd: dict) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def run_diffusers(src: Path, size: str, seed: int, work: Path, env: dict) -> dict:
    """One run of diffusers' DreamBooth LoRA script on the bench's diffusers folder."""
    s = SIZES[size]
    model = write_diffusers_folder(size, work / f"diffusers_{size}")
    images = work / f"diffusers_images_{size}"
    if not images.exists():
        write_images(images, s.images, s.pixels)
        for t in images.glob("*.txt"):
            t.unlink()  # the script takes its prompt from --instance_prompt
    stamps = work / f"stamps_{size}_{seed}.json"
    script = src / "examples" / "dreambooth" / "train_dreambooth_lora.py"
    args = ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(images),
            "--instance_prompt", "a photo of sks ball", "--output_dir", str(work / f"diffusers_out_{seed}"),
            "--resolution", str(s.pixels), "--train_batch_size", "1", "--max_train_steps",
            str(s.warmup + s.measured + 1), "--learning_rate", "1e-4", "--rank", str(RANK),
            "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--seed", str(seed), "--mixed_precision", "no",
            "--pre_compute_text_embeddings", "--checkpointing_steps", "1000000", "--dataloader_num_workers", "0",
            "--report_to", "tensorboard"]
    log = work / f"diffusers_{size}_{seed}.log"
    with open(log, "w") as f:
        code = subprocess.call([sys.executable, "-m", "bench.diffusers_script", str(script), str(stamps), "--", *args],
                               cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    data = json.loads(stamps.read_text()) if stamps.exists() else {"stamps": []}
    st = data["stamps"][: s.warmup + s.measured]
    d = [b - a for a, b in zip(st, st[1:])][max(0, s.warmup - 1):]
    if code != 0 or not d:
        return {"error": f"diffusers script failed (exit {code}); see {log}"}
    return {"step": statistics.median(d), "steps": d, "trainable": data["trainable"], "rss": None}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def comfy_usable(path: Path) -> tuple[bool, str]:
    if not (path / "comfy" / "sd.py").is_file():
        return False, f"no ComfyUI at {path}"
    code = (f"import sys; sys.path.insert(0, {str(path)!r}); import comfy.options; "
            "from comfy.cli_args import args; args.cpu = True; import comfy.sd")
    probe = subprocess.run([sys.executable, "-c", code],
                           capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return False, f"ComfyUI at {path} does not import in this Python ({last})"
    return True, ""


# ---- hardware ------------------------------------------------------------------------------------
def matmul_peak(threads: int, device: str = "cpu") -> dict[str, float]:
    """FLOP/s of a large square matmul, fp32 and bf16, best of several (this machine, now): 2048x2048
    on the CPU, 8192x8192 on a GPU."""
    import torch

    torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    n = 8192 if device == "cuda" else 2048
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
        best = float("inf")
        for _ in range(7):
            sync()
            t0 = time.perf_counter()
            a @ b
            sync()
            best = min(best, time.perf_counter() - t0)
        out[name] = 2 * n ** 3 / best
    return out


def resolve_device(name: str) -> str:
    """auto: CUDA when this Python's torch sees a GPU, else the CPU."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def comfy_version(path: Path) -> str:
    try:
        text = (path / "comfyui_version.py").read_text()
        return text.split("__version__", 1)[1].split("=", 1)[1].strip().splitlines()[0].strip("\"' ")
    except (OSError, IndexError):
        return "?"


# ---- the table -----------------------------------------------------------------------------------
def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarise(cs: list[Contender], peak: dict, size: str = "tiny") -> list[dict]:
    by = {c.name: c for c in cs}
    rows = []
    for c in cs:
        ok = [r for r in c.results if "error" not in r]
        row = {"name": c.name, "what": what(c, size), "runs": len(ok), "errors": [r["error"] for r in c.results if "error" in r]}
        row["step"] = _median([r["step"] for r in ok])
        row["rss"] = max((r["rss"] for r in ok if r.get("rss")), default=None)
        # What the run added on top of the loaded model (and the modules imported by earlier runs).
        row["rss_train"] = max((r["rss"] - r["rss_start"] for r in ok if r.get("rss_start")), default=None)
        row["vram"] = max((r["vram"] for r in ok if r.get("vram")), default=None)
        row["trainable"] = ok[0]["trainable"] if ok else None
        ref = by.get(c.reference) if c.reference else None
        if ref is not None:
            pairs = [a["step"] / b["step"] for a, b in zip(c.results, ref.results)
                     if "error" not in a and "error" not in b]
            row["ratio"], row["reference"] = _median(pairs), ref.name
            ref_rss = max((r["rss"] for r in ref.results if r.get("rss")), default=None)
            row["rss_ratio"] = row["rss"] / ref_rss if row["rss"] and ref_rss else None
            ref_vram = max((r["vram"] for r in ref.results if r.get("vram")), default=None)
            row["vram_ratio"] = row["vram"] / ref_vram if row["vram"] and ref_vram else None
        row["flops"] = c.flops
        if c.flops and row["step"]:
            achieved = c.flops / row["step"]
            row["peak_share"] = achieved / peak["bf16" if c.variant.get("precision") == "bf16" else "fp32"]
        rows.append(row)
    return rows


def fmt_table(size: str, rows: list[dict], device: str = "cpu") -> str:
    s = SIZES[size]
    vram = any(r.get("vram") for r in rows)  # on a GPU: its peak memory beside the process' RSS
    lines = [f"### {size}: {s.model}, {s.pixels}x{s.pixels} px, batch 1, rank {RANK}, fp32 base weights unless the "
             f"contender says otherwise, {device}, {s.measured} timed steps per run after {s.warmup} warm-up",
             "", "| contender | s/step (median) | ratio | vs | peak RSS MiB | RSS ratio | run's RSS growth MiB "
             "| trainable params | GFLOP/step | share of matmul peak | " + ("peak VRAM MiB | VRAM ratio | " if vram else "")
             + "what |",
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if vram else "") + "---|"]
    for r in rows:
        f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        vram_cells = (f"| {f(r['vram'] / 2**20 if r.get('vram') else None, '.0f')} | {f(r.get('vram_ratio'), '.2f')} "
                      if vram else "")
        lines.append(
            f"| {r['name']} | {f(r['step'], '.4f')} | {f(r.get('ratio'), '.2f')} | {r.get('reference') or '-'} "
            f"| {f(r['rss'] / 2**20 if r['rss'] else None, '.0f')} | {f(r.get('rss_ratio'), '.2f')} "
            f"| {f(r['rss_train'] / 2**20 if r.get('rss_train') is not None else None, '.0f')} "
            f"| {f(r['trainable'], ',')} | {f(r['flops'] / 1e9 if r['flops'] else None, '.1f')} "
            f"| {f(r.get('peak_share') * 100 if r.get('peak_share') else None, '.0f')}{'%' if r.get('peak_share') else ''} "
            f"{vram_cells}| {r['what']}{errors(r['errors'])} |")
    return "\n".join(lines)


def errors(errs: list[str]) -> str:
    """The runs' errors for the table, each different one once, with how many runs it ended."""
    if not errs:
        return ""
    counts = {e: errs.count(e) for e in dict.fromkeys(errs)}
    return " (failed: " + "; ".join(f"{e} ({n} of the runs)" if n > 1 else e for e, n in counts.items()) + ")"


def fmt_use(size: str, use: list[dict]) -> str:
    ok = [u for u in use if "error" not in u]
    if not ok:
        return f"### {size}: using LoRAs\n\nfailed: {use[0].get('error') if use else 'not run'}"
    m = lambda k: statistics.median(u[k] for u in ok)  # noqa: E731
    lines = [f"### {size}: using LoRAs (3 LoRAs, attn_ff, rank {RANK}; median of {len(ok)})", "",
             "| measure | ours | reference | ratio |", "|---|---|---|---|",
             f"| apply a 3-LoRA stack (s) | {m('apply_stack'):.4f} | 3 chained LoraLoader {m('apply_chained'):.4f} "
             f"| {m('apply_stack') / m('apply_chained'):.2f} |",
             f"| sample 4 steps with the stack (s) | {m('sample_stack'):.3f} | base model {m('sample_base'):.3f} "
             f"| {m('sample_stack') / m('sample_base'):.3f} |",
             f"| sample 4 steps, chained LoraLoaders (s) | {m('sample_chained'):.3f} | base model "
             f"{m('sample_base'):.3f} | {m('sample_chained') / m('sample_base'):.3f} |",
             f"| merge 3 LoRAs into a checkpoint file (s) | {m('merge_ours'):.3f} | LoraLoader x3 + CheckpointSave "
             f"{m('merge_native'):.3f} | {m('merge_ours') / m('merge_native'):.2f} |"]
    return "\n".join(lines)


def plan(ns) -> int:
    """What ``main`` would run with these arguments, without loading anything."""
    try:
        device = resolve_device(ns.device)
    except ImportError:
        device = f"{ns.device} (torch is not importable in this Python)"
    has_comfy = (Path(ns.comfyui) / "comfy" / "sd.py").is_file()
    only = set(ns.only.split(",")) if ns.only else None
    print(f"device: {device}; ComfyUI: {ns.comfyui if has_comfy else 'none (standalone engine only)'}"
          + (f" {comfy_version(Path(ns.comfyui))}" if has_comfy else "") + f"; out: {ns.out}"
          + (f" (section '{ns.section}')" if ns.section else ""))
    for size in ns.sizes.split(","):
        s = SIZES[size]
        cs = [c for c in contenders(has_comfy, bool(ns.diffusers_src))
              if (only is None or c.name in only) and size in c.sizes and (c.kind != "node" or has_comfy)]
        runs = ns.runs if size == "tiny" else ns.real_runs
        print(f"[{size}] {s.model}, {s.pixels} px, {runs} runs x ({s.warmup} warm-up + {s.measured} timed steps)"
              + (", Flux set written first (bench/flux.py)" if s.family == "flux" else ""))
        for c in cs:
            print(f"  {c.name:18} {'vs ' + c.reference if c.reference else '':18} {what(c, size)}")
        if not cs:
            print("  (nothing runs at this size without ComfyUI)")
    return 0


def write_section(path: Path, title: str, body: str) -> None:
    """``## title`` + body in the file at ``path``: in place of that section if the file has it (up to the
    next ``## `` heading), else appended; the rest of the file is kept."""
    head = f"## {title}"
    lines = path.read_text().splitlines() if path.exists() else ["# Benchmark results"]
    if head in lines:
        i = lines.index(head)
        j = next((k for k in range(i + 1, len(lines)) if lines[k].startswith("## ")), len(lines))
        lines[i:j] = [head, "", *body.rstrip("\n").splitlines(), ""]
    else:
        lines += ["", head, "", *body.rstrip("\n").splitlines()]
    path.write_text("\n".join(lines).rstrip("\n") + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["train"], help="the benchmark to run")
    p.add_argument("--sizes", default="tiny,real", help="comma list of: " + ", ".join(SIZES))
    p.add_argument("--runs", type=int, default=5, help="alternating runs per contender at the tiny size")
    p.add_argument("--real-runs", type=int, default=2, help="alternating runs per contender at the real size")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for every contender")
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH") or str(Path.home() / "comfy" / "ComfyUI"),
                   help="a ComfyUI checkout, for the native trainer and our node (default: $COMFYUI_PATH or "
                        "~/comfy/ComfyUI); this Python needs its requirements")
    p.add_argument("--diffusers-src", default=None, help="a diffusers source checkout, to run its DreamBooth script")
    p.add_argument("--only", default=None, help="comma list of contender names to run (default: all)")
    p.add_argument("--no-flops", action="store_true", help="skip counting FLOPs")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where every contender trains (auto: CUDA when torch sees a GPU, else the CPU)")
    p.add_argument("--sequential", action="store_true",
                   help="one worker alive at a time (for sets that do not fit twice in memory, e.g. Flux on a "
                        "small machine); runs still alternate between the contenders of one kind")
    p.add_argument("--section", default=None,
                   help="write the tables as a '## SECTION' of --out (replacing that section if it is there, "
                        "keeping the rest of the file) instead of rewriting the whole file")
    p.add_argument("--out", default=str(REPO / "bench" / "RESULTS.md"), help="where to write the table")
    p.add_argument("--plan", action="store_true", help="print what would run (sizes, contenders, device) and exit")
    ns = p.parse_args(argv)
    unknown = [s for s in ns.sizes.split(",") if s not in SIZES]
    if unknown:
        p.error(f"--sizes {ns.sizes}: unknown {', '.join(unknown)}; choose from {', '.join(SIZES)}")
    if ns.plan:
        return plan(ns)
    device = resolve_device(ns.device)

    comfy_ok, why = comfy_usable(Path(ns.comfyui))
    if not comfy_ok:
        print(f"{why}: running the standalone engine only (--comfyui PATH, with ComfyUI's requirements "
              "installed in this Python, for the rest)")
    dsrc = Path(ns.diffusers_src) if ns.diffusers_src else None
    if dsrc and not (dsrc / "examples" / "dreambooth" / "train_dreambooth_lora.py").is_file():
        p.error(f"--diffusers-src {dsrc} has no examples/dreambooth/train_dreambooth_lora.py; give a diffusers "
                "source checkout")
    env = {**os.environ, "OMP_NUM_THREADS": str(ns.threads), "MKL_NUM_THREADS": str(ns.threads),
           "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    started = time.time()
    peaks = {}
    only = set(ns.only.split(",")) if ns.only else None
    sections, work = [], Path(tempfile.mkdtemp(prefix="lw_bench_"))
    for size in ns.sizes.split(","):
        cs = [c for c in contenders(comfy_ok, dsrc is not None)
              if c.kind != "node" or comfy_ok]
        cs = [c for c in cs if (only is None or c.name in only) and size in c.sizes]
        runs = ns.runs if size == "tiny" else ns.real_runs
        if not cs:
            print(f"[{size}] no contender runs at this size (ComfyUI contenders need --comfyui)")
            continue
        if SIZES[size].family == "flux":
            # The set is written once per machine, before any worker loads it (bench/flux.py).
            print(f"[{size}] writing the Flux-shaped set (once per machine)", flush=True)
            subprocess.run([sys.executable, "-m", "bench.flux", "--comfyui", ns.comfyui], cwd=REPO, env=env,
                           check=True, stdout=subprocess.DEVNULL)
        # The peak is measured anew for each size, just before its runs: a shared machine's load drifts.
        peak = peaks[size] = matmul_peak(ns.threads, device)
        print(f"[{size}] matmul peak: fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s")
        kinds = list(dict.fromkeys(c.kind for c in cs if c.kind != "diffusers"))
        # Alternating: every worker alive, runs A B C A B C. Sequential: one kind's worker at a time.
        groups = [kinds] if not ns.sequential else [[k] for k in kinds]
        if ns.sequential and any(c.kind == "diffusers" for c in cs):
            groups.append([])  # diffusers' script runs in its own processes
        workers = {}
        try:
            for group in groups:
                for kind in group:
                    print(f"[{size}] starting {kind} worker", flush=True)
                    workers[kind] = Worker(kind, size, ns.comfyui if comfy_ok else None, env, device)
                members = [c for c in cs if c.kind in group or (c.kind == "diffusers" and group == groups[-1])]
                for r in range(runs):
                    for c in members:
                        if c.kind == "diffusers":
                            res = run_diffusers(dsrc, size, r, work, env)
                        else:
                            res = workers[c.kind].ask({"op": "train", "size": size, "variant": c.variant, "seed": r})
                        c.results.append(res)
                        print(f"[{size}] run {r + 1}/{runs} {c.name}: "
                              + (f"{res['step']:.4f} s/step" if "error" not in res else res["error"]), flush=True)
                if not ns.no_flops:
                    for c in members:
                        if c.kind != "diffusers" and size in c.count_flops:
                            c.flops = workers[c.kind].ask({"op": "flops", "size": size,
                                                           "variant": c.variant}).get("flops")
                if ns.sequential:
                    for kind in group:
                        workers.pop(kind).close()
            if not ns.no_flops:
                by_variant = {json.dumps(c.variant, sort_keys=True): c.flops for c in cs if c.flops}
                for c in cs:  # diffusers' script computes what engine-attn computes
                    if c.kind == "diffusers":
                        c.flops = by_variant.get(json.dumps({"rank": RANK, "preset": "attn"}, sort_keys=True))
            use = []
            # LoRA use is measured on the SD1.5 sizes (a Flux sample would cost a T5 encode per prompt).
            if comfy_ok and (only is None or "use" in only) and SIZES[size].family == "sd15":
                for w in list(workers.values()):
                    w.close()
                workers = {"use": Worker("use", size, ns.comfyui, env, device)}
                use = [workers["use"].ask({"op": "use", "size": size}) for _ in range(3 if size == "tiny" else 1)]
        finally:
            for w in workers.values():
                w.close()
        rows = summarise(cs, peak, size)
        sections.append(fmt_table(size, rows, device))
        if use:
            sections.append(fmt_use(size, use))
        print(sections[-2] if use else sections[-1])
        if use:
            print(sections[-1])
    import torch

    measured = "; ".join(f"{size}: fp32 {p['fp32'] / 1e9:.0f} GFLOP/s, bf16 {p['bf16'] / 1e9:.0f} GFLOP/s"
                         for size, p in peaks.items())
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if device == "cuda" else ""
    n = 8192 if device == "cuda" else 2048
    host = f", ComfyUI {comfy_version(Path(ns.comfyui))}" if comfy_ok else ""
    machine = (f"{_cpu_name()}, {os.cpu_count()} cores, {ns.threads} threads{gpu}, torch {torch.__version__}, "
               f"Python {platform.python_version()}{host}; {n}x{n} matmul peak measured before each size's runs: "
               f"{measured}")
    command = "python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:])
    body = (f"Machine: {machine}.\n\nCommand: `{command}` "
            f"({time.time() - started:.0f} s, {time.strftime('%Y-%m-%d')}).\n\n"
            "Ratios are medians of run-by-run ratios against the contender in the `vs` column "
            + ("(each worker in turn: --sequential). " if ns.sequential else "(runs alternate between contenders). ")
            + "Lower is better.\n\n" + "\n\n".join(sections) + "\n")
    if ns.section:
        write_section(Path(ns.out), ns.section, body)
    else:
        Path(ns.out).write_text("# Benchmark results\n\n" + body)
    print(f"wrote {ns.out} in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
