"""Run configs: dataclasses read from TOML, shared by every stage.

A stage's config is a dataclass of sections (``[data]``, ``[train]``, ...), each a
dataclass of keys declared with ``setting`` (default and allowed range); every key is
optional in the file. ``load_config`` reads a file for any such class: unknown sections
or keys, values of the wrong type and values out of range are errors that name the key,
the expected type or range and the value, so a typo never silently falls back to a
default. Path keys are taken relative to the config file's folder.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..chat.templates import CHAT_TEMPLATES, TOOL_FORMATS


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range."""


def setting(default, *, min=None, above=None, max=None, choices=None, path=False):
    """A config key: its default, and the range its value must be in (``min`` <= value,
    ``above`` < value, value <= ``max``, value in ``choices``); ``path``: a filesystem
    path, taken relative to the config file's folder. Checked by ``enforce``."""
    rules = {"min": min, "above": above, "max": max, "choices": choices, "path": path}
    metadata = {k: v for k, v in rules.items() if v is not None and v is not False}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls):
    """A config section (a nested dataclass) with its defaults."""
    return field(default_factory=cls)


@dataclass
class ModelSpec:
    """Where a model comes from: a local Hugging Face directory or ``.gguf`` file
    (``path``) or, when ``path`` is empty, a randomly initialised Qwen3 built from
    ``config`` (the keyword arguments of ``transformers.Qwen3Config``) with ``seed``.

    How its conversations are written and its answers read (``chat.templates``):
    ``chat_template`` = ``auto`` (the model's own chat template when it handles tools and
    is not Qwen3's, else the Qwen3 layout as text for the model's tokenizer) | ``qwen3`` |
    ``qwen3-no-think`` | ``model``; ``tool_format`` = ``auto`` (the template's own format,
    Hermes in the Qwen3 layout) | ``hermes`` | ``llama3.1-json``."""

    path: str = setting("", path=True)
    config: dict = setting({})
    seed: int = 0
    chat_template: str = setting("auto", choices=CHAT_TEMPLATES)
    tool_format: str = setting("auto", choices=TOOL_FORMATS)


@dataclass
class TrainConfig:
    """The ``[train]`` keys both training stages share (each stage subclasses it for its
    own defaults and keys). Parameters and AdamW stay fp32; ``dtype`` is the autocast
    compute dtype."""

    out_dir: str = setting("runs/train", path=True)
    lr: float = setting(3e-6, above=0)
    weight_decay: float = setting(0.0, min=0)   # not on biases and norm weights
    adam_betas: list = setting([0.9, 0.95])     # OpenRLHF's default, as released
    lr_schedule: str = setting("cosine", choices=("cosine", "constant"))
    warmup_ratio: float = setting(0.03, min=0, max=1)  # of the run's steps, linear from 0
    min_lr_ratio: float = setting(0.1, min=0, max=1)   # cosine ends at this x lr
    max_grad_norm: float = setting(1.0, above=0)
    # micro_batch (released): mean of each micro-batch's token mean; step_tokens: token
    # mean over the whole step, independent of the micro-batch split
    loss_normalization: str = setting("micro_batch", choices=("micro_batch", "step_tokens"))
    micro_batch_size: int = setting(4, min=1)  # sequences per forward/backward (accumulation)
    max_steps: int = setting(0, min=0)         # stop after this many optimizer steps (0 = no cap)
    dtype: str = setting("bfloat16", choices=("bfloat16", "float32"))  # autocast compute dtype
    device: str = "auto"                       # auto = cuda when available, else cpu
    save_every: int = setting(50, min=1)       # optimizer steps between checkpoints
    keep_checkpoints: int = setting(2, min=1)
    log_every: int = setting(1, min=1)
    seed: int = 0
    tensorboard: bool = False                  # also log every step to out_dir/tensorboard
    # auto: flash_attention_2 on CUDA when flash-attn is installed, else sdpa (see speedups)
    attn_implementation: str = setting("auto", choices=("auto", "sdpa", "eager", "flash_attention_2"))
    liger_kernels: bool = False  # Liger's RMSNorm/SwiGLU/RoPE on the trunk (CUDA; our fused head stays)
    # under torchrun: ddp = every rank holds the whole model, gradients all-reduced once per
    # step; fsdp2 = the student sharded with fully_shard (for one that does not fit a device)
    data_parallel: str = setting("ddp", choices=("ddp", "fsdp2"))

    def checks(self) -> list:
        """What ``setting`` ranges cannot say, for the stages' ``validate``."""
        betas = self.adam_betas
        return [(len(betas) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                         and 0 <= b < 1 for b in betas),
                 f"train.adam_betas must be two numbers in [0, 1), got {betas!r}")]


