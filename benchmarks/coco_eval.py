"""MS-COCO 2014 validation FID and IS of a text-to-image model: Table 1 of the paper (section 4.2).

    python benchmarks/coco_eval.py --model runs/sd-sp/export --label SP \\
        --annotations coco/annotations/captions_val2014.json --images coco/val2014 \\
        --n 10000 --steps 25 --guidance 1 --out runs/coco/sp-25
    python benchmarks/coco_eval.py --model runs/sd-mse/export --label MSE --guidance 7.5 --rescale 0.7 ...
    accelerate launch benchmarks/coco_eval.py ...        # one shard per process (RANK / WORLD_SIZE)
    python benchmarks/coco_eval.py --metrics-only --annotations ... --images ... --out runs/coco/sp-25

Captions: annotation entries are read in file order and each image id keeps its first caption
(surrounding whitespace stripped); the first N image ids met this way are the evaluation set.
Caption index i (0-based, in that order) gives out/images/<i:05d>.png and is paired with the real
image of the same id for FID.

Generation: the model directory is a diffusers Stable Diffusion folder (unet/, vae/,
text_encoder/, tokenizer/, scheduler/; e.g. written by export_diffusers). The UNet runs through
DiffusersUNet and the library's DDIM sampler (trailing spacing, eta 0) in latent space, with the
schedule of scheduler/scheduler_config.json (v-prediction required); the context is the text
encoder's last hidden state, the unconditional context that of the empty prompt. The initial
noise of caption i is drawn from a generator seeded by (--seed, i), so batch size and sharding do
not change any image. Shard k of K generates the indices i with i % K == k. Images are written to
a temporary file and renamed, and existing PNGs are skipped: rerunning the same command resumes.
out/generation.json pins the settings; a run with other settings on the same --out is refused.

Metrics (shard 0 once every image exists, or --metrics-only): generated and real images are
centre-cropped to a square, resized bilinearly to 299x299 exactly as the FID Inception wrapper
does (done per image so COCO's mixed sizes batch together), and passed once through the
pt_inception-2015-12-05 network: pool3 features for FID against the real images of the same ids
(statistics cached in out/fid_reference.safetensors), unbiased logits for IS (10 splits from 100
images up, else 1). Results go to out/metrics.json and a Table 1 row is printed.

User errors (missing files or folders, N larger than the captions available, mismatched
settings) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backbones.diffusers_unet import DIFFUSERS_BETA_SCHEDULES
from perceptual_diffusion.fileio import atomic_write
from perceptual_diffusion.images import to_uint8
from perceptual_diffusion.schedule import NoiseSchedule

if TYPE_CHECKING:
    from backbones.diffusers_unet import DiffusersUNet
    from perceptual_diffusion.latent import LatentPipeline

__all__ = ["Caption", "UserError", "select_captions", "load_captions", "shard_indices", "resolve_shard",
           "caption_noise", "schedule_from_config", "SDComponents", "load_image", "table_row", "main"]

log = logging.getLogger("coco_eval")

TABLE_HEADER = "| Loss | CFG | Rescale | Steps | NFE | FID | IS |"
TABLE_RULE = "|---|---|---|---|---|---|---|"
INCEPTION_SIZE = 299
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Generation settings pinned in out/generation.json, with their defaults.
DEFAULTS: dict[str, Any] = {"n": 10_000, "steps": 25, "guidance": 1.0, "rescale": 0.0, "size": 512, "seed": 0}
_BETAS = {theirs: ours for ours, theirs in DIFFUSERS_BETA_SCHEDULES.items()}  # diffusers name -> ours
_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class UserError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


# ---------------------------------------------------------------------- captions and shards

@dataclass(frozen=True)
class Caption:
    index: int         # position in the evaluation set; names out/images/<index:05d>.png
    image_id: int
    caption: str
    file_name: str     # the real image, relative to --images


def select_captions(annotations: Mapping[str, Any], n: int) -> list[Caption]:
    """The first `n` image ids in the order of `annotations["annotations"]`, each with its first
    caption (whitespace stripped) and its `file_name` from `annotations["images"]`."""
    if n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    entries = annotations.get("annotations")
    if not isinstance(entries, list):
        raise UserError("the annotations file has no 'annotations' list (is it captions_val2014.json?)")
    first: dict[int, str] = {}
    for a in entries:
        first.setdefault(int(a["image_id"]), str(a["caption"]).strip())
    if n > len(first):
        raise UserError(f"--n {n} is larger than the {len(first)} captioned images in the annotations file")
    names = {int(im["id"]): str(im["file_name"]) for im in annotations.get("images", [])}
    chosen = list(first.items())[:n]
    missing = [i for i, _ in chosen if i not in names]
    if missing:
        raise UserError(f"image id {missing[0]} has captions but no entry in the annotations' 'images' list"
                        f" ({len(missing)} such ids)")
    return [Caption(k, i, c, names[i]) for k, (i, c) in enumerate(chosen)]


def load_captions(path: str | Path, n: int) -> list[Caption]:
    """`select_captions` of a COCO captions JSON file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"annotations file {path} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"annotations file {path} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise UserError(f"annotations file {path} holds a JSON {type(data).__name__}, not an object")
    return select_captions(data, n)


