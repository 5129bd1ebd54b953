"""The radially averaged power spectrum against closed forms (a cosine, a checkerboard, white noise,
a scaled set), its samples-versus-data ratios on blur and grain, its plot, and the real-versus-real
floor of the high-frequency ratio."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from perceptual_diffusion.datasets import DigitsDataset
from perceptual_diffusion.metrics import (radial_power_spectrum, real_vs_real_floor, save_spectrum_plot,
                                          spectrum_metrics)

S = 32


@pytest.fixture(scope="module")
def digits():
    """The 1,797 digits [N x 1 x 32 x 32] in a fixed random order (the file groups them by writer)."""
    images = DigitsDataset(S).images
    return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))]


def _bins_at(radius: int, size: int = S) -> int:
    k = np.fft.fftfreq(size) * size
    return int((np.rint(np.hypot(k[:, None], k[None, :])) == radius).sum())


def _wave(ky: int, kx: int) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(S, dtype=torch.float64), torch.arange(S, dtype=torch.float64),
                          indexing="ij")
    return torch.cos(2 * math.pi * (ky * y + kx * x) / S)   # (16, 16): the +/- checkerboard


WAVES = [(3, 4, 5), (0, 7, 7), (5, 12, 13), (16, 16, 23)]


@pytest.mark.parametrize("ky, kx, radius", WAVES)
def test_a_single_frequency_puts_all_its_power_at_its_radius(ky, kx, radius):
    img = _wave(ky, kx)
    spectrum = radial_power_spectrum(img[None, None].repeat(2, 3, 1, 1), window=None)
    # Parseval: the annulus holds the image's energy, sum of squares / (H W) per bin on average.
    energy = float((img ** 2).sum())
    assert int(spectrum.argmax()) == radius
    assert float(spectrum[radius]) * _bins_at(radius) == pytest.approx(energy, rel=1e-10)
    others = torch.cat([spectrum[:radius], spectrum[radius + 1:]])
    assert float(others.abs().max()) < 1e-20 * energy


@pytest.mark.parametrize("ky, kx, radius", WAVES)
def test_the_hann_taper_keeps_a_frequency_at_its_radius(ky, kx, radius):
    spectrum = radial_power_spectrum(_wave(ky, kx)[None, None])
    energy = spectrum * torch.tensor([_bins_at(r) for r in range(len(spectrum))])
    near = energy[max(radius - 2, 0):radius + 3].sum()
    assert int(spectrum.argmax()) == radius and near > 0.97 * energy.sum()


@pytest.mark.parametrize("window, first", [(None, 1), ("hann", 2)])   # the taper's mean removal dents r = 1
def test_white_noise_has_a_flat_spectrum_at_its_variance(window, first):
    noise = 0.5 * torch.randn(200, 1, S, S, generator=torch.Generator().manual_seed(0))
    spectrum = radial_power_spectrum(noise, window=window)
    assert abs(float(spectrum[0])) < 1e-20   # the mean is removed: no DC
    inside = spectrum[first:S // 2 + 1]
    assert torch.allclose(inside, torch.full_like(inside, 0.25), rtol=0.15)
    slope = np.polyfit(np.log(np.arange(first, S // 2 + 1)), np.log(inside.numpy()), 1)[0]
    assert abs(slope) < 0.05


def test_a_set_against_itself_is_exactly_one_and_zero(digits):
    m = spectrum_metrics(digits[:300], digits[:300])
    assert list(m) == ["spectrum_hf_ratio"] + [f"spectrum_log_ratio_{b}" for b in range(4)]
    assert m["spectrum_hf_ratio"] == 1.0 and all(m[f"spectrum_log_ratio_{b}"] == 0.0 for b in range(4))


def test_scaling_the_samples_scales_every_band_by_its_square(digits):
    m = spectrum_metrics(2 * digits[:100], digits[:100], num_bands=8)   # exact in float32
    assert m["spectrum_hf_ratio"] == pytest.approx(1.0, rel=1e-12)
    for b in range(8):
        assert m[f"spectrum_log_ratio_{b}"] == pytest.approx(math.log10(4), rel=1e-12)


def _blur(x):
    return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def _checkerboard(x):
    sign = (torch.arange(S)[:, None] + torch.arange(S)[None, :]) % 2 * 2 - 1
    return x + 0.1 * sign


def _laplacian_noise(x):
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    kernel = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]])[None, None]
    return x + 0.05 * F.conv2d(F.pad(noise, (1, 1, 1, 1), mode="circular"), kernel)


@pytest.mark.parametrize("change, direction", [(_blur, -1), (_checkerboard, 1), (_laplacian_noise, 1)])
def test_blur_lowers_and_fine_grain_raises_the_hf_ratio(digits, change, direction):
    data, samples = digits[:600], change(digits[600:1200])
    m = spectrum_metrics(samples, data)
    floor = spectrum_metrics(digits[600:1200], data)   # the same images, unchanged
    assert abs(floor["spectrum_hf_ratio"] - 1) < 0.1
    if direction < 0:
        assert m["spectrum_hf_ratio"] < 0.2 and m["spectrum_log_ratio_3"] < -0.5
    else:
        assert m["spectrum_hf_ratio"] > 1.5 and m["spectrum_log_ratio_3"] > 0.2
    # the low band barely moves: a change at the pixel scale shows where it is
    assert abs(m["spectrum_log_ratio_0"] - floor["spectrum_log_ratio_0"]) < 0.1


def test_without_the_taper_the_wrap_around_edge_hides_the_blur(digits):
    # The digits touch the top edge: the periodic DFT sees a step there, whose leakage a blur that
    # stops at the border cannot remove. This is why the Hann taper is the default.
    data, blurred = digits[:600], _blur(digits[600:1200])
    assert spectrum_metrics(blurred, data, window=None)["spectrum_hf_ratio"] > 0.9
    assert spectrum_metrics(blurred, data)["spectrum_hf_ratio"] < 0.2


def test_spectrum_metrics_rejects_bad_input(digits):
    with pytest.raises(ValueError, match="samples must be images"):
        spectrum_metrics(digits[:4, 0], digits[:4])
    with pytest.raises(ValueError, match="data must be images"):
        spectrum_metrics(digits[:4], digits[:4, :, :1])
    with pytest.raises(ValueError, match="same C x H x W"):
        spectrum_metrics(digits[:4], digits[:4, :, :16, :16])
    with pytest.raises(ValueError, match=r"num_bands must be in \[1, 16\]"):
        spectrum_metrics(digits[:4], digits[:4], num_bands=17)
    with pytest.raises(ValueError, match="no spectral energy"):
        spectrum_metrics(digits[:4], torch.zeros(4, 1, S, S))
    with pytest.raises(ValueError, match="window must be 'hann' or None"):
        spectrum_metrics(digits[:4], digits[:4], window="hamming")


def test_plot_draws_each_curve_where_its_values_are(tmp_path, digits):
    data = radial_power_spectrum(digits[:200])
    path = save_spectrum_plot({"data": data, "samples x10": data * 10}, tmp_path / "sub" / "spec.png",
                              nyquist=S // 2)
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (400, 640, 3)
    blue, vermillion = (0, 114, 178), (213, 94, 0)   # the first two colours, in the order given

    def rows(colour, col):
        return np.nonzero((img[:, col] == colour).all(-1))[0]

    col = 640 // 2   # right of the legend, inside the plot
    assert len(rows(blue, col)) and len(rows(vermillion, col))
    # ten times the power: a decade higher, i.e. nearer the top of the picture
    assert rows(vermillion, col).mean() < rows(blue, col).mean() - 20
    with pytest.raises(ValueError, match="1 to 7"):
        save_spectrum_plot({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="curves\\['a'\\] must be a spectrum"):
        save_spectrum_plot({"a": torch.ones(2, 3)}, tmp_path / "x.png")


# ---------------------------------------------------------------- real-versus-real floor


def test_floor_of_the_hf_ratio_is_near_one_and_deterministic(digits):
    floor = real_vs_real_floor(spectrum_metrics, digits, n=500, splits=4)
    assert set(floor) == {"spectrum_hf_ratio"} | {f"spectrum_log_ratio_{b}" for b in range(4)}
    mean, std = floor["spectrum_hf_ratio"]
    assert abs(mean - 1) < 0.05 and 0 < std < 0.05
    assert all(abs(floor[f"spectrum_log_ratio_{b}"][0]) < 0.05 for b in range(4))
    assert real_vs_real_floor(spectrum_metrics, digits, n=500, splits=4) == floor
    # a blurred set stands far outside that floor
    blurred = spectrum_metrics(_blur(digits[:500]), digits[500:1000])["spectrum_hf_ratio"]
    assert blurred < mean - 10 * std


def test_floor_rejects_a_pool_too_small_for_two_disjoint_sets(digits):
    with pytest.raises(ValueError, match="two disjoint sets of n=1000 need 2000"):
        real_vs_real_floor(spectrum_metrics, digits, n=1000)
    with pytest.raises(ValueError, match="splits must be >= 2"):
        real_vs_real_floor(spectrum_metrics, digits, n=10, splits=1)
