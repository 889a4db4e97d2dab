"""The experiment's one typed config tree: schema, loading, overrides, saving.

Everything past this module works with :class:`Config` objects; no other module
reads raw YAML or dicts. Defaults live here, once, with their units and intent.
Importing this module must stay cheap (no torch): the CLI validates a config
before it pays for the heavy imports.
"""

from __future__ import annotations

import collections.abc
import copy
import difflib
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from bnctl import normspec
from bnctl.errors import ConfigError

# Names accepted by each registry. The registries themselves live next to the
# code they build (data.DATASETS, norms.NORMS, models.MODELS, optim.OPTIMIZERS,
# optim.SCHEDULERS); tests check that both lists agree.
DatasetName = Literal["synthetic", "cifar10", "imagefolder"]
ModelName = Literal["seed_cnn", "vgg", "resnet20"]
NormName = Literal["batch", "batch_manual", "ghost", "noisy_batch", "group", "layer", "instance", "none"]
InitName = Literal["default", "kaiming", "xavier", "normal"]
OptimizerName = Literal["adam", "adamw", "sgd"]
SchedulerName = Literal["none", "cosine", "step", "onecycle"]
Precision = Literal["fp32", "bf16", "fp16"]
Augment = Literal["none", "crop_flip"]
DistBN = Literal["broadcast", "reduce", "none"]

# The only keys a resumed run may change: anything else would not reproduce the run.
# train.tensorboard only adds a view of the same numbers (and older checkpoints predate the key).
RESUMABLE_KEYS = frozenset({"train.epochs", "device", "train.tensorboard"})

BATCH_STAT_NORMS = normspec.BATCH_STAT_NORMS  # norms that normalize with batch statistics

PositiveFloat = Field(gt=0)

# torch.manual_seed, torch.Generator and numpy's generators all accept any seed in this range.
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]
Beta = Annotated[float, Field(ge=0, lt=1)]  # an Adam decay rate: 1 would never forget, above 1 diverges

ShortcutName = Literal["zero_pad", "projection"]

# Keys that only mean something for some models: set to anything but their default with another
# model they would be silently ignored, so validation refuses them. (section, key) -> models.
MODEL_SPECIFIC_KEYS: dict[tuple[str, str], frozenset[str]] = {
    ("model", "depth"): frozenset({"vgg", "resnet20"}),
    ("model", "fc_norm"): frozenset({"seed_cnn"}),
    ("model", "shortcut"): frozenset({"resnet20"}),
}

# Every key that is read only for some values of another (model-specific keys, and normspec's keys of
# norms, inits, optimizers and schedules): dotted key -> (the deciding key, the values that read it).
KEY_APPLIES: dict[str, tuple[str, frozenset[str]]] = {
    **{f"{section}.{key}": ("model.name", models) for (section, key), models in MODEL_SPECIFIC_KEYS.items()},
    **normspec.KEY_APPLIES,
}
_CHOICE_NOUN = {"model.name": "model", "model.norm": "norm", "model.init": "initialization",
                "optimizer.name": "optimizer", "scheduler.name": "schedule"}


class _Section(BaseModel):
    """Base for every section: unknown keys are errors, assignments re-validate, floats must be finite."""

    # allow_inf_nan=False: a NaN mean or an infinite lr would only surface later as a "diverged" run.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Section):
    name: DatasetName = "synthetic"
    root: str = "./data"  # cifar10: folder holding cifar-10-batches-py/; imagefolder: holds train/ and test/
    download: bool = False  # cifar10 only; needs network access
    train_size: int = Field(5000, ge=10)  # synthetic only: images generated for training
    test_size: int = Field(1000, ge=10)  # synthetic only: images generated for testing
    synthetic_seed: Seed = 0  # synthetic only: the dataset's own seed, independent of the run's seed
    train_limit: Optional[int] = Field(None, ge=1)  # train on a fixed random subset of N images (seeded, not the first N)
    test_limit: Optional[int] = Field(None, ge=1)  # evaluate on a fixed random subset of N test images (as train_limit)
    image_size: int = Field(32, ge=8)  # imagefolder: images are resized to this square size
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per-channel normalization, on the 0..1 scale
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    augment: Augment = "none"  # crop_flip: random 4-pixel-padded crop + horizontal flip, on device

    @model_validator(mode="after")
    def _std_positive(self) -> "DataConfig":
        if any(s <= 0 for s in self.std):
            raise ValueError(f"data.std must be > 0 in every channel, got {list(self.std)}")
        return self


