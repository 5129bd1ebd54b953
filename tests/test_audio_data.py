"""Audio data and outputs: the generated tones, the band-limited resampler, the audio folder
dataset, the tones metric, WAV files and spectrogram pictures."""

from __future__ import annotations

import itertools
import math
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from perceptual_diffusion.audio import colorize, read_wav, save_spectrogram, save_wav, spectrogram
from perceptual_diffusion.datasets.audio import (PITCHES, AudioFolderDataset, TonesDataset,
                                                resample, render_tones, tone_envelope,
                                                tone_parameters, tones)
from perceptual_diffusion.datasets.loader import SkipCorrupt
from perceptual_diffusion.metrics.tones import analyse_tones, tones_metrics

SR, LENGTH = 8000, 2048
PROPERTY = settings(max_examples=25, deadline=None)


def sine(freq: float, amplitude: float = 0.5, length: int = LENGTH, sr: int = SR,
         phase: float = 0.0) -> torch.Tensor:
    t = torch.arange(length, dtype=torch.float64) / sr
    return amplitude * torch.sin(2 * math.pi * freq * t + phase)


def rfft_peak_hz(x: torch.Tensor, sr: int) -> float:
    """Frequency of the strongest bin of the Hann-windowed spectrum of a 1-D signal."""
    w = torch.hann_window(x.shape[-1], periodic=False, dtype=torch.float64)
    return float(torch.fft.rfft(x.double() * w).abs().argmax()) * sr / x.shape[-1]


# ------------------------------------------------------------------------------ tones


def test_pitches_are_the_c_major_scale_and_resolvable_at_the_default_length():
    assert len(PITCHES) == 8 == TonesDataset.num_classes
    assert PITCHES[0] == pytest.approx(261.63, abs=0.01)
    assert PITCHES[5] == pytest.approx(440.0)
    assert PITCHES[7] == pytest.approx(2 * PITCHES[0])
    bin_width = SR / LENGTH
    assert min(b - a for a, b in itertools.pairwise(PITCHES)) / bin_width > 5


def test_tones_are_deterministic_in_the_seed_and_parameters_do_not_depend_on_the_length():
    a, b = tones(6, seed=3), tones(6, seed=3)
    assert a.shape == (6, 1, LENGTH) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, tones(6, seed=4))
    # The parameters depend on the seed only: a shorter clip plays the same notes.
    short = tones(6, length=512, seed=3)
    assert torch.equal(short, render_tones(tone_parameters(6, 3), 512))
    assert torch.equal(short.abs().amax(-1), a.abs().amax(-1))  # both peak at the amplitude
    assert torch.equal(tone_parameters(6, 3).pitch_index, tone_parameters(6, 3).pitch_index)


def test_peak_equals_the_drawn_amplitude_and_stays_in_range():
    p = tone_parameters(64, seed=1)
    x = render_tones(p)
    peak = x.abs().amax((1, 2)).double()
    assert torch.allclose(peak, p.amplitude, atol=1e-6)
    assert 0.3 <= float(p.amplitude.min()) and float(p.amplitude.max()) <= 0.9
    assert float(x.abs().max()) <= 0.9 + 1e-6


def test_spectrum_peaks_at_the_drawn_pitch():
    p = tone_parameters(32, seed=2)
    x = render_tones(p)
    for clip, index in zip(x[:, 0], p.pitch_index):
        assert abs(rfft_peak_hz(clip, SR) - PITCHES[index]) <= SR / LENGTH  # within one bin


def test_clip_is_envelope_times_sine_at_the_drawn_pitch_and_phase():
    p = tone_parameters(16, seed=5)
    x = render_tones(p).double()[:, 0]
    env = tone_envelope(p, LENGTH)
    t = torch.arange(LENGTH, dtype=torch.float64) / SR
    f = torch.tensor(PITCHES, dtype=torch.float64)[p.pitch_index]
    shape = env * torch.sin(2 * math.pi * f[:, None] * t + p.phase[:, None])
    scale = (x * shape).sum(1) / (shape * shape).sum(1)  # least-squares gain per clip
    assert torch.allclose(x, scale[:, None] * shape, atol=1e-6)
    # The gain turns the envelope's peak into the clip's: at least the amplitude, and only a
    # little more (the envelope's peak lies within a few degrees of a sine crest).
    assert bool((scale >= p.amplitude - 1e-6).all()) and bool((scale <= p.amplitude / 0.9).all())