def _range_error(key: str, value, rules: dict) -> str | None:
    """Why ``value`` breaks ``rules`` (a ``setting``'s metadata), None when it does not."""
    low, high = rules.get("min"), rules.get("max")
    if "choices" in rules and value not in rules["choices"]:
        return f"{key} must be one of {', '.join(map(repr, rules['choices']))}, got {value!r}"
    if low is not None and high is not None and not low <= value <= high:
        return f"{key} must be in [{low}, {high}], got {value!r}"
    if low is not None and value < low:
        return f"{key} must be >= {low}, got {value!r}"
    if high is not None and value > high:
        return f"{key} must be <= {high}, got {value!r}"
    if "above" in rules and not value > rules["above"]:
        return f"{key} must be > {rules['above']}, got {value!r}"
    return None


def _range_errors(cfg, prefix: str = "") -> list:
    errors = []
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            errors += _range_errors(value, key + ".")
        elif (error := _range_error(key, value, f.metadata)) is not None:
            errors.append(error)
    return errors


def enforce(cfg, checks: list, models: dict) -> None:
    """Check every key's range (see ``setting``), then ``checks`` (``(ok, message)``
    pairs that relate keys to each other); every model spec needs a path or a config.
    Raises a ConfigError with the first failure."""
    for message in _range_errors(cfg):
        raise ConfigError(message)
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    for name, spec in models.items():
        if not spec.path and not spec.config:
            raise ConfigError(f"{name}.model needs a path or a config")


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               dict: "a table", list: "a list"}


def _check_type(where: str, expected, value):
    """``value`` as the field's type wants it (an int is a fine float); else a ConfigError
    naming the key, the expected type and the value."""
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    ok = isinstance(value, expected) and not (expected in (int, float) and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{where}: expected {_TYPE_NAMES.get(expected, expected.__name__)}, "
                          f"got {value!r} ({type(value).__name__})")
    return value


def build(cls, values: dict, where: str = "config"):
    """Instantiate dataclass ``cls`` from a dict, recursing into dataclass fields."""
    if not isinstance(values, dict):
        raise ConfigError(f"[{where}] must be a table, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) in [{where}]: {', '.join(unknown)}; "
                          f"known: {', '.join(known)}")
    kwargs = {}
    for name, value in values.items():
        kind, key = hints[name], name if where == "config" else f"{where}.{name}"
        if dataclasses.is_dataclass(kind):
            kwargs[name] = build(kind, value, key)
        else:
            kwargs[name] = _check_type(key, typing.get_origin(kind) or kind, value)
    return cls(**kwargs)


def from_dict(cls, values: dict):
    """A validated config of class ``cls`` from plain values (TOML tables as dicts)."""
    return build(cls, values).validate()


def _read_toml(path: Path, overrides: dict | None) -> dict:
    """The file's tables with ``overrides`` (``{"train.lr": 1e-5}``) written over them."""
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        with path.open("rb") as f:
            values = tomllib.load(f)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {error}") from None
    for dotted, value in (overrides or {}).items():
        *parents, leaf = dotted.split(".")
        node = values
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {dotted}: {p} is not a table")
        node[leaf] = value
    return values


def resolve_paths(cfg, base: Path) -> None:
    """Make every non-empty path key of ``cfg`` (recursively) relative to ``base``."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            resolve_paths(value, base)
        elif f.metadata.get("path") and value:
            setattr(cfg, f.name, str((base / value).resolve()))  # an absolute value replaces base


PRESETS = Path(__file__).resolve().parents[1] / "configs"  # shipped with the package


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.toml"))


def preset_path(name: str) -> Path:
    path = PRESETS / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"no preset named {name!r}; presets: {', '.join(preset_names())}")
    return path


def load_config(cls, source: str | Path, overrides: dict | None = None):
    """Read a TOML run config of class ``cls`` from a file, or a shipped preset by name
    (``"ckd-qwen3-0.6b"``); ``overrides`` (``{"train.lr": 1e-5}``) win over it. Relative
    paths are taken relative to the file's folder, or for a preset to the current folder."""
    path = Path(source)
    is_preset = not path.exists() and path.suffix != ".toml" and len(path.parts) == 1
    if is_preset:
        path = preset_path(str(source))
    cfg = from_dict(cls, _read_toml(path, overrides))
    resolve_paths(cfg, Path.cwd() if is_preset else path.resolve().parent)
    return cfg


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
