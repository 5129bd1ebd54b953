"""`DiffusersUNet`: a diffusers `UNet2DConditionModel` (Stable Diffusion's UNet) as a `HookedDenoiser`.

    net = DiffusersUNet.from_pretrained("path/to/sd21-base")           # or a hub id, subfolder="unet"
    net = DiffusersUNet.from_preset("tiny")                            # fresh weights, for tests
    net.set_null_context(empty_prompt_embedding)                       # [1 x L x D], for cond=None / CFG
    v = net(z_t, t, context)                                           # [N x 4 x h x w] -> same shape
    feats = net.forward_features(z_t, t, context, layers="mid")        # stops after the midblock
    export_diffusers(net, "out", schedule_cfg, components_from="path/to/sd21-base")

The UNet's output is taken as v. The released SD2.1-base predicts epsilon: the paper first
fine-tunes it with the v objective (eq. 5) and zero terminal SNR, which is stage 1 here.
Taps: ``down.i`` (output hidden state of ``down_blocks[i]``), ``mid`` (``mid_block`` output),
``up.i`` (output of ``up_blocks[i]``), read by `HookedDenoiser`'s forward hooks on those blocks
while diffusers' own forward runs; early exit raises from the hook of the last requested tap, so
nothing after it runs (v and the taps equal diffusers' to the bit: tests/test_diffusers_unet.py).
The Stable Diffusion family (SD 1.x / 2.x) is accepted: a UNet whose forward needs more than the
text context, or whose blocks are of other types, is refused at construction.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from perceptual_diffusion.denoiser import HookedDenoiser, LayerSpec

from .base import ConformanceExample
from .layers import check_attention_backend

try:
    from diffusers import DDIMScheduler, UNet2DConditionModel
except ImportError as e:  # pragma: no cover - exercised only without the `sd` extra
    raise ImportError(
        "backbones.diffusers_unet needs diffusers; install the `sd` extra (pip install 'perceptual-diffusion[sd]')"
    ) from e

__all__ = ["SUPPORTED_BLOCKS", "DiffusersUNet", "ddim_scheduler_config", "export_diffusers"]

# Block classes of SD 1.x and 2.x, whose outputs the taps and `feature_info` are checked against.
SUPPORTED_BLOCKS = {
    "down": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "mid": ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D"),
    "up": ("CrossAttnUpBlock2D", "UpBlock2D"),
}

# Adapter options accepted next to UNet config fields (the trainer passes the first two).
_ADAPTER_KW = ("in_channels", "num_classes", "gradient_checkpointing", "attention_backend")


def _unet_fields() -> frozenset[str]:
    params = inspect.signature(UNet2DConditionModel.__init__).parameters
    return frozenset(n for n in params if n != "self")


class DiffusersUNet(HookedDenoiser):
    """A diffusers `UNet2DConditionModel` predicting v: z_t [N x C x H x W], t (N,), cond -> v like z_t.

    Args:
        unet: the wrapped model (attribute `unet`, so its state dict keys are ``unet.*``).
        in_channels: if given, must equal ``unet.config.in_channels`` (the trainer passes the
            data's channel count).
        num_classes: must be None; SD UNets are conditioned on text, not labels.
        gradient_checkpointing: turn on diffusers' per-block activation checkpointing.
        attention_backend: "sdpa" (diffusers' default processors, torch SDPA) or "xformers"
            (diffusers' own switch, `enable_xformers_memory_efficient_attention`; CUDA only:
            refused with one line where it cannot run, never a silent fallback).

    `cond` is the text context [N x L x D] (the text encoder's last hidden state, used as
    encoder_hidden_states) or None, meaning the stored null context (`set_null_context`).
    Computes in the UNet's parameter dtype and returns v in z_t's dtype. Raises
    NotImplementedError for UNets outside the SD family (class or addition embeddings, encoder
    projections, timestep conditioning, other block types); ControlNet / T2I residuals cannot be
    passed at all.
    """

    SHARD_UNITS: ClassVar[tuple[str, ...]] = ("ResnetBlock2D", "Transformer2DModel")  # FSDP units
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # about 0.2M parameters: two levels, cross-attention at the first level and in the midblock.
        # attention_head_dim is diffusers' (mis)name for the number of heads.
        "tiny": {
            "sample_size": 8,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "block_out_channels": (16, 32),
            "layers_per_block": 1,
            "attention_head_dim": 4,
            "cross_attention_dim": 32,
            "norm_num_groups": 8,
            "use_linear_projection": True,
        },
        # stabilityai/stable-diffusion-2-1-base unet/config.json (865M parameters, 64x64 latents)
        "sd21-base": {
            "sample_size": 64,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "attention_head_dim": (5, 10, 20, 20),
            "cross_attention_dim": 1024,
            "use_linear_projection": True,
            "upcast_attention": False,
            "norm_num_groups": 32,
            "norm_eps": 1e-5,
            "act_fn": "silu",
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "downsample_padding": 1,
            "mid_block_scale_factor": 1,
            "center_input_sample": False,
            "dual_cross_attention": False,
        },
    }

    def __init__(
        self,
        unet: UNet2DConditionModel,
        *,
        in_channels: int | None = None,
        num_classes: int | None = None,
        gradient_checkpointing: bool = False,
        attention_backend: str = "sdpa",
    ):
        if not isinstance(unet, UNet2DConditionModel):
            raise TypeError(f"DiffusersUNet wraps a diffusers UNet2DConditionModel, got {type(unet).__name__}")
        _check_supported(unet)
        cfg = unet.config
        if in_channels is not None and in_channels != cfg.in_channels:
            raise ValueError(
                f"in_channels={in_channels} does not match the UNet's in_channels={cfg.in_channels} "
                "(SD UNets take VAE latents; set the data's channels to the latent channels)"
            )
        if num_classes is not None:
            raise ValueError(
                f"num_classes={num_classes!r}: DiffusersUNet is conditioned on text contexts, not class "
                "labels; use num_classes=None"
            )
        # diffusers' xformers switch test-runs a CUDA kernel: without CUDA, refuse in the library's words
        check_attention_backend(attention_backend, "cuda" if torch.cuda.is_available() else "cpu")
        if attention_backend == "xformers":
            unet.enable_xformers_memory_efficient_attention()
        taps = {f"down.{i}": f"down_blocks.{i}" for i in range(len(unet.down_blocks))}
        taps["mid"] = "mid_block"
        taps.update({f"up.{j}": f"up_blocks.{j}" for j in range(len(unet.up_blocks))})
        super().__init__(unet, taps, _predict_v)
        # HookedDenoiser registers the UNet as `module`, but checkpoints name its weights unet.*:
        # it is registered as `unet`, and the property `module` reads it from there
        del self.module
        self.unet = unet
        self.attention_backend = attention_backend  # read by check_attention_backends
        self._checkpointing = bool(gradient_checkpointing)
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        dim = cfg.cross_attention_dim
        self.context_dim: int | None = dim if isinstance(dim, int) else None
        # Empty until set_null_context; persistent, so checkpoints carry the empty-prompt encoding.
        self.register_buffer("null_context", torch.empty(0, dtype=unet.dtype), persistent=True)

        chans, red = list(cfg.block_out_channels), 1
        info: dict[str, dict[str, int]] = {}
        for i, block in enumerate(unet.down_blocks):
            red *= 2 if block.downsamplers is not None else 1
            info[f"down.{i}"] = {"channels": chans[i], "reduction": red}
        info["mid"] = {"channels": chans[-1], "reduction": red}
        for j, block in enumerate(unet.up_blocks):
            red //= 2 if block.upsamplers is not None else 1
            info[f"up.{j}"] = {"channels": chans[::-1][j], "reduction": red}
        self.feature_info = info

    def train(self, mode: bool = True) -> DiffusersUNet:
        """diffusers recomputes checkpointed blocks whenever grad is enabled, also in eval mode;
        a frozen perceptual copy (eval) takes gradients to its input only, so it runs without."""
        super().train(mode)
        if getattr(self, "_checkpointing", False):
            (self.unet.enable_gradient_checkpointing if mode else self.unet.disable_gradient_checkpointing)()
        return self

    @property
    def module(self) -> UNet2DConditionModel:
        """The wrapped UNet, under the name `HookedDenoiser` reads it by."""
        return self.unet

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path, subfolder: str | None = "unet", **kw: Any) -> DiffusersUNet:
        """Load ``UNet2DConditionModel.from_pretrained(path_or_hub_id, subfolder=...)``.

        A local directory, or a hub id when the machine can reach the hub. Keyword arguments
        named in_channels / num_classes / gradient_checkpointing / attention_backend go to the adapter, the rest
        (torch_dtype, variant, ...) to diffusers.
        """
        adapter = {k: kw.pop(k) for k in _ADAPTER_KW if k in kw}
        unet = UNet2DConditionModel.from_pretrained(str(path_or_hub_id), subfolder=subfolder, **kw)
        return cls(unet, **adapter)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **kw: Any) -> DiffusersUNet:
        """A freshly initialised UNet from a `UNet2DConditionModel` config dict (e.g. a config.json);
        `kw` are the adapter options (in_channels, num_classes, gradient_checkpointing,
        attention_backend)."""
        cfg = {k: v for k, v in dict(config).items() if not k.startswith("_")}  # "_class_name", ...
        unknown = sorted(set(cfg) - _unet_fields())
        if unknown:
            raise TypeError(f"unknown UNet2DConditionModel config field(s) {', '.join(map(repr, unknown))}")
        return cls(UNet2DConditionModel(**cfg), **kw)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> DiffusersUNet:
        """A freshly initialised UNet from `PRESETS[name]` ("tiny" | "sd21-base") with config
        fields replaced by `overrides`.

        `in_channels` sets the UNet's in_channels (and out_channels unless that is given too);
        `num_classes` must be None; `gradient_checkpointing` and `attention_backend` are adapter
        options.
        """
        if name not in cls.PRESETS:
            raise ValueError(f"unknown DiffusersUNet preset {name!r}; presets: {', '.join(cls.PRESETS)}")
        if overrides.get("num_classes") is not None:
            raise ValueError(
                f"num_classes={overrides['num_classes']!r}: DiffusersUNet is conditioned on text contexts, "
                "not class labels; use num_classes=None"
            )
        overrides.pop("num_classes", None)
        adapter = {"gradient_checkpointing": bool(overrides.pop("gradient_checkpointing", False))}
        if "attention_backend" in overrides:
            adapter["attention_backend"] = overrides.pop("attention_backend")
        fields = _unet_fields()
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(
                f"unknown DiffusersUNet override(s) {', '.join(map(repr, unknown))}; UNet2DConditionModel "
                f"fields or {', '.join(_ADAPTER_KW)}"
            )
        cfg = {**cls.PRESETS[name], **overrides}
        if "in_channels" in overrides and "out_channels" not in overrides:
            cfg["out_channels"] = overrides["in_channels"]
        return cls.from_config(cfg, **adapter)

    @classmethod
    def conformance_example(cls) -> ConformanceExample:
        """The "tiny" preset on 8x8 latents with a fixed null context, conditioned on contexts of 5 tokens."""
        dim = cls.PRESETS["tiny"]["cross_attention_dim"]

        def build(**overrides: Any) -> DiffusersUNet:
            net = cls.from_preset("tiny", **overrides)
            net.set_null_context(torch.randn(1, 5, dim, generator=torch.Generator().manual_seed(1)))
            return net

        def make_cond(n: int) -> Tensor:
            return torch.randn(n, 5, dim, generator=torch.Generator().manual_seed(2))

        return ConformanceExample(build, (cls.PRESETS["tiny"]["in_channels"], 8, 8), make_cond, checkpointing=True)

    # ------------------------------------------------------------------ null context
    def set_null_context(self, context: Tensor) -> None:
        """Store the unconditional context [1 x L x D] (the empty prompt's encoding)."""
        if not isinstance(context, Tensor) or not context.is_floating_point():
            raise TypeError(f"null context must be a float Tensor [1 x L x D], got {type(context).__name__}")
        if context.ndim != 3 or context.shape[0] != 1:
            raise ValueError(f"null context must have shape [1 x L x D], got {tuple(context.shape)}")
        self._check_dim(context)
        self.null_context = context.detach().to(device=self.null_context.device, dtype=self.unet.dtype).clone()

    @property
    def has_null_context(self) -> bool:
        return self.null_context.numel() > 0

    def null_cond(self, cond: Any) -> Tensor | None:
        """The null context expanded to cond's batch, [N x L x D] (None stays None: it already
        means the null context here)."""
        if cond is None:
            return None
        if not isinstance(cond, Tensor):
            raise TypeError(f"cond must be None or a context Tensor [N x L x D], got {type(cond).__name__}")
        return self._null(cond.shape[0])

    def _null(self, n: int) -> Tensor:
        if not self.has_null_context:
            raise ValueError(
                "no null context is set (cond=None and classifier-free guidance need one): call "
                "set_null_context(ctx) with the empty prompt's encoding [1 x L x D]"
            )
        return self.null_context.expand(n, -1, -1)

    def _check_dim(self, context: Tensor) -> None:
        if self.context_dim is not None and context.shape[-1] != self.context_dim:
            raise ValueError(
                f"context has feature size {context.shape[-1]}, the UNet's cross_attention_dim is {self.context_dim}"
            )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the buffer's shape is only known once set: take the incoming one before the copy
        key = prefix + "null_context"
        if key in state_dict and state_dict[key].shape != self.null_context.shape:
            self.null_context = self.null_context.new_empty(state_dict[key].shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _context(self, cond: Any, n: int) -> Tensor:
        if cond is None:
            return self._null(n)
        if not isinstance(cond, Tensor) or not cond.is_floating_point():
            what = type(cond).__name__ if not isinstance(cond, Tensor) else f"a {cond.dtype} tensor"
            raise TypeError(f"cond must be None or a float context Tensor [N x L x D], got {what}")
        if cond.ndim != 3 or cond.shape[0] != n:
            raise ValueError(f"context must be [N x L x D] with N={n}, got {tuple(cond.shape)}")
        self._check_dim(cond)
        return cond

    # ------------------------------------------------------------------ forward
    def forward(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return super().forward(x_t, t, self._context(cond, x_t.shape[0]))

    def forward_features(
        self, x_t: Tensor, t: Tensor, cond: Any = None, *, layers: LayerSpec, stop_early: bool = True
    ) -> dict[str, Tensor]:
        return super().forward_features(x_t, t, self._context(cond, x_t.shape[0]), layers=layers,
                                        stop_early=stop_early)

    def save_pretrained(self, out_dir: str | Path, schedule: Any, **kw: Any) -> Path:
        """`export_diffusers(self, out_dir, schedule, **kw)`."""
        return export_diffusers(self, out_dir, schedule, **kw)


def _predict_v(unet: UNet2DConditionModel, x_t: Tensor, t: Tensor, context: Tensor) -> Tensor:
    """The UNet's output, taken as v: computed in its parameter dtype, returned in x_t's."""
    dtype = unet.conv_in.weight.dtype
    t = torch.as_tensor(t, device=x_t.device)
    return unet(x_t.to(dtype), t, encoder_hidden_states=context.to(dtype)).sample.to(x_t.dtype)


def _check_supported(unet: UNet2DConditionModel) -> None:
    """Refuse, at construction, a UNet outside the SD 1.x / 2.x family: one that needs inputs other
    than the text context, has no midblock, or has other block types."""
    cfg = unet.config
    problems = []
    if unet.class_embedding is not None:
        problems.append(f"class embeddings (class_embed_type={cfg.class_embed_type!r}, "
                        f"num_class_embeds={cfg.num_class_embeds!r})")
    if cfg.addition_embed_type is not None:
        problems.append(f"addition_embed_type={cfg.addition_embed_type!r} (e.g. SDXL's text_time)")
    if unet.encoder_hid_proj is not None:
        problems.append(f"encoder_hid_dim_type={cfg.encoder_hid_dim_type!r}")
    if cfg.time_cond_proj_dim is not None:
        problems.append(f"time_cond_proj_dim={cfg.time_cond_proj_dim} (timestep_cond, e.g. LCM)")
    if unet.mid_block is None:
        problems.append("mid_block_type=None (no midblock to tap)")
    for kind, blocks in (("down", unet.down_blocks), ("mid", [unet.mid_block]), ("up", unet.up_blocks)):
        for b in blocks:
            if b is not None and type(b).__name__ not in SUPPORTED_BLOCKS[kind]:
                problems.append(f"{kind} block {type(b).__name__} (supported: {', '.join(SUPPORTED_BLOCKS[kind])})")
    if problems:
        raise NotImplementedError(
            "DiffusersUNet takes the Stable Diffusion 1.x/2.x UNets (conditioned on a text context only); "
            "this UNet uses "
            + "; ".join(problems)
        )


# ---------------------------------------------------------------------- export

DIFFUSERS_BETA_SCHEDULES = {
    "linear": "linear",
    "scaled_linear": "scaled_linear",
    # diffusers' betas_for_alpha_bar(T) is NoiseSchedule.cosine's formula with the same s = 0.008
    # and betas clipped at 0.999 (tests/test_diffusers_unet.py checks alpha_bar agrees)
    "cosine": "squaredcos_cap_v2",
}

_SCHEDULE_FIELDS = ("kind", "num_timesteps", "beta_start", "beta_end", "zero_terminal_snr")


def ddim_scheduler_config(schedule: Any, *, set_alpha_to_one: bool = True) -> dict[str, Any]:
    """The `DDIMScheduler` config reproducing `ddim_sample` (eta = 0) for a schedule config.

    `schedule` is a `perceptual_diffusion.config.ScheduleConfig` or a mapping of its fields
    (kind "linear" | "scaled_linear" | "cosine", num_timesteps, beta_start, beta_end,
    zero_terminal_snr). v-prediction, trailing spacing, no clipping. `set_alpha_to_one=True`
    makes the last step land on alpha_bar = 1 as `ddim_sample` does; False is SD's original
    setting (the last step stops at alpha_bar_1 and keeps a little noise).
    """
    if dataclasses.is_dataclass(schedule) and not isinstance(schedule, type):
        fields = {f: getattr(schedule, f) for f in _SCHEDULE_FIELDS if hasattr(schedule, f)}
    elif isinstance(schedule, Mapping):
        fields = dict(schedule)
    else:
        raise TypeError(f"schedule must be a ScheduleConfig or a mapping of its fields, got {type(schedule).__name__}")
    missing = [f for f in _SCHEDULE_FIELDS if f not in fields]
    if missing:
        raise ValueError(f"schedule config lacks field(s) {', '.join(missing)}")
    kind = fields["kind"]
    if kind not in DIFFUSERS_BETA_SCHEDULES:
        raise ValueError(f"schedule kind {kind!r} has no diffusers equivalent; "
                         f"choose one of {', '.join(DIFFUSERS_BETA_SCHEDULES)}")
    T = fields["num_timesteps"]
    if isinstance(T, bool) or not isinstance(T, int) or T < 2:
        raise ValueError(f"schedule num_timesteps must be an int >= 2, got {T!r}")
    return {
        "num_train_timesteps": T,
        "beta_schedule": DIFFUSERS_BETA_SCHEDULES[kind],
        "beta_start": float(fields["beta_start"]),
        "beta_end": float(fields["beta_end"]),
        "rescale_betas_zero_snr": bool(fields["zero_terminal_snr"]),
        "prediction_type": "v_prediction",
        "timestep_spacing": "trailing",
        "steps_offset": 1,  # SD's value (pipelines rewrite anything else); trailing spacing ignores it
        "clip_sample": False,
        "thresholding": False,
        "set_alpha_to_one": bool(set_alpha_to_one),
    }


# pipeline components copied from `components_from`, with the classes SD uses if its
# model_index.json does not name them
_COMPONENTS = {
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
}


def export_diffusers(
    net: DiffusersUNet | UNet2DConditionModel,
    out_dir: str | Path,
    schedule: Any,
    *,
    components_from: str | Path | None = None,
    set_alpha_to_one: bool = True,
) -> Path:
    """Write a diffusers `StableDiffusionPipeline` directory for the network.

    out_dir/unet (``unet.save_pretrained``), out_dir/scheduler (a DDIMScheduler from
    `ddim_scheduler_config(schedule, set_alpha_to_one=...)`) and out_dir/model_index.json.
    With `components_from` (a local SD model directory) its vae/, text_encoder/ and tokenizer/
    are copied too, so ``StableDiffusionPipeline.from_pretrained(out_dir)`` loads on its own;
    without it, pass vae, text_encoder and tokenizer to from_pretrained. Returns out_dir.
    """
    unet = net.unet if isinstance(net, DiffusersUNet) else net
    if not isinstance(unet, UNet2DConditionModel):
        raise TypeError(f"export_diffusers needs a DiffusersUNet or UNet2DConditionModel, got {type(net).__name__}")
    scheduler = DDIMScheduler(**ddim_scheduler_config(schedule, set_alpha_to_one=set_alpha_to_one))
    source = None
    if components_from is not None:
        source = Path(components_from)
        absent = [c for c in _COMPONENTS if not (source / c).is_dir()]
        if absent:
            raise FileNotFoundError(f"components_from={str(source)!r} has no {', '.join(absent)} folder(s)")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out / "unet")
    scheduler.save_pretrained(out / "scheduler")
    classes = dict(_COMPONENTS)
    if source is not None:
        index = source / "model_index.json"
        named = json.loads(index.read_text()) if index.is_file() else {}
        for name in _COMPONENTS:
            if isinstance(named.get(name), list) and None not in named[name]:
                classes[name] = named[name]
            if (out / name).exists():
                shutil.rmtree(out / name)
            shutil.copytree(source / name, out / name)

    import diffusers

    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        **classes,
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (out / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
    return out
