"""Settings: one dataclass per concern, the choice lists and defaults every module checks against, and the checked
loading of a stage YAML. This module is the bottom layer: it imports nothing of the project (nor torch), so
everything may import it.

- `ModelSettings`: what defines a FoveatedVLM besides its weights (model.py, checkpoint config.json).
- `FrameConfig`: how media becomes frames (frames.py); `DataConfig` (training) and `EvalProtocol` (benchmark.py)
  extend it, so one object carries a frame setting from YAML or the command line to its use.
- The stage YAML's sections (model, data, training, loss, checkpoint, eval, wandb), loaded by `load`: a key the
  dataclass does not have, a value of the wrong type or outside its choices stops the run with a message naming
  the key and the file. `--set section.key=value` overrides a loaded value (parsed as YAML, so
  `--set training.lr_llm=1e-5` is a float). The checks that need the file system, torch or transformers (shard
  paths, init_from, backbone config keys) are train.check_config's.
"""

import dataclasses
import json
import re
import typing
from dataclasses import dataclass, field
from typing import Optional, Union

import yaml

# ---------------------------------------------------------------- choices and shared defaults
MODES = ("coarse_fine", "coarse_only", "autoregressive")  # FoveatedVLM's forward modes
PARAM_GROUPS = ("connector", "dino", "llm")  # parameter groups: their lr_* and freeze_* settings, the optimizer's
LOSS_TYPES = ("text_ce_all", "text_ce_answer_only", "dpo")
FRAME_SAMPLING = ("uniform", "head")  # a video longer than max_frames at sample_fps: uniform over it, or its head
SCHEDULES = ("cosine", "constant", "converging")
DTYPES = ("auto", "bfloat16", "float16", "float32")  # autocast (distributed.resolve_dtype)
DEVICES = ("auto", "cpu", "cuda")
SCORING = ("original", "mean")  # an MCQ option's score (tokenization.option_targets)
PROTOCOLS = ("original", "lmms-eval")  # how benchmark.py asks and scores (EvalProtocol.name)
MAX_FRAMES = 64  # frames taken from a video by default, in training and inference alike
FRAME_SIZE = 224  # DINOv2's input side as trained
# Frames decoded and encoded at a time on the streamed path (videos longer than this, at inference), by device
# type when chunk_frames is null: at 224 px a chunk holds ~9.5 MB of DINOv2 keys and values a frame (float32).
CHUNK_FRAMES = {"cpu": 64, "cuda": 256}
SYSTEM_PROMPT = "You are a helpful AI assistant."  # the original recipe's system turn (tokenization.chat)

Paths = Union[str, list]  # shards: one name, glob, brace pattern or URL, or a list of them (shards.py)


@dataclass
class ModelSettings:
    """What defines a FoveatedVLM besides its weights, written once: the constructor's defaults, ModelConfig (which
    adds the training-only fields), bench.py and a checkpoint's config.json all use it."""

    llm: Optional[str] = None  # hub id, folder, .gguf or pkg://package/file.gguf
    dino: Optional[str] = None  # hub id or folder
    llm_config: Optional[dict] = None  # a transformers config as a dict -> random init (tests, quickstart)
    dino_config: Optional[dict] = None
    query_dim: int = 384
    visual_scale: float = 0.14  # the visual tokens' scale on entering the LLM
    deep_query: bool = True  # the query goes through every DINO layer (False: one cross-attention at the end)
    lambda_coarse: float = 0.0  # weight of the coarse tokens' own text loss in coarse_fine

    @classmethod
    def of(cls, source, where="model settings"):
        """The settings of an object with these fields (ModelConfig) or of a dict (a saved config.json); a dict
        key that is not a setting is an error naming it and `where`."""
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(source, dict):
            return cls(**{name: getattr(source, name) for name in names})
        unknown = sorted(set(source) - set(names))
        if unknown:
            raise ValueError(f"{where}: unknown model setting(s) {unknown}; the settings are {', '.join(names)}")
        return cls(**source)

    def constructor_kwargs(self):
        """FoveatedVLM's keywords for these settings (it names the backbones llm_name and dino_name)."""
        kwargs = {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelSettings)}
        kwargs["llm_name"], kwargs["dino_name"] = kwargs.pop("llm"), kwargs.pop("dino")
        return kwargs


