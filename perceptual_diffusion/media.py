"""Samples as files a person opens, per modality: a PNG grid for images, a frame-strip PNG and an
animated GIF for video, a spectrogram PNG and a WAV file for audio.

    paths = save_samples(x, "runs/demo/samples/mse_01000.png", "video")   # [.png, .gif]
"""

from __future__ import annotations

import math
from pathlib import Path

from torch import Tensor

__all__ = ["save_samples", "SAMPLE_RANKS"]

SAMPLE_RANKS = {"image": 4, "video": 5, "audio": 3}  # [N x C x H x W], [N x C x F x H x W], [N x C x L]


def save_samples(x: Tensor, path: str | Path, modality: str, *, nrow: int | None = None, scale: int = 2,
                 sample_rate: int = 8000, fps: int = 8) -> list[Path]:
    """Write samples in [-1, 1] next to `path` (its suffix is replaced per file) and return the
    files written, the picture first.

    image: `path`.png, a grid with `nrow` per row; video: `path`.png, one clip per row and one
    frame per column, plus `path`.gif animating a grid of the clips (`nrow` per row); audio:
    `path`.png, the clips' spectrograms tiled `nrow` per row (low frequencies at the bottom of
    each tile), plus `path`.wav, the clips one after another with short silences between.
    """
    if modality not in SAMPLE_RANKS:
        raise ValueError(f"unknown modality {modality!r}; choose one of {', '.join(SAMPLE_RANKS)}")
    if x.ndim != SAMPLE_RANKS[modality]:
        raise ValueError(f"{modality} samples must have rank {SAMPLE_RANKS[modality]}, got shape {tuple(x.shape)}")
    png = Path(path).with_suffix(".png")
    x = x.detach().float().cpu()
    if modality == "image":
        from .images import save_grid

        return [save_grid(x, png, nrow=nrow, scale=scale)]
    if modality == "video":
        from .images import save_frame_strip, save_gif

        return [save_frame_strip(x, png, scale=scale),
                save_gif(x, png.with_suffix(".gif"), fps=fps, scale=scale, nrow=nrow)]
    from .audio import save_spectrogram, save_wav

    nrow = nrow or math.ceil(math.sqrt(x.shape[0]))
    return [save_spectrogram(x, png, sample_rate, scale=scale, nrow=nrow),
            save_wav(x, png.with_suffix(".wav"), sample_rate)]
