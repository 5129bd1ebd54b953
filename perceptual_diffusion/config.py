"""Recipes: TOML files loaded into these dataclasses, validated, overridable with --set.

A recipe names the data, the backbone, the noise schedule and the two training stages of the
paper (section 4): "mse" (v-prediction MSE with conditional dropout) and "sp" (self-perceptual
from a frozen copy of the stage-1 model).

    r = load_recipe("recipes/image/circles.toml", ["mse.lr=1e-4", 'train.stages=["sp"]'])
    save_recipe(r, run_dir / "recipe.toml")       # the resolved recipe; .json works too

Every user error (unknown key, wrong type, value out of range, missing file) is a `RecipeError`
whose message is one line naming the dotted field.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import re
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .datasets.registry import DATASET_SPECS
from .denoiser import LAYER_GROUPS
from .objectives import DISTANCES, FORMULATIONS, T_PRIME_MODES
from .schedule import SCHEDULE_KINDS

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None


@dataclass
class DataConfig:
    name: str = "circles"            # a key of DATASET_SPECS (datasets/registry.py): image: circles | digits |
                                     # photo_patches | image_folder | shards; video: moving_shapes |
                                     # video_folder; audio: tones | audio_folder
    size: int = 32                   # images and video frames are size x size
    channels: int = 1                # 1 (gray) or 3 (RGB); audio 1 (mono) or 2 (stereo); as the dataset allows
    frames: int = 8                  # video: frames per clip
    length: int = 2048               # audio: samples per clip
    sample_rate: int = 8000          # audio: Hz (audio_folder resamples to it)
    num_items: int = 4096            # circles, photo_patches, moving_shapes, tones: how many items to generate
    path: str = ""                   # *_folder: the folder (image_folder: captions.jsonl optional);
                                     # shards: "/data/laion/{00000..00999}.tar", a glob or a folder
    conditional: bool = False        # digits (10 digits), moving_shapes (8 headings), tones (8 pitches)
    min_size: int = 0                # shards: keep samples whose width and height are >= this
    min_aesthetic: float = 0.0       # shards: keep samples with aesthetic score >= this (0 = no filter)
    caption_key: str = "txt"         # shards: the member holding the caption
    empty_captions: bool = False     # shards / image_folder: every caption "" (section 5.7, unconditional)
    num_workers: int = 0             # DataLoader workers
    seed: int = 0                    # generation seed of synthetic data
    scale: float = 1.0               # the model sees every item's x times this (e.g. 1 / the data's std, so its
                                     # SNR meets the schedule's); samples are divided by it before they are
                                     # scored or saved, so metrics, WAVs and images stay in data units


@dataclass
class ModelConfig:
    backbone: str = "image_unet"     # a key of backbones' registry
    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)  # backbone config fields
    pretrained: str = ""             # diffusers_unet: a diffusers model dir or hub id to load the UNet from
    latent: str = ""                 # a diffusers model dir or hub id whose vae / text_encoder / tokenizer
                                     # train the backbone in latent space on captions ("" = pixel space)
    latent_cache: str = ""           # with model.latent: a .safetensors file holding every image's latent
                                     # (the VAE posterior mean), made on first use, checked against the data
                                     # and the VAE each run ("" = encode each batch, a fresh posterior sample)


@dataclass
class ScheduleConfig:
    kind: str = "scaled_linear"      # linear | scaled_linear | cosine
    num_timesteps: int = 1000
    beta_start: float = 0.00085      # linear / scaled_linear only
    beta_end: float = 0.012
    zero_terminal_snr: bool = True


@dataclass
class StageConfig:
    """Optimisation settings of one stage (both stages share these fields)."""

    steps: int = 1000                # optimizer steps
    batch_size: int = 32             # per process, per micro-batch
    grad_accum: int = 1              # micro-batches per optimizer step
    lr: float = 3e-5                 # AdamW (the paper's fine-tuning lr)
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0            # linear LR warm-up, then constant
    decay_steps: int = 0             # the stage's last decay_steps steps (all, if it is shorter) run at
    decay_factor: float = 0.1        # lr * decay_factor: a step decay, the anneal a constant lr never gets
    grad_clip: float = 1.0           # max grad norm; 0 disables
    ema_decay: float = 0.9995
    ema_warmup: bool = False         # decay min(ema_decay, (1 + n) / (10 + n)) early on
    cond_dropout: float = 0.1        # probability of the null condition (CFG training)
    # A checkpoint (dir, or run dir: its latest) to start from; "" = stage mse from scratch (or
    # model.pretrained), stage sp from this run's final mse checkpoint. With `init`, stage mse is
    # the matched control of an SP run: the same start, optimizer, lr, steps, batch, EMA and seed.
    init: str = ""
    init_weights: str = "ema"        # online | ema: which weights of `init` the online net starts from


@dataclass
class SPStageConfig(StageConfig):
    """Stage 2: the self-perceptual objective (every option of `SelfPerceptual`)."""

    cond_dropout: float = 0.0        # the paper trains SP without conditional dropout
    init_weights: str = "frozen"     # frozen (Algorithm 1: the copy that is frozen) | online | ema
    perceptual_weights: str = "ema"  # online | ema: which stage-1 weights are frozen as f_*
    perceptual_dtype: str = "auto"   # auto (the mixed-precision dtype) | fp32 | bf16 | fp16
    layers: str = "mid"              # mid | encoder | decoder | encoder+mid | all | a tap name
    t_prime: str = "uniform"         # uniform | near | normal
    distance: str = "mse"            # mse | mae
    formulation: str = "sp"          # sp | sp2
    mse_weight: float = 0.0          # + mse_weight * eq. 5 from the same forward
    near_offset: int = 40
    normal_std: float = 100.0
    # Before training, the frozen network's v-MSE on the fixed validation batch (train.validation_size)
    # is compared with the best loss its stage-1 checkpoint recorded (the divergence guard's running
    # minimum of the median loss); above check_factor x that, the stage stops: the stage-1 model
    # looks diverged or broken. 0 turns the check off.
    check_factor: float = 3.0


@dataclass
class TrainConfig:
    stages: tuple[str, ...] = ("mse", "sp")  # which stages this run executes, in order
    mixed_precision: str = "no"      # no | fp16 | bf16
    log_every: int = 10              # steps between metrics.jsonl lines
    sample_every: int = 500          # steps between sample grids (0: only at the end of a stage)
    checkpoint_every: int = 500      # steps between checkpoints (0: only at the end of a stage)
    keep_last: int = 2               # checkpoints kept by rotation (stage-final ones are kept)
    num_samples: int = 16            # images per sample grid, same noise every time
    sample_steps: int = 25           # DDIM steps for sample grids
    nonfinite: str = "stop"          # stop | skip: what a NaN/inf loss or gradient does
    # A sustained loss spike (finite, so `nonfinite` misses it): the median loss of the last
    # `divergence_window` optimizer steps stays above `divergence_factor` x its running minimum for
    # `divergence_window` consecutive steps, confirmed no earlier than the stage's warm-up plus one
    # window. "stop" ends the run naming the last checkpoint saved before the rise, which rotation
    # keeps (summary.json: "diverged"; exit status 3); "warn" logs that once per stage and trains on;
    # "off" does neither. A median of 50, as one batch's loss can be 15x another's: on the image,
    # video and audio recipes it stays within 1.24x of its minimum, and a 2x spike is no noise.
    divergence: str = "stop"         # stop | warn | off
    divergence_factor: float = 2.0
    divergence_window: int = 50
    # Diagnostics on one fixed validation batch (its own RNG; training's streams are untouched):
    # every log_every steps both stages log val_vmse (eq. 5) and, where there is a frozen network
    # (stage sp's f_*, or the start weights of an mse stage with mse.init), val_sp (eq. 12, mid taps).
    # 0 turns the diagnostics and sp.check_factor's check off.
    validation_size: int = 32
    compile: bool = False            # torch.compile the online net (GPU users)
    fsdp: bool = False               # shard weights, gradients, optimizer state across processes (FSDP2)


@dataclass
class Recipe:
    name: str = "run"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    mse: StageConfig = field(default_factory=StageConfig)
    sp: SPStageConfig = field(default_factory=SPStageConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ---------------------------------------------------------------------------------- choices
# The choices of the library's objects (objectives, layer groups, schedules) and the dataset and
# backbone registries, whose entries carry their own rules, come from where they are defined;
# these are the trainer's own.
STAGES = ("mse", "sp")                         # the only order in which stages may run
WEIGHT_SOURCES = ("online", "ema")
SP_INIT_WEIGHTS = ("frozen", *WEIGHT_SOURCES)  # "frozen": whatever sp.perceptual_weights freezes
PERCEPTUAL_DTYPES = ("auto", "fp32", "bf16", "fp16")
MIXED_PRECISION = ("no", "fp16", "bf16")
NONFINITE = ("stop", "skip")
DIVERGENCE = ("stop", "warn", "off")
_TAP = re.compile(r"(down|up)\.\d+")

# common spellings from other trainers, for "did you mean"
_ALIASES = {
    "learning_rate": "lr", "betas": "adam_betas", "max_grad_norm": "grad_clip",
    "gradient_accumulation_steps": "grad_accum", "accumulation_steps": "grad_accum",
    "batch": "batch_size", "num_steps": "steps", "max_steps": "steps", "ema": "ema_decay",
    "warmup": "warmup_steps", "lr_warmup_steps": "warmup_steps", "dropout": "cond_dropout",
    "num_train_timesteps": "num_timesteps", "timesteps": "num_timesteps",
    "image_size": "size", "resolution": "size", "num_frames": "frames", "sampling_rate": "sample_rate",
    "sr": "sample_rate", "in_channels": "channels", "dataset": "name",
    "layer": "layers", "precision": "mixed_precision", "stage": "stages",
    "sharded": "fsdp", "shard": "fsdp",
}


class RecipeError(ValueError):
    """A user error in a recipe or an override; str() is one line (the CLI prints it, exits 2)."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).splitlines()))


