"""Host tests: LoRA Workbench running inside a real ComfyUI, on the CPU.

ComfyUI is found through ``COMFYUI_PATH`` or comfy-cli's default ``~/comfy/ComfyUI`` (the folder
that holds ``main.py``). When it is absent, or the running venv lacks the packages its
``requirements.txt`` lists, every test here is skipped with one line saying which and how to fix
it. Test modules in this folder must therefore not import ComfyUI at module level: they get it
through the fixtures below, which put it on ``sys.path``.

Fixtures (all session-scoped, so ComfyUI boots once per run):
  comfyui_path          Path of the ComfyUI checkout.
  comfy_host            ComfyUI booted in-process on the CPU with our pack loaded from
                        ``custom_nodes/lora-workbench`` (see ``comfy_harness.ComfyHost``).
  run_prompt            ``run_prompt(api_prompt) -> PromptRun``: runs an API-format prompt with
                        ComfyUI's PromptExecutor, no HTTP server.
  tiny_sd15_checkpoint  Path of a tiny checkpoint ComfyUI detects as SD1.5, in the host's
                        ``models/checkpoints`` (its ``.name`` is the ``ckpt_name`` to use).
  tiny_sdxl_checkpoint  The same for a tiny SDXL-family checkpoint (~1.7 GB: ComfyUI's CLIP-G is
                        full size), built once per session in the session's temporary folder.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import InvalidRequirement, Requirement

from comfy_harness import REPO_ROOT, boot_in_process, set_folder

HOST_DIR = Path(__file__).resolve().parent
if str(HOST_DIR.parent) not in sys.path:  # tests/, for the fixtures package shared with the engine tests
    sys.path.insert(0, str(HOST_DIR.parent))
DEFAULT_COMFYUI_PATH = Path("~/comfy/ComfyUI").expanduser()


def find_comfyui() -> tuple[Path | None, str | None]:
    """(ComfyUI path, None) when usable here, else (None or the path, reason to skip)."""
    configured = os.environ.get("COMFYUI_PATH")
    if configured:
        path = Path(configured).expanduser()
        if not (path / "main.py").is_file():
            return None, f"COMFYUI_PATH={path} has no main.py - host tests skipped"
    else:
        path = DEFAULT_COMFYUI_PATH
        if not (path / "main.py").is_file():
            return None, "ComfyUI not found (set COMFYUI_PATH or install to ~/comfy/ComfyUI) - host tests skipped"
    problems = unmet_requirements(path / "requirements.txt")
    if problems:
        shown = ", ".join(problems[:5]) + (f" and {len(problems) - 5} more" if len(problems) > 5 else "")
        return path, (
            f"ComfyUI at {path} lacks its requirements in this venv ({shown}; "
            f"pip install -r {path / 'requirements.txt'}) - host tests skipped"
        )
    return path, None


def unmet_requirements(requirements_file: Path) -> list[str]:
    """Lines of ComfyUI's requirements.txt that the running venv does not satisfy.

    Checked through installed distribution metadata, without importing anything, so the check
    costs milliseconds; a venv that has every package but still fails to import ComfyUI is a
    real failure and is left to fail loudly.
    """
    if not requirements_file.is_file():
        return [f"{requirements_file} is missing"]
    problems = []
    for line in requirements_file.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            continue  # not a plain requirement (a URL or option line); pip knows it, we don't need to
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        try:
            version = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            problems.append(f"missing {requirement.name}")
            continue
        if requirement.specifier and not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{requirement.name} {version} (wants {requirement.specifier})")
    return problems


COMFYUI_PATH, SKIP_REASON = find_comfyui()


def pytest_configure(config):
    config.addinivalue_line("markers", "host: needs a ComfyUI install (COMFYUI_PATH or ~/comfy/ComfyUI)")


def pytest_collection_modifyitems(config, items):
    # This hook sees the whole session's items; mark only ours.
    for item in items:
        if HOST_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.host)


def _host_has_zimage() -> bool:
    """Whether this ComfyUI knows Z-Image (its ``supported_models.ZImage``, after 0.3.64): read from its source, so
    the answer needs no booted host."""
    source = COMFYUI_PATH / "comfy" / "supported_models.py" if COMFYUI_PATH else None
    return bool(source and source.is_file() and "class ZImage(" in source.read_text(encoding="utf-8"))


def _host_has_flux2() -> bool:
    """Whether this ComfyUI knows FLUX.2 (its ``supported_models.Flux2``, after 0.3.64): read from its source, so the
    answer needs no booted host."""
    source = COMFYUI_PATH / "comfy" / "supported_models.py" if COMFYUI_PATH else None
    return bool(source and source.is_file() and "class Flux2(" in source.read_text(encoding="utf-8"))


def _host_maps_quantized_te() -> bool:
    """Whether this ComfyUI keeps a scaled-fp8 text encoder's matrices in the file's own tensors (its
    ``comfy/quant_ops.py`` mixed-precision ops, after 0.3.64) rather than copying them into the model: read from
    its source, so the answer needs no booted host."""
    return bool(COMFYUI_PATH and (COMFYUI_PATH / "comfy" / "quant_ops.py").is_file())


def pytest_runtest_setup(item):
    # Skipping from here (not with a skip marker per test) makes pytest fold every host test's
    # skip into one summary line at this location.
    if SKIP_REASON:
        pytest.skip(SKIP_REASON)
    if "zimage" in item.nodeid and not _host_has_zimage():
        pytest.skip(HOST_LIMIT_ZIMAGE)
    if "flux2" in item.nodeid and not _host_has_flux2():
        pytest.skip(HOST_LIMIT_FLUX2)
    if "qwen_image" in item.nodeid and not _host_maps_quantized_te():
        pytest.skip(HOST_LIMIT_QWEN_IMAGE)


@pytest.fixture(scope="session")
def comfyui_path() -> Path:
    assert COMFYUI_PATH is not None and SKIP_REASON is None
    return COMFYUI_PATH


@pytest.fixture(scope="session")
def comfy_host(comfyui_path, tmp_path_factory):
    base_directory = tmp_path_factory.mktemp("comfy_base")
    host = boot_in_process(comfyui_path, base_directory, REPO_ROOT)
    try:
        yield host
    finally:
        host.close()


@pytest.fixture(scope="session")
def run_prompt(comfy_host):
    return comfy_host.run_prompt


@pytest.fixture(scope="session")
def tiny_sd15_checkpoint(comfy_host) -> Path:
    from tiny_sd15 import write_checkpoint

    return write_checkpoint(comfy_host.base_directory / "models" / "checkpoints" / "tiny_sd15.safetensors")


@pytest.fixture(scope="session")
def tiny_sdxl_checkpoint(comfy_host) -> Path:
    from tiny_sdxl import write_checkpoint

    return write_checkpoint(comfy_host.base_directory / "models" / "checkpoints" / "tiny_sdxl.safetensors")


@pytest.fixture(scope="session")
def tiny_sd3_checkpoint(comfy_host, tmp_path_factory) -> Path:
    """A tiny all-in-one SD3.5 medium checkpoint (``fixtures/tiny_sd3.py``: MMDiT-X at hidden 128, CLIP-L +
    CLIP-G, no T5) linked into the host's models/checkpoints; both hosts load it."""
    from fixtures import tiny_sd3

    path = tiny_sd3.build_sd3_checkpoint(set_folder(tmp_path_factory, "tiny_sd3"), "medium",
                                         vae_decoder_ch=tiny_sd3.host_vae_decoder_ch())
    target = comfy_host.base_directory / "models" / "checkpoints" / path.name
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        os.link(path, target)
    return target