def shard_indices(n: int, shard: int, num_shards: int) -> list[int]:
    """Indices of 0..n-1 that shard `shard` of `num_shards` generates: i % num_shards == shard."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise UserError(f"--shard must be in [0, {num_shards}) and --num-shards >= 1, got {shard} of {num_shards}")
    return list(range(shard, n, num_shards))


def resolve_shard(shard: int | None, num_shards: int | None, env: Mapping[str, str]) -> tuple[int, int]:
    """(shard, num_shards) from the flags, else from RANK / WORLD_SIZE (accelerate, torchrun), else (0, 1)."""
    if (shard is None) != (num_shards is None):
        raise UserError("give --shard and --num-shards together")
    if shard is None:
        try:
            shard, num_shards = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
        except ValueError as e:
            raise UserError(f"RANK / WORLD_SIZE must be integers ({e})") from e
    shard_indices(0, shard, num_shards)  # validates
    return shard, num_shards


def caption_noise(seed: int, index: int, shape: Sequence[int]) -> Tensor:
    """x_T of caption `index`: float32 standard normal on the CPU from a generator seeded by
    (seed, index) through numpy's SeedSequence, independent of batching and sharding."""
    state = np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0]
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(state)))


def image_path(out: Path, index: int) -> Path:
    return out / "images" / f"{index:05d}.png"