class ModelConfig(_Section):
    name: ModelName = "seed_cnn"
    norm: NormName = "batch"
    width: float = Field(1.0, gt=0)  # channel multiplier (1.0 = the published widths)
    depth: Optional[int] = Field(None, ge=1)  # None = standard depth; vgg: 11|13|16|19 (11); resnet20: 6n+2 (20)
    fc_norm: bool = True  # seed_cnn: normalize the hidden fully connected layer too (as the notebook does)
    shortcut: ShortcutName = "zero_pad"  # resnet20: zero_pad = He et al.'s parameter-free option A; projection = 1x1 conv + norm (B)
    virtual_batch_size: int = Field(8, ge=2)  # ghost: samples per virtual batch (below train.batch_size)
    groups: int = Field(8, ge=1)  # group: channel groups per GroupNorm
    # noisy_batch: each step, each channel's noise gets a mean ~ U(-bn_noise_mean, bn_noise_mean) and a
    # standard deviation ~ U(0, bn_noise_std), in units of BN's output (norms.NoisyBatchNorm, docs/landscape.md)
    bn_noise_mean: float = Field(0.5, ge=0)
    bn_noise_std: float = Field(1.0, ge=0)
    bn_momentum: Optional[float] = Field(0.1, ge=0, le=1)  # PyTorch convention: new = (1-m)*old + m*batch; None = cumulative average
    bn_eps: float = Field(1e-5, gt=0)  # added to the variance before the square root
    bn_affine: bool = True  # learn the scale (gamma) and shift (beta)
    bn_track_running_stats: bool = True  # False: eval mode uses batch statistics too
    init: InitName = "default"  # default = PyTorch's own layer initialization
    init_std: float = Field(0.02, gt=0)  # init=normal: standard deviation of the weights
    init_scale: float = Field(1.0, gt=0)  # multiplies every conv/linear weight after init (sensitivity studies)
    dropout: float = Field(0.0, ge=0, lt=1)  # dropout probability before the last layer


class OptimizerConfig(_Section):
    name: OptimizerName = "adam"
    lr: float = Field(1e-3, gt=0)  # peak learning rate (onecycle's max_lr)
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd only
    nesterov: bool = False  # sgd only
    betas: tuple[Beta, Beta] = (0.9, 0.999)  # adam/adamw only; each in [0, 1)
    weight_decay: float = Field(0.0, ge=0)  # on conv/linear parameters
    norm_weight_decay: float = Field(0.0, ge=0)  # on normalization scales and shifts (decaying them is rarely wanted)

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> "OptimizerConfig":
        if self.name == "sgd" and self.nesterov and self.momentum == 0:
            raise ValueError("optimizer.nesterov needs optimizer.momentum > 0")
        return self


class SchedulerConfig(_Section):
    name: SchedulerName = "none"  # stepped once per training step, not per epoch
    step_size: int = Field(30, ge=1)  # step: epochs between decays
    gamma: float = Field(0.1, gt=0, le=1)  # step: decay factor
    warmup_pct: float = Field(0.3, gt=0, lt=1)  # onecycle: fraction of steps spent warming up
    min_lr: float = Field(0.0, ge=0)  # cosine: final learning rate