HOST_LIMIT_ZIMAGE = ("host limit: this ComfyUI has no Z-Image (comfy.supported_models.ZImage, added after 0.3.64); "
                     "the Z-Image tests run on 0.33+")


@pytest.fixture(scope="session")
def tiny_zimage_files(comfy_host, tmp_path_factory) -> dict:
    """{"dit", "te", "vae"}: the names UNETLoader / CLIPLoader (type lumina2) / VAELoader list for the tiny Z-Image set
    (``fixtures/tiny_zimage.py``), written once per session and linked into the host's model folders; a host-limit
    skip on a ComfyUI without Z-Image (0.3.64)."""
    import comfy.supported_models

    from fixtures import tiny_zimage

    if not hasattr(comfy.supported_models, "ZImage"):
        pytest.skip(HOST_LIMIT_ZIMAGE)
    paths = tiny_zimage.build_zimage_set(set_folder(tmp_path_factory, "tiny_zimage"))
    return tiny_zimage.link_zimage_set(paths, comfy_host.base_directory / "models")


HOST_LIMIT_FLUX2 = ("host limit: this ComfyUI has no FLUX.2 (comfy.supported_models.Flux2, added after 0.3.64); "
                    "the FLUX.2 tests run on 0.33+")


@pytest.fixture(scope="session")
def tiny_flux2_files(comfy_host, tmp_path_factory) -> dict:
    """{"dit", "te", "vae"}: the names UNETLoader / CLIPLoader (type flux2) / VAELoader list for the tiny FLUX.2 klein
    4B set (``fixtures/tiny_flux2.py``), written once per session and linked into the host's model folders; a
    host-limit skip on a ComfyUI without FLUX.2 (0.3.64)."""
    import comfy.supported_models

    from fixtures import tiny_flux2

    if not hasattr(comfy.supported_models, "Flux2"):
        pytest.skip(HOST_LIMIT_FLUX2)
    paths = tiny_flux2.build_flux2_set(set_folder(tmp_path_factory, "tiny_flux2"))
    return tiny_flux2.link_flux2_set(paths, comfy_host.base_directory / "models")


