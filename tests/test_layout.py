"""The shape of the house: the engine never imports the host, the package imports cleanly."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOST_MODULES = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "server", "nodes", "execution",
                "comfy_execution", "latent_preview", "node_helpers"}


def _imported_top_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods.add(node.module.split(".")[0])
    return mods


def test_engine_never_imports_comfyui():
    offenders = {}
    for py in sorted((ROOT / "training").rglob("*.py")):
        bad = _imported_top_modules(py) & HOST_MODULES
        if bad:
            offenders[str(py.relative_to(ROOT))] = sorted(bad)
    assert not offenders, f"training/ must stay host-free, but imports ComfyUI modules: {offenders}"


def test_package_import_has_no_side_effects_and_no_host():
    code = (
        "import sys, logging, lora_workbench, lora_workbench.training.train.trainer, lora_workbench.app.cli\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(HOST_MODULES)!r})\n"
        "assert not bad, bad\n"
        "assert lora_workbench.WEB_DIRECTORY == './js'\n"
        "assert callable(lora_workbench.comfy_entrypoint)\n"
        "assert not logging.getLogger().handlers, 'importing must not configure logging'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "", f"importing the package printed: {r.stdout!r}"


def test_root_init_only_declares_entrypoint():
    tree = ast.parse((ROOT / "__init__.py").read_text())
    top_level = [type(n).__name__ for n in tree.body if not isinstance(n, ast.Expr)]
    assert sorted(top_level) == ["Assign", "AsyncFunctionDef"], top_level
    assert "NODE_CLASS_MAPPINGS" not in (ROOT / "__init__.py").read_text()


def _relative_targets(path: Path) -> set[str]:
    """Package-relative modules a file imports (``from ..x import y`` -> the path of ``x``), as
    dotted names from the repo root."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            if node.module:
                out.add(".".join([*base, node.module]))
            else:
                out.update(".".join([*base, a.name]) for a in node.names)
    return out


def test_node_modules_share_code_through_nodes_comfy_never_through_each_other():
    node_modules = {f"nodes.{p.stem}" for p in (ROOT / "nodes").glob("*_nodes.py")}
    offenders = {}
    for py in sorted((ROOT / "nodes").glob("*_nodes.py")):
        hits = {t for t in _relative_targets(py) if any(t == m or t.startswith(m + ".") for m in node_modules)}
        if hits:
            offenders[py.name] = sorted(hits)
    assert not offenders, f"node modules import other node modules (move the shared code to nodes/comfy/): {offenders}"


def test_engine_never_imports_the_app_or_the_nodes():
    """Arrows point down only: app/ and nodes/ use training/, never the other way (relative imports count)."""
    offenders = {}
    for py in sorted((ROOT / "training").rglob("*.py")):
        hits = {t for t in _relative_targets(py) if t.split(".")[0] in ("app", "nodes")}
        if hits:
            offenders[str(py.relative_to(ROOT))] = sorted(hits)
    assert not offenders, f"training/ imports the layers above it: {offenders}"


def test_event_names_are_defined_once_and_the_frontend_uses_the_same():
    import re

    from lora_workbench.nodes.comfy import events

    js = (ROOT / "js" / "lora_workbench.js").read_text(encoding="utf-8")
    block = re.search(r"const TRAIN_EVENTS = Object\.freeze\(\{(.*?)\}\);", js, re.S)
    assert block, "js/lora_workbench.js has no TRAIN_EVENTS constant"
    assert set(re.findall(r'"(lw\.[\w.]+)"', block.group(1))) == set(events.ALL)
    assert js.count('"lw.') == len(events.ALL), "an event name is spelled outside TRAIN_EVENTS in the JS"
    spelled = [str(p.relative_to(ROOT)) for folder in ("training", "app", "nodes") for p in (ROOT / folder).rglob("*.py")
               if '"lw.train.' in p.read_text(encoding="utf-8") and p.name != "events.py"]
    assert not spelled, f"event names spelled outside nodes/comfy/events.py: {spelled}"


def test_every_error_of_ours_has_the_one_base_and_an_error_name():
    import builtins

    bases = {}
    for folder in ("training", "app", "nodes"):
        for py in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(py.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ClassDef):
                    bases[node.name] = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases]
    builtin_errors = {n for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException)}

    def is_exception(name, seen=()):
        return name in builtin_errors or any(is_exception(b, (*seen, name)) for b in bases.get(name, ())
                                             if b not in seen)

    def has_base(name, seen=()):
        return name == "LoraWorkbenchError" or any(has_base(b, (*seen, name)) for b in bases.get(name, ())
                                                   if b not in seen)

    ours = [n for n in bases if n not in builtin_errors and is_exception(n)]
    assert len(ours) > 15, ours
    signals = {"Interrupted"}  # a KeyboardInterrupt: a stop request, not an error
    assert [n for n in ours if n not in signals and not n.endswith("Error")] == []
    assert [n for n in ours if n not in signals and not has_base(n)] == []