def test_envelope_rises_linearly_then_decays_to_the_end_level():
    p = tone_parameters(16, seed=6)
    env = tone_envelope(p, LENGTH)
    assert torch.all(env[:, 0] == 0)
    assert torch.allclose(env[:, -1], p.end_level)
    assert float(env.max()) <= 1 + 1e-12
    peak_at = env.argmax(1)
    for e, k, attack in zip(env, peak_at, p.attack):
        assert abs(int(k) / (LENGTH - 1) - float(attack)) <= 1 / (LENGTH - 1)
        assert bool((e[1:k + 1].diff() > 0).all())          # rising
        assert bool((e[k:].diff() <= 1e-15).all())           # non-increasing
        rise = e[:k]  # the samples before the attack ends
        assert torch.allclose(rise, torch.arange(k, dtype=torch.float64) / (LENGTH - 1) / attack,
                              atol=1e-12)  # linear from 0, reaching 1 at the attack's end


def test_chirp_sweeps_from_the_start_pitch_to_the_end_pitch():
    p = tone_parameters(8, seed=7)
    x = render_tones(p, length=8000, chirp=True)[:, 0]
    def crossings(s: torch.Tensor) -> int:
        return int((torch.sign(s[1:]) != torch.sign(s[:-1])).sum())

    for clip, i, j in zip(x, p.pitch_index, p.end_index):
        assert i != j
        head, tail = clip[1000:1800], clip[-800:]  # 0.1 s each, where the envelope is well up
        mid_head, mid_tail = 1400 / 8000, 7600 / 8000  # their centre times, as a fraction
        f_head = PITCHES[i] + (PITCHES[j] - PITCHES[i]) * mid_head
        f_tail = PITCHES[i] + (PITCHES[j] - PITCHES[i]) * mid_tail
        assert abs(crossings(head) / (2 * 0.1) - f_head) <= 15
        assert abs(crossings(tail) / (2 * 0.1) - f_tail) <= 15


def test_tones_dataset_items_and_labels():
    ds = TonesDataset(12, 256, SR, seed=9, conditional=True)
    p = tone_parameters(12, 9)
    assert len(ds) == 12
    item = ds[4]
    assert item["x"].shape == (1, 256) and torch.equal(item["x"], tones(12, 256, SR, 9)[4])
    assert item["label"].dtype == torch.int64 and item["label"].ndim == 0
    assert [int(ds[i]["label"]) for i in range(12)] == p.pitch_index.tolist()
    assert set(TonesDataset(4, 256, conditional=False)[0]) == {"x"}


def test_tones_reject_bad_arguments():
    with pytest.raises(ValueError, match="n must be"):
        tones(0)
    with pytest.raises(ValueError, match="sample_rate"):
        tones(2, sample_rate=1000)
    with pytest.raises(ValueError, match="length"):
        tones(2, length=8)


# ------------------------------------------------------------------------------ resampling


def test_sine_survives_8k_to_16k_to_8k():
    x = sine(440.0, 0.7, length=4000, phase=0.3)
    up = resample(x, 8000, 16000)
    assert up.shape == (8000,)
    # Away from the ends (the signal is zero outside), the upsampled sine is the sine at 16 kHz.
    assert float((up - sine(440.0, 0.7, 8000, 16000, 0.3))[200:-200].abs().max()) < 1e-4
    back = resample(up, 16000, 8000)
    assert back.shape == x.shape
    assert float((back - x)[100:-100].abs().max()) < 1e-4
    assert rfft_peak_hz(back, 8000) == pytest.approx(rfft_peak_hz(x, 8000))
    assert float(back[100:-100].abs().max()) == pytest.approx(0.7, abs=1e-3)


@pytest.mark.parametrize("freq, passes", [(1000.0, True), (3000.0, True), (4500.0, False),
                                          (6000.0, False), (15000.0, False)])