# ---------------------------------------------------------------------------------- loading
def load_recipe(path: str | Path, overrides: Iterable[str] = ()) -> Recipe:
    """Read a recipe (.toml, or the .json that `save_recipe` writes), apply --set overrides
    ("a.b=value", value parsed as TOML, else a bare string), validate and return it."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"recipe file not found: '{path}'")
    if not path.is_file():
        raise RecipeError(f"recipe path '{path}' is not a file")
    try:
        if path.suffix == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise RecipeError(f"invalid JSON in '{path}': {e}") from None
            if not isinstance(data, dict):
                raise RecipeError(f"invalid recipe '{path}': the top level must be an object")
        else:
            data = _parse_toml(path.read_text(encoding="utf-8"), f"'{path}'")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"cannot read recipe '{path}': {e}") from None
    for item in overrides:
        apply_override(data, item)
    return recipe_from_dict(data)


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set "a.b.c=value" in the nested dict `data` in place (value: a TOML value, else a string)."""
    key, sep, text = item.partition("=")
    key, text = key.strip(), text.strip()
    try:  # TOML's dotted-key grammar, so that model.overrides."a.b"=1 works
        node = _parse_toml(f"{key} = 0", "") if sep and key else None
    except RecipeError:
        node = None
    if node is None:
        raise RecipeError(f"override '{item}' must look like key=value, e.g. mse.lr=1e-4")
    parts = []
    while isinstance(node, dict):
        (part, node), = node.items()
        parts.append(part)
    try:
        value = _parse_toml(f"v = {text}", "")["v"]
    except RecipeError:
        value = text  # bare words: sp.layers=encoder+mid, data.path=/data/faces
    if not isinstance(value, str) and _leaf_type(parts) is str:
        value = text  # name=2024 means the string "2024"
    node = data
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"cannot set '{key}': '{'.'.join(parts[: i + 1])}' is not a table")
    node[parts[-1]] = value


