"""Figures without a plotting library: labelled image grids and simple line charts (Pillow)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from dad.utils.colormap import apply_colormap

_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def disparity_rgb(disparity: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Colour a disparity map (near = bright); ``lo``/``hi`` fix the range for comparisons."""
    if lo is None or hi is None:
        lo, hi = np.percentile(disparity, [1, 99])
    return apply_colormap((disparity - lo) / max(hi - lo, 1e-12))


def image_grid(rows: Sequence[Sequence[np.ndarray]], column_titles: Sequence[str], path: str | Path,
               cell: int = 160, pad: int = 4, title_height: int = 18) -> Path:
    """Rows of (H, W, 3) uint8 images resized into cells, with a title above each column."""
    ncol = len(column_titles)
    width = ncol * (cell + pad) + pad
    height = title_height + len(rows) * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(column_titles):
        draw.text((pad + c * (cell + pad) + 2, 3), title, fill=(0, 0, 0))
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            tile = Image.fromarray(np.asarray(img, dtype=np.uint8))
            tile.thumbnail((cell, cell))
            canvas.paste(tile, (pad + c * (cell + pad), title_height + pad + r * (cell + pad)))
    path = Path(path)
    canvas.save(path)
    return path


def _log_or_gap(values: np.ndarray) -> np.ndarray:
    """log10 of the positive values; NaN (a gap in the line) for zero or negative ones, which a
    log axis cannot show (a loss term that is exactly 0 on some step, say)."""
    out = np.full(values.shape, np.nan)
    positive = values > 0
    out[positive] = np.log10(values[positive])
    return out


def line_chart(series: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, title: str = "",
               xlabel: str = "step", ylabel: str = "", size: tuple[int, int] = (640, 360), log_y: bool = False) -> Path:
    """Named (x, y) series on shared axes with a legend; optional log-scale y."""
    w, h = size
    left, right, top, bottom = 56, 12, 24, 36
    canvas = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    xs = np.concatenate([np.asarray(x, float) for x, _ in series.values()]) if series else np.zeros(1)
    ys = np.concatenate([np.asarray(y, float) for _, y in series.values()]) if series else np.zeros(1)
    ys_t = _log_or_gap(ys) if log_y else ys
    finite = np.isfinite(ys_t)
    x0, x1 = float(xs.min()), float(xs.max()) if xs.max() > xs.min() else float(xs.min()) + 1
    y0, y1 = (float(ys_t[finite].min()), float(ys_t[finite].max())) if finite.any() else (0.0, 1.0)
    if y1 <= y0:
        y1 = y0 + 1.0

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (w - left - right), top + (1 - (y - y0) / (y1 - y0)) * (h - top - bottom))

    draw.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        _, yp = px(x0, yv)
        label = f"{10 ** yv:.3g}" if log_y else f"{yv:.3g}"
        draw.line([left - 4, yp, left, yp], fill=(0, 0, 0))
        draw.text((2, yp - 6), label, fill=(0, 0, 0))
        xv = x0 + (x1 - x0) * i / 4
        xp, _ = px(xv, y0)
        draw.text((xp - 10, h - bottom + 4), f"{xv:.0f}", fill=(0, 0, 0))
    draw.text((w // 2 - 20, h - 14), xlabel, fill=(0, 0, 0))
    draw.text((left, 4), title + (f"  ({ylabel}, log scale)" if log_y else f"  ({ylabel})" if ylabel else ""), fill=(0, 0, 0))
    for i, (name, (x, y)) in enumerate(series.items()):
        color = _PALETTE[i % len(_PALETTE)]
        yv = _log_or_gap(np.asarray(y, float)) if log_y else np.asarray(y, float)
        run: list[tuple[float, float]] = []
        for a, b in [*zip(np.asarray(x, float), yv), (np.nan, np.nan)]:  # a gap ends a line
            if np.isfinite(b):
                run.append(px(a, b))
                continue
            if len(run) > 1:
                draw.line(run, fill=color, width=2)
            elif run:
                draw.point(run, fill=color)
            run = []
        draw.rectangle([w - right - 150, top + 6 + 14 * i, w - right - 140, top + 14 + 14 * i], fill=color)
        draw.text((w - right - 136, top + 3 + 14 * i), name, fill=(0, 0, 0))
    path = Path(path)
    canvas.save(path)
    return path