def test_downsampling_44k1_to_8k_keeps_the_band_and_removes_what_would_alias(freq, passes):
    x = sine(freq, 0.8, length=22050, sr=44100)
    y = resample(x, 44100, 8000)
    assert y.shape == (4000,)
    rms = float(y[300:-300].pow(2).mean().sqrt())
    if passes:
        assert rms == pytest.approx(0.8 / math.sqrt(2), rel=1e-3)
        assert rfft_peak_hz(y, 8000) == pytest.approx(freq, abs=8000 / 4000)
    else:
        assert rms < 1e-4 * 0.8  # below -80 dB instead of an alias at |freq - k 8000|


@PROPERTY
@given(st.integers(10, 480), st.integers(10, 480), st.floats(-1, 1))
def test_resampling_keeps_a_constant_and_the_output_length(orig_hundreds, new_hundreds, level):
    # Rates in steps of 100 Hz: nearly coprime rates are refused (their filter bank is huge).
    orig, new = 100 * orig_hundreds, 100 * new_hundreds
    x = torch.full((2, 700), level, dtype=torch.float64)
    y = resample(x, orig, new)
    assert y.shape == (2, math.ceil(700 * new / orig))
    edge = math.ceil(24 * max(1.0, new / orig) / 0.95) + 2  # kernel reach in output samples
    if y.shape[1] > 2 * edge:  # the documented DC accuracy of the default filter: 2e-6
        assert torch.allclose(y[:, edge:-edge], x[:, :1], atol=2e-6 * abs(level), rtol=0)


def test_resample_at_the_same_rate_is_the_identity_and_rejects_bad_input():
    x = torch.randn(3, 100)
    assert torch.equal(resample(x, 16000, 16000), x)
    with pytest.raises(TypeError, match="floating"):
        resample(torch.ones(10, dtype=torch.int64), 8000, 16000)
    with pytest.raises(ValueError, match="new_sr"):
        resample(x, 8000, 0)
    with pytest.raises(ValueError, match="rolloff"):
        resample(x, 8000, 16000, rolloff=1.5)


# ------------------------------------------------------------------------------ folders


@pytest.fixture
def sf():
    return pytest.importorskip("soundfile")


def test_folder_lists_audio_recursively_and_crops_or_pads_at_the_centre(tmp_path, sf):
    long, short = sine(440.0, 0.5, 3000).numpy(), sine(440.0, 0.25, 1000).numpy()
    (tmp_path / "b").mkdir()
    sf.write(tmp_path / "b" / "long.wav", long, SR, subtype="FLOAT")
    sf.write(tmp_path / "a.flac", short, SR)
    (tmp_path / "notes.txt").write_text("not audio")
    ds = AudioFolderDataset(tmp_path, length=LENGTH, sample_rate=SR)
    assert ds.files == ["a.flac", "b/long.wav"] and len(ds) == 2
    cropped = ds[1]["x"]
    assert cropped.shape == (1, LENGTH) and cropped.dtype == torch.float32
    start = (3000 - LENGTH) // 2
    assert np.allclose(cropped[0].numpy(), long[start:start + LENGTH], atol=1e-7)
    padded = ds[0]["x"][0].numpy()
    left = (LENGTH - 1000) // 2
    assert np.all(padded[:left] == 0) and np.all(padded[left + 1000:] == 0)
    assert np.allclose(padded[left:left + 1000], short, atol=1 / 32767)  # FLAC is 16-bit
    assert float(np.abs(padded).max()) == pytest.approx(0.25, abs=1e-4)  # level kept


def test_stereo_mixdown_and_kept_channels(tmp_path, sf):
    left, right = sine(300.0, 0.6, 512), sine(500.0, 0.2, 512)
    sf.write(tmp_path / "st.wav", torch.stack([left, right], 1).numpy(), SR, subtype="FLOAT")
    mono = AudioFolderDataset(tmp_path, 512, SR, channels=1)[0]["x"]
    assert torch.allclose(mono[0].double(), (left + right) / 2, atol=1e-6)
    stereo = AudioFolderDataset(tmp_path, 512, SR, channels=2)[0]["x"]
    assert stereo.shape == (2, 512)
    assert torch.allclose(stereo.double(), torch.stack([left, right]), atol=1e-6)
    (tmp_path / "st.wav").unlink()
    sf.write(tmp_path / "mono.wav", left.numpy(), SR, subtype="FLOAT")
    dup = AudioFolderDataset(tmp_path, 512, SR, channels=2)[0]["x"]
    assert torch.equal(dup[0], dup[1]) and torch.allclose(dup[0].double(), left, atol=1e-6)


