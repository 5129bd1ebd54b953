"""scikit-learn's bundled 8x8 handwritten digits (1,797 real images, 10 classes), upsampled."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["DigitsDataset"]


class DigitsDataset(Dataset):
    """Items {"x": (1, size, size) float32 in [-1, 1], "label": int64 scalar in 0..9}; the
    label is left out when `conditional` is False (unconditional training, section 5.7).

    Pixel values 0..16 map linearly to [-1, 1]; bilinear upsampling (no antialias) keeps
    them in range since every output pixel is a convex combination of inputs.
    """

    num_classes = 10

    def __init__(self, size: int = 32, conditional: bool = True):
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise ImportError("the digits dataset needs scikit-learn: "
                              "pip install 'perceptual-diffusion[data]'") from e
        if size < 1:
            raise ValueError(f"digits: size must be >= 1, got {size}")
        digits = load_digits()
        x = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / 8 - 1  # (N, 1, 8, 8)
        self.images = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                    antialias=False).clamp_(-1, 1).contiguous()
        self.labels = torch.as_tensor(digits.target, dtype=torch.int64)
        self.conditional = conditional

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if self.conditional:
            return {"x": self.images[index], "label": self.labels[index]}
        return {"x": self.images[index]}
