"""perceptual-diffusion: diffusion training with the self-perceptual objective of Lin & Yang,
"Diffusion Model with Perceptual Loss", for any backbone that implements `Denoiser`."""

from .denoiser import Denoiser, HookedDenoiser, TappedDenoiser, resolve_layers
from .objectives import SelfPerceptual, VelocityMSE, make_perceptual
from .sampling import ddim_sample, rescale_guidance
from .schedule import NoiseSchedule

__version__ = "0.1.0"

__all__ = [
    "NoiseSchedule",
    "Denoiser",
    "TappedDenoiser",
    "HookedDenoiser",
    "resolve_layers",
    "VelocityMSE",
    "SelfPerceptual",
    "make_perceptual",
    "ddim_sample",
    "rescale_guidance",
]
