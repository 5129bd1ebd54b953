"""The FID Inception-v3 (TF "2015-12-05" graph ported to PyTorch), built on torchvision's blocks.

The construction of pytorch-fid's `fid_inception_v3`: torchvision's Inception3 without aux
logits and with 1008 classes, whose pool branches take the FID variants of the TF graph: those
of Mixed_5b-5d (A), 6b-6e (C) and 7b (E_1) average without counting padding, and 7c (E_2)
max-pools. Parameter names are torchvision's, so the published
`pt_inception-2015-12-05-6726825d.pth` state dict loads strictly. Weights are never
downloaded: `load_fid_inception` only looks on disk.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.inception import (BasicConv2d, Inception3, InceptionA, InceptionAux,
                                          InceptionB, InceptionC, InceptionD, InceptionE)

__all__ = ["InceptionV3FID", "load_fid_inception", "FID_WEIGHTS_FILE", "WEIGHTS_ENV"]

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
# torch-fidelity / torchmetrics cache the same weights (same sha256 prefix) under this name.
_FIDELITY_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_ENV = "PERCEPTUAL_DIFFUSION_WEIGHTS"


def _avg_pool_no_pad(x: Tensor) -> Tensor:
    # TF's SAME average pooling divides by the number of real (unpadded) pixels.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(InceptionA):
    """torchvision's 35x35 block with the TF pool branch (no padding in the average)."""

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_no_pad(x))
        return torch.cat([self.branch1x1(x), b5, b3, bp], 1)


class FIDInceptionC(InceptionC):
    """torchvision's 17x17 block (factorised 7x7) with the TF pool branch."""

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            bd = conv(bd)
        bp = self.branch_pool(_avg_pool_no_pad(x))
        return torch.cat([self.branch1x1(x), b7, bd, bp], 1)


def _inception_e(block: InceptionE, x: Tensor, pooled: Tensor) -> Tensor:
    """torchvision's 8x8 block (split 1x3/3x1 outputs) with `pooled` fed to its pool branch."""
    b3 = block.branch3x3_1(x)
    b3 = torch.cat([block.branch3x3_2a(b3), block.branch3x3_2b(b3)], 1)
    bd = block.branch3x3dbl_2(block.branch3x3dbl_1(x))
    bd = torch.cat([block.branch3x3dbl_3a(bd), block.branch3x3dbl_3b(bd)], 1)
    return torch.cat([block.branch1x1(x), b3, bd, block.branch_pool(pooled)], 1)


class FIDInceptionE1(InceptionE):
    """Mixed_7b of the TF graph: the pool branch averages without counting padding."""

    def forward(self, x: Tensor) -> Tensor:
        return _inception_e(self, x, _avg_pool_no_pad(x))


class FIDInceptionE2(InceptionE):
    """Mixed_7c of the TF graph: the pool branch max-pools."""

    def forward(self, x: Tensor) -> Tensor:
        return _inception_e(self, x, F.max_pool2d(x, 3, stride=1, padding=1))


class InceptionV3FID(Inception3):
    """FID Inception-v3: [N x C x H x W] in [-1, 1] (C = 1 or 3) -> 2048-d pool3 features.

    Input is resized bilinearly to 299x299 (align_corners=False, as pytorch-fid) and gray
    images are repeated to 3 channels; [-1, 1] is already the range the network expects.
    Implements `FeatureNetwork`; `logits` gives the 1008-way classifier for the IS.
    Constructed in eval mode with frozen parameters: it is only ever an evaluator.
    """

    dim = 2048
    num_classes = 1008

    def __init__(self) -> None:
        # init_weights=False: torch's default init; real weights come from `from_file`.
        super().__init__(num_classes=self.num_classes, aux_logits=False, init_weights=False,
                         inception_blocks=[BasicConv2d, FIDInceptionA, InceptionB,
                                           FIDInceptionC, InceptionD, FIDInceptionE1,
                                           InceptionAux])
        self.Mixed_7c = FIDInceptionE2(2048)  # the blocks list has one E slot
        self.requires_grad_(False)
        self.eval()

    def _prepare(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected [N x 1|3 x H x W] images, got shape {tuple(x.shape)}")
        p = self.fc.weight
        x = x.to(device=p.device, dtype=p.dtype)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return x

    def forward(self, x: Tensor) -> Tensor:
        """x [N x C x H x W] in [-1, 1] -> (N, 2048) pool3 features."""
        x = self._prepare(x)
        for block in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3, self.maxpool1,
                      self.Conv2d_3b_1x1, self.Conv2d_4a_3x3, self.maxpool2,
                      self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):
            x = block(x)
        return self.avgpool(x).flatten(1)

    def features(self, x: Tensor) -> Tensor:
        """(N, 2048) pool3 features, the FID embedding."""
        return self(x)

    def logits(self, x: Tensor, bias: bool = False) -> Tensor:
        """(N, 1008) class logits for the IS. Without the bias by default, as the original IS
        code (pool3 @ softmax/logits/MatMul weight) and torch-fidelity's "logits_unbiased"."""
        f = self(x)
        return F.linear(f, self.fc.weight, self.fc.bias if bias else None)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> InceptionV3FID:
        """The network with weights read from a local `pt_inception-2015-12-05` state dict
        (torch.load with weights_only=True, strict load)."""
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        model = cls()
        # Files saved before BatchNorm counted its batches lack these buffers; they are unused.
        counters = {k: v for k, v in model.state_dict().items()
                    if k.endswith("num_batches_tracked")}
        model.load_state_dict({**counters, **state}, strict=True)
        return model


def _candidates(path: str | os.PathLike | None) -> list[Path]:
    if path is not None:
        p = Path(path)
        return [p / FID_WEIGHTS_FILE if p.is_dir() else p]
    places = []
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        p = Path(env)
        folder = p.is_dir() or not p.suffix
        places += [p / FID_WEIGHTS_FILE, p / _FIDELITY_WEIGHTS_FILE] if folder else [p]
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    return places + [hub / FID_WEIGHTS_FILE, hub / _FIDELITY_WEIGHTS_FILE]


def load_fid_inception(path: str | os.PathLike | None = None) -> InceptionV3FID:
    """The FID Inception-v3 with its published weights, from `path` (a file or a folder
    holding it), else from $PERCEPTUAL_DIFFUSION_WEIGHTS (a file or folder), else from the
    torch hub cache (torch.hub.get_dir()/checkpoints). Never downloads; raises
    FileNotFoundError naming the file and the places searched."""
    places = _candidates(path)
    for p in places:
        if p.is_file():
            return InceptionV3FID.from_file(p)
    raise FileNotFoundError(
        f"FID Inception weights {FID_WEIGHTS_FILE} not found (looked at "
        f"{', '.join(str(p) for p in places)}); download it from the pytorch-fid releases "
        f"and pass its path or set ${WEIGHTS_ENV}")