def test_folder_resamples_and_reads_only_the_crop_it_needs(tmp_path, sf):
    x = (sine(700.0, 0.5, 30000, 44100) + sine(2500.0, 0.3, 30000, 44100)).numpy()
    sf.write(tmp_path / "hi.wav", x, 44100, subtype="FLOAT")
    item = AudioFolderDataset(tmp_path, length=1000, sample_rate=SR)[0]["x"][0]
    full = resample(torch.from_numpy(x.astype(np.float32)).double(), 44100, SR)
    start = (full.shape[0] - 1000) // 2
    assert torch.allclose(item.double(), full[start:start + 1000], atol=1e-6)
    assert rfft_peak_hz(item, SR) == pytest.approx(700.0, abs=SR / 1000)


def test_folder_scales_clipping_float_audio_to_peak_one(tmp_path, sf):
    sf.write(tmp_path / "loud.wav", sine(440.0, 2.0, 800).numpy(), SR, subtype="FLOAT")
    x = AudioFolderDataset(tmp_path, 800, SR)[0]["x"]
    assert float(x.abs().max()) == pytest.approx(1.0)
    assert torch.allclose(x[0].double(), sine(440.0, 2.0, 800) / sine(440.0, 2.0, 800).abs().max(),
                          atol=1e-6)


def test_corrupt_file_raises_on_read_and_is_skipped(tmp_path, sf):
    sf.write(tmp_path / "good.wav", sine(440.0, 0.5, 600).numpy(), SR)
    (tmp_path / "bad.wav").write_bytes(b"RIFF\x00\x00not really a wave file")
    ds = AudioFolderDataset(tmp_path, 512, SR)
    assert ds.files == ["bad.wav", "good.wav"]
    with pytest.raises(OSError, match="bad.wav"):
        ds[0]
    skipping = SkipCorrupt(ds)
    assert skipping[0] is None and skipping[1]["x"].shape == (1, 512)


def test_folder_errors_at_construction(tmp_path, sf):
    with pytest.raises(FileNotFoundError, match="not found"):
        AudioFolderDataset(tmp_path / "missing")
    with pytest.raises(ValueError, match="no audio files"):
        AudioFolderDataset(tmp_path)
    with pytest.raises(ValueError, match="no folder"):
        AudioFolderDataset("")
    with pytest.raises(ValueError, match="channels must be 1 or 2"):
        AudioFolderDataset(tmp_path, channels=3)


def test_folder_without_soundfile_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "soundfile", None)  # makes `import soundfile` fail
    one_line = r"^install perceptual-diffusion\[audio\] \(soundfile\)$"
    with pytest.raises(RuntimeError, match=one_line):
        AudioFolderDataset(tmp_path)


# ------------------------------------------------------------------------------ metric


def test_true_tones_score_valid_with_small_error_and_matching_labels():
    p = tone_parameters(256, seed=11)
    m = tones_metrics(render_tones(p), SR, labels=p.pitch_index)
    assert m["valid_fraction"] >= 0.98 and m["num_valid"] >= 251
    assert m["pitch_error_cents"] < 10
    assert m["label_accuracy"] >= 0.98
    assert m["pitch_tv"] < 0.15  # sampling noise of 256 draws from 8 notes
    assert m["param_fd"] < 0.05
    assert m["peak_concentration"] > 0.95
    wrong = tones_metrics(render_tones(p), SR, labels=(p.pitch_index + 1) % 8)
    assert wrong["label_accuracy"] == 0.0


def test_true_tones_against_reference_clips_and_parameters():
    x = tones(128, seed=12)
    by_clips = tones_metrics(x, SR, reference=tones(128, seed=13))
    by_params = tones_metrics(x, SR, reference=tone_parameters(128, 13))
    assert by_clips["pitch_tv"] == pytest.approx(by_params["pitch_tv"])
    assert by_clips["param_fd"] == pytest.approx(by_params["param_fd"], abs=1e-4)
    assert by_clips["param_fd"] < 0.2


