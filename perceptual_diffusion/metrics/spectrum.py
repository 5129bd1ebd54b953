"""The radially averaged power spectrum of images, samples against data, so that high-frequency
grain is measured rather than eyed (the spectral view of generated images of Durall et al. 2020,
"Watch your up-convolution").

    m = spectrum_metrics(samples, data)   # {"spectrum_hf_ratio": 1.0 when alike, "spectrum_log_ratio_0", ...}
    curves = {"data": radial_power_spectrum(data), "SP": radial_power_spectrum(samples)}
    save_spectrum_plot(curves, "spectrum.png", nyquist=16)

Radius is in cycles per image along the shorter side S = min(H, W); radius r averages the DFT
bins with round(|k|) = r. The Nyquist radius is S // 2; radii beyond it are the corners of the DFT
square (incomplete annuli), kept because pixel-scale grain (a +/- checkerboard) lives in the corner
(S/2, S/2), at radius S / sqrt(2).

Each image is tapered by a 2-D Hann window before the DFT (`window="hann"`, the default), because
the DFT treats an image as periodic: content that touches the border (the digits touch the top
edge; every natural patch does) makes a wrap-around step whose broadband leakage swamps the high
frequencies. Measured on the digits: a 3 x 3 blur moves the high-frequency ratio to 0.98 without a
taper and to 0.02 with it. `window=None` is the plain periodogram of the mean-subtracted image.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

__all__ = ["radial_power_spectrum", "spectrum_metrics", "save_spectrum_plot"]

_CHUNK = 256  # images per FFT: bounds the complex128 buffer
# Okabe & Ito's colour-blind-safe palette without black (black draws the axes and text).
_PALETTE = [(0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (230, 159, 0),
            (86, 180, 233), (240, 228, 66)]


def _check_images(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or x.ndim != 4 or min(x.shape[:2]) < 1 or min(x.shape[-2:]) < 2:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be images [N x C x H x W] with H, W >= 2, got {got}")


def _radius(h: int, w: int) -> Tensor:
    """[H x W] integer radius of each DFT bin, in cycles per image along the shorter side."""
    s = min(h, w)
    ky = torch.fft.fftfreq(h, dtype=torch.float64) * s
    kx = torch.fft.fftfreq(w, dtype=torch.float64) * s
    return torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2).round().long()


def _taper(h: int, w: int, window: str | None) -> Tensor:
    """[H x W] float64 taper: the outer product of two symmetric Hann windows, or ones."""
    if window is None:
        return torch.ones(h, w, dtype=torch.float64)
    if window != "hann":
        raise ValueError(f"window must be 'hann' or None, got {window!r}")
    if min(h, w) < 3:
        raise ValueError(f"window='hann' needs images of at least 3 x 3 pixels, got {h} x {w}")
    return (torch.hann_window(h, periodic=False, dtype=torch.float64)[:, None]
            * torch.hann_window(w, periodic=False, dtype=torch.float64)[None, :])


def _radial_power(images: Tensor, name: str, window: str | None) -> tuple[Tensor, Tensor]:
    """(R,) power summed over the DFT bins of each integer radius, and (R,) bins per radius.

    The power of a bin is the mean over images and channels of |DFT(w (x - m))|^2 / sum(w^2),
    w the taper and m the w-weighted mean of the image (so the DC is exactly 0): white noise of
    variance s^2 has expected power s^2 in every bin away from the DC, and without a taper
    (Parseval) the mean over all bins is the pixel variance. float64.
    """
    _check_images(images, name)
    n, c, h, w = images.shape
    taper = _taper(h, w, window)
    power = torch.zeros(h, w, dtype=torch.float64)
    for chunk in images.split(_CHUNK):
        x = chunk.detach().to("cpu", torch.float64)
        x = (x - (x * taper).sum(dim=(-2, -1), keepdim=True) / taper.sum()) * taper
        power += torch.fft.fft2(x).abs().square().sum(dim=(0, 1))
    power /= n * c * float(taper.square().sum())
    r = _radius(h, w).flatten()
    sums = torch.zeros(int(r.max()) + 1, dtype=torch.float64).index_add_(0, r, power.flatten())
    return sums, torch.bincount(r, minlength=sums.shape[0]).to(torch.float64)


def radial_power_spectrum(images: Tensor, window: str | None = "hann") -> Tensor:
    """Radially averaged power spectrum of images [N x C x H x W] -> (R,) float64: entry r is the
    mean power of the DFT bins at integer radius r (see the module docstring and `_radial_power`),
    averaged over channels and images; entry 0 (the DC) is 0 up to round-off."""
    sums, counts = _radial_power(images, "images", window)
    return sums / counts


def spectrum_metrics(samples: Tensor, data: Tensor, num_bands: int = 4, window: str | None = "hann"
                     ) -> dict[str, float]:
    """Spectrum of samples [N x C x H x W] against data [M x C x H x W] (same C, H, W), each
    tapered by `window` (see the module docstring):

    - "spectrum_hf_ratio": the fraction of spectral energy above half the Nyquist radius
      (r > S/4, corners included) in the samples over the same fraction in the data; 1.0 means
      the same, above 1 more fine detail or grain, below 1 blur.
    - "spectrum_log_ratio_<b>", b = 0 .. num_bands - 1 from low to high frequency: log10 of the
      samples' energy over the data's in the b-th of `num_bands` equal-width radius bands of
      (0, Nyquist] (the last band also takes the corners); 0 means the same, 1 ten times more.
    """
    _check_images(samples, "samples")
    _check_images(data, "data")
    if samples.shape[1:] != data.shape[1:]:
        raise ValueError(f"samples and data must have the same C x H x W, got {tuple(samples.shape[1:])} "
                         f"and {tuple(data.shape[1:])}")
    nyquist = min(samples.shape[-2:]) // 2
    if not 1 <= num_bands <= nyquist:
        raise ValueError(f"num_bands must be in [1, {nyquist}] (the Nyquist radius), got {num_bands}")
    s, _ = _radial_power(samples, "samples", window)
    d, _ = _radial_power(data, "data", window)
    r = torch.arange(s.shape[0])
    band = ((r - 1) * num_bands // nyquist).clamp(max=num_bands - 1)  # the DC (r = 0) gets -1
    out = {}
    for b in range(num_bands):
        e_s, e_d = s[band == b].sum(), d[band == b].sum()
        if not e_d > 0:
            raise ValueError(f"data has no spectral energy in band {b} (radius "
                             f"{b * nyquist / num_bands:g} to {(b + 1) * nyquist / num_bands:g})")
        out[f"spectrum_log_ratio_{b}"] = float(torch.log10(e_s / e_d))
    high = r > nyquist / 2
    hf_s, hf_d = s[high].sum() / s[1:].sum(), d[high].sum() / d[1:].sum()
    return {"spectrum_hf_ratio": float(hf_s / hf_d), **out}


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round values (1, 2 or 5 times a power of ten apart) inside [lo, hi]."""
    raw = max(hi - lo, 1e-12) / n
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def _text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], s: str,
          font: ImageFont.ImageFont | ImageFont.FreeTypeFont, anchor: str) -> None:
    """Draw `s` with its bounding box's (horizontal l/m/r, vertical t/m/b) point at xy."""
    x0, y0, x1, y1 = draw.textbbox((0, 0), s, font=font)
    fx, fy = {"l": 0, "m": 0.5, "r": 1}[anchor[0]], {"t": 0, "m": 0.5, "b": 1}[anchor[1]]
    draw.text((xy[0] - x0 - fx * (x1 - x0), xy[1] - y0 - fy * (y1 - y0)), s, fill=(0, 0, 0), font=font)


