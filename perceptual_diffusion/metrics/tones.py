"""Exact metrics for the tones toy: is each clip one steady note of the scale, and do the notes
and loudness follow the data's distribution?

    a = analyse_tones(samples)           # per clip: frequency, concentration, cents, validity
    m = tones_metrics(samples)           # {"valid_fraction", "num_valid", "pitch_error_cents",
                                         #  "pitch_tv", "param_fd"} (+ "label_accuracy")

Per clip, the Hann-windowed magnitude spectrum over the whole clip (a torchaudio spectrogram of
one frame; bin width sample_rate / L: 3.91 Hz at the default 2048 samples and 8 kHz). The clip
has ONE dominant peak when the energy within +-2 bins of its strongest bin (the Hann main lobe)
is at least 90% of the clip's energy: true tones hold 99.8%, a chord of two equal notes about
50%, noise a few percent, and a second note counts against it once it is within about 10 dB of
the first. The peak's frequency is the vertex of a parabola through the log magnitudes of the
strongest bin and its two neighbours (under 0.5 cents off for true tones). The clip is valid
when it has one dominant peak within 25 cents of a pitch of PITCHES. The tolerance is half the
50 cents that separate a note from a quarter tone off it, so a quarter-tone detuned note fails.

A model that always plays the same note scores valid_fraction 1 but a pitch_tv of 7/8 and a
large param_fd, so validity alone never rewards a collapsed model.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torchaudio.functional
from torch import Tensor

from ..datasets.audio import PITCHES, ToneParams, tone_parameters
from .fid import sample_frechet_distance

__all__ = ["ToneAnalysis", "analyse_tones", "tones_metrics", "PEAK_BINS", "MIN_CONCENTRATION",
           "TOLERANCE_CENTS"]

log = logging.getLogger(__name__)

PEAK_BINS = 2              # +-bins around the strongest bin that count as its peak
MIN_CONCENTRATION = 0.9    # energy share of that peak for one dominant tone
TOLERANCE_CENTS = 25.0     # distance to a valid pitch for a valid clip
MIN_RMS = 1e-3             # quieter clips (silence) have no peak
REFERENCE_SIZE = 5000      # tones drawn for the true (pitch, amplitude) distribution
REFERENCE_SEED = 12345     # differs from the datasets' default seed 0, the usual training data
_CHUNK = 1024              # clips analysed at once


@dataclass(frozen=True)
class ToneAnalysis:
    """Per-clip results of `analyse_tones`, each a numpy array (N,): `frequency` (Hz of the
    strongest peak), `concentration` (its share of the energy), `dominant` (one dominant peak),
    `cents` (signed distance to the nearest pitch), `pitch_index` (that pitch), `amplitude`
    (peak |x|) and `valid` (dominant and within tolerance)."""

    frequency: np.ndarray
    concentration: np.ndarray
    dominant: np.ndarray
    cents: np.ndarray
    pitch_index: np.ndarray
    amplitude: np.ndarray
    valid: np.ndarray


def _as_clips(samples: Tensor) -> Tensor:
    x = torch.as_tensor(samples).detach()
    if x.ndim == 3 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 2:
        raise ValueError(f"expected mono clips [N x 1 x L] or [N x L], got {tuple(x.shape)}")
    if x.shape[1] < 2 * PEAK_BINS + 3:
        raise ValueError(f"clips of {x.shape[1]} samples are too short for a spectrum")
    return x.to("cpu", torch.float64)


def _spectral_peaks(x: Tensor, sample_rate: int) -> tuple[Tensor, Tensor]:
    """(frequency in Hz, energy share of the +-PEAK_BINS peak) of clips [N x L] float64."""
    length = x.shape[1]
    window = torch.hann_window(length, periodic=False, dtype=torch.float64)
    # One frame as long as the clip: the windowed spectrum of the whole clip, [N x F].
    mag = torchaudio.functional.spectrogram(x, pad=0, window=window, n_fft=length,
                                            hop_length=length, win_length=length, power=1.0,
                                            normalized=False, center=False)[..., 0]
    power = mag**2
    bins = power.shape[1]
    # Parabolic interpolation needs both neighbours: a peak at DC or Nyquist is taken one bin in.
    strongest = power.argmax(1).clamp(1, bins - 2)
    near = (torch.arange(bins)[None] - strongest[:, None]).abs() <= PEAK_BINS
    share = (power * near).sum(1) / power.sum(1).clamp_min(torch.finfo(torch.float64).tiny)
    # Log magnitudes: the Hann main lobe is close to a Gaussian, whose log is a parabola.
    a, b, c = (mag.gather(1, (strongest + d)[:, None])[:, 0].clamp_min(1e-300).log()
               for d in (-1, 0, 1))
    curvature = a - 2 * b + c
    offset = torch.where(curvature < 0, 0.5 * (a - c) / curvature.clamp_max(-1e-300), 0.0)
    return (strongest + offset.clamp(-0.5, 0.5)) * sample_rate / length, share


def analyse_tones(samples: Tensor, sample_rate: int = 8000, *,
                  tolerance_cents: float = TOLERANCE_CENTS,
                  min_concentration: float = MIN_CONCENTRATION) -> ToneAnalysis:
    """Analyse clips [N x 1 x L] (or [N x L]) at `sample_rate` Hz one by one (see the module
    docstring for the rules). Clips quieter than RMS 1e-3 have no dominant peak."""
    if sample_rate <= 2 * max(PITCHES):
        raise ValueError(f"sample_rate must exceed {2 * max(PITCHES):.1f} Hz, got {sample_rate}")
    if not tolerance_cents > 0:
        raise ValueError(f"tolerance_cents must be > 0, got {tolerance_cents}")
    if not 0 < min_concentration <= 1:
        raise ValueError(f"min_concentration must be in (0, 1], got {min_concentration}")
    x = _as_clips(samples)
    if len(x) == 0:
        empty = np.zeros(0)
        return ToneAnalysis(empty, empty, empty.astype(bool), empty, empty.astype(np.int64),
                            empty, empty.astype(bool))
    peaks = [_spectral_peaks(chunk, sample_rate) for chunk in x.split(_CHUNK)]
    freq = torch.cat([f for f, _ in peaks])
    share = torch.cat([s for _, s in peaks])
    pitches = torch.tensor(PITCHES, dtype=torch.float64)
    all_cents = 1200 * torch.log2(freq.clamp_min(1e-9)[:, None] / pitches[None])
    nearest = all_cents.abs().argmin(1)
    cents = all_cents.gather(1, nearest[:, None])[:, 0]
    dominant = (share >= min_concentration) & (x.pow(2).mean(1).sqrt() >= MIN_RMS)
    valid = dominant & (cents.abs() <= tolerance_cents)
    return ToneAnalysis(freq.numpy(), share.numpy(), dominant.numpy(), cents.numpy(),
                        nearest.numpy(), x.abs().amax(1).numpy(), valid.numpy())


def _features(pitch_index: np.ndarray, amplitude: np.ndarray) -> np.ndarray:
    """(pitch index, log amplitude) as (M, 2) float64."""
    return np.stack([pitch_index.astype(np.float64),
                     np.log(np.maximum(amplitude.astype(np.float64), 1e-12))], 1)


@functools.lru_cache(maxsize=1)
def _default_reference() -> ToneParams:
    return tone_parameters(REFERENCE_SIZE, seed=REFERENCE_SEED)


def _reference(reference: Tensor | ToneParams | None, sample_rate: int, **rules: float
               ) -> tuple[np.ndarray, np.ndarray]:
    """(pitch histogram (K,) summing to 1, features (M, 2)) of the reference."""
    k = len(PITCHES)
    if reference is None or isinstance(reference, ToneParams):
        params = _default_reference() if reference is None else reference
        index = params.pitch_index.numpy()
        features = _features(index, params.amplitude.numpy())
        # The generator draws every note with probability 1/K: use that, not an estimate.
        hist = (np.full(k, 1 / k) if reference is None
                else np.bincount(index, minlength=k) / len(index))
        return hist, features
    ref = analyse_tones(reference, sample_rate, **rules)
    if not ref.valid.all():
        log.warning("%d of %d reference clips are not one valid tone; they are left out",
                    int((~ref.valid).sum()), len(ref.valid))
    if not ref.valid.any():
        raise ValueError("no reference clip is one valid tone")
    index = ref.pitch_index[ref.valid]
    return (np.bincount(index, minlength=k) / len(index),
            _features(index, ref.amplitude[ref.valid]))


def tones_metrics(samples: Tensor, sample_rate: int = 8000, labels: Tensor | None = None,
                  reference: Tensor | ToneParams | None = None, *,
                  tolerance_cents: float = TOLERANCE_CENTS,
                  min_concentration: float = MIN_CONCENTRATION) -> dict[str, float]:
    """Validity and diversity of tone clips [N x 1 x L] (about [-1, 1]) at `sample_rate` Hz.

    - "valid_fraction", "num_valid": clips that are one dominant peak within
      `tolerance_cents` of a pitch of PITCHES (`analyse_tones`).
    - "pitch_error_cents": mean |cents| to the nearest pitch over clips with one dominant peak,
      valid or not (inf when there is none).
    - "pitch_tv": total-variation distance (1/2 sum |p - q|, in [0, 1]) between the pitch
      histogram of the valid clips and the reference's (1 when no clip is valid).
    - "param_fd": Frechet distance between Gaussians fitted to (pitch index, log peak |x|) of
      the valid clips and of the reference (inf when no clip is valid).
    - "peak_concentration": the mean over all clips of the energy fraction within +-PEAK_BINS of
      the strongest bin (about 1 for a pure tone, a few hundredths for noise): partial credit
      on the way to one dominant peak, informative while valid_fraction is 0.
    - "label_accuracy" (when `labels` (N,) are given): fraction of all clips that are valid
      and play the note PITCHES[label].

    The reference defaults to the true parameters of 5,000 freshly drawn tones (seed 12345)
    with the exact uniform note distribution; pass ToneParams for other true parameters, or
    reference clips [M x 1 x L] to analyse them like the samples. True tones score
    valid_fraction 1 and pitch_tv about sqrt((K - 1) / (2 pi N)) for N clips (0.066 at 256).
    """
    rules = {"tolerance_cents": tolerance_cents, "min_concentration": min_concentration}
    a = analyse_tones(samples, sample_rate, **rules)
    n = len(a.valid)
    ref_hist, ref_features = _reference(reference, sample_rate, **rules)
    valid_index = a.pitch_index[a.valid]
    num_valid = int(a.valid.sum())
    if num_valid:
        hist = np.bincount(valid_index, minlength=len(PITCHES)) / num_valid
        pitch_tv = float(0.5 * np.abs(hist - ref_hist).sum())
        param_fd = sample_frechet_distance(_features(valid_index, a.amplitude[a.valid]), ref_features)
    else:
        pitch_tv, param_fd = 1.0, math.inf
    out = {"valid_fraction": num_valid / n if n else 0.0, "num_valid": num_valid,
           "pitch_error_cents": float(np.abs(a.cents[a.dominant]).mean()) if a.dominant.any()
           else math.inf,
           "pitch_tv": pitch_tv, "param_fd": param_fd,
           "peak_concentration": float(a.concentration.mean()) if n else 0.0}
    if labels is not None:
        labels_np = torch.as_tensor(labels).detach().cpu().numpy().reshape(-1)
        if labels_np.shape[0] != n:
            raise ValueError(f"got {labels_np.shape[0]} labels for {n} samples")
        hit = a.valid & (a.pitch_index == labels_np)
        out["label_accuracy"] = float(hit.mean()) if n else 0.0
    return out