HOST_LIMIT_QWEN_IMAGE = ("host limit: this ComfyUI (0.3.64) copies the scaled-fp8 Qwen2.5-VL-7B's matrices into "
                         "its model while the file is mapped, so the Qwen-Image set's load peaks above 15 GB, more "
                         "than CI's host suite can hold beside the rest; the Qwen-Image tests run on 0.33+")


@pytest.fixture(scope="session")
def tiny_qwen_image_files(comfy_host, tmp_path_factory) -> dict:
    """{"dit", "te", "vae"}: the names UNETLoader / CLIPLoader (type qwen_image) / VAELoader list for the tiny
    Qwen-Image set (``fixtures/tiny_qwen_image.py``), written once per session and linked into the host's model
    folders; a host-limit skip on a ComfyUI that would copy the 8 GB encoder (0.3.64)."""
    from fixtures import tiny_qwen_image

    if not _host_maps_quantized_te():
        pytest.skip(HOST_LIMIT_QWEN_IMAGE)
    paths = tiny_qwen_image.build_qwen_image_set(set_folder(tmp_path_factory, "tiny_qwen_image"))
    return tiny_qwen_image.link_qwen_image_set(paths, comfy_host.base_directory / "models")


def _host_pins_flux_width() -> bool:
    """True on a ComfyUI that builds every Flux at hidden 3072 whatever the file says (0.3.64)."""
    import comfy.model_detection

    from fixtures import tiny_flux

    return comfy.model_detection.detect_unet_config(tiny_flux.flux_dit_state_dict("dev"), "")["hidden_size"] != 128


HOST_LIMIT_DITS = ("host limit: this ComfyUI (0.3.64) builds every Flux at full width (3072) and its T5-XXL load "
                   "alone peaks near 15 GiB, more than CI's host suite can hold beside the rest; the Flux/Chroma "
                   "host tests run on 0.33+")


@pytest.fixture(scope="session")
def tiny_dit_files(comfy_host, tmp_path_factory):
    """``files(family)`` -> {"dit", "clip_l", "t5xxl", "vae"}: the names UNETLoader / DualCLIPLoader / CLIPLoader /
    VAELoader list for a tiny set ComfyUI detects as that family ("flux" = Flux.1 dev, "schnell", "chroma";
    ``fixtures/tiny_flux.py``). Written once per session and linked into the host's model folders. Skips (a
    stated host limit, which CI accepts) on a ComfyUI that pins Flux's width (0.3.64)."""
    from fixtures import tiny_flux

    if _host_pins_flux_width():
        pytest.skip(HOST_LIMIT_DITS)
    restore = _memoize_t5()
    build = set_folder(tmp_path_factory, "tiny_dit")
    models = comfy_host.base_directory / "models"
    folders = {"dit": "diffusion_models", "clip_l": "text_encoders", "t5xxl": "text_encoders", "vae": "vae"}
    made: dict[str, dict[str, str]] = {}

    def files(family: str) -> dict[str, str]:
        if family not in made:
            if family == "chroma":
                paths = tiny_flux.build_chroma_set(build)
            else:
                paths = tiny_flux.build_flux_set(build, "dev" if family == "flux" else family)
            names = {}
            for role, path in paths.items():
                target = models / folders[role] / path.name
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.exists():
                    os.link(path, target)
                names[role] = path.name
            made[family] = names
        return made[family]

    yield files
    restore()


def _memoize_t5():
    """T5-XXL encodes remembered for the session, by the encoder's weights and the tokens: one encode of the
    fixture's full-size fp8 T5 takes 30-45 s on a 2-core CPU (ComfyUI casts every fp8 matrix per call), the
    T5 is the same file in every set, and no test checks T5 itself. Returns the undo."""
    import comfy.sd1_clip
    import comfy.text_encoders.sd3_clip
    import torch

    original = comfy.sd1_clip.SDClipModel.encode
    t5_class = comfy.text_encoders.sd3_clip.T5XXLModel
    cache: dict = {}

    def encode(self, tokens):
        if not isinstance(self, t5_class):
            return original(self, tokens)
        first = next(self.parameters())
        key = (repr(tokens), first.dtype, first.flatten()[:64].float().sum().item(), tuple(first.shape))
        if key not in cache:
            cache[key] = original(self, tokens)
        out = cache[key]
        return tuple(o.clone() if isinstance(o, torch.Tensor) else o for o in out)

    comfy.sd1_clip.SDClipModel.encode = encode
    return lambda: setattr(comfy.sd1_clip.SDClipModel, "encode", original)

