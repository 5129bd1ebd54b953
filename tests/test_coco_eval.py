"""benchmarks/coco_eval.py: caption selection, seeding and sharding laws, the schedule read from a
diffusers scheduler, the Table 1 row, and end to end on a tiny offline SD folder with fake COCO data
(two shards, resume, --metrics-only, FID recomputed by hand, a diffusers pipeline as the oracle of
one image) plus the exit-2 errors."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sd_tiny import tiny_pipeline, tiny_scheduler

from perceptual_diffusion.metrics.fid import RunningStats, inception_score
from perceptual_diffusion.metrics.inception import InceptionV3FID

from helpers import load_benchmark


def _load():
    if "coco_eval" in sys.modules:
        return sys.modules["coco_eval"]
    return load_benchmark("coco_eval")


ce = _load()

# Image ids in first-appearance order 42, 7, 13, 99, 5, 61; each has two captions, interleaved.
ANNOTATIONS = [
    (42, "A cat on a mat.\n"), (7, "  a red bus "), (42, "second caption of 42"), (13, "the dog"),
    (7, "second caption of 7"), (99, "an apple"), (13, "second caption of 13"), (5, "five"),
    (99, "second caption of 99"), (61, "sixty-one"), (5, "second caption of 5"), (61, "second caption of 61"),
]
SIZES = {42: (40, 24), 7: (20, 36), 13: (30, 30), 99: (44, 28), 5: (26, 18), 61: (32, 48)}  # (W, H)


def _annotations() -> dict:
    return {
        "images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg", "width": w, "height": h}
                   for i, (w, h) in sorted(SIZES.items())],
        "annotations": [{"id": k, "image_id": i, "caption": c} for k, (i, c) in enumerate(ANNOTATIONS)],
    }


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    (root / "captions_val2014.json").write_text(json.dumps(_annotations()))
    images = root / "val2014"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in SIZES.items():
        yy, xx = np.mgrid[0:h, 0:w]
        base = rng.integers(0, 256, 3)
        pix = (base + 4 * xx[..., None] + 2 * yy[..., None] * np.array([1, -1, 2])) % 256  # not crop-invariant
        Image.fromarray(pix.astype(np.uint8)).save(images / f"COCO_val2014_{i:012d}.jpg", quality=95)
    return root / "captions_val2014.json", images


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    tiny_pipeline(root / "tok", seed=0).save_pretrained(root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random FID Inception whose activations neither vanish nor explode (He-initialised convs)."""
    torch.manual_seed(0)
    net = InceptionV3FID()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("weights") / "random_inception.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(autouse=True)
def _no_launcher_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)


def _args(coco, model_dir, weights, out, *extra):
    ann, images = coco
    return ["--model", str(model_dir), "--annotations", str(ann), "--images", str(images), "--out", str(out),
            "--inception-weights", str(weights), "--n", "4", "--steps", "2", "--size", "16", "--guidance", "7.5",
            "--rescale", "0.7", "--seed", "3", "--device", "cpu", "--workers", "0", *extra]


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im).copy()


# ---------------------------------------------------------------------- pure parts

def test_first_caption_of_each_image_in_annotation_order():
    caps = ce.select_captions(_annotations(), 4)
    assert [(c.index, c.image_id, c.caption) for c in caps] == [
        (0, 42, "A cat on a mat."), (1, 7, "a red bus"), (2, 13, "the dog"), (3, 99, "an apple")]
    assert caps[1].file_name == "COCO_val2014_000000000007.jpg"
    assert len(ce.select_captions(_annotations(), 6)) == 6
    with pytest.raises(ce.UserError, match="--n 7 is larger than the 6 captioned images"):
        ce.select_captions(_annotations(), 7)
    broken = _annotations()
    broken["images"] = broken["images"][1:]  # id 5 loses its file name
    with pytest.raises(ce.UserError, match="image id 5"):
        ce.select_captions(broken, 6)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.text(max_size=5)), min_size=1, max_size=30), st.data())
