"""The paper's two stages in miniature: MSE training, then SP from a frozen copy (Algorithm 1),
on generated one-disk images (Figure 2a), with sample grids from the same initial noise.

This is the library's quick end-to-end check; real runs use the training engine and recipes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .datasets import circles
from .images import save_grid
from .objectives import SelfPerceptual, VelocityMSE, make_perceptual
from .sampling import ddim_sample
from .schedule import NoiseSchedule

@dataclass
class DemoConfig:
    mse_steps: int = 300
    sp_steps: int = 200
    batch_size: int = 16
    image_size: int = 16
    num_images: int = 2048
    lr: float = 1e-3
    sp_lr: float = 1e-4
    sample_steps: int = 25
    num_samples: int = 16
    seed: int = 0
    out: str = "runs/demo"


@dataclass
class DemoResult:
    mse_loss_first: float
    mse_loss_last: float
    sp_loss_first: float
    sp_loss_last: float
    eval_mse_of_mse_model: float
    eval_mse_of_sp_model: float
    samples: str


def _train(net, objective, data, steps, lr, batch_size, generator, desc) -> list[float]:
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    bar = tqdm(range(steps), desc=desc)
    for _ in bar:
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=generator)
        loss = objective(net, data[idx], generator=generator).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return losses


def _mean(xs: list[float]) -> float:
    return sum(xs) / max(len(xs), 1)


def run_demo(cfg: DemoConfig) -> DemoResult:
    """Train the tiny ImageUNet with MSE, then with SP; write samples.png; return the losses."""
    from backbones import ImageUNet  # backbones depend on the library, not the other way round

    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    data = circles(cfg.num_images, cfg.image_size, seed=cfg.seed)
    schedule = NoiseSchedule.scaled_linear(zero_terminal_snr=True)
    net = ImageUNet.from_preset("tiny", in_channels=1)

    mse = VelocityMSE(schedule)
    mse_losses = _train(net, mse, data, cfg.mse_steps, cfg.lr, cfg.batch_size, g, "stage 1: mse")
    perceptual = make_perceptual(net)
    mse_model = make_perceptual(net)  # kept to sample the MSE model next to the SP model

    sp = SelfPerceptual(schedule, perceptual)
    sp_losses = _train(net, sp, data, cfg.sp_steps, cfg.sp_lr, cfg.batch_size, g, "stage 2: sp")

    net.eval()
    eval_g = torch.Generator().manual_seed(cfg.seed + 1)
    x0 = data[torch.randint(0, data.shape[0], (256,), generator=eval_g)]
    t, noise = torch.randint(0, schedule.num_timesteps, (256,), generator=eval_g), torch.randn(x0.shape, generator=eval_g)
    with torch.no_grad():  # eq. 5 on one fixed held batch, for both models
        eval_mse = [mse(m, x0, t=t, noise=noise).mean().item() for m in (mse_model, net)]

    noise = torch.randn(cfg.num_samples, 1, cfg.image_size, cfg.image_size, generator=eval_g)
    rows = [data[: cfg.num_samples]]
    for model in (mse_model, net):
        rows.append(ddim_sample(model, schedule, noise, steps=cfg.sample_steps))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    path = save_grid(torch.cat(rows), out / "samples.png", nrow=cfg.num_samples, scale=4)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    k = max(1, min(50, cfg.mse_steps // 5, cfg.sp_steps // 5))
    return DemoResult(
        mse_loss_first=_mean(mse_losses[:k]), mse_loss_last=_mean(mse_losses[-k:]),
        sp_loss_first=_mean(sp_losses[:k]), sp_loss_last=_mean(sp_losses[-k:]),
        eval_mse_of_mse_model=eval_mse[0], eval_mse_of_sp_model=eval_mse[1], samples=str(path),
    )