def _parse_toml(text: str, where: str) -> dict[str, Any]:
    if tomllib is None:
        raise RecipeError("reading TOML on Python < 3.11 needs the 'tomli' package (pip install tomli)")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"invalid TOML in {where}: {e}") from None


def _leaf_type(parts: list[str]) -> Any:
    """The type hint of the dotted field `parts`, or None (unknown key or free-form table)."""
    cls: Any = Recipe
    for part in parts:
        if not dataclasses.is_dataclass(cls):
            return None
        cls = _hints(cls).get(part)
    return cls


# ---------------------------------------------------------------------------------- dict <-> Recipe
def recipe_from_dict(d: dict[str, Any], *, check_paths: bool = True) -> Recipe:
    """Build a `Recipe` from nested dicts (missing keys keep their defaults) and validate it.

    check_paths=False skips the existence checks of data.path, mse.init and sp.init, for a recipe stored
    in a checkpoint that is only sampled from (its data and stage-1 run may be elsewhere now).
    """
    recipe = _build(Recipe, d, "")
    validate_recipe(recipe, check_paths=check_paths)
    return recipe


def recipe_to_dict(r: Recipe) -> dict[str, Any]:
    """Nested plain dicts of `r` (tuples become lists): `recipe_from_dict` inverts it."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(r)


def save_recipe(r: Recipe, path: str | Path) -> Path:
    """Write the resolved recipe as TOML (path ends in .toml) or JSON (.json); returns the path."""
    path = Path(path)
    d = recipe_to_dict(r)
    if path.suffix == ".toml":
        text = _to_toml(d)
    elif path.suffix == ".json":
        text = json.dumps(d, indent=2) + "\n"
    else:
        raise RecipeError(f"cannot save a recipe as '{path}': the name must end in .toml or .json")
    path.write_text(text, encoding="utf-8")
    return path


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _build(cls: type, d: Any, prefix: str) -> Any:
    if not isinstance(d, dict):
        raise RecipeError(f"{prefix} must be a table, got {_describe(d)}")
    hints = _hints(cls)
    for key in d:
        if key not in hints:
            raise RecipeError(_unknown_key(prefix, str(key), list(hints)))
    return cls(**{key: _coerce(hints[key], value, _join(prefix, key)) for key, value in d.items()})


_PLURAL = {str: "strings", int: "ints", float: "floats"}


def _coerce(hint: Any, value: Any, path: str) -> Any:
    """`value` checked against (and converted to) the field type `hint`."""
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    if hint is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{path} must be a bool (true or false), got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{path} must be an int, got {_describe(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{path} must be a float, got {_describe(value)}")
        if abs(value) > 1e300 or not math.isfinite(value):  # checked first: huge ints overflow
            raise RecipeError(f"{path} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise RecipeError(f"{path} must be a string, got {_describe(value)}")
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple and args[-1] is Ellipsis:  # tuple[str, ...]
        if not isinstance(value, (list, tuple)) or not all(isinstance(x, args[0]) for x in value):
            raise RecipeError(f"{path} must be a list of {_PLURAL[args[0]]}, got {_describe(value)}")
        return tuple(value)
    if origin is tuple:  # tuple[float, float]
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise RecipeError(f"{path} must be a list of {len(args)} floats, got {_describe(value)}")
        return tuple(_coerce(a, x, f"{path}[{i}]") for i, (a, x) in enumerate(zip(args, value)))
    if origin is dict:  # model.overrides: free-form, checked by the backbone
        if not isinstance(value, dict):
            raise RecipeError(f"{path} must be a table, got {_describe(value)}")
        return {k: _free_form(x, _join(path, k)) for k, x in value.items()}
    raise TypeError(f"unsupported recipe field type {hint!r} at {path}")  # a schema bug


def _free_form(value: Any, path: str) -> Any:
    """A copy of a free-form value: strings, numbers, bools, null (JSON), lists and tables."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_free_form(x, f"{path}[{i}]") for i, x in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): _free_form(x, _join(path, str(k))) for k, x in value.items()}
    raise RecipeError(f"{path} must be a string, number, bool, list or table, got {_describe(value)}")


