"""Audio data: generated sine tones on a C-major scale (no download) and a folder of audio files
read with soundfile, resampled with torchaudio's band-limited (Kaiser-windowed sinc) resampler.

    x = tones(16)                                  # [16 x 1 x 2048] at 8 kHz, one note each
    p = tone_parameters(16)                        # the notes, amplitudes, ... drawn for them
    y = resample(x, 8000, 16000)                   # [16 x 1 x 4096]
    ds = AudioFolderDataset("data/wavs", length=16000, sample_rate=16000)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import torchaudio.transforms
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["PITCHES", "PITCH_NAMES", "ToneParams", "tone_parameters", "tone_envelope",
           "render_tones", "tones", "TonesDataset", "resample", "AUDIO_EXTENSIONS",
           "AudioFolderDataset"]

# C4 D4 E4 F4 G4 A4 B4 C5 (MIDI notes), equal temperament with A4 = 440 Hz.
_MIDI = (60, 62, 64, 65, 67, 69, 71, 72)
PITCH_NAMES = ("C4", "D4", "E4", "F4", "G4", "A4", "B4", "C5")
PITCHES = tuple(440.0 * 2.0 ** ((m - 69) / 12) for m in _MIDI)  # 261.63 ... 523.25 Hz
"""The valid pitches in Hz. Neighbours are at least a semitone apart (E4-F4: 19.6 Hz); at the
default 2048 samples and 8 kHz an FFT bin is 8000 / 2048 = 3.91 Hz wide, so the closest pair is
5 bins apart and 50 cents at C4 (7.6 Hz) spans about 2 bins."""

AMPLITUDE_RANGE = (0.3, 0.9)  # peak |x| of a clip
ATTACK_RANGE = (0.02, 0.2)    # linear rise from 0, as a fraction of the clip
END_LEVEL_RANGE = (0.25, 1.0)  # envelope at the last sample, after exponential decay from 1


@dataclass(frozen=True)
class ToneParams:
    """The true parameters of n tones, each a tensor (n,): `pitch_index` (long, into PITCHES;
    the start of a chirp), `end_index` (long, the end pitch of a chirp; always drawn, different
    from pitch_index, unused by plain tones), `amplitude` (the clip's peak |x|), `phase`
    (radians at t = 0), `attack` (fraction of the clip spent rising from 0) and `end_level`
    (envelope at the end, after an exponential decay from 1 when the attack ends)."""

    pitch_index: Tensor
    end_index: Tensor
    amplitude: Tensor
    phase: Tensor
    attack: Tensor
    end_level: Tensor

    def __len__(self) -> int:
        return self.pitch_index.shape[0]


def tone_parameters(n: int, seed: int = 0) -> ToneParams:
    """Draw the parameters of `n` tones, deterministic in `seed` and independent of the clip
    length and sample rate: pitch uniform over PITCHES, amplitude, attack and end level uniform
    in their ranges, phase uniform in [0, 2 pi)."""
    if n < 1:
        raise ValueError(f"tones: n must be >= 1, got {n}")
    g = torch.Generator().manual_seed(seed)
    k = len(PITCHES)

    def uniform(lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)

    pitch = torch.randint(k, (n,), generator=g)
    end = (pitch + 1 + torch.randint(k - 1, (n,), generator=g)) % k
    return ToneParams(pitch, end, uniform(*AMPLITUDE_RANGE), uniform(0.0, 2 * math.pi),
                      uniform(*ATTACK_RANGE), uniform(*END_LEVEL_RANGE))


def tone_envelope(params: ToneParams, length: int) -> Tensor:
    """The amplitude envelope [n x length] float64: a linear rise from 0 to 1 over the first
    `attack` of the clip, then an exponential decay reaching `end_level` at the last sample."""
    t = torch.arange(length, dtype=torch.float64)[None] / max(length - 1, 1)
    attack, end = params.attack[:, None], params.end_level[:, None]
    rise = t / attack
    decay = end ** ((t - attack) / (1 - attack))
    return torch.where(t < attack, rise, decay)


def render_tones(params: ToneParams, length: int = 2048, sample_rate: int = 8000,
                 chirp: bool = False) -> Tensor:
    """Clips [n x 1 x length] float32 of the tones `params` describes: envelope times a sine at
    PITCHES[pitch_index] (chirp=True: a linear frequency sweep from PITCHES[pitch_index] at the
    first sample to PITCHES[end_index] one sample after the last), scaled so that the peak
    |x| is exactly `amplitude`."""
    if length < 16:
        raise ValueError(f"tones: length must be >= 16 samples, got {length}")
    if sample_rate <= 2 * max(PITCHES):
        raise ValueError(f"tones: sample_rate must exceed {2 * max(PITCHES):.1f} Hz (twice the "
                         f"highest pitch) to represent every note, got {sample_rate}")
    pitches = torch.tensor(PITCHES, dtype=torch.float64)
    f0 = pitches[params.pitch_index][:, None]
    t = torch.arange(length, dtype=torch.float64)[None] / sample_rate
    cycles = f0 * t
    if chirp:
        duration = length / sample_rate
        cycles = cycles + (pitches[params.end_index][:, None] - f0) * t**2 / (2 * duration)
    wave = tone_envelope(params, length) * torch.sin(2 * math.pi * cycles + params.phase[:, None])
    # The envelope's peak rarely meets a crest of the sine exactly; rescale so the drawn
    # amplitude is the clip's true peak, which the metric measures.
    peak = wave.abs().amax(1, keepdim=True)
    return (wave * (params.amplitude[:, None] / peak)).float()[:, None]


def tones(n: int, length: int = 2048, sample_rate: int = 8000, seed: int = 0,
          chirp: bool = False) -> Tensor:
    """`n` clips [n x 1 x length] float32 in [-0.9, 0.9], each one note of PITCHES with a
    random phase, peak amplitude in [0.3, 0.9] and attack/decay envelope, deterministic in
    `seed` (the parameters are `tone_parameters(n, seed)`). chirp=True sweeps linearly between
    two different notes instead; `metrics.tones` scores steady tones, so chirps fail it."""
    return render_tones(tone_parameters(n, seed), length, sample_rate, chirp)


class TonesDataset(Dataset):
    """`tones(num_items, length, sample_rate, seed, chirp)` as a map-style dataset: items
    {"x": (1, length)}, plus "label": the pitch index (int64 scalar, the start note of a
    chirp) when `conditional`. Generated once up front (4096 clips of 2048 samples: 32 MiB)."""

    num_classes = len(PITCHES)

    def __init__(self, num_items: int = 4096, length: int = 2048, sample_rate: int = 8000,
                 seed: int = 0, conditional: bool = False, chirp: bool = False):
        self.params = tone_parameters(num_items, seed)
        self.clips = render_tones(self.params, length, sample_rate, chirp)
        self.sample_rate, self.conditional = sample_rate, conditional

    def __len__(self) -> int:
        return self.clips.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if self.conditional:
            return {"x": self.clips[index], "label": self.params.pitch_index[index]}
        return {"x": self.clips[index]}


# ------------------------------------------------------------------------------ resampling

# 24 zero crossings, Kaiser beta 11, cutoff 0.95: flatter (3e-6) and deeper (>100 dB) than before
_FILTER = {"lowpass_filter_width": 24, "rolloff": 0.95, "beta": 11.0}
_MAX_KERNEL = 2**24  # weights in torchaudio's filter bank (128 MiB in float64)


def _ratio(orig_sr: int, new_sr: int, lowpass_filter_width: int, rolloff: float,
           beta: float) -> tuple[int, int, int]:
    """Check the arguments of `resample`; return new_sr / orig_sr as up / down in lowest terms
    and the filter's reach in input samples (torchaudio's kernel `width`)."""
    for name, v in (("orig_sr", orig_sr), ("new_sr", new_sr),
                    ("lowpass_filter_width", lowpass_filter_width)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"resample: {name} must be a positive integer, got {v!r}")
    if not 0 < rolloff <= 1:
        raise ValueError(f"resample: rolloff must be in (0, 1], got {rolloff}")
    if not beta >= 0:
        raise ValueError(f"resample: beta must be >= 0, got {beta}")
    g = math.gcd(orig_sr, new_sr)
    up, down = new_sr // g, orig_sr // g
    reach = math.ceil(lowpass_filter_width * down / (min(up, down) * rolloff))
    # torchaudio builds one kernel per output phase: up x (down + 2 reach) weights, which
    # nearly coprime rates (44101 -> 48000 Hz: 2e9) cannot hold.
    if up != down and up * (down + 2 * reach) > _MAX_KERNEL:
        raise ValueError(f"resample: {orig_sr} -> {new_sr} Hz is {up}/{down} in lowest terms, "
                         f"whose filter bank would hold {up * (down + 2 * reach):,} weights "
                         f"(limit {_MAX_KERNEL:,}); use rates with a larger common divisor")
    return up, down, reach


def _input_span(frames: int, up: int, down: int, reach: int, start: int, count: int
                ) -> tuple[int, int]:
    """The input frames lo .. hi - 1 that outputs start .. start + count - 1 of resampling
    `frames` frames by up / down draw on. lo is a multiple of `down`, so output j of resampling
    only the span is output j + lo // down * up of resampling all the frames."""
    lo = max(0, start * down // up - reach) // down * down
    hi = min(frames, (start + count - 1) * down // up + reach + 1)
    return lo, hi


@functools.lru_cache(maxsize=4)
def _resampler(orig_sr: int, new_sr: int, lowpass_filter_width: int, rolloff: float, beta: float,
               device: torch.device) -> torchaudio.transforms.Resample:
    # The kernel costs as much as resampling a short clip; a folder's files share a few rates.
    # float64: torchaudio's float32 kernel (sin of pi t for t up to 24 in float32) errs by 2e-5.
    return torchaudio.transforms.Resample(orig_sr, new_sr, "sinc_interp_kaiser",
                                          lowpass_filter_width, rolloff, beta,
                                          dtype=torch.float64).to(device)


def resample(x: Tensor, orig_sr: int, new_sr: int, *,
             lowpass_filter_width: int = _FILTER["lowpass_filter_width"],
             rolloff: float = _FILTER["rolloff"], beta: float = _FILTER["beta"]) -> Tensor:
    """Band-limited resampling of x [... x L] from `orig_sr` to `new_sr` Hz along the last
    axis: [... x ceil(L * new_sr / orig_sr)], same dtype (floating point; computed in float64).

    torchaudio's resampler with a Kaiser-windowed sinc (`lowpass_filter_width` zero crossings
    each side, window shape `beta`) cut off at `rolloff` times the lower Nyquist frequency, so
    downsampling removes what the new rate cannot hold instead of aliasing it; the signal is
    taken as zero outside [0, L). With the defaults, relative to the lower of the two Nyquist
    frequencies: the gain is within 1e-5 of 1 up to 0.75 of it (a constant passes within 2e-6)
    and tones beyond 1.1 times it are attenuated by more than 100 dB. Rates whose ratio in
    lowest terms is huge (nearly coprime rates such as 44101 -> 48000 Hz) raise ValueError.
    """
    if not x.is_floating_point():
        raise TypeError(f"resample: x must be a floating-point tensor, got {x.dtype}")
    if x.ndim < 1:
        raise ValueError("resample: x needs a time axis [... x L], got a scalar")
    up, down, _ = _ratio(orig_sr, new_sr, lowpass_filter_width, rolloff, beta)
    if up == down:
        return x.clone()
    module = _resampler(orig_sr, new_sr, lowpass_filter_width, float(rolloff), float(beta),
                        x.device)
    return module(x.to(torch.float64).contiguous()).to(x.dtype)


# ------------------------------------------------------------------------------ folders

# Suffixes of formats libsndfile reads without being told the sample rate, keyed to the name
# soundfile.available_formats() gives the format (kept only when the installed library has it).
AUDIO_EXTENSIONS = {".wav": "WAV", ".wave": "WAV", ".flac": "FLAC", ".ogg": "OGG",
                    ".oga": "OGG", ".opus": "OGG", ".mp3": "MP3", ".aiff": "AIFF", ".aif": "AIFF",
                    ".aifc": "AIFF", ".au": "AU", ".snd": "AU", ".caf": "CAF", ".w64": "W64",
                    ".rf64": "RF64"}


def _soundfile() -> ModuleType:
    try:
        import soundfile
    except (ImportError, OSError):  # OSError: the module is there but libsndfile is not
        raise RuntimeError("install perceptual-diffusion[audio] (soundfile)") from None
    return soundfile


class AudioFolderDataset(Dataset):
    """Every audio file under `path` that soundfile reads (see AUDIO_EXTENSIONS; sorted by
    relative path), as items {"x": (channels, length) float32 in [-1, 1]} at `sample_rate`.

    channels=1 mixes all channels down to their mean; channels=2 keeps the first two (a mono
    file is duplicated). Files at another rate are resampled with `resample`. A clip longer
    than `length` is centre-cropped (only the frames the crop needs are read), a shorter one
    is zero-padded equally on both sides. Levels are kept as recorded unless a sample exceeds
    1 in magnitude (float files, resampling overshoot), in which case the clip is scaled to
    peak 1 rather than clipped.

    An unreadable or empty file raises OSError naming the file from __getitem__ (wrap the
    dataset in `SkipCorrupt` to skip it); a missing or empty folder raises at construction.
    """

    def __init__(self, path: str | Path, length: int = 2048, sample_rate: int = 8000,
                 channels: int = 1):
        if not str(path):
            raise ValueError("audio_folder: no folder given (set data.path)")
        if channels not in (1, 2):
            raise ValueError(f"audio_folder: channels must be 1 or 2, got {channels}")
        if length < 1:
            raise ValueError(f"audio_folder: length must be >= 1, got {length}")
        if sample_rate < 1:
            raise ValueError(f"audio_folder: sample_rate must be >= 1, got {sample_rate}")
        sf = _soundfile()
        root = Path(path).expanduser()
        if not root.is_dir():
            what = "is not a folder" if root.exists() else "not found"
            raise FileNotFoundError(f"audio folder {what}: {root}")
        formats = sf.available_formats()
        suffixes = tuple(s for s, fmt in AUDIO_EXTENSIONS.items() if fmt in formats)
        self.root, self.length, self.sample_rate = root, length, sample_rate
        self.channels = channels
        self.files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                            if p.suffix.lower() in suffixes and p.is_file())
        if not self.files:
            raise ValueError(f"no audio files ({', '.join(s[1:] for s in suffixes)}) found "
                             f"under {root}")

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> Tensor:
        """The clip at `index` as (channels, length) float32 in [-1, 1]."""
        file = self.root / self.files[index]
        sf = _soundfile()
        try:
            info = sf.info(str(file))
            if info.frames <= 0 or info.samplerate <= 0:
                raise ValueError("no audio frames")
            orig_sr = int(info.samplerate)
            up, down, reach = _ratio(orig_sr, self.sample_rate, **_FILTER)
            total = -(-info.frames * up // down)
            count = min(self.length, total)
            start = (total - count) // 2
            lo, hi = ((start, start + count) if up == down
                      else _input_span(info.frames, up, down, reach, start, count))
            data, _ = sf.read(str(file), start=lo, stop=hi, dtype="float32", always_2d=True)
        except Exception as e:
            raise OSError(f"cannot read audio {file}: {e}") from e
        x = torch.from_numpy(data.T.copy())  # (file channels, frames)
        x = x.mean(0, keepdim=True) if self.channels == 1 else x[:2].expand(2, -1)
        x = torch.nn.functional.pad(x, (0, hi - lo - x.shape[1]))  # a short read: zeros
        if up != down:
            first = start - lo // down * up
            x = resample(x.double(), orig_sr, self.sample_rate)[:, first:first + count].float()
        pad = self.length - count
        x = torch.nn.functional.pad(x, (pad // 2, pad - pad // 2))
        peak = float(x.abs().max())
        if peak > 1:
            x = x / peak
        return x.contiguous()

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"x": self.load(index)}