class LandscapeConfig(_Section):
    """Loss-landscape and internal-covariate-shift probes (landscape.py, docs/landscape.md)."""

    every: int = Field(0, ge=0)  # training steps between probes (step 0 is probed); 0 = off
    # Step sizes, as multiples of the direction: direction=update moves by c times the update the
    # optimizer makes this step; direction=gradient by c*lr*g (lr of this step, g the batch gradient).
    scales: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    direction: Literal["update", "gradient"] = "update"
    ics: bool = True  # also Santurkar's internal covariate shift per layer (one extra pass per layer)

    @field_validator("scales")
    @classmethod
    def _positive_scales(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(c <= 0 for c in v):
            raise ValueError(f"train.landscape.scales must be one or more step sizes > 0, got {list(v)}")
        return v


class TrainConfig(_Section):
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(64, ge=1)  # the incomplete last training batch is dropped (BN needs >1 sample)
    eval_batch_size: int = Field(1000, ge=1)
    precision: Precision = "fp32"  # bf16: autocast on CPU or CUDA; fp16: CUDA only, with a gradient scaler
    channels_last: bool = True  # NHWC memory layout: 1.4x faster CPU training at batch 4 (bench/RESULTS.md)
    compile: bool = False  # torch.compile the model (slow first epoch, faster after)
    # CUDA only (the CPU ignores both; run.json records what was in force):
    cudnn_benchmark: bool = False  # let cuDNN time its kernels per shape: faster at fixed shapes, but the chosen
    #                                kernels (and the last bits of every number) may differ from run to run
    tf32: bool = False  # TensorFloat-32 matmuls/convolutions on Ampere+: ~2-8x faster fp32 work, ~1e-3 relative
    #                     error; false keeps "fp32" meaning fp32, as on the CPU
    eval_train: bool = False  # add a clean eval-mode pass over the training set (clean_train_* columns)
    diagnostics: bool = False  # record BN statistics to diagnostics.csv
    diagnostics_every: int = Field(50, ge=1)  # steps between diagnostic samples
    # Under torchrun (several processes) only; one process ignores both. batch_size stays the global batch.
    sync_bn: bool = True  # BN statistics over the global batch (results independent of the process count);
    #                       false: each process normalizes its own slice = ghost BN, virtual batch batch_size/N
    dist_bn: DistBN = "reduce"  # unsynchronized BN's running stats at each epoch end: average over processes
    #                             (reduce), rank 0's (broadcast), or left per process (none)
    tensorboard: bool = False  # also write TensorBoard event files into the run directory (extra: tensorboard)
    landscape: LandscapeConfig = LandscapeConfig()  # loss-landscape and ICS probes into landscape.csv (off)


class Config(_Section):
    name: str = Field("experiment", min_length=1)  # letters, digits, _ . - (it becomes part of a folder name)
    seed: Seed = 0  # 0 .. 2**63-1
    device: str = "auto"  # auto: cuda, then mps, then cpu; or cpu, mps, cuda, cuda:N
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    train: TrainConfig = TrainConfig()

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", v):
            raise ValueError("name may contain only letters, digits, '_', '.' and '-' (it names the run's folder)")
        return v

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v):
            raise ValueError("device must be one of auto, cpu, cuda, cuda:N (N = GPU index) or mps")
        return v

    @model_validator(mode="after")
    def _keys_apply(self) -> "Config":
        for key, value, choice, chosen, applies in not_applying(self):
            raise ValueError(
                f"{key}={value!r} does not apply to {choice}={chosen} (only to {', '.join(sorted(applies))}) and "
                f"would be ignored; remove it or choose such a{'n' if _CHOICE_NOUN[choice][0] in 'aeiou' else ''} "
                f"{_CHOICE_NOUN[choice]}")
        return self

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> "Config":
        if self.model.norm in BATCH_STAT_NORMS and self.train.batch_size == 1:
            raise ValueError(
                f"train.batch_size=1 cannot train with model.norm={self.model.norm}: batch normalization "
                "estimates each channel's mean and variance from the batch, and one sample has no variance "
                "at the fully connected layer. Use batch_size >= 2 or a per-sample norm (group, layer)."
            )
        if self.model.norm == "ghost" and self.model.virtual_batch_size >= self.train.batch_size:
            raise ValueError(
                f"model.norm=ghost with model.virtual_batch_size={self.model.virtual_batch_size} >= "
                f"train.batch_size={self.train.batch_size} normalizes each batch as one, which is plain batch "
                "norm; choose a virtual_batch_size below the batch size"
            )
        if self.scheduler.name == "cosine" and self.scheduler.min_lr > self.optimizer.lr:
            raise ValueError(f"scheduler.min_lr={self.scheduler.min_lr:g} is above optimizer.lr="
                             f"{self.optimizer.lr:g}; the cosine schedule decays from lr down to min_lr")
        if self.model.norm == "ghost" and self.train.batch_size % self.model.virtual_batch_size == 1:
            raise ValueError(
                f"train.batch_size={self.train.batch_size} leaves a ghost batch of one sample with "
                f"model.virtual_batch_size={self.model.virtual_batch_size}; choose sizes that divide evenly"
            )
        if batch_stats_at_eval(self) and self.train.eval_batch_size == 1:
            raise ValueError(
                f"train.eval_batch_size=1 cannot evaluate model.norm={self.model.norm} with "
                "model.bn_track_running_stats=false: without running estimates, eval mode normalizes with "
                "each test batch's statistics, and one image has no variance. Use eval_batch_size >= 2.")
        # A run moved to another device (eval --device, resume device=...) adapts its precision in
        # experiment.setup and says so; a new run asking for the impossible is refused here.
        moved = bool(info.context and info.context.get("moved"))
        if self.train.precision == "fp16" and not self.device.startswith("cuda") and not moved:
            if self.device != "auto":
                raise ValueError("train.precision=fp16 needs a CUDA device; use bf16 on CPU")
        return self


