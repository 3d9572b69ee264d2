"""LoRA layers on any backend's modules, through peft.

The backend says which modules exist and what kohya calls them; this module picks the targets a
preset names, injects peft LoRA layers (fp32 weights whatever the base dtype), reads them out as
a ``LoraWeights`` in kohya naming, loads them back, and removes them again so a cached base
model is left exactly as it was.

``network`` "loha" / "lokr" injects peft's LyCORIS layers (``LoHaConfig`` / ``LoKrConfig``) instead, read out
as ``LycorisModule`` under LyCORIS's own key names (peft names its parameters the same way). Both start at the
base model: peft zero-inits ``hada_w2_b`` (LoHa) and ``lokr_w1`` (LoKr). A LoKr layer whose two Kronecker
factors are both full (no rank, e.g. a small layer or a large rank) trains at scale 1, as LyCORIS trains it:
every loader (ComfyUI, A1111/Forge, LyCORIS) applies alpha / rank only to a low-rank factor, so a file then
gives exactly the trained delta.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from .files import ALGOS, LoraModule, LoraWeights, LycorisModule

log = logging.getLogger(__name__)

ADAPTER = "lw"

UNET_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
UNET_FF = ("ff.net.0.proj", "ff.net.2")
# kohya's LoCon: every Linear/Conv inside the down/mid/up blocks (not conv_in/out or embeddings).
UNET_BLOCK_PREFIXES = ("down_blocks.", "mid_block.", "up_blocks.", "input_blocks.", "middle_block.", "output_blocks.")
TE_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


@dataclass(frozen=True)
class LoraTarget:
    component: str  # "unet", "te", "te1", "te2"
    path: str  # module path inside that component's root module
    kohya_name: str
    is_conv: bool


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear)


def _is_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d)


def select_unet_targets(named_modules: Iterable[tuple[str, nn.Module]], preset: str) -> list[tuple[str, bool]]:
    """(path, is_conv) of the UNet modules a preset trains. Works on diffusers and LDM names."""
    out = []
    for path, m in named_modules:
        if not (_is_linear(m) or _is_conv(m)):
            continue
        in_attn_block = ".attn1." in f".{path}." or ".attn2." in f".{path}."
        if preset in ("attn", "attn_ff") and in_attn_block and path.endswith(UNET_ATTN) and _is_linear(m):
            out.append((path, False))
        elif preset == "attn_ff" and path.endswith(UNET_FF) and _is_linear(m):
            out.append((path, False))
        elif preset == "all" and path.startswith(UNET_BLOCK_PREFIXES):
            out.append((path, _is_conv(m)))
    return out


def select_text_encoder_targets(named_modules: Iterable[tuple[str, nn.Module]]) -> list[str]:
    """kohya's text-encoder targets: attention and MLP Linears of every CLIP layer."""
    return [p for p, m in named_modules if _is_linear(m) and ".layers." in p and p.endswith(TE_TARGETS)]