def _save_png(pixels: np.ndarray, path: Path) -> None:
    """uint8 (H, W, 3) to `path` through a temporary sibling and a rename (never half a PNG)."""
    atomic_write(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"))


# ---------------------------------------------------------------------- model

def schedule_from_config(cfg: Mapping[str, Any]) -> NoiseSchedule:
    """The NoiseSchedule of a diffusers scheduler config (DDIMScheduler field names and defaults).
    Raises UserError unless it predicts v, the only parameterisation `ddim_sample` takes."""
    pred = cfg.get("prediction_type", "epsilon")
    if pred != "v_prediction":
        raise UserError(f"the scheduler's prediction_type is {pred!r}; this evaluation samples v-prediction "
                        "models only (prediction_type 'v_prediction')")
    zsnr = bool(cfg.get("rescale_betas_zero_snr", False))
    if cfg.get("trained_betas") is not None:
        return NoiseSchedule(torch.tensor(cfg["trained_betas"], dtype=torch.float64), zsnr)
    kind = cfg.get("beta_schedule", "linear")
    if kind not in _BETAS:
        raise UserError(f"scheduler beta_schedule {kind!r} is not supported; supported: {', '.join(_BETAS)}")
    T = int(cfg.get("num_train_timesteps", 1000))
    if _BETAS[kind] == "cosine":
        return NoiseSchedule.cosine(T, zero_terminal_snr=zsnr)
    return NoiseSchedule.from_name(_BETAS[kind], num_timesteps=T, beta_start=float(cfg.get("beta_start", 1e-4)),
                                   beta_end=float(cfg.get("beta_end", 0.02)), zero_terminal_snr=zsnr)


def check_model_dir(model: str | Path) -> Path:
    """`model` as a Path, or UserError unless it is a folder with the SD subfolders."""
    path = Path(model)
    if not path.is_dir():
        raise UserError(f"model directory {path} not found")
    absent = [c for c in _SUBFOLDERS if not (path / c).is_dir()]
    if absent:
        raise UserError(f"model directory {path} lacks {', '.join(f'{c}/' for c in absent)} "
                        "(a diffusers Stable Diffusion folder is expected)")
    return path


class SDComponents:
    """What generation needs from a diffusers SD folder: the UNet as a DiffusersUNet, the frozen
    VAE + text encoder as a LatentPipeline (contexts, empty-prompt context, decoding) and the
    schedule of its scheduler config."""

    def __init__(self, net: DiffusersUNet, latents: LatentPipeline, schedule: NoiseSchedule) -> None:
        self.net, self.latents, self.schedule = net, latents, schedule

    @classmethod
    def from_pretrained(cls, model: Path, device: torch.device, dtype: torch.dtype) -> SDComponents:
        from backbones.diffusers_unet import DiffusersUNet
        from perceptual_diffusion.latent import LatentPipeline

        cfg = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
        schedule = schedule_from_config(cfg)
        if not schedule.zero_terminal_snr:
            log.warning("the scheduler has no zero terminal SNR: trailing DDIM starts from a noisy, not pure-noise, x_T")
        net = DiffusersUNet.from_pretrained(model, torch_dtype=dtype).to(device).eval()
        return cls(net, LatentPipeline.from_pretrained(model, dtype=dtype).to(device), schedule)

    def latent_shape(self, size: int) -> tuple[int, int, int]:
        """(C, h, w) of the UNet's input for size x size images."""
        if size % self.latents.downsample:
            raise UserError(f"--size {size} must be a multiple of the VAE's downsampling factor "
                            f"{self.latents.downsample}")
        return self.latents.latent_shape((3, size, size))


# ---------------------------------------------------------------------- generation

def _settings(args: argparse.Namespace, captions: list[Caption], dtype: str) -> dict[str, Any]:
    digest = hashlib.sha256("\n".join(f"{c.image_id}\t{c.caption}" for c in captions).encode()).hexdigest()
    return {"model": str(Path(args.model).resolve()), "n": args.n, "steps": args.steps, "guidance": args.guidance,
            "rescale": args.rescale, "size": args.size, "seed": args.seed, "dtype": dtype, "captions_sha256": digest}


def _pin_settings(out: Path, settings: dict[str, Any]) -> None:
    """Write out/generation.json, or check that the one there has the same settings."""
    path = out / "generation.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        diff = [k for k in settings if stored.get(k) != settings[k]]
        if diff:
            k = diff[0]
            raise UserError(f"{path} pins {k}={stored.get(k)!r}, this run has {k}={settings[k]!r}; use the "
                            "same settings or another --out")
        return
    text = json.dumps(settings, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _remove_stale_temporaries(out: Path, indices: list[int]) -> None:
    """Temporary PNGs of this shard left by a killed run (atomic_write names them .<name>.*.tmp)."""
    for i in indices:
        for tmp in (out / "images").glob(f".{i:05d}.png.*.tmp"):
            tmp.unlink(missing_ok=True)


def generate(args: argparse.Namespace, captions: list[Caption], indices: list[int], device: torch.device,
             dtype: torch.dtype) -> int:
    """Generate the PNGs of `indices` that do not exist yet; returns how many were made."""
    from tqdm.auto import tqdm

    from perceptual_diffusion.sampling import ddim_sample

    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out, indices)
    todo = [i for i in indices if not image_path(out, i).exists()]
    if not todo:
        return 0
    sd = SDComponents.from_pretrained(Path(args.model), device, dtype)
    shape = sd.latent_shape(args.size)
    guided = args.guidance != 1.0
    null = sd.latents.null_context()  # [1 x L x D], the empty prompt
    for start in tqdm(range(0, len(todo), args.batch_size), desc="generating", unit="batch",
                      disable=not sys.stderr.isatty()):
        batch = todo[start:start + args.batch_size]
        context = sd.latents.encode_prompts([captions[i].caption for i in batch])
        noise = torch.stack([caption_noise(args.seed, i, shape) for i in batch]).to(device)
        z0 = ddim_sample(sd.net, sd.schedule, noise, cond=context, steps=args.steps, spacing="trailing", eta=0.0,
                         guidance_scale=args.guidance, uncond=null.expand(len(batch), -1, -1) if guided else None,
                         guidance_rescale=args.rescale if guided else 0.0)
        pixels = to_uint8(sd.latents.decode(z0))
        for i, p in zip(batch, pixels):
            _save_png(p, image_path(out, i))
    return len(todo)


# ---------------------------------------------------------------------- metrics

def load_image(path: str | Path) -> Tensor:
    """An image file -> float32 [3 x 299 x 299] in [-1, 1]: RGB, centre crop to the shorter side
    (offsets floor((W - s) / 2), floor((H - s) / 2)), then the InceptionV3FID resize (bilinear,
    align_corners=False, no antialias)."""
    with Image.open(path) as im:
        x = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy())
    h, w = x.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    x = x[top:top + s, left:left + s].permute(2, 0, 1).float().div(127.5).sub(1)
    if s != INCEPTION_SIZE:
        x = F.interpolate(x[None], size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)[0]
    return x


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tensor:
        return load_image(self.paths[i])


