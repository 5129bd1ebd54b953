"""Several processes on CPU (gloo) through `accelerate launch`: DDP keeps every replica equal;
FSDP (train.fsdp) shards the online net, its EMA and the optimizer, and DeepSpeed ZeRO-2 (the
shipped recipes/accelerate/deepspeed_zero2.yaml) partitions gradients and optimizer state; both
save full checkpoints that resume bit for bit and in one process, and train what DDP trains.
Shard units, sharding helpers and the checks of the accelerate configs."""

import json
import tomllib
from pathlib import Path

import pytest
import torch

from backbones import BACKBONES, build_backbone
from perceptual_diffusion.checkpoint import latest_checkpoint, load_checkpoint
from perceptual_diffusion.config import RecipeError, load_recipe, recipe_from_dict
from perceptual_diffusion.sharding import load_optimizer_state, optimizer_state, shard, shard_units

from helpers import accelerate_launch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = """
name = "dist"
seed = 5
[data]
name = "digits"
size = 16
conditional = true
[model]
preset = "tiny"
[mse]
steps = 4
batch_size = 4
grad_accum = 2
lr = 1e-3
cond_dropout = 0.1
ema_decay = 0.9
[sp]
steps = 3
batch_size = 4
lr = 1e-4
ema_decay = 0.9
[train]
log_every = 1
sample_every = 0
checkpoint_every = 0
num_samples = 4
sample_steps = 3
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One DDP run through the CLI and, through tests/dist_driver.py, an FSDP run straight through
    (fsdp/a) and the same run stopped at global steps 2 and 5 and resumed (fsdp/b)."""
    tmp = tmp_path_factory.mktemp("dist")
    recipe = tmp / "r.toml"
    recipe.write_text(RECIPE)
    ddp = accelerate_launch("-m", "perceptual_diffusion.cli", "train", recipe, "--out", tmp / "ddp", "--no-progress")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    fsdp = accelerate_launch(ROOT / "tests" / "dist_driver.py", recipe, tmp / "fsdp", "train.fsdp=true", port_offset=1)
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    return tmp


@pytest.fixture(scope="module")
def deepspeed_runs(runs):
    """tests/dist_driver.py under the shipped ZeRO-2 config: straight through (deepspeed/a) and
    stopped at global steps 2 and 5 and resumed (deepspeed/b)."""
    pytest.importorskip("deepspeed")
    proc = accelerate_launch(ROOT / "tests" / "dist_driver.py", runs / "r.toml", runs / "deepspeed",
                   config=ROOT / "recipes" / "accelerate" / "deepspeed_zero2.yaml", port_offset=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return runs / "deepspeed"


def _final(run_dir):
    return load_checkpoint(latest_checkpoint(run_dir))


def test_two_process_ddp_ends_with_identical_weights(runs):
    summary = json.loads((runs / "ddp" / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["sharded"] is False
    a, b = summary["weight_digests_per_process"]
    assert a == b and set(a) == {"mse", "sp"}
    # every logged loss is the mean over both processes
    assert all("loss" in json.loads(line) for line in (runs / "ddp" / "metrics.jsonl").read_text().splitlines())


def test_fsdp_checkpoints_hold_full_weights_and_resume_bit_for_bit(runs):
    a, b = _final(runs / "fsdp" / "a"), _final(runs / "fsdp" / "b")
    net = build_backbone("image_unet", "tiny", in_channels=1, num_classes=10)
    reference = net.state_dict()
    assert set(a.weights) == {"model", "ema", "perceptual"}
    for name in a.weights:  # gathered, unsharded tensors of the full shapes
        assert {k: v.shape for k, v in a.weights[name].items()} == {k: v.shape for k, v in reference.items()}
        assert all(torch.equal(a.weights[name][k], b.weights[name][k]) for k in reference), name
    opt_a, opt_b = a.state["optimizer"], b.state["optimizer"]
    assert set(opt_a["state"]) == {name for name, _ in net.named_parameters()}  # keyed by name, every parameter
    for key, sa in opt_a["state"].items():
        for field, value in sa.items():
            assert torch.equal(value, opt_b["state"][key][field]), (key, field)
    assert a.state["ema_updates"] == b.state["ema_updates"] == 3
    assert json.loads((runs / "fsdp" / "a" / "summary.json").read_text())["sharded"] is True
    summary = json.loads((runs / "fsdp" / "b" / "summary.json").read_text())
    assert summary["sharded"] is True and set(summary["weight_digest"]) == {"sp"}
    assert Path(summary["mse_vs_sp"]).is_file()  # stage 1 from its checkpoint, stage 2 sharded


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])
def test_sharded_engines_train_what_ddp_trains(engine, runs, request):
    """Same data split, same RNG streams: only the order of floating-point sums differs."""
    if engine == "deepspeed":
        request.getfixturevalue("deepspeed_runs")
    ddp, other = _final(runs / "ddp"), _final(runs / engine / "a")
    for name in ("model", "ema", "perceptual"):
        for key, value in ddp.weights[name].items():
            torch.testing.assert_close(other.weights[name][key], value, rtol=1e-4, atol=1e-5, msg=f"{name} {key}")
    for key, state in ddp.state["optimizer"]["state"].items():  # the same Adam moments, by name
        for field in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(other.state["optimizer"]["state"][key][field], state[field],
                                       rtol=1e-3, atol=1e-8, msg=f"{key} {field}")
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (runs / "ddp", runs / engine / "a")]
    assert len(losses[0]) == len(losses[1]) == 7
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-4, atol=1e-6)