def not_applying(cfg: Config) -> list[tuple[str, Any, str, Any, frozenset[str]]]:
    """Keys set to something other than their default that this config never reads:
    (key, value, the deciding key, its value, the values that would read it) each."""
    out = []
    for key, (choice, applies) in KEY_APPLIES.items():
        chosen = _get(cfg, choice)
        if chosen not in applies:
            section, leaf = key.split(".")
            part = getattr(cfg, section)
            value = getattr(part, leaf)
            if value != type(part).model_fields[leaf].default:
                out.append((key, value, choice, chosen, applies))
    return out


def _get(cfg: Config, dotted: str) -> Any:
    section, leaf = dotted.split(".")
    return getattr(getattr(cfg, section), leaf)


def batch_stats_at_eval(cfg: Config) -> bool:
    """Whether the model normalizes with batch statistics even in eval mode (no running estimates)."""
    return cfg.model.norm in BATCH_STAT_NORMS and not cfg.model.bn_track_running_stats


# ---------------------------------------------------------------- loading

def _origin(key: str, origins: dict[str, str]) -> str | None:
    """Where the value at a dotted error location came from, when an override set it (or its section)."""
    for dotted, where in origins.items():
        if dotted == key or dotted.startswith(key + ".") or key.startswith(dotted + "."):
            return where
    return None


def _format_validation_error(err: ValidationError, source: str, origins: dict[str, str] | None = None) -> str:
    lines, from_overrides = [], 0
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "config"
        where = _origin(key, origins or {}) if e["loc"] else None
        from_overrides += where is not None
        tail = f" (from {where})" if where else ""
        if e["type"] == "extra_forbidden":
            parent, _, leaf = key.rpartition(".")
            lines.append(f"  {key}: unknown key{_suggest_key(leaf, parent)}{tail}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "model_type":  # pydantic names its class; the user wrote a scalar where a section goes
                msg = f"must be a section of keys (e.g. '{key}:' followed by indented 'name: ...' lines)"
            got = f" (got {e['input']!r})" if _short(e.get("input")) else ""
            hint = ""
            if e["type"] == "literal_error" and isinstance(e.get("input"), str):
                hint = _suggest(e["input"], [str(c) for c in _literal_choices(e["loc"])])
            lines.append(f"  {key}: {msg}{got}{hint}{tail}")
    if lines and from_overrides == len(lines):  # every problem is in an override, none in the file
        head = f"invalid override for config {source}:" if source else "invalid override:"
    else:
        head = f"invalid config {source}:".replace(" :", ":")
    return "\n".join([head] + lines)


def _short(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool)) and len(repr(value)) < 60


def _section_fields(parent: str) -> list[str]:
    model: type[BaseModel] = Config
    for part in [p for p in parent.split(".") if p]:
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return list(model.model_fields)


def _literal_choices(loc: tuple) -> tuple:
    """The allowed values of the Literal-typed field at a validation error's location."""
    model: type[BaseModel] = Config
    annotation: Any = None
    for part in loc:
        field = model.model_fields.get(str(part)) if model is not None else None
        if field is None:
            return ()
        annotation = field.annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return typing.get_args(annotation) if typing.get_origin(annotation) is Literal else ()


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