def inject(
    roots: dict[str, nn.Module],
    targets: list[LoraTarget],
    rank: int,
    alpha: float,
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
    dropout: float = 0.0,
    use_dora: bool = False,
    seed: int | None = None,
    devices: dict[str, torch.device] | None = None,
    network: str = "lora",
) -> list[nn.Parameter]:
    """Add LoRA layers (``network`` "lora"; "loha" / "lokr": LyCORIS layers) on ``targets``; return the
    trainable parameters (fp32; the delta is zero until they train)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model

    if network not in ("lora", *ALGOS):
        raise ValueError(f"network {network!r} unknown; use lora, loha or lokr")
    if seed is not None:
        # LoRA A init draws from the global RNG: fix it so a seed repeats a run exactly.
        torch.manual_seed(seed)
    params: list[nn.Parameter] = []
    for comp in sorted({t.component for t in targets}):
        paths = [t.path for t in targets if t.component == comp]
        conv_paths = [t.path for t in targets if t.component == comp and t.is_conv]
        root = roots[comp]
        for p in root.parameters():
            p.requires_grad_(False)
        patterns = dict(rank_pattern={f"^{p}$": conv_rank for p in conv_paths} if conv_rank else {},
                        alpha_pattern={f"^{p}$": conv_alpha for p in conv_paths} if conv_alpha else {})
        if network == "lora":
            cfg = LoraConfig(
                r=rank,
                lora_alpha=alpha,
                target_modules=paths,
                lora_dropout=dropout,
                init_lora_weights=True,  # kaiming-uniform down, zero up: training starts at the base model
                use_dora=use_dora,
                **patterns,
            )
        else:
            # peft's defaults are LyCORIS's file layout: flat conv factors (no Tucker), LoKr's factor -1 (near the
            # square root) with only w2 decomposed; init_weights: one zero factor, so the delta starts at 0.
            config_class = LoHaConfig if network == "loha" else LoKrConfig
            cfg = config_class(r=rank, alpha=alpha, target_modules=paths, init_weights=True, **patterns)
        inject_adapter_in_model(cfg, root, adapter_name=ADAPTER)
        if network == "lokr":
            full = [path for path, layer in _lycoris_layers(root)
                    if ADAPTER in layer.lokr_w1 and ADAPTER in layer.lokr_w2]
            for path in full:
                # No low-rank factor: loaders apply scale 1 (see the module note), so train at scale 1.
                layer = root.get_submodule(path)
                layer.alpha[ADAPTER] = float(layer.r[ADAPTER])
                layer.set_scale(ADAPTER, 1.0)
            if full and alpha != rank:
                log.info("LoKr: %d of the %s layers have two full Kronecker factors (rank %d is at least half their "
                         "factors' size): they train at scale 1, as LyCORIS trains them, not alpha / rank",
                         len(full), comp, rank)
        for name, p in root.named_parameters():
            if f".{ADAPTER}." in name or name.endswith(f".{ADAPTER}"):
                # LoRA weights train in fp32 even on a fp16/bf16 base: tiny updates survive.
                # On the compute device: under lowvram the base weight may sit on the CPU.
                p.data = p.data.to(device=(devices or {}).get(comp, p.device), dtype=torch.float32)
                p.requires_grad_(True)
                params.append(p)
    n = sum(p.numel() for p in params)
    log.debug("injected LoRA into %d modules, %d trainable parameters", len(targets), n)
    return params


def _lora_layers(root: nn.Module):
    from peft.tuners.lora import LoraLayer

    for path, m in root.named_modules():
        if isinstance(m, LoraLayer) and ADAPTER in m.lora_A:
            yield path, m


def _lycoris_layers(root: nn.Module):
    from peft.tuners.lycoris_utils import LycorisLayer

    for path, m in root.named_modules():
        if isinstance(m, LycorisLayer) and ADAPTER in m._available_adapters:
            yield path, m


def _algo(layer) -> str:
    from peft.tuners.loha import LoHaLayer

    return "loha" if isinstance(layer, LoHaLayer) else "lokr"


def _lycoris_module(layer) -> LycorisModule:
    """A peft LoHa / LoKr layer's weights under LyCORIS's key names (peft uses the same names), fp32 CPU copies."""
    algo = _algo(layer)
    weights = {k: getattr(layer, k)[ADAPTER].detach().float().cpu().clone()
               for k in ALGOS[algo] if ADAPTER in getattr(layer, k)}
    module = LycorisModule(algo, weights, None, tuple(layer.get_base_layer().weight.shape))
    scaling = float(layer.scaling[ADAPTER])
    if module.rank:
        module.alpha = scaling * module.rank
    else:
        # a LoKr without a low-rank factor: loaders apply scale 1, so any other scale goes into w1 (inject
        # trains these at scale 1, so this only acts on layers another tool set up)
        module.alpha = float(layer.r[ADAPTER])
        if scaling != 1.0:
            weights["lokr_w1"] = weights["lokr_w1"] * scaling
    return module


def extract(roots: dict[str, nn.Module], targets: list[LoraTarget], metadata: dict | None = None,
            arch: str = "unknown") -> LoraWeights:
    """Read the trained LoRA out of the injected model into kohya naming (detached fp32 copies)."""
    by_path = {(t.component, t.path): t for t in targets}
    modules: dict[str, LoraModule | LycorisModule] = {}
    for comp, root in roots.items():
        for path, layer in _lycoris_layers(root):
            t = by_path.get((comp, path))
            if t is not None:
                modules[t.kohya_name] = _lycoris_module(layer)
        for path, layer in _lora_layers(root):
            t = by_path.get((comp, path))
            if t is None:
                continue
            down = layer.lora_A[ADAPTER].weight.detach().float().cpu().clone()
            up = layer.lora_B[ADAPTER].weight.detach().float().cpu().clone()
            alpha = float(layer.scaling[ADAPTER]) * down.shape[0]
            dora = None
            if getattr(layer, "use_dora", {}).get(ADAPTER, False):
                mag = layer.lora_magnitude_vector[ADAPTER].weight.detach().float().cpu().clone()
                dora = mag.reshape(-1, *([1] * (layer.get_base_layer().weight.dim() - 1)))
            modules[t.kohya_name] = LoraModule(down=down, up=up, alpha=alpha, dora_scale=dora)
    return LoraWeights(modules=modules, metadata=dict(metadata or {}), arch=arch)


def load_into(roots: dict[str, nn.Module], targets: list[LoraTarget], lora: LoraWeights) -> None:
    """Copy a ``LoraWeights`` into injected layers (resume, tests). Every target must be present, with
    the rank it was injected with; the LoRA's own alpha is kept (see below)."""
    from peft import set_peft_model_state_dict

    by_path = {(t.component, t.path): t for t in targets}
    missing = [t.kohya_name for t in targets if t.kohya_name not in lora.modules]
    if missing:
        raise ValueError(f"the LoRA lacks {len(missing)} trained modules, e.g. {missing[:3]}; "
                         "it was made with other target layers (preset) than this run")
    for comp, root in roots.items():
        state: dict[str, torch.Tensor] = {}  # peft's key names: <module path>.lora_A.weight ...
        for path, layer in _lycoris_layers(root):
            t = by_path.get((comp, path))
            if t is not None:
                state.update(_lycoris_state(path, layer, lora.modules[t.kohya_name], t.kohya_name))
        for path, layer in _lora_layers(root):
            t = by_path.get((comp, path))
            if t is None:
                continue
            m = lora.modules[t.kohya_name]
            if not isinstance(m, LoraModule):
                raise ValueError(f"{t.kohya_name}: the saved module is a {m.algo}, the layer a LoRA; resume with "
                                 f"network={m.algo!r}")
            a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            if a.shape != m.down.shape or b.shape != m.up.shape:
                raise ValueError(f"{t.kohya_name}: LoRA shapes {tuple(m.down.shape)}/{tuple(m.up.shape)} do "
                                 f"not fit the layer ({tuple(a.shape)}/{tuple(b.shape)}); ranks differ")
            state[f"{path}.lora_A.weight"] = m.down
            state[f"{path}.lora_B.weight"] = m.up
            if m.dora_scale is not None and getattr(layer, "use_dora", {}).get(ADAPTER, False):
                state[f"{path}.lora_magnitude_vector"] = m.dora_scale.flatten()
            # peft's state dict carries no alpha (it lives in the LoraConfig given at injection), so a LoRA
            # whose alpha differs from the injected one gets its scale through peft's set_scale, a factor
            # on lora_alpha / r (tests/test_network.py shows the library alone keeps the injected scale).
            if layer.lora_alpha[ADAPTER] != m.alpha:
                layer.set_scale(ADAPTER, m.alpha / layer.lora_alpha[ADAPTER])
        if state:
            result = set_peft_model_state_dict(root, state, adapter_name=ADAPTER)
            if result.unexpected_keys:
                raise RuntimeError(f"peft did not place {len(result.unexpected_keys)} LoRA weights, e.g. "
                                   f"{result.unexpected_keys[:3]}; its state-dict key names changed")