def _batches(paths: list[Path], batch_size: int, workers: int):
    return torch.utils.data.DataLoader(_ImageFiles(paths), batch_size=batch_size, num_workers=workers)


def _fingerprint(net: torch.nn.Module) -> str:
    return hashlib.sha256(net.fc.weight.detach().cpu().numpy().tobytes()).hexdigest()[:16]


def reference_paths(images: Path, captions: list[Caption]) -> list[Path]:
    paths = [images / c.file_name for c in captions]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"real image {missing[0]} not found ({len(missing)} of the {len(paths)} selected are missing)")
    return paths


def compute_metrics(args: argparse.Namespace, captions: list[Caption], net: torch.nn.Module,
                    device: torch.device) -> dict[str, float]:
    """FID of out/images against the real images of the same ids, and IS, from one Inception pass."""
    from perceptual_diffusion.metrics.fid import cached_statistics, fid_and_inception_score

    out = Path(args.out)
    net = net.to(device)
    real = reference_paths(Path(args.images), captions)
    ids = hashlib.sha256(",".join(str(c.image_id) for c in captions).encode()).hexdigest()[:16]
    key = f"coco-fid-pool3|ids={ids}|n={len(captions)}|centre-crop+bilinear-{INCEPTION_SIZE}|inception={_fingerprint(net)}"
    ref = cached_statistics(out / "fid_reference.safetensors", key,
                            lambda: _batches(real, args.inception_batch_size, args.workers), net)
    generated = _batches([image_path(out, c.index) for c in captions], args.inception_batch_size, args.workers)
    return fid_and_inception_score(net, generated, ref, key="generated")


def table_row(label: str, guidance: float, rescale: float, steps: int, nfe: int, fid: float, is_: float) -> str:
    """One Table 1 row: the CFG and Rescale cells are empty when unused."""
    cfg = f"{guidance:g}" if guidance != 1.0 else ""
    phi = f"{rescale:g}" if guidance != 1.0 and rescale > 0 else ""
    cells = [label, cfg, phi, str(steps), str(nfe), f"{fid:.2f}", f"{is_:.2f}"]
    return "| " + " | ".join(cells) + " |"


