"""Turning audio tensors into files a person can open: 16-bit WAV (stdlib `wave`, no extra
dependency) and spectrogram PNGs (torchaudio spectrograms).

    save_wav(x, "samples.wav", 8000)            # [N x C x L] clips, short silences between
    x, sr = read_wav("samples.wav")             # [C x L] float32
    save_spectrogram(x, "samples.png", 8000)    # one spectrogram per clip, stacked
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import torch
import torchaudio.functional as AF
from PIL import Image
from torch import Tensor

__all__ = ["save_wav", "read_wav", "spectrogram", "colorize", "save_spectrogram"]

_PCM_MAX = 32767  # 16-bit full scale; -1 maps to -32767 so the scale is symmetric

# Matplotlib's viridis at 0, 1/8, ..., 1 (perceptually uniform, readable in gray and by the
# colour-blind); `colorize` interpolates linearly between these anchors.
_VIRIDIS = np.array([[68, 1, 84], [72, 40, 120], [62, 73, 137], [49, 104, 142], [38, 130, 142],
                     [31, 158, 137], [53, 183, 121], [110, 206, 88], [253, 231, 37]],
                    dtype=np.float64)


def _clips(x: Tensor, name: str) -> Tensor:
    """[C x L] or [N x C x L] as [N x C x L] float32 on the CPU."""
    x = torch.as_tensor(x).detach()
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[-1] < 1:
        raise ValueError(f"{name} needs audio [C x L] or [N x C x L], got shape {tuple(x.shape)}")
    return x.float().cpu()


def save_wav(x: Tensor, path: str | Path, sample_rate: int, gap: float = 0.25) -> Path:
    """Write audio in [-1, 1] ([C x L], or [N x C x L]: the N clips one after another with
    `gap` seconds of silence between them) as a 16-bit PCM WAV file of C channels. Values
    outside [-1, 1] are clipped; x maps to round(x * 32767)."""
    clips = _clips(x, "save_wav")
    if not isinstance(sample_rate, int) or sample_rate < 1:
        raise ValueError(f"save_wav: sample_rate must be a positive integer, got {sample_rate!r}")
    if gap < 0:
        raise ValueError(f"save_wav: gap must be >= 0 seconds, got {gap}")
    channels = clips.shape[1]
    silence = clips.new_zeros(channels, round(gap * sample_rate))
    pieces = []
    for i, clip in enumerate(clips):
        pieces += [silence, clip] if i else [clip]
    audio = torch.cat(pieces, 1)
    pcm = (audio.clamp(-1, 1) * _PCM_MAX).round().to(torch.int16).T.numpy()  # (frames, C)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.astype("<i2").tobytes())
    return path


def read_wav(path: str | Path) -> tuple[Tensor, int]:
    """Read a 16-bit PCM WAV file (what `save_wav` writes): ([C x L] float32, sample rate),
    samples divided by 32767 so that read_wav inverts save_wav up to rounding."""
    with wave.open(str(path), "rb") as f:
        if f.getsampwidth() != 2:
            raise ValueError(f"read_wav reads 16-bit PCM only; {path} has "
                             f"{8 * f.getsampwidth()}-bit samples")
        channels, rate = f.getnchannels(), f.getframerate()
        data = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2")
    x = torch.from_numpy(data.reshape(-1, channels).T.astype(np.float32) / _PCM_MAX)
    return x.contiguous(), rate


def spectrogram(x: Tensor, n_fft: int = 256, hop: int = 64, amin: float = 1e-5) -> Tensor:
    """Log-magnitude spectrogram [F x T] in dB (F = n_fft // 2 + 1 bins of sample_rate / n_fft
    Hz from 0 Hz up, T = L // hop + 1 frames) of audio [L] or [C x L] (channels averaged).

    torchaudio's spectrogram with a Hann window, frames centred on multiples of `hop`
    (zero-padded at the ends). Magnitudes are scaled by 2 / sum(window), so a sine of amplitude
    A at a bin's centre frequency reads 20 log10(A) dB there; below `amin` reads 20 log10(amin)
    (-100 dB).
    """
    x = torch.as_tensor(x).detach()
    if x.ndim == 2:
        x = x.mean(0)
    if x.ndim != 1:
        raise ValueError(f"spectrogram needs audio [L] or [C x L], got shape {tuple(x.shape)}")
    if n_fft < 2 or hop < 1:
        raise ValueError(f"spectrogram: need n_fft >= 2 and hop >= 1, got {n_fft}, {hop}")
    window = torch.hann_window(n_fft, dtype=torch.float64)
    mag = AF.spectrogram(x.cpu().double(), pad=0, window=window, n_fft=n_fft, hop_length=hop,
                         win_length=n_fft, power=1.0, normalized=False, center=True,
                         pad_mode="constant")
    return AF.amplitude_to_DB(mag * (2 / window.sum()), 20.0, amin, 0.0).float()


def colorize(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape; clipped) -> uint8 RGB (..., 3) on the viridis colormap."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0, 1) * (len(_VIRIDIS) - 1)
    lo = np.minimum(np.floor(v).astype(np.int64), len(_VIRIDIS) - 2)
    w = (v - lo)[..., None]
    return np.round(_VIRIDIS[lo] * (1 - w) + _VIRIDIS[lo + 1] * w).astype(np.uint8)


def save_spectrogram(x: Tensor, path: str | Path, sample_rate: int, n_fft: int = 256,
                     hop: int = 64, max_freq: float | None = None,
                     db_range: tuple[float, float] = (-80.0, 0.0), scale: int = 2, nrow: int = 1) -> Path:
    """Write a PNG of the spectrograms (`spectrogram`) of audio [C x L] or [N x C x L]: one
    clip per band, stacked top to bottom in order and separated by a white line, time to the
    right and low frequencies at the bottom of each band, `db_range` mapped onto viridis
    (the same fixed range for every clip, so loudness compares across bands and files).
    `max_freq` (Hz, with `sample_rate`) drops the bins above it; `scale` upsamples pixels;
    `nrow` > 1 tiles the bands left to right, `nrow` per row (white lines between tiles)."""
    clips = _clips(x, "save_spectrogram")
    lo_db, hi_db = db_range
    if not hi_db > lo_db:
        raise ValueError(f"save_spectrogram: db_range must be (low, high) with low < high, "
                         f"got {db_range}")
    if scale < 1:
        raise ValueError(f"save_spectrogram: scale must be >= 1, got {scale}")
    bins = n_fft // 2 + 1
    if max_freq is not None:
        if max_freq <= 0:
            raise ValueError(f"save_spectrogram: max_freq must be > 0 Hz, got {max_freq}")
        bins = min(bins, int(max_freq * n_fft / sample_rate) + 1)
    bands = []
    for clip in clips:
        db = spectrogram(clip, n_fft, hop)[:bins].flip(0).numpy()
        band = colorize((db - lo_db) / (hi_db - lo_db))
        bands.append(band.repeat(scale, axis=0).repeat(scale, axis=1))
    if nrow < 1:
        raise ValueError(f"save_spectrogram: nrow must be >= 1, got {nrow}")
    h, w = bands[0].shape[:2]
    cols = min(nrow, len(bands))
    n_rows = -(-len(bands) // cols)
    grid = np.full((n_rows * (h + 1) - 1, cols * (w + 1) - 1, 3), 255, dtype=np.uint8)
    for i, band in enumerate(bands):
        r, c = divmod(i, cols)
        grid[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = band
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path