def test_deepspeed_resumes_bit_for_bit(deepspeed_runs):
    a, b = _final(deepspeed_runs / "a"), _final(deepspeed_runs / "b")
    assert set(a.weights) == {"model", "ema", "perceptual"}
    for name in a.weights:
        assert {v.dtype for v in a.weights[name].values()} == {torch.float32}
        assert all(torch.equal(a.weights[name][k], b.weights[name][k]) for k in a.weights[name]), name
    for key, state in a.state["optimizer"]["state"].items():
        assert int(state["step"]) == 3
        assert all(torch.equal(v, b.state["optimizer"]["state"][key][f]) for f, v in state.items()), key
    summary = json.loads((deepspeed_runs / "b" / "summary.json").read_text())
    assert summary["engine"] == "deepspeed" and summary["sharded"] is True
    assert Path(summary["mse_vs_sp"]).is_file()


# ---------------------------------------------------------------------------- in one process

@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_every_backbone_names_shard_units_it_has(backbone):
    """Each class named in the backbone's SHARD_UNITS is a block of its tiny net (a stale name
    would leave that block unsharded without a word)."""
    names = set(BACKBONES[backbone].SHARD_UNITS)
    found = shard_units(build_backbone(backbone, "tiny"))
    assert names and {type(m).__name__ for m in found} == names
    # children before parents: fully_shard must see a unit's inner units first
    position = {id(m): i for i, m in enumerate(found)}
    for m in found:
        for inner in m.modules():
            if inner is not m and id(inner) in position:
                assert position[id(inner)] < position[id(m)]


def test_shard_needs_a_process_group():
    net = build_backbone("image_unet", "tiny")
    with pytest.raises(RuntimeError, match="several processes"):
        shard(net)


def _clone(state):
    """A copy sharing no tensor with `state` (loading would otherwise alias the live optimizer's)."""
    return torch.utils._pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, state)


def test_optimizer_state_by_name_round_trips_and_accepts_index_states():
    torch.manual_seed(0)
    nets = [build_backbone("image_unet", "tiny", in_channels=1) for _ in range(3)]
    for n in nets[1:]:
        n.load_state_dict(nets[0].state_dict())
    opts = [torch.optim.AdamW(n.parameters(), lr=1e-2) for n in nets]
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 900])
    nets[0](x, t).square().mean().backward()
    opts[0].step()
    by_name = optimizer_state(nets[0], opts[0])
    assert all(isinstance(k, str) for k in by_name["state"])
    for n in nets[1:]:
        n.load_state_dict(nets[0].state_dict())
    load_optimizer_state(nets[1], opts[1], _clone(by_name))
    load_optimizer_state(nets[2], opts[2], _clone(opts[0].state_dict()))  # integer ids (older checkpoints)
    for n, o in zip(nets, opts):
        o.zero_grad()
        n(x, t).square().mean().backward()
        o.step()
    for n in nets[1:]:
        assert all(torch.equal(p, q) for p, q in zip(nets[0].parameters(), n.parameters()))