# ---------------------------------------------------------------------- command line

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="diffusers SD model directory (unet/, vae/, text_encoder/, tokenizer/, scheduler/);"
                                   " with --metrics-only taken from out/generation.json")
    p.add_argument("--annotations", required=True, help="COCO captions JSON, e.g. captions_val2014.json")
    p.add_argument("--images", required=True, help="folder of the real images, e.g. val2014/")
    p.add_argument("--out", required=True, help="output folder: images/, generation.json, metrics.json, "
                                                "fid_reference.safetensors")
    p.add_argument("--label", help="the Loss cell of the printed row, e.g. MSE or SP (default: the model folder's name)")
    p.add_argument("--n", type=int, help=f"number of captions/images (default {DEFAULTS['n']})")
    p.add_argument("--steps", type=int, help=f"DDIM steps, e.g. 25 or 50 (default {DEFAULTS['steps']})")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale; 1 = none, e.g. 7.5 for the MSE + "
                                                  "CFG rows (default 1)")
    p.add_argument("--rescale", type=float, help="guidance rescale phi in [0, 1], e.g. 0.7; used only with "
                                                 "guidance != 1 (default 0)")
    p.add_argument("--size", type=int, help=f"generation resolution in pixels (default {DEFAULTS['size']})")
    p.add_argument("--seed", type=int, help="noise seed; caption i's noise is seeded by (seed, i) (default 0)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="model dtype for generation (default fp16 on CUDA, "
                                                           "else fp32); the sampler's arithmetic stays float32")
    p.add_argument("--batch-size", type=int, default=16, help="captions per sampling batch (default 16)")
    p.add_argument("--inception-batch-size", type=int, default=64, help="images per Inception batch (default 64)")
    p.add_argument("--workers", type=int, default=4, help="image-loading processes for the metrics (default 4)")
    p.add_argument("--inception-weights", help="pt_inception-2015-12-05-6726825d.pth file or its folder (default: "
                                               "$PERCEPTUAL_DIFFUSION_WEIGHTS, then the torch hub cache)")
    p.add_argument("--shard", type=int, help="this process's shard index (default $RANK, else 0)")
    p.add_argument("--num-shards", type=int, help="number of shards (default $WORLD_SIZE, else 1)")
    p.add_argument("--wait", type=float, default=0.0, help="seconds shard 0 waits for the other shards' images "
                                                           "before giving up on the metrics (default 0)")
    p.add_argument("--device", help="torch device (default cuda:$LOCAL_RANK when CUDA is available, else cpu)")
    p.add_argument("--metrics-only", action="store_true", help="compute the metrics of an existing --out")
    p.add_argument("--skip-metrics", action="store_true", help="generate only (no Inception weights needed)")
    args = p.parse_args(argv)
    if args.metrics_only and args.skip_metrics:
        p.error("--metrics-only and --skip-metrics exclude each other")
    for name in ("batch_size", "inception_batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.workers < 0 or args.wait < 0:
        p.error("--workers and --wait must be >= 0")
    return args


def _resolve(args: argparse.Namespace, device: torch.device) -> None:
    """Fill the generation settings: from out/generation.json for --metrics-only (flags given
    must agree with it), else from the defaults; then check their ranges."""
    fields = [*DEFAULTS, "model", "dtype"]
    if args.metrics_only:
        path = Path(args.out) / "generation.json"
        if not path.is_file():
            raise UserError(f"{path} not found: --metrics-only needs a folder written by a generation run")
        stored = json.loads(path.read_text())
        for k in fields:
            given = getattr(args, k)
            if k == "model" and given is not None:
                given = str(Path(given).resolve())
            if given is not None and given != stored[k]:
                raise UserError(f"--{k} {given!r} differs from {stored[k]!r} in {path}")
            setattr(args, k, stored[k])
        return
    if args.model is None:
        raise UserError("--model is required (except with --metrics-only)")
    for k, v in DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.dtype is None:
        args.dtype = "fp16" if device.type == "cuda" else "fp32"
    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    if not 0.0 <= args.rescale <= 1.0:
        raise UserError(f"--rescale must be in [0, 1], got {args.rescale}")
    if args.size < 1:
        raise UserError(f"--size must be >= 1, got {args.size}")


def _load_inception(weights: str | None) -> torch.nn.Module:
    from perceptual_diffusion.metrics.inception import load_fid_inception

    try:
        return load_fid_inception(weights)
    except FileNotFoundError as e:
        raise UserError(str(e)) from e


def _wait_for(paths: list[Path], seconds: float) -> list[Path]:
    deadline = time.monotonic() + seconds
    missing = [p for p in paths if not p.exists()]
    while missing and time.monotonic() < deadline:
        time.sleep(min(10.0, max(deadline - time.monotonic(), 0.0)))
        missing = [p for p in missing if not p.exists()]
    return missing


def run(args: argparse.Namespace) -> int:
    """Generate this shard's images, then (shard 0) measure; raises UserError for bad input."""
    device = torch.device(args.device or (f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available()
                                          else "cpu"))
    _resolve(args, device)
    out = Path(args.out)
    captions = load_captions(args.annotations, args.n)
    if not Path(args.images).is_dir():
        raise UserError(f"images folder {args.images} not found")
    shard, num_shards = resolve_shard(args.shard, args.num_shards, os.environ)
    if args.metrics_only and shard != 0:
        return 0  # launched on several processes: shard 0 measures
    measure = shard == 0 and not args.skip_metrics
    pngs = [image_path(out, c.index) for c in captions]
    if args.metrics_only and any(not p.exists() for p in pngs):
        missing = [p for p in pngs if not p.exists()]
        raise UserError(f"{len(missing)} of {args.n} images are missing (first {missing[0]})")
    net = None
    if measure:  # fail before spending hours on sampling
        net = _load_inception(args.inception_weights)
        reference_paths(Path(args.images), captions)

    if not args.metrics_only:
        check_model_dir(args.model)
        out.mkdir(parents=True, exist_ok=True)
    _pin_settings(out, _settings(args, captions, args.dtype))  # --metrics-only: checks the captions
    if not args.metrics_only:
        atomic_write(out / "captions.jsonl", lambda tmp: Path(tmp).write_text(
            "".join(json.dumps(dataclasses.asdict(c)) + "\n" for c in captions), encoding="utf-8"))
        mine = shard_indices(args.n, shard, num_shards)
        made = generate(args, captions, mine, device, DTYPES[args.dtype])
        print(f"shard {shard}/{num_shards}: generated {made} images, {len(mine) - made} already there", file=sys.stderr)
    if not measure:
        return 0

    missing = _wait_for(pngs, args.wait)
    if missing:
        print(f"{len(missing)} of {args.n} images are missing (first {missing[0]}): the other shards are not done;"
              " run with --metrics-only once they are", file=sys.stderr)
        return 0
    metrics = compute_metrics(args, captions, net, device)
    nfe = args.steps * (2 if args.guidance != 1.0 else 1)
    label = args.label or Path(args.model).name
    result = {**metrics, "n": args.n, "steps": args.steps, "nfe": nfe, "guidance": args.guidance,
              "rescale": args.rescale, "seed": args.seed, "model": str(Path(args.model).resolve()), "label": label,
              "size": args.size, "dtype": args.dtype}
    text = json.dumps(result, indent=2) + "\n"
    atomic_write(out / "metrics.json", lambda tmp: Path(tmp).write_text(text))
    print(TABLE_HEADER, TABLE_RULE, table_row(label, args.guidance, args.rescale, args.steps, nfe,
                                              metrics["fid"], metrics["is"]), sep="\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        return run(args)
    except UserError as e:
        print(f"coco_eval: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
