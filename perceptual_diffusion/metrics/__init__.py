"""Evaluation metrics: FID, KID and Inception Score over pluggable feature networks (the standard
FID Inception-v3 when its weights are on disk), with streaming, cached statistics; the radially
averaged power spectrum of samples against data; KID, a Frechet distance and the grain of image
patches on fixed weight-free features; and the real-versus-real floor of any metric."""

from .fid import (FeatureNetwork, RunningStats, cached_statistics, compute_statistics,
                  frechet_distance, inception_score, sqrtm_trace)
from .floor import real_vs_real_floor
from .inception import FID_WEIGHTS_FILE, InceptionV3FID, load_fid_inception
from .kid import kernel_inception_distance, polynomial_kernel, polynomial_mmd2
from .patches import mean_abs_laplacian, patch_features, patches_metrics
from .spectrum import radial_power_spectrum, save_spectrum_plot, spectrum_metrics

__all__ = ["FeatureNetwork", "RunningStats", "cached_statistics", "compute_statistics",
           "frechet_distance", "inception_score", "sqrtm_trace", "FID_WEIGHTS_FILE",
           "InceptionV3FID", "load_fid_inception", "kernel_inception_distance", "polynomial_kernel",
           "polynomial_mmd2", "radial_power_spectrum", "save_spectrum_plot", "spectrum_metrics",
           "real_vs_real_floor", "mean_abs_laplacian", "patch_features", "patches_metrics"]