def test_fp16_with_fsdp_is_refused(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(RECIPE)
    with pytest.raises(RecipeError, match="bf16"):
        load_recipe(path, ["train.fsdp=true", "train.mixed_precision=fp16"])


# ------------------------------------------------------------- the shipped accelerate configs

def _accelerate(config: Path, monkeypatch):
    """What `accelerate launch --config_file CONFIG` hands each process: its environment turned
    into the FSDP plugin, and the accelerator fields `sharding_plan` reads."""
    from types import SimpleNamespace

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(config), "x.py"]))
    assert args.use_fsdp
    for key, value in prepare_multi_gpu_env(args).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "false")  # an FSDP1 plugin would look for a GPU to sync on
    plugin = FullyShardedDataParallelPlugin()
    return SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=plugin),
                           num_processes=args.num_processes), plugin


@pytest.mark.parametrize("name", ["fsdp_1node.yaml", "fsdp_multinode.yaml"])
def test_shipped_fsdp_configs_shard_the_sd_unet(name, monkeypatch):
    pytest.importorskip("diffusers")
    from perceptual_diffusion.engines import sharding_plan

    acc, _ = _accelerate(ROOT / "recipes" / "accelerate" / name, monkeypatch)
    text = (ROOT / "recipes" / "image" / "sd21_t2i_mse.toml").read_text()
    recipe = recipe_from_dict(tomllib.loads(text), check_paths=False)  # no SD2.1 weights here
    assert recipe.train.mixed_precision == "bf16"
    wanted, options = sharding_plan(acc, recipe.train)
    assert wanted and options == {"class_names": None, "reshard_after_forward": True}
    net = build_backbone("diffusers_unet", "tiny")
    units = shard_units(net, options["class_names"])
    assert {type(u).__name__ for u in units} == {"ResnetBlock2D", "Transformer2DModel"}
    inner = net.unet
    expected = sum(len(b.resnets) + len(getattr(b, "attentions", ()) or ())
                   for b in [*inner.down_blocks, inner.mid_block, *inner.up_blocks])
    assert len(units) == expected


def _train(**fields):
    from perceptual_diffusion.config import TrainConfig

    return TrainConfig(**fields)


def test_fsdp_plan_refuses_fsdp1_and_fp16_and_reads_unit_names(tmp_path, monkeypatch):
    from accelerate.utils import DistributedType

    from perceptual_diffusion.engines import sharding_plan

    text = (ROOT / "recipes" / "accelerate" / "fsdp_1node.yaml").read_text()
    config = tmp_path / "c.yaml"
    config.write_text(text.replace("fsdp_version: 2", "fsdp_version: 1"))
    acc, _ = _accelerate(config, monkeypatch)
    with pytest.raises(RecipeError, match="fsdp_version: 2"):
        sharding_plan(acc, _train(mixed_precision="bf16"))
    config.write_text(text.replace("  fsdp_version: 2\n", "  fsdp_version: 2\n  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n"
                                                          "  fsdp_transformer_layer_cls_to_wrap: ResBlock\n"
                                                          "  fsdp_reshard_after_forward: false\n", 1)
                      .replace("  fsdp_reshard_after_forward: true\n", "", 1))
    acc, _ = _accelerate(config, monkeypatch)
    with pytest.raises(RecipeError, match="fp16"):
        sharding_plan(acc, _train(mixed_precision="fp16"))
    assert sharding_plan(acc, _train(mixed_precision="bf16")) == (
        True, {"class_names": ["ResBlock"], "reshard_after_forward": False})
    acc.num_processes = 1  # nothing to shard: plain training
    assert sharding_plan(acc, _train()) == (False, {})
    acc.distributed_type = DistributedType.DEEPSPEED  # DeepSpeed shards itself
    assert sharding_plan(acc, _train()) == (False, {})
    with pytest.raises(RecipeError, match="exclude each other"):
        sharding_plan(acc, _train(fsdp=True))