def _all_keys(cls: type | None = None, prefix: str = "") -> list[str]:
    """Every dotted field name of the schema, e.g. ["name", ..., "data.name", ..., "train.compile"]."""
    keys = []
    for name, hint in _hints(cls or Recipe).items():
        path = _join(prefix, name)
        keys += _all_keys(hint, path) if dataclasses.is_dataclass(hint) else [path]
    return keys


def _unknown_key(prefix: str, key: str, valid: list[str]) -> str:
    """"unknown key 'mse.learning_rate'; did you mean 'mse.lr'?" (or the valid keys there)."""
    head = f"unknown key '{_join(prefix, key)}'"
    name = _ALIASES.get(key, key)
    if name not in valid:  # a typo of a valid key or of an alias (learnig_rate -> lr)
        close = difflib.get_close_matches(key, valid + list(_ALIASES), n=1, cutoff=0.6)
        name = _ALIASES.get(close[0], close[0]) if close else name
    if name in valid:
        return f"{head}; did you mean '{_join(prefix, name)}'?"
    # the right key in the wrong table: [mse] layers = ... -> sp.layers
    elsewhere = [k for k in _all_keys() if k.rsplit(".", 1)[-1] == name]
    if elsewhere:
        return f"{head}; did you mean {' or '.join(map(repr, elsewhere[:2]))}?"
    return f"{head}; valid keys{' in ' + prefix if prefix else ''}: {', '.join(valid)}"


