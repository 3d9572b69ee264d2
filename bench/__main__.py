"""``python -m bench train``: our trainer against ComfyUI's native one and diffusers' script.

Every contender runs in a worker process of its own (bench/worker.py) that loads its model once;
the runs alternate A B A B between contenders so that the load of this shared machine falls on
all of them alike, and each ratio is taken pair by pair (run i of A against run i of B, adjacent
in time). See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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


def contenders(with_native: bool, with_diffusers: bool) -> list[Contender]:
    out = []
    if with_native:
        out += [
            Contender("native", "native", {"rank": RANK, "gc": True},
                      "ComfyUI TrainLoraNode, all layers + norm/bias diffs, gradient checkpointing (its default)",
                      sizes=("tiny",)),
            Contender("native-nogc", "native", {"rank": RANK, "gc": False},
                      "ComfyUI TrainLoraNode, all layers + norm/bias diffs, no checkpointing", count_flops=("tiny",)),
        ]
    nat, nat_gc = ("native-nogc", "native") if with_native else (None, None)
    out += [
        Contender("ours-all", "node", {"rank": RANK, "preset": "all"},
                  "our Train LoRA node, preset all (every Linear/Conv)", nat),
        Contender("ours-all-gc", "node", {"rank": RANK, "preset": "all", "gc": True},
                  "our Train LoRA node, preset all, gradient checkpointing", nat_gc, sizes=("tiny",)),
        Contender("ours-attn", "node", {"rank": RANK, "preset": "attn"},
                  "our Train LoRA node, preset attn (our default)", nat),
        Contender("ours-attn-pp", "node", {"rank": RANK, "preset": "attn", "prior": True},
                  "our Train LoRA node, preset attn, prior preservation", "ours-attn", sizes=("tiny",)),
        Contender("ours-all-bf16", "node", {"rank": RANK, "preset": "all", "precision": "bf16"},
                  "our Train LoRA node, preset all, bf16 autocast (LoRA fp32)", nat),
        Contender("engine-attn", "engine", {"rank": RANK, "preset": "attn"},
                  "our engine standalone (diffusers backend), preset attn", "diffusers" if with_diffusers else None),
        Contender("engine-attn-bf16", "engine", {"rank": RANK, "preset": "attn", "precision": "bf16"},
                  "our engine standalone, preset attn, bf16 autocast (LoRA fp32)",
                  "diffusers" if with_diffusers else None),
        Contender("engine-attn-bf16w", "engine", {"rank": RANK, "preset": "attn", "precision": "bf16", "weights": "bf16"},
                  "our engine standalone, preset attn, base weights in bf16 (--weight-dtype bf16), LoRA fp32",
                  "diffusers" if with_diffusers else None),
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
    def __init__(self, kind: str, size: str, comfyui: str | None, env: dict):
        cmd = [sys.executable, "-m", "bench.worker", kind, size] + (["--comfyui", comfyui] if comfyui else [])
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
def matmul_peak(threads: int) -> dict[str, float]:
    """FLOP/s of a large square matmul, fp32 and bf16, best of several (this machine, now)."""
    import torch

    torch.set_num_threads(threads)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        n = 2048
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        best = float("inf")
        for _ in range(7):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        out[name] = 2 * n ** 3 / best
    return out


# ---- the table -----------------------------------------------------------------------------------
def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarise(cs: list[Contender], peak: dict) -> list[dict]:
    by = {c.name: c for c in cs}
    rows = []
    for c in cs:
        ok = [r for r in c.results if "error" not in r]
        row = {"name": c.name, "what": c.what, "runs": len(ok), "errors": [r["error"] for r in c.results if "error" in r]}
        row["step"] = _median([r["step"] for r in ok])
        row["rss"] = max((r["rss"] for r in ok if r.get("rss")), default=None)
        # What the run added on top of the loaded model (and the modules imported by earlier runs).
        row["rss_train"] = max((r["rss"] - r["rss_start"] for r in ok if r.get("rss_start")), default=None)
        row["trainable"] = ok[0]["trainable"] if ok else None
        ref = by.get(c.reference) if c.reference else None
        if ref is not None:
            pairs = [a["step"] / b["step"] for a, b in zip(c.results, ref.results)
                     if "error" not in a and "error" not in b]
            row["ratio"], row["reference"] = _median(pairs), ref.name
            ref_rss = max((r["rss"] for r in ref.results if r.get("rss")), default=None)
            row["rss_ratio"] = row["rss"] / ref_rss if row["rss"] and ref_rss else None
        row["flops"] = c.flops
        if c.flops and row["step"]:
            achieved = c.flops / row["step"]
            row["peak_share"] = achieved / peak["bf16" if c.variant.get("precision") == "bf16" else "fp32"]
        rows.append(row)
    return rows


def fmt_table(size: str, rows: list[dict]) -> str:
    s = SIZES[size]
    lines = [f"### {size}: {s.pixels}x{s.pixels} px, batch 1, rank {RANK}, fp32 base weights unless the contender says otherwise, "
             f"{s.measured} timed steps per run after {s.warmup} warm-up",
             "", "| contender | s/step (median) | ratio | vs | peak RSS MiB | RSS ratio | run's RSS growth MiB "
             "| trainable params | GFLOP/step | share of matmul peak | what |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        lines.append(
            f"| {r['name']} | {f(r['step'], '.4f')} | {f(r.get('ratio'), '.2f')} | {r.get('reference') or '-'} "
            f"| {f(r['rss'] / 2**20 if r['rss'] else None, '.0f')} | {f(r.get('rss_ratio'), '.2f')} "
            f"| {f(r['rss_train'] / 2**20 if r.get('rss_train') is not None else None, '.0f')} "
            f"| {f(r['trainable'], ',')} | {f(r['flops'] / 1e9 if r['flops'] else None, '.1f')} "
            f"| {f(r.get('peak_share') * 100 if r.get('peak_share') else None, '.0f')}{'%' if r.get('peak_share') else ''} "
            f"| {r['what']}{' (errors: ' + '; '.join(r['errors']) + ')' if r['errors'] else ''} |")
    return "\n".join(lines)


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
    p.add_argument("--out", default=str(REPO / "bench" / "RESULTS.md"), help="where to write the table")
    ns = p.parse_args(argv)

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
        # The peak is measured anew for each size, just before its runs: a shared machine's load drifts.
        peak = peaks[size] = matmul_peak(ns.threads)
        print(f"[{size}] matmul peak: fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s")
        workers = {}
        try:
            for kind in dict.fromkeys(c.kind for c in cs if c.kind != "diffusers"):
                print(f"[{size}] starting {kind} worker")
                workers[kind] = Worker(kind, size, ns.comfyui if comfy_ok else None, env)
            for r in range(runs):
                for c in cs:
                    if c.kind == "diffusers":
                        res = run_diffusers(dsrc, size, r, work, env)
                    else:
                        res = workers[c.kind].ask({"op": "train", "size": size, "variant": c.variant, "seed": r})
                    c.results.append(res)
                    print(f"[{size}] run {r + 1}/{runs} {c.name}: "
                          + (f"{res['step']:.4f} s/step" if "error" not in res else res["error"]), flush=True)
            if not ns.no_flops:
                for c in cs:
                    if c.kind != "diffusers" and size in c.count_flops:
                        c.flops = workers[c.kind].ask({"op": "flops", "size": size, "variant": c.variant}).get("flops")
                by_variant = {json.dumps(c.variant, sort_keys=True): c.flops for c in cs if c.flops}
                for c in cs:  # diffusers' script computes what engine-attn computes
                    if c.kind == "diffusers":
                        c.flops = by_variant.get(json.dumps({"rank": RANK, "preset": "attn"}, sort_keys=True))
            use = []
            if comfy_ok and (only is None or "use" in only):
                for w in list(workers.values()):
                    w.close()
                workers = {"use": Worker("use", size, ns.comfyui, env)}
                use = [workers["use"].ask({"op": "use", "size": size}) for _ in range(3 if size == "tiny" else 1)]
        finally:
            for w in workers.values():
                w.close()
        rows = summarise(cs, peak)
        sections.append(fmt_table(size, rows))
        if use:
            sections.append(fmt_use(size, use))
        print(sections[-2] if use else sections[-1])
        if use:
            print(sections[-1])
    import torch

    measured = "; ".join(f"{size}: fp32 {p['fp32'] / 1e9:.0f} GFLOP/s, bf16 {p['bf16'] / 1e9:.0f} GFLOP/s"
                         for size, p in peaks.items())
    machine = (f"{_cpu_name()}, {os.cpu_count()} cores, {ns.threads} threads, torch {torch.__version__}, "
               f"Python {platform.python_version()}; 2048x2048 matmul peak measured before each size's runs: "
               f"{measured}")
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (f"# Benchmark results\n\nMachine: {machine}.\n\nCommand: `{command}` "
            f"({time.time() - started:.0f} s, {time.strftime('%Y-%m-%d')}).\n\n"
            "Ratios are medians of run-by-run ratios against the contender in the `vs` column "
            "(runs alternate between contenders). Lower is better.\n\n" + "\n\n".join(sections) + "\n")
    Path(ns.out).write_text(text)
    print(f"wrote {ns.out} in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
