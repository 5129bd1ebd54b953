"""Evaluation metrics: FID and Inception Score over pluggable feature networks (the standard
FID Inception-v3 when its weights are on disk), with streaming, cached statistics."""

from .fid import (FeatureNetwork, RunningStats, cached_statistics, compute_statistics,
                  frechet_distance, inception_score, sqrtm_trace)
from .inception import FID_WEIGHTS_FILE, InceptionV3FID, load_fid_inception

__all__ = ["FeatureNetwork", "RunningStats", "cached_statistics", "compute_statistics",
           "frechet_distance", "inception_score", "sqrtm_trace", "FID_WEIGHTS_FILE",
           "InceptionV3FID", "load_fid_inception"]