# ---------------------------------------------------------------------------------- TOML writer
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _to_toml(d: dict[str, Any]) -> str:
    """TOML for nested dicts: scalars first, then one [table] per dict (sub-tables dotted)."""
    lines: list[str] = []

    def table(node: dict[str, Any], path: list[str]) -> None:
        scalars = [(k, v) for k, v in node.items() if not isinstance(v, dict)]
        tables = [(k, v) for k, v in node.items() if isinstance(v, dict)]
        if path and (scalars or not tables):
            lines.append(f"\n[{'.'.join(map(_toml_key, path))}]")
        for k, v in scalars:
            lines.append(f"{_toml_key(k)} = {_toml_value(v, '.'.join(path + [k]))}")
        for k, v in tables:
            table(v, path + [k])

    table(d, [])
    return "\n".join(lines).lstrip("\n") + "\n"


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_string(s: str) -> str:
    out = (_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c) for c in s)
    return '"' + "".join(out) + '"'


def _toml_value(v: Any, path: str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, str):
        return _toml_string(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x, f"{path}[{i}]") for i, x in enumerate(v)) + "]"
    if isinstance(v, dict):
        items = ", ".join(f"{_toml_key(k)} = {_toml_value(x, f'{path}.{k}')}" for k, x in v.items())
        return "{" + items + "}"
    raise RecipeError(f"{path} = {v!r} cannot be written as TOML; save the recipe as .json")