def test_deepspeed_plan_accepts_zero_1_and_2_and_refuses_what_it_cannot_honour():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from perceptual_diffusion.engines import deepspeed_plan

    def acc(**zero):
        plugin = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": 2, **zero}})
        return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=plugin))

    assert not deepspeed_plan(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU), _train())
    for stage in (1, 2):
        assert deepspeed_plan(acc(stage=stage, offload_optimizer={"device": "none"}), _train(mixed_precision="bf16"))
    for stage in (0, 3):
        with pytest.raises(RecipeError, match=f"ZeRO stage {stage} is not supported.*DDP.*FSDP"):
            deepspeed_plan(acc(stage=stage), _train())
    with pytest.raises(RecipeError, match="offload_optimizer is not supported"):
        deepspeed_plan(acc(offload_optimizer={"device": "cpu"}), _train())
    with pytest.raises(RecipeError, match="not 'fp16'"):
        deepspeed_plan(acc(), _train(mixed_precision="fp16"))
    with pytest.raises(RecipeError, match="nonfinite = 'skip'"):
        deepspeed_plan(acc(), _train(nonfinite="skip"))


@pytest.mark.slow
def test_deepspeed_in_bf16_keeps_float32_masters_and_resumes_bit_for_bit(runs, tmp_path):
    """A bf16 engine computes with bf16 weights; the EMA and the checkpoints come from the float32
    masters in the ZeRO partitions, and a resume restores them exactly."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "bf16"
    proc = accelerate_launch(ROOT / "tests" / "dist_driver.py", runs / "r.toml", out, "train.mixed_precision='bf16'",
                   config=ROOT / "recipes" / "accelerate" / "deepspeed_zero2.yaml", port_offset=3, precision="bf16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _final(out / "a"), _final(out / "b")
    assert {v.dtype for v in a.weights["model"].values()} == {v.dtype for v in a.weights["ema"].values()} == {
        torch.float32}
    for name in a.weights:
        assert all(torch.equal(a.weights[name][k], b.weights[name][k]) for k in a.weights[name]), name
    # float32 masters, not bf16 values widened: most weights are not representable in bf16
    w = torch.cat([v.flatten() for v in a.weights["model"].values()])
    assert (w.bfloat16().float() != w).float().mean() > 0.5


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])
def test_a_checkpoint_saved_sharded_resumes_in_one_process(engine, runs, tmp_path, caplog, request):
    """Full tensors and optimizer state keyed by name: the FSDP / DeepSpeed run's mid-SP checkpoint
    (global step 5) continues in one unsharded process, Adam moments included."""
    import shutil

    from perceptual_diffusion.trainer import Trainer

    if engine == "deepspeed":
        request.getfixturevalue("deepspeed_runs")
    run = tmp_path / "run"
    shutil.copytree(runs / engine / "b", run)
    shutil.rmtree(run / "checkpoints" / "step-0000007")
    saved = load_checkpoint(latest_checkpoint(run))
    assert saved.step == 5
    recipe = load_recipe(runs / "r.toml", ["train.fsdp=true"])  # one process: nothing to shard
    trainer = Trainer(recipe, run, resume="latest", progress=False)
    assert type(trainer.engine).__name__ == "Engine"  # unsharded
    result = trainer.run()
    assert [s.stage for s in result.stages] == ["sp"] and "RNG streams restart" in caplog.text
    final = load_checkpoint(latest_checkpoint(run))
    assert final.step == 7 and final.state["ema_updates"] == 3
    moved = [k for k, v in saved.weights["model"].items() if not torch.equal(v, final.weights["model"][k])]
    assert moved  # it trained on from the loaded weights
    for key, state in final.state["optimizer"]["state"].items():  # Adam steps continued from 1, not 0
        assert int(state["step"]) == 3, key