@dataclass
class FrameConfig:
    """How media becomes frames (frames.load_clip): frame side, frame cap, the video sampling rule, and how many
    views a single frame (an image, or a one-frame clip) becomes. The defaults are inference's: the original
    recipe's stages 2-3 trained images as 8 identical frames."""

    frame_size: int = FRAME_SIZE
    max_frames: Optional[int] = MAX_FRAMES  # null: every frame at sample_fps
    frame_sampling: str = "uniform"  # beyond max_frames at sample_fps: "uniform" over the video, or the "head"
    sample_fps: float = 1.0
    replicate_image_frames: int = 8  # a single frame becomes this many views of one tensor (encoded once)
    chunk_frames: Optional[int] = None  # inference: longer videos are decoded and encoded this many frames at a
    #                                    time (streaming.py); null: CHUNK_FRAMES of the device


@dataclass
class InputSettings:
    """What a model needs to be used as trained, saved with its weights (config.json's "inputs"): its frame side,
    the frames a single image becomes, and the system turn its prompts start with. The defaults are the original
    recipe's (published checkpoints)."""

    frame_size: int = FRAME_SIZE
    replicate_image_frames: int = 8
    system_prompt: Optional[str] = SYSTEM_PROMPT

    @classmethod
    def of(cls, data):
        """The settings a model trained on `data` (a DataConfig) is used with."""
        return cls(data.frame_size, data.replicate_image_frames, data.system_prompt)


# ---------------------------------------------------------------- the stage YAML's sections
@dataclass
class ModelConfig(ModelSettings):
    """The model's settings (ModelSettings) and how training uses the model."""

    tokenizer: Optional[str] = None  # default: llm, else init_from's checkpoint
    mode: str = "coarse_fine"  # forward mode for training and validation
    gradient_checkpointing: bool = False
    init_from: Optional[str] = None  # a checkpoint folder or a training save_dir (its newest checkpoint)
    freeze_dino: bool = False
    freeze_llm: bool = False
    freeze_connector: bool = False

    def frozen(self, group):
        """Whether parameter group `group` (one of PARAM_GROUPS) is frozen (freeze_<group>)."""
        return getattr(self, f"freeze_{group}")


@dataclass
class DataConfig(FrameConfig):
    """The training data: shards, the frames they become (FrameConfig) and the text the model reads."""

    train_shards: Optional[Paths] = None
    val_shards: Optional[Paths] = None
    text_shards: Optional[Paths] = None
    text_ratio: float = 0.0  # fraction of batches that are text-only retention batches
    num_workers: int = 2
    prefetch_factor: int = 2
    replicate_image_frames: int = 1  # the recipe sets 8 in stages 2-3
    max_text_tokens: int = 1024
    max_total_frames: Optional[int] = None  # cap on the padded frames of a batch (long videos -> smaller batches)
    max_batch_tokens: Optional[int] = None  # cap on the padded LLM tokens of a batch: its size x its longest row
    #                                         (frames + text; a DPO pair is two rows); text-only batches too
    shuffle_buffer: int = 100  # training: samples shuffled in a buffer before decoding
    resampled: bool = False  # training: each rank/worker draws shards with replacement (fewer or uneven shards)
    # Prompts (tokenization.py): the system turn every conversation starts with (null: the LLM template's own
    # default), the user prompt of caption-only samples by their json `source` (null: the original recipe's
    # table; a sample's own `user` text wins), and `prompt`, which when set replaces the per-source prompt for
    # every caption-only sample.
    system_prompt: Optional[str] = SYSTEM_PROMPT
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
    schedule: str = "cosine"  # one of SCHEDULES
    dtype: str = "auto"  # autocast: auto (bfloat16 on CUDA, float32 on the CPU) | bfloat16 | float16 | float32
    threads: Optional[int] = None  # torch's CPU threads; None = distributed.default_threads()
    compile: bool = False
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 10
    max_nonfinite_steps: int = 5  # this many skipped (non-finite) steps in a row stop the run
    dist_timeout_min: int = 60  # how long DDP ranks wait for each other (rank 0 writing a ~20 GB checkpoint)

    def peak_lr(self, group):
        """The starting LR of parameter group `group` (one of PARAM_GROUPS): lr_<group>."""
        return getattr(self, f"lr_{group}")


@dataclass
class LossConfig:
    type: str = "text_ce_all"  # one of LOSS_TYPES
    beta: float = 0.1  # DPO temperature