def test_selection_law(entries, data):
    ann = {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(10)],
           "annotations": [{"image_id": i, "caption": c} for i, c in entries]}
    ids = list(dict.fromkeys(i for i, _ in entries))
    n = data.draw(st.integers(1, len(ids)))
    caps = ce.select_captions(ann, n)
    assert [c.image_id for c in caps] == ids[:n]          # first appearance order, unique ids
    for c in caps:                                       # the first caption of that id
        assert c.caption == next(t for i, t in entries if i == c.image_id).strip()


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 50), st.integers(1, 7))
def test_shards_partition_the_indices(n, k):
    parts = [ce.shard_indices(n, s, k) for s in range(k)]
    assert sorted(i for p in parts for i in p) == list(range(n))
    assert all(i % k == s for s, p in enumerate(parts) for i in p)


def test_shard_from_flags_or_launcher_env():
    assert ce.resolve_shard(None, None, {}) == (0, 1)
    assert ce.resolve_shard(None, None, {"RANK": "2", "WORLD_SIZE": "4"}) == (2, 4)
    assert ce.resolve_shard(1, 3, {"RANK": "2", "WORLD_SIZE": "4"}) == (1, 3)  # flags win
    for bad in [(3, 3), (0, None), (-1, 2)]:
        with pytest.raises(ce.UserError):
            ce.resolve_shard(*bad, {})


def test_caption_noise_depends_only_on_seed_and_index():
    a = ce.caption_noise(3, 5, (4, 8, 8))
    assert a.shape == (4, 8, 8) and a.dtype == torch.float32
    torch.testing.assert_close(a, ce.caption_noise(3, 5, (4, 8, 8)), rtol=0, atol=0)
    assert not torch.allclose(a, ce.caption_noise(3, 6, (4, 8, 8)))
    assert not torch.allclose(a, ce.caption_noise(4, 5, (4, 8, 8)))
    big = torch.stack([ce.caption_noise(0, i, (256,)) for i in range(64)])
    assert abs(float(big.mean())) < 0.03 and abs(float(big.std()) - 1) < 0.03


def test_schedule_matches_the_diffusers_scheduler():
    sched = tiny_scheduler()
    s = ce.schedule_from_config(dict(sched.config))
    assert s.zero_terminal_snr and float(s.alphas_cumprod[-1]) == 0.0
    torch.testing.assert_close(s.alphas_cumprod, sched.alphas_cumprod.double(), rtol=1e-5, atol=1e-7)
    cos = ce.schedule_from_config({"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"})
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod.double()
    torch.testing.assert_close(cos.alphas_cumprod, ref, rtol=1e-5, atol=1e-7)
    with pytest.raises(ce.UserError, match="prediction_type is 'epsilon'"):
        ce.schedule_from_config({"beta_schedule": "scaled_linear"})
    with pytest.raises(ce.UserError, match="beta_schedule 'sigmoid'"):
        ce.schedule_from_config({"beta_schedule": "sigmoid", "prediction_type": "v_prediction"})


def test_table_row_in_the_papers_format():
    assert ce.table_row("MSE", 7.5, 0.7, 25, 50, 18.671, 34.168) == "| MSE | 7.5 | 0.7 | 25 | 50 | 18.67 | 34.17 |"
    assert ce.table_row("MSE", 7.5, 0.0, 25, 50, 24.41, 32.1) == "| MSE | 7.5 |  | 25 | 50 | 24.41 | 32.10 |"
    assert ce.table_row("SP", 1.0, 0.7, 50, 50, 24.42, 28.07) == "| SP |  |  | 50 | 50 | 24.42 | 28.07 |"
    assert ce.TABLE_HEADER.count("|") == ce.table_row("x", 1, 0, 1, 1, 0, 0).count("|")


