"""Typed run configuration: dataclasses, YAML loading, `key=value` overrides and validation.

Every check that can fail a run happens here, before a model is loaded, with a message that says what
to change.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml


class ConfigError(ValueError):
    """A configuration value that cannot work; the message says what to change."""


class TrainingDiverged(RuntimeError):
    """The logged training loss is not finite: the run stops rather than train on NaN weights (reported in one
    line, like a ConfigError)."""


# ---------------------------------------------------------------------------------------------------
# Methods. Every constant of docs/methods.md is a field here; defaults are the papers' values, except the
# start of AdaLoRA / IncreLoRA / SoRA (init, docs/methods.md "The stall") and what was measured to go with it
# (AdaLoRA's gamma, SoRA's xi); init "paper" restores the papers' start.
# ---------------------------------------------------------------------------------------------------


@dataclass
class MethodConfig:
    """Fields shared by every method."""

    name: str = ""
    alpha: float = 16.0
    dropout: float = 0.0
    gamma: float = 0.0  # orthogonality regularizer weight (AdaLoRA, IncreLoRA)

    def resolved_gamma(self) -> float:
        """The orthogonality regularizer's weight this run uses (0: none)."""
        return self.gamma

    def validate(self, total_steps: int | None) -> None:
        if self.alpha <= 0:
            raise ConfigError(f"method.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"method.dropout must be in [0, 1), got {self.dropout}")
        if self.resolved_gamma() < 0:
            raise ConfigError(f"method.gamma must be >= 0, got {self.gamma}")


INITS = ("lora", "paper")
PAPER_GAMMA = 0.1  # AdaLoRA's and IncreLoRA's regularizer weight on most GLUE tasks


@dataclass
class SVDFormConfig(MethodConfig):
    """Fields of the SVD-form methods (AdaLoRA, IncreLoRA): B diag(lam) A with a sensitivity score.

    init "lora" (default): A Kaiming-uniform, B = 0, every active lam = init_lam, so the adapter starts as a
    LoRA adapter with update scale alpha x init_lam and learns from the first step (docs/methods.md, "The
    stall"). init "paper": the papers' exact start, lam = 0 and A, B ~ N(0, 0.02), whose update is second
    order in the parameters and stalls short runs (init_lam does not apply).

    gamma None: the start's weight, `lora_start_gamma` with init "lora" and the papers' 0.1 with "paper", so that
    `init=paper` alone gives the papers' method (docs/methods.md, "Choices (AdaLoRA)").
    """

    gamma: float | None = None
    lora_start_gamma: ClassVar[float] = PAPER_GAMMA
    init: str = "lora"
    init_lam: float = 0.5  # with AdaLoRA's alpha 32: a LoRA adapter's alpha 16 (docs/methods.md, "The stall")
    beta1: float = 0.85
    beta2: float = 0.85

    def resolved_gamma(self) -> float:
        if self.gamma is not None:
            return self.gamma
        return PAPER_GAMMA if self.init == "paper" else self.lora_start_gamma

    def validate(self, total_steps: int | None) -> None:
        super().validate(total_steps)
        _choice("method.init", self.init, INITS)
        _positive("method.init_lam", self.init_lam)
        _beta("method.beta1", self.beta1)
        _beta("method.beta2", self.beta2)


@dataclass
class LoRAConfig(MethodConfig):
    name: str = "lora"
    r: int = 8

    def validate(self, total_steps: int | None) -> None:
        super().validate(total_steps)
        _positive("method.r", self.r)


@dataclass
class AdaLoRAConfig(SVDFormConfig):
    name: str = "adalora"
    # with the LoRA-like start a third of the papers' weight: the factors stay near orthonormal and the task
    # leads (MiniLM, SST-2 and MRPC, 3 seeds: docs/methods.md, "Choices (AdaLoRA)")
    lora_start_gamma: ClassVar[float] = 0.03
    alpha: float = 32.0
    r_init: int = 12
    r_target: int = 8
    t_init: int | None = None  # None: 10% of total steps
    t_final: int | None = None  # None: 30% of total steps
    delta_t: int = 10

    def resolved_phases(self, total_steps: int) -> tuple[int, int]:
        t_init = self.t_init if self.t_init is not None else round(0.1 * total_steps)
        t_final = self.t_final if self.t_final is not None else round(0.3 * total_steps)
        return t_init, t_final

    def validate(self, total_steps: int | None) -> None:
        super().validate(total_steps)
        _positive("method.r_init", self.r_init)
        _non_negative("method.r_target", self.r_target)
        _positive("method.delta_t", self.delta_t)
        if self.r_target > self.r_init:
            raise ConfigError(
                f"method.r_target ({self.r_target}) exceeds method.r_init ({self.r_init}): AdaLoRA only "
                "prunes; raise r_init or lower r_target")
        for key in ("t_init", "t_final"):
            value = getattr(self, key)
            if value is not None:
                _non_negative(f"method.{key}", value)
        _require_total_steps(self.name, total_steps)
        t_init, t_final = self.resolved_phases(total_steps)
        if t_init + t_final >= total_steps:
            raise ConfigError(
                f"AdaLoRA needs t_init + t_final < total steps, got t_init={t_init} + t_final={t_final} "
                f">= {total_steps}: lower method.t_init / method.t_final or train for more steps")


@dataclass
class SoRAConfig(MethodConfig):
    """init "lora" (default): every gate starts at 1, so the adapter starts as a LoRA adapter of the same alpha
    and rank and every component learns at LoRA's pace; "paper": gates ~ N(0, 1), the papers' start. The
    default xi (3e-4, absolute) is below the official 1e-3, which shrinks a gate as fast as Adam moves it;
    `init=paper xi=1e-3` is the official code's SoRA (docs/methods.md, "Choices (SoRA)")."""

    name: str = "sora"
    r_max: int = 8
    init: str = "lora"
    xi: float = 3e-4  # proximal threshold at the start of training
    xi_end: float | None = None  # None: constant xi; else raised linearly over `xi_stages` stages
    xi_stages: int = 1
    xi_mode: str = "absolute"  # "absolute" (official code) or "lr" (paper: xi * gate learning rate)
    gate_lr: float | None = None  # None: the training learning rate
    l1: float = 0.0  # optional L1 penalty on the gates (official code's extra term)

    def validate(self, total_steps: int | None) -> None:
        super().validate(total_steps)
        _positive("method.r_max", self.r_max)
        _choice("method.init", self.init, INITS)
        _non_negative("method.xi", self.xi)
        _positive("method.xi_stages", self.xi_stages)
        _non_negative("method.l1", self.l1)
        _choice("method.xi_mode", self.xi_mode, ("absolute", "lr"))
        if self.xi_end is not None:
            _non_negative("method.xi_end", self.xi_end)
            _require_total_steps(self.name + " with xi_end", total_steps)
        if self.gate_lr is not None:
            _positive("method.gate_lr", self.gate_lr)


@dataclass
class IncreLoRAConfig(SVDFormConfig):
    name: str = "increlora"
    alpha: float = 8.0
    # with the default start, r_start components of scale alpha / r_start each: in all half a LoRA alpha-16
    # adapter's scale; the full scale diverged at 2.5x the recipe lr (docs/methods.md, "The stall")
    init_lam: float = 1.0
    r_start: int | None = None  # None: r_target // 2 (at least 1) with init "lora"; 1 (official) with "paper"
    r_target: int = 4  # average rank per module at the end of growth
    r_max: int = 12  # fixed capacity per module (active + reserve components)
    incre_rank: int | None = None  # components a module gains per event; None: r_target // 2, at least 1 (official)
    top_h: int = 6  # modules selected per growth event (official code's default)
    incre_interval: int | None = None  # None: spread growth evenly until 70% of training
    t_init: int | None = None  # warmup before growth; None: 10% of total steps
    restart_warmup: int | None = None  # None: incre_interval
    reserve_lam: float = 1e-5
    # "rebalance": an activated component's lam jumps to init_lam and its B column shrinks by the same factor
    # (B diag(lam) A unchanged), so it trains at the start components' pace; "reserve": lam grows from
    # reserve_lam, the official code's way (docs/methods.md, "Activation"). None: "rebalance" with init
    # "lora", "reserve" with "paper"
    activation: str | None = None
    score: str = "component"  # "component" (shard-friendly) or "dense" (official code, one process)
    scale_rule: str = "fixed"  # "fixed": alpha / r_start; "rank": alpha / current rank (official code)

    def resolved_incre_rank(self) -> int:
        return self.incre_rank if self.incre_rank is not None else max(1, self.r_target // 2)

    def resolved_r_start(self) -> int:
        """Start rank per module: as given, else half the target with the default start, 1 with the papers'."""
        if self.r_start is not None:
            return self.r_start
        return 1 if self.init == "paper" else max(1, self.r_target // 2)

    def resolved_activation(self) -> str:
        if self.activation is not None:
            return self.activation
        return "reserve" if self.init == "paper" else "rebalance"

    def validate(self, total_steps: int | None) -> None:
        super().validate(total_steps)
        for key in ("r_target", "r_max", "top_h"):
            _positive(f"method.{key}", getattr(self, key))
        for key in ("r_start", "incre_rank"):
            if getattr(self, key) is not None:
                _positive(f"method.{key}", getattr(self, key))
        incre_rank, r_start = self.resolved_incre_rank(), self.resolved_r_start()
        _choice("method.score", self.score, ("component", "dense"))
        _choice("method.scale_rule", self.scale_rule, ("fixed", "rank"))
        _choice("method.activation", self.resolved_activation(), ("rebalance", "reserve"))
        _non_negative("method.reserve_lam", self.reserve_lam)
        if self.r_target < r_start:
            raise ConfigError(f"method.r_target ({self.r_target}) < method.r_start ({r_start}): "
                              "IncreLoRA only grows")
        if self.r_max < r_start + incre_rank:
            raise ConfigError(
                f"method.r_max ({self.r_max}) must hold r_start + incre_rank reserve components "
                f"({r_start + incre_rank}); raise r_max")
        if self.r_target > self.r_max - incre_rank:
            raise ConfigError(
                f"method.r_target ({self.r_target}) cannot be reached with capacity r_max={self.r_max} "
                f"and incre_rank={incre_rank} reserves; raise r_max to at least "
                f"{self.r_target + incre_rank}")
        if self.incre_interval is not None:
            _positive("method.incre_interval", self.incre_interval)
        if self.restart_warmup is not None:
            _non_negative("method.restart_warmup", self.restart_warmup)
        _require_total_steps(self.name, total_steps)
        if self.t_init is not None and self.t_init >= total_steps:
            raise ConfigError(f"IncreLoRA t_init ({self.t_init}) >= total steps ({total_steps}): ranks would never "
                              "grow; lower method.t_init or train longer")


@dataclass
class PRILoRAConfig(MethodConfig):
    name: str = "prilora"
    r_first: int = 4  # rank of the first layer (r_s)
    r_last: int = 12  # rank of the last layer (r_f)
    prune_interval: int = 100
    prune_ratio: float = 0.5
    beta: float = 0.9  # EMA of the per-feature input norms

    def validate(self, total_steps: int | None) -> None:
        super().validate(total_steps)
        _positive("method.r_first", self.r_first)
        _positive("method.r_last", self.r_last)
        _positive("method.prune_interval", self.prune_interval)
        _beta("method.beta", self.beta)
        if not 0 <= self.prune_ratio < 1:
            raise ConfigError(f"method.prune_ratio must be in [0, 1), got {self.prune_ratio}")


METHOD_CONFIGS: dict[str, type[MethodConfig]] = {
    "lora": LoRAConfig,
    "adalora": AdaLoRAConfig,
    "sora": SoRAConfig,
    "increlora": IncreLoRAConfig,
    "prilora": PRILoRAConfig,
}


# ---------------------------------------------------------------------------------------------------
# Model, data, training
# ---------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Which model, and where adapters go."""

    name_or_path: str = "minilm"  # "minilm": the offline all-MiniLM-L6-v2 encoder; else hub name or dir
    num_labels: int | None = None  # None: from the task
    random_init: bool = False  # build from the config at name_or_path with random weights (tests, dry runs)
    quantization: str = "none"  # none | nf4 | fp4 | int8 (bitsandbytes; the base stays frozen)
    double_quant: bool = False  # 4-bit: quantize the quantization constants too

    def validate(self) -> None:
        _choice("model.quantization", self.quantization, ("none", "nf4", "fp4", "int8"))
    targets: list[str] | str | None = None  # suffix list or one regex; None: defaults per model type
    trainable: list[str] | None = None  # extra modules trained in full (task heads); None: auto


@dataclass
class DataConfig:
    task: str = "synthetic"  # synthetic | a GLUE task | chat | synthetic_chat
    data_dir: str | None = None  # GLUE: local glue_data folder (None: the hub)
    max_length: int = 32
    train_size: int = 2048  # generated tasks (synthetic, synthetic_chat)
    eval_size: int = 512  # generated tasks; chat data without an eval split: records held out (<= 10%)
    # chat (causal LM): a .json/.jsonl/.parquet file, a directory with train.<ext>, or a hub dataset name
    dataset: str | None = None
    eval_dataset: str | None = None  # None: the source's validation/test split, else held-out records
    messages_field: str = "messages"  # list of {role, content} (or ShareGPT {from, value}) turns
    prompt_field: str = "instruction"  # instruction-style records (Alpaca): prompt, optional input, response
    input_field: str | None = "input"
    response_field: str = "output"
    packing: bool = False  # concatenate conversations into full max_length rows

    def validate(self) -> None:
        _positive("data.max_length", self.max_length)
        _positive("data.train_size", self.train_size)
        _positive("data.eval_size", self.eval_size)
        if self.packing and self.task not in ("chat", "synthetic_chat"):
            raise ConfigError("data.packing applies to chat data (data.task=chat or synthetic_chat) only")


ENGINES = ("auto", "single", "ddp", "fsdp2", "fsdp1", "deepspeed")


@dataclass
class TrainConfig:
    output_dir: str = "runs/demo"
    lr: float = 1e-3  # the embedded demo's value (MiniLM, generated task); recipes set their own
    weight_decay: float = 0.0
    batch_size: int = 32  # global examples per optimizer step (all ranks, all micro-batches)
    grad_accum: int = 1
    total_steps: int | None = None  # None: from epochs
    epochs: float | None = 3.0  # used when total_steps is None
    warmup_steps: int = 10
    lr_schedule: str = "linear"  # after warmup: linear | cosine | constant
    eval_every: int = 0  # 0: only at the end
    save_every: int = 0  # 0: only at the end
    seed: int = 0
    log_every: int = 10
    # clip the global gradient norm of everything that trains to this before the scores see it (0: off)
    max_grad_norm: float = 0.0
    engine: str = "auto"  # auto | single | ddp | fsdp2 | fsdp1 | deepspeed
    deepspeed_config: str | None = None  # a ds_configs/*.json file ("auto" values filled from here)
    # FSDP: ranks each parameter is sharded over. 0: all ranks (full sharding), or the launcher's choice
    # (accelerate: FSDP1 HYBRID_SHARD, FSDP2 parallelism_config); a divisor of the world size >= 2: hybrid
    # sharding, shards within groups of that many consecutive ranks (one machine), replicas across groups
    fsdp_shard_size: int = 0
    precision: str = "fp32"  # fp32 | bf16 | fp16
    report_to: list[str] = field(default_factory=list)  # e.g. ["wandb"]
    # Activation checkpointing of the transformer blocks: false, true (= "non_reentrant"), "reentrant"
    gradient_checkpointing: bool | str = False
    # a collective that waits longer than this ends the job (a process hung or died)
    dist_timeout_minutes: float = 30.0

    def validate(self) -> None:
        if isinstance(self.gradient_checkpointing, str):
            _choice("train.gradient_checkpointing", self.gradient_checkpointing, ("non_reentrant", "reentrant"))
        _choice("train.engine", self.engine, ENGINES)
        _choice("train.precision", self.precision, ("fp32", "bf16", "fp16"))
        _choice("train.lr_schedule", self.lr_schedule, ("linear", "cosine", "constant"))
        _positive("train.lr", self.lr)
        _non_negative("train.weight_decay", self.weight_decay)
        _non_negative("train.max_grad_norm", self.max_grad_norm)
        _positive("train.batch_size", self.batch_size)
        _positive("train.grad_accum", self.grad_accum)
        _non_negative("train.warmup_steps", self.warmup_steps)
        _positive("train.dist_timeout_minutes", self.dist_timeout_minutes)
        _non_negative("train.fsdp_shard_size", self.fsdp_shard_size)
        for key in ("eval_every", "save_every", "log_every"):
            _non_negative(f"train.{key}", getattr(self, key))
        if self.total_steps is not None:
            _positive("train.total_steps", self.total_steps)
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"train.epochs must be > 0, got {self.epochs}")


@dataclass
class RunConfig:
    method: MethodConfig = field(default_factory=lambda: AdaLoRAConfig())
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "RunConfig":
        self.model.validate()
        self.data.validate()
        self.train.validate()
        self.method.validate(self.train.total_steps)
        if self.method.name == "prilora" and self.train.gradient_checkpointing == "reentrant":
            raise ConfigError("PRILoRA collects input statistics in the forward pass, which reentrant "
                              "checkpointing runs without gradients; use train.gradient_checkpointing=true "
                              "(non-reentrant)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------
# Building configs from dicts, YAML files and overrides
# ---------------------------------------------------------------------------------------------------


def method_config(name: str, **values: Any) -> MethodConfig:
    """The typed config of method `name`, with `values` checked against its fields."""
    if name not in METHOD_CONFIGS:
        raise ConfigError(f"unknown method {name!r}; choose one of {sorted(METHOD_CONFIGS)}")
    return _build(METHOD_CONFIGS[name], {**values, "name": name}, "method")


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    data = dict(data or {})
    unknown = set(data) - {f.name for f in dataclasses.fields(RunConfig)}
    if unknown:
        raise ConfigError(f"unknown config section(s) {sorted(unknown)}; valid: method, model, data, train")
    method_values = dict(data.get("method") or {})
    method = method_config(method_values.pop("name", "adalora"), **method_values)
    return RunConfig(
        method=method,
        model=_build(ModelConfig, data.get("model") or {}, "model"),
        data=_build(DataConfig, data.get("data") or {}, "data"),
        train=_build(TrainConfig, data.get("train") or {}, "train"),
    )


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML recipe (optional), apply `section.key=value` overrides, return the typed config."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. method.r_target=4")
        section, name = parts
        data.setdefault(section, {})
        data[section][name] = yaml.safe_load(raw)
    return config_from_dict(data)


def _build(cls: type, values: dict[str, Any], section: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ConfigError(f"unknown {section} option(s) {sorted(unknown)}; valid: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        values[key] = _coerce(f"{section}.{key}", value, hints[key])
    return cls(**values)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against a simple type hint; ints are accepted where floats are expected."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, _UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{key} may not be empty")
    for option in options:
        base = typing.get_origin(option) or option
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base is float and isinstance(value, str):
            try:
                return float(value)  # YAML reads "1e-3" as a string
            except ValueError:
                pass
        if base in (str, bool, list) and isinstance(value, base):
            return value
    names = [getattr(o, "__name__", str(o)) for o in options]
    raise ConfigError(f"{key} must be of type {' or '.join(names)}, got {value!r}")


_UnionType = type(int | None)


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key} must be > 0, got {value}")


def _non_negative(key: str, value: float) -> None:
    if value < 0:
        raise ConfigError(f"{key} must be >= 0, got {value}")


def _beta(key: str, value: float) -> None:
    if not 0 <= value < 1:
        raise ConfigError(f"{key} must be in [0, 1), got {value}")


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"{key} must be one of {list(options)}, got {value!r}")


def _require_total_steps(method: str, total_steps: int | None) -> None:
    if total_steps is None:
        raise ConfigError(f"{method} schedules its ranks over the run: set train.total_steps "
                          "(or train.epochs, from which the trainer derives it)")