# Names other tools use for bnctl's keys: offered as suggestions for an unknown key, never accepted as
# aliases (one spelling per key keeps configs and sweeps comparable).
SYNONYMS: dict[str, tuple[str, ...]] = {
    "lr": ("learning_rate", "learningrate", "lrate", "base_lr", "max_lr", "peak_lr"),
    "weight_decay": ("wd", "l2", "decay", "l2_reg"),
    "epochs": ("num_epochs", "n_epochs", "max_epochs", "epoch", "nepochs"),
    "batch_size": ("bs", "batch", "batchsize", "train_batch_size", "mini_batch_size", "minibatch_size"),
    "eval_batch_size": ("test_batch_size", "val_batch_size", "eval_bs", "test_bs"),
    "optimizer": ("optim", "optimiser", "opt", "solver"),
    "scheduler": ("lr_scheduler", "sched", "schedule", "lr_schedule"),
    "data": ("dataset", "datasets"),
    "name": ("arch", "architecture", "network", "net", "model_name", "type"),
    "norm": ("normalization", "normalisation", "norm_layer", "normalization_layer", "bn", "norm_type"),
    "bn_eps": ("eps", "epsilon"),
    "bn_momentum": ("momentum",),
    "bn_affine": ("affine",),
    "bn_track_running_stats": ("track_running_stats",),
    "groups": ("num_groups", "n_groups", "gn_groups"),
    "virtual_batch_size": ("ghost_batch_size", "vbs", "ghost_size"),
    "dropout": ("drop_rate", "dropout_rate", "p_dropout", "drop"),
    "width": ("width_multiplier", "width_mult", "width_factor"),
    "precision": ("amp", "dtype", "mixed_precision"),
    "seed": ("random_seed", "rng_seed", "manual_seed"),
    "warmup_pct": ("warmup", "pct_start", "warmup_fraction"),
    "min_lr": ("eta_min", "final_lr", "lr_min"),
    "step_size": ("step", "lr_step", "decay_every"),
    "gamma": ("lr_decay", "decay_rate"),
    "root": ("data_dir", "data_root", "path", "dir", "datadir"),
    "augment": ("augmentation", "augmentations", "aug"),
    "tensorboard": ("use_tensorboard", "tb"),
}
_SYNONYM_OF = {alias: key for key, aliases in SYNONYMS.items() for alias in aliases}


def _suggest_key(leaf: str, parent: str) -> str:
    """'; did you mean ...?' for an unknown key: the bnctl name of a common synonym (learning_rate -> lr)
    or a close spelling in the same section, else the same key (or synonym) in another section."""
    here = _section_fields(parent)
    word = leaf.lower()
    target = _SYNONYM_OF.get(word, word)
    if target in here and target != leaf:
        return f"; did you mean '{target}'?"
    close = _suggest(leaf, here)
    if close:
        return close
    elsewhere = [f"{section}.{target}" for section, field in Config.model_fields.items()
                 if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
                 and section != parent and target in field.annotation.model_fields]
    if target in Config.model_fields and parent:
        elsewhere.append(target)
    return f"; did you mean '{elsewhere[0]}'?" if len(elsewhere) == 1 else ""


def validate(raw: Any, source: str = "", moved: bool = False, origins: dict[str, str] | None = None) -> Config:
    """Validate a raw mapping into a Config, raising ConfigError with dotted keys.

    ``moved``: the config of an existing run continued or evaluated on another device, whose
    precision experiment.setup adapts (fp16 exists only on CUDA), so it is not refused here.
    ``origins``: dotted keys set by overrides -> where each came from ("the command line:
    optimizer.lr=0.01"), so that an error in one names it instead of blaming the file.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {source} must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw, context={"moved": moved})
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source, origins)) from None


def command_line_origins(items: list[str]) -> dict[str, str]:
    """{dotted key: 'the command line: KEY=VALUE'} for validate's ``origins``."""
    return {item.partition("=")[0].strip(): f"the command line: {item}" for item in items}


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader (plain data only, never Python objects) that also refuses duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, collections.abc.Hashable):
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key must be a plain name, not a {type(key).__name__} ({key!r})",
                    key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (the second would silently win)", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _where(err: yaml.MarkedYAMLError) -> str:
    mark = err.problem_mark or err.context_mark
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""


def read_yaml(path: Path) -> Any:
    """Read a YAML file with the safe loader, turning every failure into a ConfigError."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if path.is_dir():
        raise ConfigError(f"config path is a directory, not a YAML file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"cannot read config {path}: it is not UTF-8 text (a YAML file is expected)") from None
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror or err}") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.constructor.ConstructorError as err:
        problem = err.problem or ""
        if "constructor for the tag" in problem:
            quoted = re.search(r"'([^']*)'", problem)
            tag = quoted.group(1).replace("tag:yaml.org,2002:", "!!") if quoted else "(unknown)"
            problem = (f"the tag {tag} is not allowed; bnctl configs hold plain values only "
                       "(YAML is read with the safe loader, which never builds Python objects)")
        raise ConfigError(f"invalid YAML in {path}{_where(err)}: {problem}") from None
    except yaml.MarkedYAMLError as err:
        raise ConfigError(f"YAML syntax error in {path}{_where(err)}: {err.problem}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"YAML error in {path}: {str(err).splitlines()[0]}") from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ['optimizer.lr=0.01', ...] into {'optimizer.lr': 0.01}, values as YAML scalars."""
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override '{item}' must look like KEY=VALUE, e.g. optimizer.lr=0.01")
        if not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part) for part in key.split(".")):
            raise ConfigError(f"override '{item}': '{key}' is not a config key; keys look like "
                              "section.key, e.g. optimizer.lr=0.01 or train.epochs=5")
        try:
            parsed[key] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"override '{item}': cannot parse the value '{text}'") from None
    return parsed