def test_load_image_crops_the_centre_then_resizes_like_the_wrapper(tmp_path):
    pix = np.random.default_rng(1).integers(0, 256, (30, 41, 3), dtype=np.uint8)  # H 30, W 41: offset 5
    Image.fromarray(pix).save(tmp_path / "x.png")
    crop = torch.from_numpy(pix[:, 5:35]).permute(2, 0, 1).float() / 127.5 - 1
    want = F.interpolate(crop[None], size=(299, 299), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(ce.load_image(tmp_path / "x.png"), want)
    Image.fromarray(pix[:, :30]).save(tmp_path / "left.png")  # the left square is another picture
    assert not torch.allclose(ce.load_image(tmp_path / "left.png"), want)


# ---------------------------------------------------------------------- end to end

def _features(net, paths, crop: bool):
    """Independent of the script: PIL crop box, the wrapper's own resize."""
    xs = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            if crop:
                w, h = im.size
                s = min(w, h)
                im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            xs.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 127.5 - 1)
    with torch.no_grad():
        return torch.cat([net.features(x[None]) for x in xs])


def _fid_of_few(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID of two small samples (n << dim) in closed form: with centred rows X, Y and S = X^T X / (n-1),
    Tr((S_a S_b)^(1/2)) is the nuclear norm of X Y^T / (n-1), since S_a S_b and (X Y^T)(X Y^T)^T share
    their non-zero eigenvalues."""
    a, b = a.double(), b.double()
    x, y = a - a.mean(0), b - b.mean(0)
    n = a.shape[0]
    cross = torch.linalg.matrix_norm(x @ y.T, ord="nuc") / (n - 1)
    return float((a.mean(0) - b.mean(0)).square().sum() + (x.square().sum() + y.square().sum()) / (n - 1) - 2 * cross)


def test_two_shards_resume_metrics_only_and_oracle(coco, model_dir, weights, tmp_path, capsys, monkeypatch):
    out = tmp_path / "a"
    # shard 0 of 2 (flags): indices 0 and 2; shard 1 has not run, so no metrics yet
    assert ce.main(_args(coco, model_dir, weights, out, "--shard", "0", "--num-shards", "2", "--batch-size", "2")) == 0
    err = capsys.readouterr().err
    assert "shard 0/2: generated 2 images" in err and "2 of 4 images are missing" in err
    assert sorted(p.name for p in (out / "images").iterdir()) == ["00000.png", "00002.png"]
    assert not (out / "metrics.json").exists()
    ann, images = coco
    metrics_only = ["--metrics-only", "--annotations", str(ann), "--images", str(images), "--out", str(out),
                    "--inception-weights", str(weights), "--device", "cpu", "--workers", "0"]
    assert ce.main(metrics_only) == 2
    assert capsys.readouterr().err.startswith("coco_eval: error: 2 of 4 images are missing (first ")
    # shard 1 of 2 from the launcher's environment; it never measures
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert ce.main(_args(coco, model_dir, weights, out, "--batch-size", "1")) == 0
    assert "shard 1/2: generated 2 images" in capsys.readouterr().err
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    pngs = [out / "images" / f"{i:05d}.png" for i in range(4)]
    assert all(_pixels(p).shape == (16, 16, 3) for p in pngs)
    assert [json.loads(line)["image_id"] for line in (out / "captions.jsonl").read_text().splitlines()] == [42, 7, 13, 99]

    # --metrics-only reads the settings from generation.json
    assert ce.main([*metrics_only, "--label", "MSE"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    m = json.loads((out / "metrics.json").read_text())
    assert {"fid", "is", "is_std", "n", "steps", "nfe", "guidance", "rescale", "seed", "model"} <= set(m)
    assert (m["n"], m["steps"], m["nfe"], m["guidance"], m["rescale"], m["seed"]) == (4, 2, 4, 7.5, 0.7, 3)
    assert m["model"] == str(model_dir.resolve()) and m["label"] == "MSE"
    assert lines[-3:] == [ce.TABLE_HEADER, ce.TABLE_RULE, f"| MSE | 7.5 | 0.7 | 2 | 4 | {m['fid']:.2f} | {m['is']:.2f} |"]

    # FID and IS by hand: real images of ids 42, 7, 13, 99 (not 5 or 61), centre-cropped
    net = InceptionV3FID.from_file(weights)
    real = _features(net, [images / f"COCO_val2014_{i:012d}.jpg" for i in (42, 7, 13, 99)], crop=True)
    fake = _features(net, pngs, crop=False)
    ref = RunningStats.load(out / "fid_reference.safetensors", key=None)
    torch.testing.assert_close(ref.mean, real.double().mean(0), rtol=1e-4, atol=1e-6)
    assert m["fid"] == pytest.approx(_fid_of_few(fake, real), rel=1e-3) and m["fid"] > 0
    is_mean, _ = inception_score((fake @ net.fc.weight.T).softmax(-1), splits=1)
    assert m["is"] == pytest.approx(is_mean, rel=1e-4)

    # resume: nothing is regenerated, PNGs keep their mtimes; a lost PNG comes back identical
    mtimes = [p.stat().st_mtime_ns for p in pngs]
    assert ce.main(_args(coco, model_dir, weights, out, "--shard", "0", "--num-shards", "2", "--skip-metrics")) == 0
    assert "generated 0 images, 2 already there" in capsys.readouterr().err
    assert [p.stat().st_mtime_ns for p in pngs] == mtimes
    before = pngs[2].read_bytes()
    pngs[2].unlink()
    stale = out / "images" / ".00002.png.killed.tmp"
    stale.write_bytes(b"half a png")
    assert ce.main(_args(coco, model_dir, weights, out, "--shard", "0", "--num-shards", "2", "--skip-metrics")) == 0
    assert "generated 1 images, 1 already there" in capsys.readouterr().err
    assert pngs[2].read_bytes() == before and not stale.exists()
    assert [p.stat().st_mtime_ns for p in pngs[:2]] == mtimes[:2]

    # one process, other batch size: the same images as the two shards
    single = tmp_path / "b"
    assert ce.main(_args(coco, model_dir, weights, single, "--batch-size", "3", "--skip-metrics")) == 0
    for i, p in enumerate(pngs):
        np.testing.assert_array_equal(_pixels(single / "images" / f"{i:05d}.png"), _pixels(p))

    # oracle: diffusers' StableDiffusionPipeline from the same folder and x_T (CFG 7.5, rescale 0.7)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    img = pipe(["A cat on a mat."], height=16, width=16, num_inference_steps=2, guidance_scale=7.5,
               guidance_rescale=0.7, latents=ce.caption_noise(3, 0, (4, 8, 8))[None], output_type="np").images[0]
    diff = np.abs(np.round(img * 255).astype(int) - _pixels(pngs[0]).astype(int))
    assert diff.max() <= 1 and _pixels(pngs[0]).std() > 5

    # other settings on the same --out are refused
    assert ce.main(_args(coco, model_dir, weights, out, "--steps", "3", "--skip-metrics")) == 2
    assert "pins steps=2, this run has steps=3" in capsys.readouterr().err


@pytest.mark.parametrize("case, message", [
    ("annotations", "annotations file .* not found"),
    ("images", "images folder .* not found"),
    ("model", "model directory .* not found"),
    ("weights", "FID Inception weights .* not found"),
    ("n", "--n 7 is larger than the 6 captioned images"),
    ("real", "real image .*COCO_val2014_000000000013.jpg not found"),
])
def test_user_errors_exit_2(case, message, coco, model_dir, weights, tmp_path, capsys):
    import re

    ann, images = coco
    if case == "real":
        partial = tmp_path / "partial"
        partial.mkdir()
        for i in (42, 7):
            os.symlink(images / f"COCO_val2014_{i:012d}.jpg", partial / f"COCO_val2014_{i:012d}.jpg")
        images = partial
    argv = _args((ann, images), model_dir, weights, tmp_path / "out")
    swap = {"annotations": ("--annotations", str(tmp_path / "none.json")), "images": ("--images", str(tmp_path / "no")),
            "model": ("--model", str(tmp_path / "nomodel")), "weights": ("--inception-weights", str(tmp_path / "w.pth")),
            "n": ("--n", "7")}
    if case in swap:
        flag, value = swap[case]
        argv[argv.index(flag) + 1] = value
    assert ce.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("coco_eval: error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "out" / "images").exists()  # failed before generating anything