@dataclass
class CheckpointConfig:
    save_dir: str = "checkpoints/run"
    save_every_steps: int = 1000
    keep_last: int = 2
    keep_best: int = 1
    metric: str = "val_loss"  # val_loss | train_loss; lower is better
    resume: str = "auto"  # auto (the newest in save_dir, if any) | none | a checkpoint folder or another save_dir


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


# ---------------------------------------------------------------- evaluation
@dataclass
class EvalProtocol(FrameConfig):
    """How benchmark.py turns questions into scores (README, Evaluation); the defaults are the original fVLM
    benchmark's. Its frame fields are the readers' (eval_readers.py, frames.load_clip)."""

    name: str = "original"  # PROTOCOLS: the original's option scores, or lmms-eval's generation (lmms_protocol.py)
    modes: tuple = MODES
    scoring: str = "original"  # one of SCORING
    system_prompt: Optional[str] = SYSTEM_PROMPT  # None: the LLM chat template's own default system turn
    max_frames: Optional[int] = None  # None: every frame of an eval-shard sample (the original's); raw video
    #                                  layouts take MAX_FRAMES by MVBench's segment rule; 0: no cap (what the
    #                                  LLM's context holds beside the question, uniformly)
    fps: Optional[float] = None  # videos read at this fixed rate instead of the benchmark's rule; a question
    #                              whose frames do not fit in the LLM's context is then skipped (too_long)
    batch_size: int = 1  # questions per forward; scores equal batch 1's
    dtype: str = "auto"  # the model weights' dtype; auto: bfloat16 on CUDA (the original's), float32 elsewhere
    yes_no: bool = False  # score eval-shard questions without options whose answer is yes/no as Yes/No (the
    #                       original skips them as having no options)


# ---------------------------------------------------------------- checked loading
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
    "data.max_batch_tokens": 1,
    "data.shuffle_buffer": 1, "training.total_samples": 1, "training.batch_size": 1, "training.grad_accum": 1,
    "training.threads": 1, "training.log_every": 1, "training.max_nonfinite_steps": 1,
    "training.dist_timeout_min": 1,
    "checkpoint.save_every_steps": 1, "checkpoint.keep_last": 1, "checkpoint.keep_best": 0, "eval.every_steps": 0,
    "eval.max_samples": 1, "data.sample_fps": 1e-3, "data.chunk_frames": 1,
}

# Fixed by the checkpoint when model.init_from is set: setting one beside it is an error, never ignored.
ARCHITECTURE_KEYS = ("llm", "dino", "llm_config", "dino_config", "query_dim", "deep_query")
# The model settings a config applies on top of init_from's checkpoint: every other one.
AFTER_INIT_KEYS = tuple(f.name for f in dataclasses.fields(ModelSettings) if f.name not in ARCHITECTURE_KEYS)


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
    """A shard setting (one name or a list) as a list."""
    return [value] if isinstance(value, str) else list(value or [])


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


def check_required(cfg, source):
    """The settings a training run cannot do without."""
    if cfg.loss.type == "dpo" and cfg.model.init_from is None:
        raise ConfigError(f"{source}: 'model.init_from' is required for loss.type dpo (the frozen reference)")
    if not cfg.data.train_shards:
        raise ConfigError(f"{source}: 'data.train_shards' is required")
    if cfg.model.init_from is None and not (cfg.model.llm or cfg.model.llm_config):
        raise ConfigError(f"{source}: 'model.llm' (or model.llm_config) is required without model.init_from")
    if not (cfg.model.tokenizer or cfg.model.llm or cfg.model.init_from):
        raise ConfigError(f"{source}: 'model.tokenizer' is required when neither model.llm nor model.init_from is set")


def source_name(path, overrides=()):
    """How error messages name a config: its file, and the --set overrides applied to it."""
    return f"{path} (with --set {' '.join(overrides)})" if overrides else path


def load(path, overrides=()):
    """Read a stage YAML, apply `--set` overrides, and return the Config, checked for keys, types, choices and
    the model keys init_from fixes (train.check_config adds the checks that need files and libraries)."""
    try:
        with open(path) as f:
            raw = yaml.load(f, Loader=_Loader) or {}
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    source = source_name(path, overrides)
    raw = apply_overrides(raw, overrides)
    cfg = from_dict(raw, source)
    check_init_from(raw.get("model") or {}, cfg, source)
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
    """Read a config written by `save` (YAML or JSON)."""
    with open(path) as f:
        raw = json.load(f) if path.endswith(".json") else yaml.load(f, Loader=_Loader)
    return from_dict(raw, path)
