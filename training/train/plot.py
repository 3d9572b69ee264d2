"""A loss curve as a picture (raw and smoothed), drawn with Pillow: no plotting library needed."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw


def ema(values: list[float], alpha: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = alpha * avg + (1 - alpha) * v
        out.append(avg / (1 - alpha ** i))
    return out


def loss_plot(losses: list[float], width: int = 768, height: int = 384, smoothing: float = 0.9,
              title: str = "training loss", validation: list | None = None) -> Image.Image:
    """Raw loss (light) and its EMA (dark) against the step, with min/max labels; ``validation`` ((step, loss, ...)
    per validation) as a green line with the best step marked."""
    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 60, 16, 30, 36
    d.text((left, 8), title, fill=(0, 0, 0))
    validation = [v for v in (validation or []) if math.isfinite(v[1])]
    finite = [v for v in losses if math.isfinite(v)] + [v[1] for v in validation]
    d.rectangle([left, top, width - right, height - bottom], outline=(160, 160, 160))
    if not finite:
        d.text((left + 10, top + 10), "no steps yet", fill=(120, 120, 120))
        return img
    lo, hi = min(finite), max(finite)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    n = len(losses)

    def xy(i, v):
        x = left + (width - left - right) * (i / max(1, n - 1))
        y = top + (height - top - bottom) * (1 - (v - lo) / (hi - lo))
        return x, y

    finite = [v for v in losses if math.isfinite(v)]
    raw = [xy(i, v) for i, v in enumerate(losses) if math.isfinite(v)]
    if len(raw) > 1:
        d.line(raw, fill=(170, 200, 240), width=1)
    smooth = [xy(i, v) for i, v in enumerate(ema(finite, smoothing))]
    if len(smooth) > 1:
        d.line(smooth, fill=(20, 70, 160), width=2)
    if validation:
        points = [xy(s - 1, v) for s, v, *_ in validation]  # step s is the loss at index s - 1
        if len(points) > 1:
            d.line(points, fill=(30, 150, 60), width=2)
        for x, y in points:
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(30, 150, 60))
        best_step, best = min(((s, v) for s, v, *_ in validation), key=lambda t: t[1])
        bx, by = xy(best_step - 1, best)
        d.ellipse([bx - 5, by - 5, bx + 5, by + 5], outline=(30, 150, 60), width=2)
        d.text((left + 80, 8), f"validation: best {best:.4f} at step {best_step}", fill=(30, 150, 60))
    d.text((4, top - 4), f"{hi:.4g}", fill=(0, 0, 0))
    d.text((4, height - bottom - 10), f"{lo:.4g}", fill=(0, 0, 0))
    d.text((left, height - bottom + 6), "step 1", fill=(0, 0, 0))
    d.text((width - right - 70, height - bottom + 6), f"step {n}", fill=(0, 0, 0))
    last = ema(finite, smoothing)[-1]
    d.text((width - right - 200, 8), f"last {finite[-1]:.4f}  smoothed {last:.4f}", fill=(20, 70, 160))
    return img


def label_grid(images: torch.Tensor, row_labels: list[str], col_labels: list[str]) -> torch.Tensor:
    """One IMAGE [1, H, W, 3]: the cells (row-major) below column labels and right of row labels.
    Cell pixels are copied exactly; only the label bands are drawn with PIL."""
    from PIL import ImageFont

    n, h, w, _ = images.shape
    rows, cols = len(row_labels), len(col_labels)
    font = ImageFont.load_default(size=max(12, min(h, w) // 16))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad = 8

    def box(text):
        left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    row_labels = [r if len(r) <= 48 else r[:45] + "..." for r in row_labels]
    left = max(box(r)[0] for r in row_labels) + 2 * pad
    top = max(box(c)[1] for c in col_labels) + 2 * pad
    canvas = Image.new("RGB", (left + cols * w, top + rows * h), "white")
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(col_labels):
        tw, _ = box(label)
        draw.text((left + c * w + (w - tw) // 2, pad), label, fill="black", font=font)
    for r, label in enumerate(row_labels):
        _, th = box(label)
        draw.text((pad, top + r * h + (h - th) // 2), label, fill="black", font=font)
    grid = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0).to(images.dtype)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[top + r * h: top + (r + 1) * h, left + c * w: left + (c + 1) * w] = images[i].cpu()
    return grid[None]
