"""What the conformance kit looks at inside a denoiser: signal in its zero-initialised layers, the
order in which its modules run, and where each tap is reached during a full forward pass; and
the one thread its checks run on."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from ..denoiser import HookedDenoiser, TappedDenoiser

__all__ = ["one_thread", "randomise_zero_init", "record_calls", "tap_positions"]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread, restored on exit. Tiny nets gain nothing from more, and
    threads spinning on a busy machine made the kit's checks up to 50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def randomise_zero_init(net: nn.Module, seed: int = 0) -> nn.Module:
    """Replace zero-initialised output layers (adaLN-Zero, zero-init projections) with noise, so
    every path of the net carries signal and a skipped module would show up in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.is_floating_point() and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return net


def record_calls(net: nn.Module, fn: Callable[[], Any], calls: list[str] | None = None) -> list[str]:
    """The names of the submodules of `net` whose forward returns while `fn()` runs, in order
    (appended to `calls`). A checkpointed block recomputed in backward shows up again."""
    calls = [] if calls is None else calls
    handles = [m.register_forward_hook(lambda mod, i, o, name=name: calls.append(name))
               for name, m in net.named_modules() if name]
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return calls


def tap_positions(net: nn.Module, x_t: Tensor, t: Tensor, cond: Any) -> tuple[list[str], dict[str, list[int]] | None]:
    """One full forward pass: its module calls (as `record_calls`) and, per tap, how many calls had
    returned each time the tap was reached.

    The taps are seen through `TappedDenoiser._run`'s tap callback or `HookedDenoiser`'s tapped
    submodules; for any other `Denoiser` the positions are None (it offers no way to see them).
    """
    calls: list[str] = []
    marks: dict[str, list[int]] = {}

    def mark(name: str, h: Any = None) -> Any:
        marks.setdefault(name, []).append(len(calls))
        return h

    if isinstance(net, TappedDenoiser):
        record_calls(net, lambda: net._run(x_t, t, cond, mark), calls)
        return calls, marks
    if isinstance(net, HookedDenoiser):
        def run() -> None:
            # registered after record_calls' hooks, so a tapped submodule's own call counts
            handles = [net.module.get_submodule(path).register_forward_hook(
                lambda mod, i, o, name=name: mark(name)) for name, path in net.layer_paths.items()]
            try:
                net(x_t, t, cond)
            finally:
                for h in handles:
                    h.remove()

        record_calls(net, run, calls)
        return calls, marks
    record_calls(net, lambda: net(x_t, t, cond), calls)
    return calls, None