def _merge_into(node: dict[str, Any], key: str, value: Any) -> None:
    """node[key] = value, except that a mapping given for a section merges into it key by key."""
    if isinstance(value, dict) and isinstance(node.get(key), dict):
        for sub, sub_value in value.items():
            _merge_into(node[key], str(sub), sub_value)
    else:
        node[key] = copy.deepcopy(value)


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a raw config mapping; unknown keys are caught by validation.

    A whole section given as a mapping (model={norm: none}, or `model: {norm: none}` in a sweep
    file's fixed) sets the keys it names and keeps the section's others, as model.norm=none would:
    replacing the section would silently reset every key it leaves out to its default.
    """
    for key, value in overrides.items():
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key}: '{part}' is not a section")
            node = child
        _merge_into(node, parts[-1], value)
    return raw


class SlurmConfig(_Section):
    """A sweep file's `slurm:` section: the job array `bnctl sweep --launcher slurm` submits (options override it)."""

    partition: Optional[str] = None  # Slurm partition (None: the cluster's default)
    time_min: int = Field(60, ge=1)  # wall-time limit of each array task, in minutes
    cpus_per_run: int = Field(2, ge=1)  # CPU cores of each task; a task trains one run at a time
    gpus_per_run: int = Field(0, ge=0)  # GPUs of each task (0: CPU-only runs)
    mem_gb: Optional[float] = Field(None, gt=0)  # memory of each task (None: the partition's default)
    parallelism: int = Field(16, ge=1)  # array tasks running at once (sbatch --array=0-N%parallelism)
    tasks: Optional[int] = Field(None, ge=1)  # array tasks; task i runs shard i/tasks (None: one task per run)
    setup: list[str] = []  # shell lines each task runs first (module load ..., source .venv/bin/activate)


def load(path: Path | None, overrides: list[str] | None = None, moved: bool = False) -> Config:
    """Load a YAML config (or the defaults when path is None), apply overrides and validate (see validate)."""
    raw = read_yaml(path) if path is not None else {}
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, got {type(raw).__name__}")
    if moved:
        upgrade_stored(raw)  # an existing run's config.yaml, perhaps written by an older bnctl
    raw = apply_overrides(raw, parse_overrides(overrides or []))
    return validate(raw, str(path) if path else "", moved=moved, origins=command_line_origins(overrides or []))


def upgrade_stored(raw: Any) -> Any:
    """A config stored by an older bnctl, completed so that it rebuilds the model that bnctl trained."""
    model = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(model, dict):
        return raw
    if model.get("name") == "resnet20" and "shortcut" not in model:
        model["shortcut"] = "projection"  # resnet20's only shortcut before model.shortcut existed
    # Older versions accepted keys that do not apply (model.depth for seed_cnn, optimizer.momentum for
    # adam) and ignored them: their defaults build and train the same run.
    reset_not_applying(raw)
    return raw


def reset_not_applying(raw: dict[str, Any], keep: collections.abc.Container[str] = ()) -> list[str]:
    """Set every key of a raw config that this config would not read back to its default (keys in keep
    excepted; validation refuses those); returns the keys reset. A sweep's fixed key that applies to
    some cells only is dropped this way from the others, so that their stored config claims nothing."""
    reset = []
    for key, (choice, applies) in KEY_APPLIES.items():
        section, leaf = key.split(".")
        part = raw.get(section)
        if key in keep or not isinstance(part, dict) or leaf not in part:
            continue
        choice_section, choice_leaf = choice.split(".")
        chosen = raw.get(choice_section)
        chosen = chosen.get(choice_leaf, default_of(choice)) if isinstance(chosen, dict) else default_of(choice)
        default = default_of(key)
        value = list(part[leaf]) if isinstance(part[leaf], (list, tuple)) else part[leaf]
        if isinstance(chosen, str) and chosen not in applies and value != (
                list(default) if isinstance(default, tuple) else default):
            part[leaf] = default
            reset.append(key)
    return reset


def default_of(dotted: str) -> Any:
    """The default value of a dotted section.key."""
    section, leaf = dotted.split(".")
    return getattr(Config.model_fields[section].default, leaf)


def to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain YAML/JSON-safe types (for run dirs and checkpoints)."""
    return cfg.model_dump(mode="json")


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; used to show how runs differ."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out