# ---------------------------------------------------------------------------------- validation
def validate_recipe(r: Recipe, *, check_paths: bool = True) -> None:
    """Check ranges, choices and (unless check_paths=False) that data.path, mse.init and sp.init exist;
    the first failure raises a one-line `RecipeError`."""
    # backbones, a sibling package built on this library's denoiser, is imported on use
    from backbones import BACKBONE_SPECS

    _at_least("seed", r.seed, 0)

    d = r.data
    _choice("data.name", d.name, tuple(DATASET_SPECS))
    data = DATASET_SPECS[d.name]
    _at_least("data.size", d.size, 8)
    try:
        data.check_channels(d.channels)
    except ValueError as e:
        raise RecipeError(str(e)) from None
    _at_least("data.frames", d.frames, data.min_frames)
    _at_least("data.length", d.length, 16)
    _at_least("data.sample_rate", d.sample_rate, 1000)
    _at_least("data.min_size", d.min_size, 0)
    _at_least("data.min_aesthetic", d.min_aesthetic, 0)
    _at_least("data.num_items", d.num_items, 1)
    _at_least("data.num_workers", d.num_workers, 0)
    _at_least("data.seed", d.seed, 0)
    if not (isinstance(d.scale, (int, float)) and not isinstance(d.scale, bool) and 0 < d.scale < math.inf):
        raise RecipeError(f"data.scale must be a finite number > 0, got {d.scale!r}")

    m = r.model
    _choice("model.backbone", m.backbone, tuple(BACKBONE_SPECS))
    backbone = BACKBONE_SPECS[m.backbone]
    if not backbone.installed:
        raise RecipeError(f"model.backbone = {m.backbone!r} needs the {backbone.extra!r} extra "
                          f"({', '.join(backbone.requires)}): pip install 'perceptual-diffusion[{backbone.extra}]'")
    if not m.preset:
        raise RecipeError("model.preset must name a preset of the backbone, e.g. 'tiny'")
    if m.latent and (data.modality != "image" or d.channels != 3):
        raise RecipeError(f"model.latent needs RGB images (data.channels = 3 from an image dataset), got "
                          f"data.name = {d.name!r}, data.channels = {d.channels}")
    latent_names = " or ".join(repr(name) for name, spec in BACKBONE_SPECS.items() if spec.latent)
    if bool(m.latent) != backbone.latent:
        raise RecipeError(f"model.backbone = {latent_names} trains in a VAE latent space on captions and needs "
                          "model.latent (a diffusers model dir with vae/, text_encoder/, tokenizer/); other "
                          f"backbones work in pixel space (got model.backbone = {m.backbone!r}, "
                          f"model.latent = {m.latent!r})")
    if m.latent and d.scale != 1:
        raise RecipeError(f"data.scale scales pixel-space data; a latent recipe scales its latents by the VAE's "
                          f"scaling_factor, got data.scale = {d.scale!r} with model.latent")
    if m.latent_cache and not m.latent:
        raise RecipeError(f"model.latent_cache caches VAE latents and needs model.latent, got "
                          f"model.latent_cache = {m.latent_cache!r} without it")
    if m.latent_cache and not m.latent_cache.endswith(".safetensors"):
        raise RecipeError(f"model.latent_cache must name a .safetensors file, got {m.latent_cache!r}")
    if m.pretrained and not backbone.latent:
        raise RecipeError(f"model.pretrained loads diffusers UNets only (model.backbone = {latent_names}), "
                          f"got model.backbone = {m.backbone!r}")

    s = r.schedule
    _choice("schedule.kind", s.kind, SCHEDULE_KINDS)
    _at_least("schedule.num_timesteps", s.num_timesteps, 2)
    _interval("schedule.beta_start", s.beta_start, 0, 1, "(0, 1)")
    _interval("schedule.beta_end", s.beta_end, s.beta_start, 1, f"[schedule.beta_start = {s.beta_start}, 1)",
              low_open=False)

    for name in ("mse", "sp"):
        _validate_stage(name, getattr(r, name))
    _choice("mse.init_weights", r.mse.init_weights, WEIGHT_SOURCES)
    p = r.sp
    _choice("sp.init_weights", p.init_weights, SP_INIT_WEIGHTS)
    _choice("sp.perceptual_weights", p.perceptual_weights, WEIGHT_SOURCES)
    _choice("sp.perceptual_dtype", p.perceptual_dtype, PERCEPTUAL_DTYPES)
    if p.layers not in LAYER_GROUPS and not _TAP.fullmatch(p.layers):
        raise RecipeError(
            f"sp.layers must be one of {_listing(LAYER_GROUPS)} or a tap name like 'down.0' or 'up.1', "
            f"got {p.layers!r}"
        )
    _choice("sp.t_prime", p.t_prime, T_PRIME_MODES)
    _choice("sp.distance", p.distance, DISTANCES)
    _choice("sp.formulation", p.formulation, FORMULATIONS)
    _at_least("sp.mse_weight", p.mse_weight, 0)
    _at_least("sp.near_offset", p.near_offset, 0)
    _above("sp.normal_std", p.normal_std, 0)
    if p.check_factor != 0:
        _above("sp.check_factor (or 0 to turn the check off)", p.check_factor, 1)

    t = r.train
    stages = list(t.stages)
    if stages not in _stage_orders():
        raise RecipeError(
            f"train.stages must be a non-empty list drawn from {list(STAGES)} in that order without "
            f"repeats, got {stages}"
        )
    _choice("train.mixed_precision", t.mixed_precision, MIXED_PRECISION)
    _choice("train.nonfinite", t.nonfinite, NONFINITE)
    _choice("train.divergence", t.divergence, DIVERGENCE)
    _above("train.divergence_factor", t.divergence_factor, 1)
    _at_least("train.divergence_window", t.divergence_window, 2)
    if t.fsdp and t.mixed_precision == "fp16":
        raise RecipeError("train.fsdp supports mixed_precision 'no' or 'bf16', not 'fp16' (its loss scaler "
                          "would need to agree across shards); use bf16")
    _at_least("train.log_every", t.log_every, 1)
    _at_least("train.validation_size", t.validation_size, 0)
    _at_least("train.sample_every", t.sample_every, 0)
    _at_least("train.checkpoint_every", t.checkpoint_every, 0)
    _at_least("train.keep_last", t.keep_last, 1)
    _at_least("train.num_samples", t.num_samples, 1)
    if not 1 <= t.sample_steps <= s.num_timesteps:
        raise RecipeError(
            f"train.sample_steps must be in [1, schedule.num_timesteps = {s.num_timesteps}], "
            f"got {t.sample_steps}"
        )

    # paths last: a typo elsewhere is reported before a missing folder
    if not check_paths:
        return
    if data.needs_path and not d.path:
        raise RecipeError(f"data.path must name {data.path} when data.name is '{d.name}'")
    if data.path_is_dir and not Path(d.path).is_dir():
        raise RecipeError(f"data.path '{d.path}' is not an existing directory (data.name = '{d.name}')")
    if "sp" in stages:
        if stages == ["sp"] and not p.init:
            raise RecipeError(
                "sp.init must name a stage-1 checkpoint: an SP-only run (train.stages = ['sp']) starts "
                "from an MSE-trained model and freezes a copy of it"
            )
        if p.init and not Path(p.init).exists():
            raise RecipeError(f"sp.init '{p.init}' does not exist (it should be a stage-1 checkpoint)")
    if "mse" in stages and r.mse.init and not Path(r.mse.init).exists():
        raise RecipeError(f"mse.init '{r.mse.init}' does not exist (it should be a checkpoint or a run "
                          "directory to continue from)")


