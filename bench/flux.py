"""The bench's Flux-shaped model set: written once per machine, loaded as a user's graph loads it.

The set is tests/fixtures/tiny_flux.py's Flux.1 dev set at the real width: one double and one single
block at hidden 3072 (~0.5G parameters; 0.3.64 pins Flux's width to 3072 and 0.33 reads it from the
file, so the same file loads on both), CLIP-L, a full-size T5-XXL in fp8 (its first layer random, the
others exact pass-throughs, so it is sparse on disk) and the Flux "ae" VAE with its real decoder width.

``python -m bench.flux --comfyui PATH`` writes it (the orchestrator runs this before the workers
start, so two workers never write it at once); ``load`` gives MODEL, CLIP and VAE. The DiT is
loaded as ``UNETLoader`` loads it, with fp32 weights (``model_options={"dtype": torch.float32}``,
the one thing UNETLoader's widget cannot ask for): the bench compares trainers on fp32 base weights
on every device; the bf16 contenders say so.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HIDDEN = 3072  # Flux.1's width (pinned by ComfyUI 0.3.64's detection)
VAE_DECODER_CH = 128  # the real ae decoder; 0.3.64 builds it at this width whatever the file says
FOLDERS = {"dit": "diffusion_models", "clip_l": "text_encoders", "t5xxl": "text_encoders", "vae": "vae"}


def set_dir() -> Path:
    """Where the set is written: kept between bench runs (the T5 alone takes a minute to write)."""
    return Path(os.environ.get("LW_BENCH_FLUX_DIR") or Path(tempfile.gettempdir()) / "lw_bench_flux_set")


def _fixtures():
    sys.path.insert(0, str(REPO / "tests"))
    from fixtures import tiny_flux

    return tiny_flux


def build(folder: Path | None = None) -> dict[str, Path]:
    """Write the set (if not there yet) and return its paths by role (ComfyUI on ``sys.path``)."""
    return _fixtures().build_flux_set(folder or set_dir(), "dev", hidden_size=HIDDEN, vae_decoder_ch=VAE_DECODER_CH)


def load(base: Path):
    """MODEL, CLIP, VAE of the set, linked into the models folders under ``base`` (ComfyUI booted)."""
    import torch

    import comfy.sd
    import folder_paths
    import nodes

    paths = build()  # written already by the orchestrator: only the paths
    names = {}
    for role, path in paths.items():
        target = base / "models" / FOLDERS[role] / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            os.symlink(path, target)
        names[role] = path.name
    with torch.inference_mode():
        model = comfy.sd.load_diffusion_model(folder_paths.get_full_path_or_raise("diffusion_models", names["dit"]),
                                              model_options={"dtype": torch.float32})
        clip = nodes.DualCLIPLoader().load_clip(names["clip_l"], names["t5xxl"], "flux")[0]
        vae = nodes.VAELoader().load_vae(names["vae"])[0]
    return model, clip, vae


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.flux", description="write the bench's Flux-shaped set")
    p.add_argument("--comfyui", required=True, help="a ComfyUI checkout (its classes give the key names)")
    p.add_argument("--out", default=None, help=f"folder (default: $LW_BENCH_FLUX_DIR or {set_dir()})")
    ns = p.parse_args()
    sys.path.insert(0, ns.comfyui)
    import comfy.options  # noqa: F401
    from comfy.cli_args import args

    args.cpu = True  # only builds tensors; never touches a GPU
    for role, path in build(Path(ns.out) if ns.out else None).items():
        print(f"{role}: {path}")


if __name__ == "__main__":
    main()
