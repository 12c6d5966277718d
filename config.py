"""Training configuration: one dataclass per section of a stage YAML (model, data, training, loss, checkpoint,
eval, wandb), loaded and checked before any work starts.

The defaults live only here. A YAML key the dataclass does not have, a value of the wrong type, or a required
path that does not exist stops the run with a message naming the key and the file. `--set section.key=value`
overrides a loaded value (the value is parsed as YAML, so `--set training.lr_llm=1e-5` is a float).
"""

import argparse
import dataclasses
import difflib
import json
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Optional, Union

import yaml

from data import LOSS_TYPES
from distributed import DEVICES, DTYPES
from frames import FRAME_SAMPLING
from model import MODES, ModelSettings
from schedule import SCHEDULES

Paths = Union[str, list]  # shards: one name, glob, brace pattern or URL, or a list of them (shards.py)


@dataclass
class ModelConfig(ModelSettings):
    """The model's settings (model.ModelSettings: llm, dino, their configs, query_dim, visual_scale, deep_query,
    lambda_coarse) and how training uses the model."""

    tokenizer: Optional[str] = None  # default: llm, else init_from
    mode: str = "coarse_fine"  # forward mode for training and validation
    gradient_checkpointing: bool = False
    init_from: Optional[str] = None  # a checkpoint folder (save_pretrained layout) to start from
    freeze_dino: bool = False
    freeze_llm: bool = False
    freeze_connector: bool = False


@dataclass
class DataConfig:
    train_shards: Optional[Paths] = None
    val_shards: Optional[Paths] = None
    text_shards: Optional[Paths] = None
    text_ratio: float = 0.0  # fraction of batches that are text-only retention batches
    max_frames: int = 64
    frame_size: int = 224
    num_workers: int = 2
    prefetch_factor: int = 2
    replicate_image_frames: int = 1  # images become this many identical frames (8 in stages 2-3)
    max_text_tokens: int = 1024
    max_total_frames: Optional[int] = None  # cap on the padded frames of a batch (long videos -> smaller batches)
    frame_sampling: str = "uniform"  # beyond max_frames at sample_fps: "uniform" over the video, or the "head"
    sample_fps: float = 1.0
    shuffle_buffer: int = 100  # training: samples shuffled in a buffer before decoding
    resampled: bool = False  # training: each rank/worker draws shards with replacement (fewer or uneven shards)
    # Prompts (tokenization.py): the system turn every conversation starts with (null: the LLM template's
    # own default, this project's behaviour before it followed the original recipe), the user prompt of
    # caption-only samples by their json `source` (null: the original's table; a sample's own `user` text
    # wins), and `prompt`, which when set replaces the per-source prompt for every caption-only sample.
    system_prompt: Optional[str] = "You are a helpful AI assistant."
    caption_prompts: Optional[dict] = None
    prompt: Optional[str] = None


@dataclass
class TrainingConfig:
    total_samples: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    lr_connector: float = 1e-4
    lr_dino: float = 1e-5
    lr_llm: float = 1e-5
    target_lr: Optional[float] = None  # converging schedule: every group ends here
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.1  # cosine schedule floor, as a fraction of each group's peak LR
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    schedule: str = "cosine"  # cosine | constant | converging
    dtype: str = "auto"  # autocast: auto (bfloat16 on CUDA, float32 on the CPU) | bfloat16 | float16 | float32
    threads: Optional[int] = None  # torch's CPU threads; None = distributed.default_threads()
    compile: bool = False
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 10
    max_nonfinite_steps: int = 5  # this many skipped (non-finite) steps in a row stop the run


@dataclass
class LossConfig:
    type: str = "text_ce_all"  # text_ce_all | text_ce_answer_only | dpo
    beta: float = 0.1  # DPO temperature


@dataclass
class CheckpointConfig:
    save_dir: str = "checkpoints/run"
    save_every_steps: int = 1000
    keep_last: int = 2
    keep_best: int = 1
    metric: str = "val_loss"  # val_loss | train_loss; lower is better
    resume: str = "auto"  # auto (latest in save_dir, if any) | none | a checkpoint folder


@dataclass
class EvalConfig:
    every_steps: int = 0  # 0 = no validation
    max_samples: int = 1000
    modes: Optional[list] = None  # validation loss also in these modes (val_loss_<mode>); val_loss is model.mode's


@dataclass
class WandbConfig:
    project: str = "fvlm"
    run_name: Optional[str] = None
    mode: str = "disabled"  # online | offline | disabled


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    stage: Optional[int] = None  # informational

    def to_dict(self):
        return dataclasses.asdict(self)


