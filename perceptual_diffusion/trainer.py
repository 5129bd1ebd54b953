"""The training loop: the paper's two stages (section 4) on Hugging Face accelerate.

Stage "mse" trains v-prediction MSE (eq. 5) with conditional dropout; stage "sp" starts from
the stage-1 checkpoint, freezes a copy of it as the perceptual network (EMA weights by
default) and trains the self-perceptual objective (eq. 12). The same loop runs on one CPU, one
GPU, or many processes under `accelerate launch` / torchrun; what differs between one process /
DDP, FSDP2 and DeepSpeed ZeRO-1/2 is an `engines.Engine`.

Nothing is lost on a fault: checkpoints are atomic and hold every state needed for an exact
resume (weights, EMA, optimizer, LR schedule, grad scaler, every process's RNG, the data
position); SIGTERM/SIGINT save at the next step boundary; a non-finite loss or gradient stops
the run naming the step (or, with ``train.nonfinite = "skip"``, skips and counts the step); a
sustained finite loss spike stops it naming the last checkpoint saved before the rise
(`guards`; ``train.divergence = "warn"`` only warns).
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from pathlib import Path

import torch
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

from .builders import (WEIGHTS_KEY, Conditioner, build_latent, build_objective, build_optimizer, build_schedule,
                       build_train_dataset, frozen_model,
                       load_start, new_model)
from .checkpoint import (capture_rng_state, checkpoint_before, final_checkpoint, load_checkpoint, read_meta,
                         resolve_checkpoint, save_checkpoint)
from .config import Recipe, RecipeError, StageConfig, recipe_to_dict, save_recipe
from .datasets import make_loader
from .datasets.loader import ResumableBatchSampler
from .ema import EMA
from .engines import make_accelerator, make_engine
from .guards import (DivergenceError, DivergenceGuard, NonFiniteError, PerceptualCheckError, check_perceptual,
                     spike_report, WARN_SUFFIX)
from .reporting import MetricsLog, Previews, param_digest, warn_recipe_changes, write_summary
from .stage import StageResult, StageState, TrainResult
from .validation import ValidationBatch

__all__ = ["Trainer", "TrainResult", "StageResult", "NonFiniteError", "DivergenceError", "PerceptualCheckError"]

log = logging.getLogger(__name__)


class Trainer:
    """Runs the stages of `recipe.train.stages` in `run_dir`, optionally resuming.

    ``Trainer(recipe, run_dir, resume="latest").run()``; `request_stop()` (called by the
    signal handlers) makes the loop save a checkpoint at the next step boundary and return.
    """

    def __init__(self, recipe: Recipe, run_dir: str | Path, resume: str | None = None, progress: bool = True):
        self.recipe, self.run_dir, self.progress = recipe, Path(run_dir), progress
        self.accelerator = make_accelerator(recipe.train.mixed_precision)
        self.device, self.is_main = self.accelerator.device, self.accelerator.is_main_process
        self.engine = make_engine(self.accelerator, recipe.train)
        self.schedule = build_schedule(recipe)
        self.resume_from = resolve_checkpoint(resume, self.run_dir) if resume else None
        if self.resume_from is not None:
            warn_recipe_changes(read_meta(self.resume_from).recipe, recipe_to_dict(recipe))
        self._stop_signal: int | None = None
        self._stop_requested = False
        self._stopped_at: int | None = None
        self._emas: dict[str, torch.nn.Module] = {}  # stage -> its final EMA model
        self._digests: dict[str, str] = {}  # stage -> digest of its final online weights
        stages = recipe.train.stages
        self.offsets = {s: sum(self._stage_cfg(p).steps for p in stages[: stages.index(s)]) for s in stages}
        self.latent = build_latent(recipe, self.device)  # None in pixel space
        self.encode = self.latent is not None and not recipe.model.latent_cache  # each batch, else cached once
        self.dataset = build_train_dataset(recipe, self.latent, self.is_main, self.accelerator.wait_for_everyone,
                                           progress)
        self.condition = Conditioner(recipe, self.latent, self.device)
        self.previews = Previews(recipe, self.schedule, self.dataset, self.latent, self.device, self.is_main)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_recipe(recipe, self.run_dir / "recipe.toml")
        self.metrics = MetricsLog(self.run_dir, self.is_main)
        self._validation: ValidationBatch | None = None

    def _stage_cfg(self, stage: str) -> StageConfig:
        return self.recipe.mse if stage == "mse" else self.recipe.sp

    def request_stop(self, signum: int | None = None) -> None:
        if self._stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        self._stop_requested, self._stop_signal = True, signum

    def validation(self) -> ValidationBatch | None:
        """The fixed validation batch (None with train.validation_size = 0), built on first use."""
        if self.recipe.train.validation_size and self._validation is None:
            self._validation = ValidationBatch.for_recipe(self.recipe, self.dataset, self.schedule, self.condition,
                                                          self.latent if self.encode else None, self.device)
        return self._validation

    def _reduce_max(self, value: float) -> float:
        """The largest of every process's `value` (so all of them take the same decision)."""
        return max(self.accelerator.gather(torch.tensor([value], device=self.device)).tolist())

    def _new_model(self, pretrained_weights: bool = True) -> torch.nn.Module:
        return new_model(self.recipe, self.latent, self.device, pretrained_weights)

    def _frozen(self, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
        return frozen_model(self.recipe, self.latent, self.device, weights)

    def _stage1_source(self) -> Path:
        if self.recipe.sp.init:
            return resolve_checkpoint(self.recipe.sp.init, self.run_dir)
        final = final_checkpoint(self.run_dir, "mse")
        if final is None:
            raise FileNotFoundError(f"no final stage-1 (mse) checkpoint in {self.run_dir}; set sp.init")
        return final

    # ------------------------------------------------------------------ the run
    def run(self, stop_after: int | None = None) -> TrainResult:
        """Train every remaining stage; `stop_after` (global step) simulates a preemption."""
        result = TrainResult(run_dir=str(self.run_dir))
        handlers = {s: signal.signal(s, lambda n, f: self.request_stop(n)) for s in (signal.SIGTERM, signal.SIGINT)}
        stages = self.recipe.train.stages
        try:
            info = read_meta(self.resume_from) if self.resume_from else None
            for stage in stages:
                if info and (stages.index(info.stage) > stages.index(stage) or (info.stage == stage and info.final)):
                    continue  # done before
                stage_result = self._run_stage(stage, self.resume_from if info and info.stage == stage else None,
                                               stop_after)
                if stage_result is None:  # interrupted
                    result.interrupted_by, result.stopped_at = self._stop_signal, self._stopped_at
                    return result
                result.stages.append(stage_result)
            self._finish(result)
            return result
        except DivergenceError as e:
            if self.is_main:  # the run ends here: the summary names the spike and the last good checkpoint
                write_summary(self.run_dir, result, diverged=e.report)
            raise
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            self.metrics.flush()

    def _run_stage(self, stage: str, resume: Path | None, stop_after: int | None) -> StageResult | None:
        st = self._setup(stage, resume)
        cfg, acc = st.cfg, self.accelerator
        bar = tqdm(total=cfg.steps, initial=st.step, desc=stage, disable=not (self.progress and self.is_main),
                   dynamic_ncols=True)
        if st.step == cfg.steps:  # resumed at the stage's (shortened) end: finish it
            log.info("%s: resumed at step %d = %s.steps; ending the stage", stage, st.step, stage)
            self.previews.grid(st.ema.model, self.run_dir / "samples" / f"{stage}-{st.offset + st.step:07d}.png")
            st.path = self._save(st, final=True)
        while st.step < cfg.steps:
            self._train_step(st)
            bar.update(1)
            if st.window:
                bar.set_postfix(loss=f"{st.window[-1]:.4f}")
            if self._after_step(st, stop_after):
                bar.close()
                return None
        bar.close()
        if st.counters["skipped_items"]:
            log.warning("%s: %d unreadable data items were skipped", stage, st.counters["skipped_items"])
        weights = self.engine.full_weights()  # collective under FSDP / DeepSpeed
        self._digests[stage] = param_digest(weights) if self.is_main or not self.engine.collective else ""
        self._emas[stage] = st.ema.model
        return st.result()

    def _setup(self, stage: str, resume: Path | None) -> StageState:
        """The stage's model, EMA, optimizer (in its engine), objective, data and guard: from
        `resume` (a checkpoint of this stage), or from its start."""
        acc, recipe, cfg, engine = self.accelerator, self.recipe, self._stage_cfg(stage), self.engine
        # a stage starts from the recipe's seed whatever ran before it (a resume then restores
        # every RNG from the checkpoint); a stage that starts from a checkpoint (sp, or mse with
        # mse.init: SP's matched control) takes seed + 1, so SP and its control see the same data
        # order and start from the same generator state
        seed = recipe.seed + int(stage == "sp" or bool(cfg.init))
        set_seed(seed)
        # stage mse starts from model.pretrained (if any) or mse.init; everything else loads a checkpoint
        model = self._new_model(pretrained_weights=stage == "mse" and resume is None and not cfg.init)
        ck, perceptual, reference = self._start(stage, model, resume)
        state = ck.state if ck is not None else {}
        ema = EMA(model, cfg.ema_decay, warmup=cfg.ema_warmup)
        if ck is not None:
            ema.load_state_dict({"model": ck.weights["ema"], "num_updates": state["ema_updates"]})
        if recipe.train.compile:
            model.forward = torch.compile(model.forward)
        engine.shard(model)  # FSDP: the online net and its EMA sharded alike
        engine.shard(ema.model)
        optimizer, lr_sched = build_optimizer(model, cfg)
        engine.prepare(model, optimizer, cfg, state.get("optimizer"), self.previews.example())
        if ck is not None:
            lr_sched.load_state_dict(state["lr_scheduler"])
            if state.get("scaler") is not None and acc.scaler is not None:
                acc.scaler.load_state_dict(state["scaler"])
        ema.model.to(self.device)
        for frozen in {id(n): n for n in (perceptual, reference) if n is not None}.values():
            frozen.to(self.device)  # never wrapped in DDP, never given to the optimizer
        world, rank = acc.num_processes, acc.process_index
        gen = torch.Generator(device=self.device).manual_seed(recipe.seed * 1_000_003 + 7919 * rank + (seed - recipe.seed))
        log.info("stage %s (%s): effective batch %d = %d per process x %d accumulation steps x %d processes", stage,
                 engine.name, cfg.batch_size * cfg.grad_accum * world, cfg.batch_size, cfg.grad_accum, world)
        pos = state.get("data_position", (0, 0))
        sampler = ResumableBatchSampler(len(self.dataset), cfg.batch_size, seed=seed,
                                        rank=rank, world_size=world, epoch=pos[0], batch_in_epoch=pos[1])
        batches = iter(make_loader(self.dataset, sampler, recipe.data.num_workers))  # before the RNGs are restored
        st = StageState(name=stage, cfg=cfg, offset=self.offsets[stage], ema=ema, lr_sched=lr_sched,
                        objective=build_objective(recipe, stage, self.schedule, perceptual), gen=gen,
                        perceptual=perceptual, reference=reference, batches=batches, data_pos=list(pos),
                        guard=DivergenceGuard.for_stage(recipe.train, cfg))
        if ck is not None:
            if state.get("stage_step", 0) > cfg.steps:
                raise RecipeError(f"{stage}.steps = {cfg.steps}, but {resume} is at {stage} step "
                                  f"{state['stage_step']}: set {stage}.steps >= {state['stage_step']} to resume from it")
            st.load_state_dict(state, rank, world)
        engine.model.train()
        self.validation()
        return st

    def _start(self, stage: str, model: torch.nn.Module, resume: Path | None):
        """Load the stage's start weights into `model`: (the resumed checkpoint or None, stage sp's
        frozen f_*, the frozen net of the val_sp diagnostic: f_* or an mse stage's start weights)."""
        recipe, cfg = self.recipe, self._stage_cfg(stage)
        ck = perceptual = None
        if resume is not None:
            ck = load_checkpoint(resume)
            model.load_state_dict(ck.weights["model"])
            if stage == "sp":
                perceptual = self._frozen(ck.weights["perceptual"])
        elif stage == "sp":  # the online net starts by default from the very weights frozen (Algorithm 1)
            source, which = self._stage1_source(), recipe.sp.perceptual_weights
            start = load_start(model, "sp", source, which if recipe.sp.init_weights == "frozen" else recipe.sp.init_weights)
            perceptual = self._frozen(start.weights[WEIGHTS_KEY[which]])
            self._check_perceptual(perceptual, source)
        elif cfg.init:  # stage mse continued from a checkpoint (the matched control of an SP run)
            load_start(model, "mse", resolve_checkpoint(cfg.init, self.run_dir), cfg.init_weights)
        elif not recipe.model.pretrained and hasattr(model, "lr_advice"):  # from scratch
            advice = model.lr_advice(recipe.model.preset, cfg.lr, cfg.warmup_steps)
            if advice and self.is_main:
                log.warning(advice)
        if stage == "mse" and cfg.init and self.validation() is not None:
            start = load_checkpoint(resolve_checkpoint(cfg.init, self.run_dir))
            return ck, perceptual, self._frozen(start.weights[WEIGHTS_KEY[cfg.init_weights]])
        return ck, perceptual, perceptual

    def _check_perceptual(self, perceptual: torch.nn.Module, source: Path) -> None:
        """Stage sp's check of f_* against stage 1's recorded loss (sp.check_factor)."""
        factor, val, which = self.recipe.sp.check_factor, self.validation(), self.recipe.sp.perceptual_weights
        if not factor or val is None:
            return
        checked = check_perceptual(
            perceptual, source, factor=factor, which=which,
            vmse=lambda net: self._reduce_max(val.vmse(net.to(self.device), self.accelerator.autocast)),
            frozen_of=lambda path: self._frozen(load_checkpoint(path).weights[WEIGHTS_KEY[which]]),
            record=lambda r: self.metrics({"step": self.offsets["sp"], "stage": "sp", "stage_step": 0, **r}))
        if not checked:
            log.info("sp: %s records no stage-1 loss to check the perceptual network against", source)

    def _train_step(self, st: StageState) -> None:
        """One optimisation step: the micro-batches, clipping, the non-finite check, the optimizer,
        the LR schedule, the EMA and the divergence guard."""
        acc, cfg, engine, t = self.accelerator, st.cfg, self.engine, self.recipe.train
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            batch = st.next_batch()
            x0 = batch["x"].to(self.device)
            if self.encode:  # images -> VAE latents (a posterior sample)
                x0 = self.latent.encode_images(x0, generator=st.gen)
            cond = self.condition(batch, cfg.cond_dropout, st.gen)
            with acc.autocast():
                loss = st.objective(engine.model, x0, cond, generator=st.gen).mean()
            loss_sum += loss.detach()
            engine.backward(loss, last=micro == cfg.grad_accum - 1, grad_accum=cfg.grad_accum)
        norm = engine.clip_grad_norm(cfg.grad_clip)
        st.grad_norm = math.nan if norm is None else norm
        loss_mean = loss_sum / cfg.grad_accum
        bad_grad = acc.scaler is None and norm is not None and not math.isfinite(norm)
        bad = torch.tensor(float(not torch.isfinite(loss_mean).item() or bad_grad), device=self.device)
        # one collective: is any process's step non-finite, and the loss summed over processes (the
        # divergence guard sees the same figure on every process, so all of them stop together)
        bad, world_loss = acc.reduce(torch.stack([bad, loss_mean.float()]), "sum").tolist()
        step = st.step + 1
        if bad > 0:
            what = f"non-finite {'loss' if not torch.isfinite(loss_mean).item() else 'gradient'}"
            if t.nonfinite == "stop":
                raise NonFiniteError(f"{what} at {st.name} step {step} (global step {st.offset + step}); "
                                     "the last complete checkpoint is intact")
            log.warning("%s at %s step %d: step skipped", what, st.name, step)
            st.counters["skipped_nonfinite"] += 1
            engine.skip()
        else:
            engine.step()
            st.lr_sched.step()
            st.ema.update(engine.online, engine.ema_params())
            st.window.append(loss_mean.item())
            if st.guard.update(step, world_loss / acc.num_processes, st.grad_norm) and t.divergence != "off":
                message, report = spike_report(self.run_dir, st.name, step, st.offset, st.guard, st.grad_norm)
                if t.divergence == "stop":
                    raise DivergenceError(message, report)
                log.warning("%s; %s", message, WARN_SUFFIX)
        st.step = step

    def _after_step(self, st: StageState, stop_after: int | None) -> bool:
        """Logging, sample grids and checkpoints after a step; True when the run stops here."""
        acc, t, step = self.accelerator, self.recipe.train, st.step
        global_step, final = st.offset + step, step == st.cfg.steps
        if step % t.log_every == 0 or final:
            local = torch.tensor(sum(st.window) / len(st.window) if st.window else float("nan"), device=self.device)
            st.last_loss = acc.gather(local.reshape(1)).mean().item()
            val = self.validation()
            diagnostics = {} if val is None else val.losses(self.engine.forward_module, st.reference, acc.autocast)
            self.metrics({"step": global_step, "stage": st.name, "stage_step": step, "loss": st.last_loss,
                          "lr": st.lr_sched.get_last_lr()[0], "grad_norm": st.grad_norm,
                          "ema_decay": st.ema.current_decay(), **st.counters, **diagnostics,
                          "elapsed_s": round(time.time() - st.t_start, 3)})
            st.window.clear()
        if (t.sample_every and step % t.sample_every == 0) or final:
            self.previews.grid(st.ema.model, self.run_dir / "samples" / f"{st.name}-{global_step:07d}.png")
        stop = self._stop_requested or (stop_after is not None and global_step >= stop_after)
        stop = acc.reduce(torch.tensor(float(stop), device=self.device), "sum").item() > 0
        if (t.checkpoint_every and step % t.checkpoint_every == 0) or final or stop:
            st.path = self._save(st, final)
        if stop and not final:
            self._stopped_at = global_step
            log.info("stopped at global step %d; checkpoint %s", global_step, st.path)
            return True
        return False

    def _save(self, st: StageState, final: bool) -> Path:
        """A checkpoint of the stage at its current step (collective: every process calls it)."""
        acc, t = self.accelerator, self.recipe.train
        rng = gather_object([capture_rng_state({"objective": st.gen})])
        path = None
        if self.is_main or self.engine.collective:  # sharded tensors are gathered to the main process
            weights, opt_state = self.engine.full_state(st.ema.model)
        if self.is_main:
            if st.perceptual is not None:
                weights["perceptual"] = st.perceptual.state_dict()
            state = st.state_dict(rng, opt_state, acc.scaler.state_dict() if acc.scaler is not None else None)
            # rotation spares the checkpoint that a spike confirmed later would name as the last good one
            good = t.divergence != "off" and checkpoint_before(self.run_dir, st.offset + st.guard.began(st.step))
            path = save_checkpoint(self.run_dir, st.offset + st.step, weights=weights, state=state,
                                   meta=st.meta(final, recipe_to_dict(self.recipe)),
                                   keep_last=t.keep_last, keep=lambda p: p == good or read_meta(p).final)
        acc.wait_for_everyone()
        return path or self.run_dir

    def _finish(self, result: TrainResult) -> None:
        """summary.json, weight digests (per process under DDP, of the gathered weights under
        FSDP / DeepSpeed), and MSE vs SP from the same noise."""
        collective = self.engine.collective  # each process holds a shard: the full weights were digested once
        digests = ([self._digests] if self.is_main else []) if collective else gather_object([self._digests])
        emas: dict[str, torch.nn.Module | None] = dict(self._emas)
        if "sp" in emas and "mse" not in emas and tuple(self.recipe.train.stages) == ("mse", "sp"):
            # stage 1 finished in an earlier process: its final EMA is in its checkpoint
            emas["mse"] = None
            if self.is_main:
                emas["mse"] = self._new_model(pretrained_weights=False).to(self.device).eval()
                emas["mse"].load_state_dict(load_checkpoint(self._stage1_source()).weights["ema"])
        grid = self.previews.side_by_side([emas[s] for s in ("mse", "sp")] if len(emas) == 2 else [],
                                          self.run_dir / "samples" / "mse_vs_sp.png")
        if not self.is_main:
            return
        if len({json.dumps(d, sort_keys=True) for d in digests}) > 1:
            log.error("processes ended with different weights: %s", digests)
        write_summary(self.run_dir, result, num_processes=self.accelerator.num_processes, sharded=collective,
                      engine=self.engine.summary_name, **grid,
                      **{"weight_digest": digests[0]} if collective else {"weight_digests_per_process": digests})