@pytest.mark.parametrize("case", ["noise", "silence", "chord", "quarter_tone", "near_silence"])
def test_non_tones_fail(case):
    g = torch.Generator().manual_seed(0)
    if case == "noise":
        x = 0.4 * torch.randn(32, LENGTH, generator=g, dtype=torch.float64)
    elif case == "silence":
        x = torch.zeros(4, LENGTH)
    elif case == "near_silence":
        x = torch.stack([sine(f, 1e-4) for f in PITCHES])
    elif case == "chord":
        x = torch.stack([sine(PITCHES[i]) + sine(PITCHES[j], 0.45)
                         for i in range(8) for j in range(8) if i != j])
    else:  # a quarter tone (50 cents) above or below every note
        x = torch.stack([sine(f * 2 ** (s / 24)) for f in PITCHES for s in (-1, 1)])
    m = tones_metrics(x[:, None], SR)
    assert m["valid_fraction"] == 0.0 and m["num_valid"] == 0
    assert m["pitch_tv"] == 1.0 and m["param_fd"] == math.inf
    a = analyse_tones(x[:, None], SR)
    if case == "noise":
        assert m["peak_concentration"] < 0.1  # white noise: ~5 of 1025 bins
    if case == "quarter_tone":  # one clean peak, in the wrong place
        assert a.dominant.all() and np.allclose(np.abs(a.cents), 50, atol=1)
        assert m["pitch_error_cents"] == pytest.approx(50, abs=1)
    else:
        assert not a.dominant.any() and m["pitch_error_cents"] == math.inf


def test_collapsed_model_is_valid_but_far_from_the_distribution():
    p = tone_parameters(400, seed=14)
    x = render_tones(p)[p.pitch_index == 3]
    m = tones_metrics(x, SR)
    assert m["valid_fraction"] == 1.0
    assert m["pitch_tv"] == pytest.approx(7 / 8)
    assert m["param_fd"] > 4  # the reference's pitch-index variance is (8^2 - 1) / 12 = 5.25


@PROPERTY
@given(st.floats(250.0, 540.0), st.floats(0.05, 0.95), st.floats(0, 2 * math.pi))
def test_measured_frequency_of_any_sine_and_validity_rule(freq, amplitude, phase):
    a = analyse_tones(sine(freq, amplitude, phase=phase)[None, None], SR)
    assert a.dominant[0] and a.concentration[0] > 0.99
    assert 1200 * abs(math.log2(a.frequency[0] / freq)) < 1.0
    cents = [1200 * math.log2(freq / f) for f in PITCHES]
    nearest = min(range(8), key=lambda i: abs(cents[i]))
    assert a.pitch_index[0] == nearest
    assert a.amplitude[0] == pytest.approx(amplitude, rel=0.01)
    if abs(cents[nearest]) < 24:
        assert a.valid[0]
    elif abs(cents[nearest]) > 26:
        assert not a.valid[0]


def test_metric_rejects_bad_input():
    with pytest.raises(ValueError, match="mono clips"):
        tones_metrics(torch.zeros(2, 2, 256))
    with pytest.raises(ValueError, match="labels"):
        tones_metrics(tones(3, 256), labels=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="sample_rate"):
        tones_metrics(tones(3, 256), sample_rate=800)


# ------------------------------------------------------------------------------ files


@PROPERTY
@given(st.integers(1, 3), st.integers(1, 2), st.integers(1, 300), st.integers(0, 2**31 - 1))
def test_wav_round_trip_is_exact_to_one_step(n, channels, length, seed):
    import tempfile
    from pathlib import Path

    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, channels, length, generator=g) * 2 - 1
    with tempfile.TemporaryDirectory() as tmp:
        path = save_wav(x, Path(tmp) / "deep" / "a.wav", 4000, gap=0.01)
        y, rate = read_wav(path)
    assert rate == 4000 and y.shape == (channels, n * length + (n - 1) * 40)
    for i in range(n):
        clip = y[:, i * (length + 40):i * (length + 40) + length]
        assert float((clip - x[i]).abs().max()) <= 0.5 / 32767 + 1e-7
        if i:
            assert torch.all(y[:, i * (length + 40) - 40:i * (length + 40)] == 0)