def _lycoris_state(path: str, layer, m, name: str) -> dict[str, torch.Tensor]:
    """peft's state-dict entries (``<path>.hada_w1_a`` ...) of LyCORIS module ``m`` for ``layer``; the layer's scale
    follows the module's alpha, as for LoRA."""
    algo = _algo(layer)
    if not isinstance(m, LycorisModule) or m.algo != algo:
        raise ValueError(f"{name}: the saved module is a {getattr(m, 'algo', 'lora')}, the layer a {algo}; resume "
                         f"with network={getattr(m, 'algo', 'lora')!r}")
    own = {k: getattr(layer, k)[ADAPTER] for k in ALGOS[algo] if ADAPTER in getattr(layer, k)}
    if set(own) != set(m.weights) or any(own[k].shape != m.weights[k].shape for k in own):
        raise ValueError(f"{name}: {algo} factors {_shapes(m.weights)} do not fit the layer's {_shapes(own)}; "
                         "ranks differ")
    alpha = m.scale * m.rank  # the alpha a file without one means (scale 1)
    if m.rank and layer.alpha[ADAPTER] != alpha:
        layer.set_scale(ADAPTER, alpha / layer.alpha[ADAPTER])
    return {f"{path}.{k}": v for k, v in m.weights.items()}


def _shapes(weights: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(weights.items()))


def eval_lora_dropout(roots: dict[str, nn.Module]) -> None:
    """Put LoRA dropout modules in eval mode (a validation pass)."""
    for root in roots.values():
        for _, layer in _lora_layers(root):
            layer.lora_dropout[ADAPTER].eval()


def train_lora_dropout(roots: dict[str, nn.Module]) -> None:
    """Put LoRA dropout modules in training mode while the frozen base model stays in eval mode."""
    for root in roots.values():
        for _, layer in _lora_layers(root):
            layer.lora_dropout[ADAPTER].train()


def remove(roots: dict[str, nn.Module]) -> int:
    """Put every wrapped module's original layer back (diffusers' ``recurse_remove_peft_layers``, what
    its ``unload_lora`` does) and drop peft's config attributes: the base model is as before injection.
    Returns how many LoRA wrappers were removed."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lycoris_utils import LycorisLayer

    n = 0
    for root in roots.values():
        n += sum(isinstance(m, (LoraLayer, LycorisLayer)) for m in root.modules())
        recurse_remove_peft_layers(root)
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            if attr in root.__dict__:
                delattr(root, attr)
    return n


def kohya_name_fn(prefix: str) -> Callable[[str], str]:
    """Module path -> kohya name with ``prefix`` (dots become underscores): SD1/SD2 and custom UNets."""
    return lambda path: prefix + path.replace(".", "_")