def _validate_stage(name: str, st: StageConfig) -> None:
    _at_least(f"{name}.steps", st.steps, 1)
    _at_least(f"{name}.batch_size", st.batch_size, 1)
    _at_least(f"{name}.grad_accum", st.grad_accum, 1)
    _above(f"{name}.lr", st.lr, 0)
    _at_least(f"{name}.weight_decay", st.weight_decay, 0)
    for i, beta in enumerate(st.adam_betas):
        _interval(f"{name}.adam_betas[{i}]", beta, 0, 1, "[0, 1)", low_open=False)
    _at_least(f"{name}.warmup_steps", st.warmup_steps, 0)
    _at_least(f"{name}.decay_steps", st.decay_steps, 0)
    if not 0 < st.decay_factor <= 1:
        raise RecipeError(f"{name}.decay_factor must be in (0, 1], got {st.decay_factor!r}")
    _at_least(f"{name}.grad_clip", st.grad_clip, 0)
    _interval(f"{name}.ema_decay", st.ema_decay, 0, 1, "(0, 1)")
    _interval(f"{name}.cond_dropout", st.cond_dropout, 0, 1, "[0, 1)", low_open=False)


def _stage_orders() -> list[list[str]]:
    """Non-empty subsequences of STAGES: ["mse"], ["sp"], ["mse", "sp"]."""
    n = len(STAGES)
    return [[s for i, s in enumerate(STAGES) if mask >> i & 1] for mask in range(1, 2**n)]


def _listing(allowed: Iterable[Any]) -> str:
    return ", ".join(map(repr, allowed))


def _choice(path: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(value, allowed, n=1, cutoff=0.8) if isinstance(value, str) else []
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise RecipeError(f"{path} must be one of {_listing(allowed)}, got {value!r}{hint}")


def _at_least(path: str, value: float, low: float) -> None:
    if not value >= low:
        raise RecipeError(f"{path} must be >= {low}, got {value!r}")


def _above(path: str, value: float, low: float) -> None:
    if not value > low:
        raise RecipeError(f"{path} must be > {low}, got {value!r}")


def _interval(path: str, value: float, low: float, high: float, shown: str, low_open: bool = True) -> None:
    """low < value < high (low <= value with low_open=False); `shown` is the interval as printed."""
    ok = (low < value if low_open else low <= value) and value < high
    if not ok:
        raise RecipeError(f"{path} must be in {shown}, got {value!r}")


# ---------------------------------------------------------------------------------- listing
def list_recipes(root: str | Path) -> list[tuple[str, str]]:
    """(path relative to `root`, description) of every recipe under `root`/recipes (or under
    `root` itself when it has no recipes/ folder), sorted; the description is the file's first
    comment line. Accelerate launcher configs (recipes/accelerate/) are not recipes."""
    root = Path(root)
    base = root / "recipes" if (root / "recipes").is_dir() else root
    found = []
    for path in sorted(base.rglob("*.toml")):
        if "accelerate" in path.relative_to(base).parts[:-1]:
            continue
        found.append((path.relative_to(root).as_posix(), _description(path)))
    return found


def _description(path: Path) -> str:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return ""
    for line in lines:
        line = line.strip()
        if line:
            return line.lstrip("#").strip() if line.startswith("#") else ""
    return ""