def save_spectrum_plot(curves: Mapping[str, Tensor | np.ndarray], path: str | Path, *,
                       nyquist: float | None = None, title: str = "radially averaged power spectrum",
                       size: tuple[int, int] = (640, 400)) -> Path:
    """Write a PNG line plot of log10 power against radius for each labelled spectrum (R,)
    (`radial_power_spectrum`; the DC at radius 0 and non-positive values are left out), with
    axes, ticks, a legend (bottom left, where falling spectra leave room) and, given `nyquist`,
    a dashed line at that radius. Pillow only; colours from Okabe & Ito's colour-blind-safe
    palette, in the order given."""
    if not curves or len(curves) > len(_PALETTE):
        raise ValueError(f"curves must hold 1 to {len(_PALETTE)} labelled spectra, got {len(curves)}")
    logs = {}
    for label, c in curves.items():
        v = torch.as_tensor(c).detach().to("cpu", torch.float64).numpy()
        if v.ndim != 1 or v.shape[0] < 3:
            raise ValueError(f"curves[{label!r}] must be a spectrum (R,) with R >= 3, got shape {v.shape}")
        y = np.full(v.shape, np.nan)
        y[v > 0] = np.log10(v[v > 0])
        y[0] = np.nan
        logs[str(label)] = y
    finite = np.concatenate([y[np.isfinite(y)] for y in logs.values()])
    if finite.size == 0:
        raise ValueError("curves have no positive power outside the DC to plot")
    x_hi = max(len(y) for y in logs.values()) - 1
    pad = max(0.05 * (finite.max() - finite.min()), 0.25)
    y_lo, y_hi = finite.min() - pad, finite.max() + pad
    w, h = size
    left, right, top, bottom = 64, w - 16, 30, h - 46
    if right - left < 100 or bottom - top < 80:
        raise ValueError(f"size must leave room for the plot, at least (180, 156), got {size}")
    px = lambda r: left + (r - 1) / (x_hi - 1) * (right - left)  # noqa: E731
    py = lambda v: bottom - (v - y_lo) / (y_hi - y_lo) * (bottom - top)  # noqa: E731

    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for t in _ticks(1, x_hi):
        draw.line([(px(t), top), (px(t), bottom)], fill=(232, 232, 232))
        draw.line([(px(t), bottom), (px(t), bottom + 4)], fill=(0, 0, 0))
        _text(draw, (px(t), bottom + 6), f"{t:g}", font, "mt")
    for t in _ticks(y_lo, y_hi):
        draw.line([(left, py(t)), (right, py(t))], fill=(232, 232, 232))
        draw.line([(left - 4, py(t)), (left, py(t))], fill=(0, 0, 0))
        _text(draw, (left - 6, py(t)), f"{t:g}", font, "rm")
    if nyquist is not None and 1 <= nyquist <= x_hi:
        for y0 in range(top, bottom, 8):
            draw.line([(px(nyquist), y0), (px(nyquist), min(y0 + 4, bottom))], fill=(150, 150, 150))
        _text(draw, (px(nyquist) + 2, top - 2), "Nyquist", font, "lb")
    for (label, y), colour in zip(logs.items(), _PALETTE):
        run: list[tuple[float, float]] = []
        for r, v in list(enumerate(y)) + [(len(y), np.nan)]:  # a gap (or the end) ends a run
            if np.isfinite(v):
                run.append((px(r), py(v)))
                continue
            if len(run) > 1:
                draw.line(run, fill=colour, width=2)
            run = []
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    _text(draw, ((left + right) / 2, 8), title, font, "mt")
    _text(draw, ((left + right) / 2, h - 6), "radius (cycles per image)", font, "mb")
    label_img = Image.new("RGB", (bottom - top, 14), (255, 255, 255))
    _text(ImageDraw.Draw(label_img), ((bottom - top) / 2, 7), "log10 power", font, "mm")
    img.paste(label_img.rotate(90, expand=True), (4, top))

    widths = [draw.textbbox((0, 0), label, font=font)[2] for label in logs]
    box_w, row = max(widths) + 40, 16
    bx, by = left + 8, bottom - row * len(logs) - 14
    draw.rectangle([bx, by, bx + box_w, by + row * len(logs) + 6], fill=(255, 255, 255),
                   outline=(150, 150, 150))
    for i, (label, colour) in enumerate(zip(logs, _PALETTE)):
        yc = by + 3 + row * i + row / 2
        draw.line([(bx + 6, yc), (bx + 28, yc)], fill=colour, width=3)
        _text(draw, (bx + 34, yc), label, font, "lm")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
