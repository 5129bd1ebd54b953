"""torchaudio behind the audio code: the resampler against analytic sines, the cropped span of a
long file against resampling all of it, the spectrogram's calibration and framing in closed
form, and the tones metric's one-frame spectrum."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from perceptual_diffusion.audio import spectrogram
from perceptual_diffusion.datasets.audio import (_FILTER, AudioFolderDataset, _input_span, _ratio,
                                                resample)
from perceptual_diffusion.metrics.tones import analyse_tones

PROPERTY = settings(max_examples=25, deadline=None)
RATES = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000)


def sine(freq: float, amplitude: float, length: int, sr: int, phase: float = 0.3) -> torch.Tensor:
    t = torch.arange(length, dtype=torch.float64) / sr
    return amplitude * torch.sin(2 * math.pi * freq * t + phase)


def edge(orig: int, new: int) -> int:
    """Outputs within the default filter's reach of the clip's ends (zero outside)."""
    zeros, rolloff = _FILTER["lowpass_filter_width"], _FILTER["rolloff"]
    return math.ceil(zeros * max(1.0, new / orig) / rolloff) + 1


# ------------------------------------------------------------------------------ resampling


@pytest.mark.parametrize("orig, new, freq", [(8000, 16000, 440.0), (8000, 16000, 3000.0),
                                             (16000, 8000, 440.0), (16000, 8000, 2900.0),
                                             (44100, 8000, 700.0), (44100, 8000, 2900.0),
                                             (22050, 16000, 5000.0), (8000, 44100, 1234.5)])
def test_resampled_sine_is_the_sine_rendered_at_the_new_rate(orig, new, freq):
    # Every freq is at most 0.75 of the lower Nyquist, where the documented gain error is 1e-5.
    x = sine(freq, 0.8, orig // 2, orig)
    y = resample(x, orig, new)
    assert y.shape == (math.ceil(x.shape[0] * new / orig),) and y.dtype == torch.float64
    e = edge(orig, new)
    assert float((y - sine(freq, 0.8, y.shape[0], new))[e:-e].abs().max()) < 1e-5 * 0.8
    y32 = resample(x.float(), orig, new)
    assert y32.dtype == torch.float32 and float((y32.double() - y).abs().max()) < 1e-7


@pytest.mark.parametrize("orig, new, freq", [(16000, 8000, 4400.0), (16000, 8000, 7900.0),
                                             (48000, 16000, 8800.0), (48000, 16000, 23000.0),
                                             (44100, 8000, 4400.0), (44100, 8000, 20000.0)])
def test_downsampling_removes_tones_above_1_1_times_the_new_nyquist(orig, new, freq):
    x = sine(freq, 0.8, orig // 2, orig)
    y = resample(x, orig, new)
    e = edge(orig, new)
    assert float(y[e:-e].abs().max()) < 1e-5 * 0.8  # > 100 dB down, no alias at |freq - k new|


def test_resample_refuses_nearly_coprime_rates_and_bad_filters():
    x = torch.zeros(100)
    with pytest.raises(ValueError, match="48000/44101 in lowest terms"):
        resample(x, 44101, 48000)
    with pytest.raises(ValueError, match="beta"):
        resample(x, 8000, 16000, beta=-1.0)
    with pytest.raises(ValueError, match="lowpass_filter_width"):
        resample(x, 8000, 16000, lowpass_filter_width=0)
    with pytest.raises(ValueError, match="time axis"):
        resample(torch.tensor(1.0), 8000, 16000)


@PROPERTY
@given(st.sampled_from(RATES), st.sampled_from(RATES), st.integers(1, 6000),
       st.integers(1, 3000), st.floats(0, 1), st.integers(0, 2**31 - 1))
def test_resampling_a_span_with_margins_equals_resampling_everything(orig, new, frames, length,
                                                                     where, seed):
    up, down, reach = _ratio(orig, new, **_FILTER)
    x = torch.randn(2, frames, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    full = resample(x, orig, new)
    count = min(length, full.shape[1])
    start = round(where * (full.shape[1] - count))  # any crop, not only the centred one
    lo, hi = (start, start + count) if up == down else _input_span(frames, up, down, reach,
                                                                   start, count)
    assert 0 <= lo < hi <= frames and lo % down == 0
    assert hi - lo <= (count + 1) * down / up + 2 * reach + down + 1  # a span, not the file
    first = start - lo // down * up
    part = resample(x[:, lo:hi], orig, new)[:, first:first + count]
    assert part.shape == (2, count)
    assert torch.allclose(part, full[:, start:start + count], rtol=0, atol=1e-12)


@pytest.mark.parametrize("orig, channels", [(44100, 1), (22050, 2), (48000, 1)])
def test_folder_reads_a_short_span_of_a_long_file_and_matches_resampling_it_all(
        tmp_path, monkeypatch, orig, channels):
    sf = pytest.importorskip("soundfile")
    frames, sr, length = 5 * orig, 8000, 1000
    data = torch.stack([sine(700.0, 0.5, frames, orig) + sine(2500.0, 0.3, frames, orig),
                        sine(300.0, 0.4, frames, orig)], 1).numpy()
    sf.write(tmp_path / "long.wav", data, orig, subtype="FLOAT")
    spans = []
    read = sf.read

    def spy(*args, **kwargs):
        spans.append((kwargs["start"], kwargs["stop"]))
        return read(*args, **kwargs)

    monkeypatch.setattr(sf, "read", spy)
    item = AudioFolderDataset(tmp_path, length=length, sample_rate=sr, channels=channels)[0]["x"]
    (lo, hi), = spans
    assert hi - lo < 2 * length * orig / sr  # about 6,000 of 220,500 frames at 44.1 kHz
    file = torch.from_numpy(data.astype(np.float32)).double().T
    file = file.mean(0, keepdim=True) if channels == 1 else file
    full = resample(file, orig, sr)
    start = (full.shape[1] - length) // 2
    assert item.shape == (channels, length)
    assert torch.allclose(item.double(), full[:, start:start + length], rtol=0, atol=1e-6)


def test_folder_with_a_nearly_coprime_rate_names_the_file(tmp_path):
    sf = pytest.importorskip("soundfile")
    sf.write(tmp_path / "odd.wav", np.zeros(500, np.float32), 44101, subtype="FLOAT")
    with pytest.raises(OSError, match=r"odd\.wav.*lowest terms"):
        AudioFolderDataset(tmp_path, length=256, sample_rate=48000)[0]


# ------------------------------------------------------------------------------ spectra


@PROPERTY
@given(st.sampled_from((32, 64, 128, 256, 512)), st.floats(0, 1), st.floats(1e-3, 1.0),
       st.floats(0, 2 * math.pi))
def test_a_sine_at_a_bin_centre_reads_its_amplitude_in_db(n_fft, where, amplitude, phase):
    # Bins 2 .. n_fft / 2 - 2: at bins 1 and n_fft / 2 - 1 the mirror image's leakage can
    # match the tone in a neighbouring bin (bin k itself is exact for every 0 < k < n_fft / 2).
    k = 2 + round(where * (n_fft // 2 - 4))
    hop, length = n_fft // 4, 4 * n_fft
    spec = spectrogram(sine(k * 8000 / n_fft, amplitude, length, 8000, phase).float(), n_fft, hop)
    assert spec.shape == (n_fft // 2 + 1, length // hop + 1) and spec.dtype == torch.float32
    inner = spec[:, 2:-2]  # frames whose window lies inside the clip (n_fft / 2 = 2 hops)
    assert torch.allclose(inner[k], torch.full_like(inner[k], 20 * math.log10(amplitude)),
                          atol=1e-3)
    assert torch.all(inner.argmax(0) == k)


def test_frames_are_centred_on_multiples_of_hop_with_zeros_outside_the_clip():
    # An impulse's spectrum is flat at the window's value where the impulse falls: frame t
    # covers samples t hop - n_fft / 2 .. t hop + n_fft / 2 - 1 (reflect padding would add an
    # echo of an impulse this close to the start).
    n_fft, hop, length, at = 64, 16, 300, 5
    x = torch.zeros(length)
    x[at] = 1.0
    spec = spectrogram(x, n_fft, hop).double()
    w = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    expected = np.full(length // hop + 1, 1e-5)
    for t in range(len(expected)):
        n = at - t * hop + n_fft // 2
        if 0 <= n < n_fft:
            expected[t] = max(w[n] * 2 / w.sum(), 1e-5)
    assert np.allclose(spec.numpy(), 20 * np.log10(expected)[None], atol=1e-4)


@pytest.mark.parametrize("amin", [1e-5, 1e-3])
def test_quiet_bins_clamp_at_amin(amin):
    spec = spectrogram(1e-9 * torch.randn(2, 400), amin=amin)  # two channels, averaged
    assert spec.shape == (129, 400 // 64 + 1)
    assert torch.allclose(spec, torch.full_like(spec, 20 * math.log10(amin)))


@pytest.mark.parametrize("length", [2048, 2047, 1500, 777])
def test_tones_metric_measures_a_sine_at_a_bin_centre_exactly(length):
    k = np.array([70, 100, 133])  # bins of 8000 / length Hz: 273 .. 520 Hz at 2048 samples
    freq = k * 8000 / length
    x = torch.stack([sine(f, 0.5, length, 8000) for f in freq])[:, None]
    a = analyse_tones(x, 8000)
    assert np.allclose(a.frequency, freq, rtol=1e-8, atol=0)  # the parabola's vertex: the bin
    assert np.all(a.concentration > 1 - 1e-6) and a.dominant.all()