def test_wav_clips_out_of_range_values_and_validates_rank(tmp_path):
    path = save_wav(torch.tensor([[2.0, -3.0, 0.5]]), tmp_path / "c.wav", 8000)
    y, _ = read_wav(path)
    assert torch.allclose(y, torch.tensor([[1.0, -1.0, 16384 / 32767]]))
    for bad in (torch.zeros(5), torch.zeros(1, 1, 1, 5)):
        with pytest.raises(ValueError, match=r"\[C x L\] or \[N x C x L\]"):
            save_wav(bad, tmp_path / "x.wav", 8000)
        with pytest.raises(ValueError, match=r"\[C x L\] or \[N x C x L\]"):
            save_spectrogram(bad, tmp_path / "x.png", 8000)


def test_spectrogram_of_a_tone_peaks_at_its_bin_with_its_level():
    freq = 10 * SR / 256  # the centre of bin 10
    spec = spectrogram(sine(freq, 0.5)[None].float(), n_fft=256, hop=64)
    assert spec.shape == (129, LENGTH // 64 + 1)
    inner = spec[:, 4:-4]  # frames whose window lies inside the clip
    assert torch.all(inner.argmax(0) == 10)
    assert torch.allclose(inner[10], torch.full_like(inner[10], 20 * math.log10(0.5)), atol=0.01)
    assert float(spectrogram(torch.zeros(512)).max()) == pytest.approx(-100.0)


def test_colormap_runs_dark_to_bright():
    rgb = colorize(np.linspace(0, 1, 33)).astype(np.float64)
    assert rgb[0].tolist() == [68, 1, 84] and rgb[-1].tolist() == [253, 231, 37]
    luma = rgb @ np.array([0.2126, 0.7152, 0.0722])
    assert np.all(np.diff(luma) > 0)


def test_spectrogram_png_stacks_clips_with_low_frequencies_at_the_bottom(tmp_path):
    x = torch.stack([sine(SR / 256 * 4, 0.8, 1024), sine(SR / 256 * 100, 0.8, 1024)])[:, None]
    path = save_spectrogram(x.float(), tmp_path / "sub" / "s.png", SR, scale=1)
    with Image.open(path) as im:
        assert im.mode == "RGB" and im.size == (1024 // 64 + 1, 2 * 129 + 1)
        a = np.asarray(im).astype(np.float64)
    luma = a @ np.array([0.2126, 0.7152, 0.0722])
    low, high = luma[:129].mean(1), luma[130:].mean(1)
    assert int(low.argmax()) == 128 - 4 and int(high.argmax()) == 128 - 100
    assert np.all(a[129] == 255)  # the separator
    cropped = save_spectrogram(x[:1].float(), tmp_path / "c.png", SR, max_freq=1000, scale=3)
    with Image.open(cropped) as im:
        assert im.size == (3 * 17, 3 * 33)  # bins 0 .. 1000 Hz / 31.25 Hz


def test_spectrogram_png_tiles_nrow_per_row(tmp_path):
    x = torch.stack([sine(SR / 256 * k, 0.8, 1024) for k in (4, 20, 60)])[:, None].float()
    path = save_spectrogram(x, tmp_path / "g.png", SR, scale=1, nrow=2)
    with Image.open(path) as im:
        w, h = 1024 // 64 + 1, 129
        assert im.size == (2 * w + 1, 2 * h + 1)
        a = np.asarray(im)
    assert np.all(a[h] == 255) and np.all(a[:h, w] == 255)  # separators between the tiles
    assert np.all(a[h + 1:, w + 1:] == 255)  # the unused fourth tile stays white
    luma = a.astype(np.float64) @ np.array([0.2126, 0.7152, 0.0722])
    assert int(luma[:h, w + 1:].mean(1).argmax()) == 128 - 20  # the second clip sits top right
    with pytest.raises(ValueError, match="nrow"):
        save_spectrogram(x, tmp_path / "bad.png", SR, nrow=0)
