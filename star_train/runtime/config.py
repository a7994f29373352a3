"""Run configuration: dataclasses read from a TOML file, defaults = STAR's released CKD run.

A config file has one table per section (``[data]``, ``[teacher]``, ``[student]``,
``[ckd]``, ``[train]``); every key is optional. Unknown sections or keys are errors
that name them, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ModelSpec:
    """Where a model comes from: a local Hugging Face directory (``path``) or, when
    ``path`` is empty, a randomly initialised Qwen3 built from ``config`` (the keyword
    arguments of ``transformers.Qwen3Config``) with ``seed``."""

    path: str = ""
    config: dict = field(default_factory=dict)
    seed: int = 0


@dataclass
class DataConfig:
    path: str = ""              # STAR messages+tools jsonl
    max_length: int = 5632      # prompt (5120) + response (512) tokens
    limit: int = 0              # use only the first N records (0 = all)


@dataclass
class TeacherConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    k: int = 100                # teacher top-k per response token
    batch_size: int = 8         # sequences per teacher forward when building the cache
    shard_size: int = 256       # examples per cache shard (the unit of resumption)


@dataclass
class StudentConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    gradient_checkpointing: bool = True


@dataclass
class CKDLossConfig:
    tail_coef: float = 10.0     # lambda on the confident-error mass
    student_topm: int = 100
    kd_ratio: float = 1.0       # 1 = pure KD (released run)
    temperature: float = 1.0
    tail_bucket: bool = False


@dataclass
class TrainConfig:
    out_dir: str = "runs/ckd"
    lr: float = 3e-6
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    batch_size: int = 128       # sequences per optimizer step
    micro_batch_size: int = 4   # sequences per forward/backward (gradient accumulation)
    epochs: int = 1
    max_steps: int = 0          # stop after this many optimizer steps (0 = the epochs)
    dtype: str = "bfloat16"     # autocast compute dtype; parameters and AdamW stay fp32
    device: str = "auto"        # auto = cuda when available, else cpu
    save_every: int = 50        # optimizer steps between checkpoints
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 0


def _optimizer_checks(t) -> list:
    """The checks both training stages' ``[train]`` sections share."""
    return [
        (t.lr > 0, "train.lr must be > 0"),
        (t.weight_decay >= 0, "train.weight_decay must be >= 0"),
        (t.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
        (t.max_grad_norm > 0, "train.max_grad_norm must be > 0"),
        (t.micro_batch_size >= 1, "train.micro_batch_size must be >= 1"),
        (t.max_steps >= 0, "train.max_steps must be >= 0"),
        (t.save_every >= 1, "train.save_every must be >= 1"),
        (t.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1"),
        (t.log_every >= 1, "train.log_every must be >= 1"),
        (t.dtype in ("bfloat16", "float32"), "train.dtype must be 'bfloat16' or 'float32'"),
    ]


def _enforce(checks: list, models: dict) -> None:
    """Raise the first failed check's message; every model spec needs a path or a config."""
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    for name, spec in models.items():
        if not spec.path and not spec.config:
            raise ValueError(f"{name}.model needs a path or a config")


@dataclass
class CKDRunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    ckd: CKDLossConfig = field(default_factory=CKDLossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "CKDRunConfig":
        checks = [
            (self.data.path, "data.path must name a STAR jsonl file"),
            (self.data.max_length >= 2, "data.max_length must be >= 2"),
            (self.data.limit >= 0, "data.limit must be >= 0"),
            (self.teacher.k >= 1, "teacher.k must be >= 1"),
            (self.teacher.batch_size >= 1, "teacher.batch_size must be >= 1"),
            (self.teacher.shard_size >= 1, "teacher.shard_size must be >= 1"),
            (self.ckd.student_topm >= 1, "ckd.student_topm must be >= 1"),
            (0.0 <= self.ckd.kd_ratio <= 1.0, "ckd.kd_ratio must be in [0, 1]"),
            (self.ckd.temperature > 0, "ckd.temperature must be > 0"),
            *_optimizer_checks(self.train),
            (self.train.batch_size >= 1, "train.batch_size must be >= 1"),
            (self.train.batch_size % max(1, self.train.micro_batch_size) == 0,
             "train.batch_size must be a multiple of train.micro_batch_size"),
            (self.train.epochs >= 1, "train.epochs must be >= 1"),
        ]
        _enforce(checks, {"teacher": self.teacher.model, "student": self.student.model})
        return self


def _build(cls, values: dict, where: str):
    """Instantiate dataclass ``cls`` from a dict, recursing into dataclass fields."""
    if not isinstance(values, dict):
        raise ValueError(f"[{where}] must be a table, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown key(s) in [{where}]: {', '.join(unknown)}; "
                         f"known: {', '.join(known)}")
    kwargs = {}
    for name, value in values.items():
        ftype = known[name].type
        sub = _DATACLASSES.get(ftype) if isinstance(ftype, str) else None
        kwargs[name] = _build(sub, value, f"{where}.{name}") if sub else value
    return cls(**kwargs)


_DATACLASSES = {c.__name__: c for c in (ModelSpec, DataConfig, TeacherConfig, StudentConfig,
                                        CKDLossConfig, TrainConfig)}


def config_from_dict(values: dict) -> CKDRunConfig:
    return _build(CKDRunConfig, values, "config").validate()


def _read_toml(path: Path, overrides: dict | None) -> dict:
    """The file's tables with ``overrides`` (``{"train.lr": 1e-5}``) written over them."""
    with path.open("rb") as f:
        values = tomllib.load(f)
    for dotted, value in (overrides or {}).items():
        *parents, leaf = dotted.split(".")
        node = values
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return values


def _resolve_paths(cfg, base: Path, model_specs) -> None:
    """Relative ``data.path``, ``train.out_dir`` and model paths are relative to ``base``."""
    cfg.data.path = _resolve(base, cfg.data.path)
    cfg.train.out_dir = _resolve(base, cfg.train.out_dir)
    for spec in model_specs:
        spec.path = _resolve(base, spec.path) if spec.path else ""


def load_config(path: str | Path, overrides: dict | None = None) -> CKDRunConfig:
    """Read a TOML run config; ``overrides`` (``{"train.lr": 1e-5}``) win over the file.
    A relative ``data.path`` / ``train.out_dir`` / model ``path`` is taken relative to the
    config file's folder."""
    path = Path(path)
    cfg = config_from_dict(_read_toml(path, overrides))
    _resolve_paths(cfg, path.resolve().parent, (cfg.teacher.model, cfg.student.model))
    return cfg


def _resolve(base: Path, p: str) -> str:
    return str((base / p).resolve())  # an absolute p replaces base


def config_to_dict(cfg: CKDRunConfig) -> dict:
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------- STAR stage 2: Sim-RL
# A separate run config (sections [data], [policy], [rollout], [grpo], [train]); defaults
# are STAR's released Sim-RL settings where shared/STAR.md gives them.

@dataclass
class SimRLDataConfig:
    path: str = ""                  # STAR messages+tools jsonl (the last message is the reference)
    max_prompt_length: int = 5120   # longer prompts are skipped (counted and logged)
    limit: int = 0                  # use only the first N records (0 = all)


@dataclass
class PolicyConfig:
    model: ModelSpec = field(default_factory=ModelSpec)  # e.g. the CKD stage's final/ folder
    gradient_checkpointing: bool = True


@dataclass
class RolloutConfig:
    num_samples: int = 8            # completions per prompt (the GRPO group)
    prompts_per_step: int = 32      # kept prompt groups wanted per optimizer step (not in STAR.md)
    max_sampling_rounds: int = 4    # dynamic filtering: rounds of refills before training anyway
    max_new_tokens: int = 512
    temperature: float = 1.0
    generate_batch_prompts: int = 8  # prompts per generate() call (x num_samples sequences)


@dataclass
class GRPOConfig:
    clip_eps: float = 0.2
    kl_coef: float = 1e-3
    kl_estimator: str = "k2"        # k1 | k2 | k3


@dataclass
class SimRLTrainConfig:
    out_dir: str = "runs/simrl"
    lr: float = 3e-7
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    micro_batch_size: int = 8       # sequences per forward/backward (gradient accumulation)
    episodes: int = 3               # passes over the prompts
    max_steps: int = 0              # stop after this many optimizer steps (0 = the episodes)
    dtype: str = "bfloat16"         # autocast compute dtype; parameters and AdamW stay fp32
    device: str = "auto"
    save_every: int = 20
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 0


@dataclass
class SimRLRunConfig:
    data: SimRLDataConfig = field(default_factory=SimRLDataConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    train: SimRLTrainConfig = field(default_factory=SimRLTrainConfig)

    def validate(self) -> "SimRLRunConfig":
        d, r, g, t = self.data, self.rollout, self.grpo, self.train
        checks = [
            (d.path, "data.path must name a STAR jsonl file"),
            (d.max_prompt_length >= 1, "data.max_prompt_length must be >= 1"),
            (d.limit >= 0, "data.limit must be >= 0"),
            (r.num_samples >= 2, "rollout.num_samples must be >= 2 (group advantages need "
                                 "a spread)"),
            (r.prompts_per_step >= 1, "rollout.prompts_per_step must be >= 1"),
            (r.max_sampling_rounds >= 1, "rollout.max_sampling_rounds must be >= 1"),
            (r.max_new_tokens >= 1, "rollout.max_new_tokens must be >= 1"),
            (r.temperature > 0, "rollout.temperature must be > 0"),
            (r.generate_batch_prompts >= 1, "rollout.generate_batch_prompts must be >= 1"),
            (g.clip_eps >= 0, "grpo.clip_eps must be >= 0"),
            (g.kl_coef >= 0, "grpo.kl_coef must be >= 0"),
            (g.kl_estimator in ("k1", "k2", "k3"), "grpo.kl_estimator must be k1, k2 or k3"),
            (t.episodes >= 1, "train.episodes must be >= 1"),
            *_optimizer_checks(t),
        ]
        _enforce(checks, {"policy": self.policy.model})
        return self


_DATACLASSES.update({c.__name__: c for c in (SimRLDataConfig, PolicyConfig, RolloutConfig,
                                             GRPOConfig, SimRLTrainConfig)})


def simrl_config_from_dict(values: dict) -> SimRLRunConfig:
    return _build(SimRLRunConfig, values, "config").validate()


def load_simrl_config(path: str | Path, overrides: dict | None = None) -> SimRLRunConfig:
    """Read a TOML Sim-RL run config, as :func:`load_config` does for CKD: ``overrides``
    (``{"train.lr": 1e-6}``) win over the file; a relative ``data.path``, ``train.out_dir``
    or ``policy.model.path`` is taken relative to the config file's folder."""
    path = Path(path)
    cfg = simrl_config_from_dict(_read_toml(path, overrides))
    _resolve_paths(cfg, path.resolve().parent, (cfg.policy.model,))
    return cfg


# ---------------------------------------------------------------- teacher rollouts
# Defaults: STAR's n = 8 rollouts per seed prompt; the sampling temperature and the
# keep rule are not given in shared/STAR.md (ours: temperature 1.0, keep completions
# whose similarity reward against the seed's reference is at least 1.0, i.e. exact).

@dataclass
class RolloutDataConfig:
    path: str = ""                  # seed records, STAR messages+tools jsonl (last = reference)
    max_prompt_length: int = 5120   # longer prompts are skipped (counted)
    limit: int = 0


@dataclass
class RolloutTeacherConfig:
    model: ModelSpec = field(default_factory=ModelSpec)


@dataclass
class RolloutSamplingConfig:
    num_samples: int = 8
    temperature: float = 1.0
    max_new_tokens: int = 512
    generate_batch_prompts: int = 4
    min_reward: float = 1.0         # keep a rollout when its reward is >= this
    dedupe: bool = True             # keep identical kept completions of one prompt once


@dataclass
class RolloutOutputConfig:
    out_dir: str = "runs/rollouts"  # shards, the merged rollouts.jsonl and summary.json
    shard_size: int = 64            # seed prompts per shard (the unit of resumption)
    dtype: str = "bfloat16"
    device: str = "auto"
    seed: int = 0


@dataclass
class RolloutRunConfig:
    data: RolloutDataConfig = field(default_factory=RolloutDataConfig)
    teacher: RolloutTeacherConfig = field(default_factory=RolloutTeacherConfig)
    sampling: RolloutSamplingConfig = field(default_factory=RolloutSamplingConfig)
    output: RolloutOutputConfig = field(default_factory=RolloutOutputConfig)

    def validate(self) -> "RolloutRunConfig":
        d, s, o = self.data, self.sampling, self.output
        checks = [
            (d.path, "data.path must name a STAR jsonl file"),
            (d.max_prompt_length >= 1, "data.max_prompt_length must be >= 1"),
            (d.limit >= 0, "data.limit must be >= 0"),
            (s.num_samples >= 1, "sampling.num_samples must be >= 1"),
            (s.temperature > 0, "sampling.temperature must be > 0"),
            (s.max_new_tokens >= 1, "sampling.max_new_tokens must be >= 1"),
            (s.generate_batch_prompts >= 1, "sampling.generate_batch_prompts must be >= 1"),
            (-1.0 <= s.min_reward <= 1.0, "sampling.min_reward must be in [-1, 1]"),
            (o.shard_size >= 1, "output.shard_size must be >= 1"),
            (o.dtype in ("bfloat16", "float32"), "output.dtype must be 'bfloat16' or 'float32'"),
        ]
        _enforce(checks, {"teacher": self.teacher.model})
        return self


_DATACLASSES.update({c.__name__: c for c in (RolloutDataConfig, RolloutTeacherConfig,
                                             RolloutSamplingConfig, RolloutOutputConfig)})


def rollout_config_from_dict(values: dict) -> RolloutRunConfig:
    return _build(RolloutRunConfig, values, "config").validate()


def load_rollout_config(path: str | Path, overrides: dict | None = None) -> RolloutRunConfig:
    """Read a TOML teacher-rollout config (paths relative to the file, as for the stages)."""
    path = Path(path)
    cfg = rollout_config_from_dict(_read_toml(path, overrides))
    base = path.resolve().parent
    cfg.data.path = _resolve(base, cfg.data.path)
    cfg.output.out_dir = _resolve(base, cfg.output.out_dir)
    spec = cfg.teacher.model
    spec.path = _resolve(base, spec.path) if spec.path else ""
    return cfg