CHOICES = {
    "model.mode": MODES,
    "eval.modes": MODES,  # each item of the list
    "data.frame_sampling": FRAME_SAMPLING,
    "training.schedule": SCHEDULES,
    "training.dtype": DTYPES,
    "training.device": DEVICES,
    "loss.type": LOSS_TYPES,
    "checkpoint.metric": ("val_loss", "train_loss"),
    "wandb.mode": ("online", "offline", "disabled"),
}


MINIMUM = {  # values with a floor (a batch of 0 would divide by zero, a sample_fps of 0 too, before any work)
    "data.max_frames": 1, "data.frame_size": 1, "data.num_workers": 0, "data.prefetch_factor": 1,
    "data.replicate_image_frames": 1, "data.max_text_tokens": 1, "data.max_total_frames": 1,
    "data.shuffle_buffer": 1, "training.total_samples": 1, "training.batch_size": 1, "training.grad_accum": 1,
    "training.threads": 1, "training.log_every": 1, "training.max_nonfinite_steps": 1,
    "checkpoint.save_every_steps": 1, "checkpoint.keep_last": 1, "checkpoint.keep_best": 0, "eval.every_steps": 0,
    "eval.max_samples": 1, "data.sample_fps": 1e-3,
}


class ConfigError(ValueError):
    pass


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-5` as a float (YAML 1.1 wants `1.0e-5`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _type_ok(value, tp):
    if tp is typing.Any:
        return True
    origin = typing.get_origin(tp)
    if origin is Union:
        return any(_type_ok(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, tp)


def _type_name(tp):
    if typing.get_origin(tp) is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return {type(None): "null", list: "list of str"}.get(tp, getattr(tp, "__name__", str(tp)))


def _section(cls, values, name, source):
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: section '{name}' must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key not in hints:
            known = ", ".join(hints)
            raise ConfigError(f"{source}: unknown key '{name}.{key}' (known keys of '{name}': {known})")
        if not _type_ok(value, hints[key]):
            raise ConfigError(f"{source}: '{name}.{key}' must be {_type_name(hints[key])}, "
                              f"got {type(value).__name__} {value!r}")
        choices = CHOICES.get(f"{name}.{key}")
        items = value if isinstance(value, list) else [value]  # eval.modes: each item is a choice
        if choices and value is not None and any(v not in choices for v in items):
            raise ConfigError(f"{source}: '{name}.{key}' must be one of {choices}, got {value!r}")
        low = MINIMUM.get(f"{name}.{key}")
        if low is not None and value is not None and value < low:
            raise ConfigError(f"{source}: '{name}.{key}' must be at least {low}, got {value!r}")
    floats = {k: float(v) for k, v in values.items() if type(v) is int and _type_ok(1.5, hints[k])}
    return cls(**{**values, **floats})


def from_dict(raw, source="<dict>"):
    """Build a checked Config from a nested dict; `source` names the file in error messages."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config must be a mapping of sections")
    sections = {f.name: f for f in dataclasses.fields(Config)}
    kwargs = {}
    for name, values in raw.items():
        if name not in sections:
            raise ConfigError(f"{source}: unknown section '{name}' (known: {', '.join(sections)})")
        if name == "stage":
            if not (values is None or _type_ok(values, int)):
                raise ConfigError(f"{source}: 'stage' must be int, got {type(values).__name__} {values!r}")
            kwargs[name] = values
        else:
            kwargs[name] = _section(sections[name].default_factory, values or {}, name, source)
    return Config(**kwargs)


def apply_overrides(raw, overrides):
    """`section.key=value` strings into the nested dict (values parsed as YAML)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        section = raw.setdefault(parts[0], {})
        if not isinstance(section, dict):
            raise ConfigError(f"--set {item!r}: '{parts[0]}' is not a section")
        section[parts[1]] = yaml.load(value, Loader=_Loader)
    return raw


def globs(value):
    return [value] if isinstance(value, str) else list(value or [])


def check_paths(cfg, source):
    """Every local shard name or glob must match a file (URLs and pipe: commands are opened when read) and
    init_from must be a folder: fail before any work."""
    from shards import expand_shards  # imports webdataset (and torch): only when a config is checked

    for key in ("train_shards", "val_shards", "text_shards"):
        patterns = globs(getattr(cfg.data, key))
        try:
            if patterns:
                expand_shards(patterns)
        except FileNotFoundError as e:
            raise ConfigError(f"{source}: 'data.{key}': {e}") from None
    init = cfg.model.init_from
    if init is not None and not os.path.isdir(init):
        raise ConfigError(f"{source}: 'model.init_from' does not exist: {init}")
    if cfg.loss.type == "dpo" and init is None:
        raise ConfigError(f"{source}: 'model.init_from' is required for loss.type dpo (the frozen reference)")
    if not cfg.data.train_shards:
        raise ConfigError(f"{source}: 'data.train_shards' is required")
    if init is None and not (cfg.model.llm or cfg.model.llm_config):
        raise ConfigError(f"{source}: 'model.llm' (or model.llm_config) is required without model.init_from")
    if not tokenizer_name(cfg):
        raise ConfigError(f"{source}: 'model.tokenizer' is required when neither model.llm nor model.init_from is set")


def check_backbone_configs(cfg, source):
    """model.llm_config / dino_config: every key must be one of its transformers config's (transformers keeps a
    mistyped key as an inert attribute and builds the default size)."""
    from pretrained import config_keys

    for key, default_type in (("llm_config", "llama"), ("dino_config", "dinov2")):
        given = getattr(cfg.model, key) or {}
        model_type = given.get("model_type", default_type)
        try:
            known = config_keys(model_type) if given else set()
        except ValueError as e:  # an unknown model_type
            raise ConfigError(f"{source}: 'model.{key}.model_type': {e}") from None
        for name in sorted(set(given) - known - {"model_type"}):
            guess = difflib.get_close_matches(name, known, n=1)
            raise ConfigError(f"{source}: 'model.{key}.{name}' is not a {model_type} config key"
                              + (f" (did you mean {guess[0]}?)" if guess else ""))


# Fixed by the checkpoint when model.init_from is set: setting one beside it is an error, never ignored.
ARCHITECTURE_KEYS = ("llm", "dino", "llm_config", "dino_config", "query_dim", "deep_query")
# The model settings a config applies on top of init_from's checkpoint: every other one.
AFTER_INIT_KEYS = tuple(f.name for f in dataclasses.fields(ModelSettings) if f.name not in ARCHITECTURE_KEYS)


def check_init_from(given, cfg, source):
    """With model.init_from, the architecture is the checkpoint's: a key of ARCHITECTURE_KEYS among the model
    keys `given` (the YAML's and --set's) is an error naming it. visual_scale, lambda_coarse, mode, the
    freeze_* switches and gradient_checkpointing apply on top of the checkpoint."""
    fixed = [key for key in ARCHITECTURE_KEYS if key in given]
    if cfg.model.init_from is not None and fixed:
        raise ConfigError(f"{source}: 'model.{fixed[0]}' cannot be set with model.init_from: the architecture "
                          f"({', '.join(ARCHITECTURE_KEYS)}) comes from the checkpoint {cfg.model.init_from}. "
                          "Remove it, or drop init_from to build a new model (model.tokenizer may be set: it "
                          "replaces the checkpoint's tokenizer).")


def tokenizer_name(cfg):
    """The tokenizer's source: model.tokenizer, else model.llm, else the init_from folder (saved with it)."""
    return cfg.model.tokenizer or cfg.model.llm or cfg.model.init_from


def load(path, overrides=(), check=True):
    """Read a stage YAML, apply `--set` overrides, and return the checked Config."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            raw = yaml.load(f, Loader=_Loader) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    source = f"{path} (with --set {' '.join(overrides)})" if overrides else path
    raw = apply_overrides(raw, overrides)
    cfg = from_dict(raw, source)
    check_init_from(raw.get("model") or {}, cfg, source)
    check_backbone_configs(cfg, source)
    if check:
        check_paths(cfg, source)
    return cfg


def save(cfg, path):
    """Write the resolved config as YAML (or JSON when the path ends in .json)."""
    data = cfg.to_dict()
    with open(path, "w") as f:
        if path.endswith(".json"):
            json.dump(data, f, indent=2)
        else:
            yaml.safe_dump(data, f, sort_keys=False)


def load_saved(path):
    """Read a config written by `save` (YAML or JSON) without the path checks."""
    with open(path) as f:
        raw = json.load(f) if path.endswith(".json") else yaml.load(f, Loader=_Loader)
    return from_dict(raw, path)


def parse_args(argv=None, description="fVLM training"):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="stage YAML, e.g. configs/stage1_135M.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable), e.g. --set training.batch_size=4")
    args = parser.parse_args(argv)
    return load(args.config, args.set)
