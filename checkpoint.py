"""Checkpoint folders, in one place: their files, finding the newest of a training save_dir, reading and writing
the model's weights and settings, and the training state that resume needs.

A checkpoint folder holds `config.json` (the model's settings, config.ModelSettings, with the full LLM and DINO
configs, so it rebuilds with no hub access), `model.safetensors` and, when one was given, the tokenizer's files:
what `FoveatedVLM.save_pretrained` writes and `from_pretrained` reads, through `write_model` / `read_settings` /
`read_state_dict` here. train.py's checkpoints are such folders, `<save_dir>/step_XXXXXXXX/`, with the resolved
training config (train_config.yaml) and training_state.pt (optimizer, scheduler, step, samples seen, RNG states,
data position, loss scaler), read back with `torch.load(weights_only=True)`: a file that would need code run to
load is refused, naming it. A folder is written under a temporary name and renamed into place, so a kill during
a save leaves the previous checkpoints intact and never a half-written `step_*` folder; `latest` and `best` are
symlinks to the newest and lowest-metric checkpoints, `keep_last` / `keep_best` prune the rest.

Wherever a checkpoint is asked for (`from_pretrained`, `--checkpoint`, `model.init_from`, `checkpoint.resume`),
`resolve` takes a checkpoint folder, a training save_dir (its newest complete checkpoint: `newest`), a hub repo,
or the original fVLM's training checkpoint (.pt; its state dict under transformers-4 DINOv2 names).
"""

import json
import os
import pickle
import random
import re
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import config
from pretrained import hub_folder

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
TRAIN_CONFIG_NAME = "train_config.yaml"  # the resolved training config, beside the model
STATE_NAME, METRICS_NAME = "training_state.pt", "metrics.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
HUB_CHECKPOINT_FILES = [CONFIG_NAME, WEIGHTS_NAME, TRAIN_CONFIG_NAME, "tokenizer*", "special_tokens_map.json",
                        "chat_template.jinja"]
BACKBONE_CONFIGS = ("llm_config", "dino_config")  # saved in full at config.json's top level, beside "fvlm"
SETTING_ALIASES = {"llm_name": "llm", "dino_name": "dino"}  # config.json setting names read under their new name
ORIGINAL_EXTENSIONS = (".pt", ".pth")  # the original's training checkpoints: {"model_state_dict": ..., ...}
# Published backbones told apart by their widths, for checkpoints that hold weights only (no config.json).
KNOWN_LLMS = {576: "HuggingFaceTB/SmolLM2-135M-Instruct", 960: "HuggingFaceTB/SmolLM2-360M-Instruct",
              2048: "HuggingFaceTB/SmolLM2-1.7B-Instruct"}
KNOWN_DINOS = {384: "facebook/dinov2-small", 768: "facebook/dinov2-base", 1024: "facebook/dinov2-large"}

_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"
_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")  # in torch's weights_only refusal
_COMPILED_PREFIX = re.compile(r"(^|\.)_orig_mod\.")  # torch.compile's wrapper in parameter names
_DINO_V4_NAMES = [  # transformers 4.x DINOv2 attention names -> 5.x
    (re.compile(r"\.attention\.attention\.query\."), ".attention.q_proj."),
    (re.compile(r"\.attention\.attention\.key\."), ".attention.k_proj."),
    (re.compile(r"\.attention\.attention\.value\."), ".attention.v_proj."),
    (re.compile(r"\.attention\.output\.dense\."), ".attention.o_proj."),
]


# ---------------------------------------------------------------- finding a checkpoint
def is_checkpoint(folder):
    return os.path.isfile(os.path.join(folder, WEIGHTS_NAME))


def checkpoints(save_dir):
    """The complete checkpoints of a training save_dir as [(step, folder)], oldest first."""
    if not os.path.isdir(save_dir):
        return []
    found = []
    for name in os.listdir(save_dir):
        m = _STEP_DIR.match(name)
        path = os.path.join(save_dir, name)
        if m and not os.path.islink(path) and is_checkpoint(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def newest(save_dir):
    """The newest complete checkpoint folder of a training save_dir, or None."""
    found = checkpoints(save_dir)
    return found[-1][1] if found else None


def resolve(path):
    """The checkpoint `path` names, as a local folder: a checkpoint folder itself, a training save_dir's newest
    checkpoint, the original's training checkpoint file (.pt) itself, or a hub repo's snapshot folder."""
    if os.path.isfile(path) and path.endswith(ORIGINAL_EXTENSIONS):
        return path
    if os.path.isdir(path):
        folder = path if is_checkpoint(path) else newest(path)
        if folder is None:
            raise FileNotFoundError(f"{path} is neither a checkpoint folder (no {WEIGHTS_NAME}) nor a training "
                                    f"save_dir holding one (step_*/{WEIGHTS_NAME}), nor the original's training "
                                    f"checkpoint ({' / '.join(ORIGINAL_EXTENSIONS)})")
        return folder
    if os.path.exists(path) or _looks_local(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    return hub_folder(path, HUB_CHECKPOINT_FILES)


def _looks_local(path):
    """A path that cannot be a hub repo id, or whose first folder exists here (`checkpoints/nope`)."""
    first = path.replace("\\", "/").split("/")[0]
    return path.startswith((".", "/", "~")) or path.endswith(ORIGINAL_EXTENSIONS) or \
        (first != path and os.path.isdir(first))


def tokenizer_source(model_cfg):
    """Where a training config's tokenizer comes from: model.tokenizer, else model.llm, else the init_from
    checkpoint (which saved its tokenizer)."""
    return model_cfg.tokenizer or model_cfg.llm or resolve(model_cfg.init_from)


def training_config(path):
    """The resolved training config saved with checkpoint `path` (see resolve), or None when it holds none
    (published weights, a save_pretrained folder)."""
    saved = os.path.join(resolve(path), TRAIN_CONFIG_NAME)
    return config.load_saved(saved) if os.path.exists(saved) else None


# ---------------------------------------------------------------- the model's files
def write_model(folder, settings, inputs, backbone_configs, state_dict, tokenizer=None):
    """Write config.json ({"fvlm": settings, "inputs": inputs (when not None), "llm_config": ..., "dino_config":
    ...}), model.safetensors and the tokenizer (when given) into `folder`."""
    os.makedirs(folder, exist_ok=True)
    saved = {"fvlm": settings, **({"inputs": inputs} if inputs is not None else {}), **backbone_configs}
    with open(os.path.join(folder, CONFIG_NAME), "w") as f:
        json.dump(saved, f, indent=2)
    save_file({k: v.detach().contiguous() for k, v in state_dict.items()}, os.path.join(folder, WEIGHTS_NAME))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def _saved_config(folder):
    """A checkpoint folder's config.json as written by write_model, or {} (weights only, or not a folder)."""
    path = os.path.join(folder, CONFIG_NAME)
    if not (os.path.isdir(folder) and os.path.isfile(path)):
        return {}
    with open(path) as f:
        saved = json.load(f)
    return saved if "fvlm" in saved else {}


def read_settings(folder):
    """The model settings (a dict of config.ModelSettings fields, backbone configs included) saved in a
    checkpoint folder's config.json, or None when it holds none (weights only)."""
    saved = _saved_config(folder)
    if not saved:
        return None
    settings = {SETTING_ALIASES.get(k, k): v for k, v in saved["fvlm"].items()}
    settings.update({k: saved[k] for k in BACKBONE_CONFIGS})
    return settings


def read_inputs(folder):
    """How the checkpoint's model is used as trained (a config.InputSettings): config.json's "inputs", else the
    training config saved beside it (its data section), else the defaults (the original recipe's: published
    weights)."""
    saved = _saved_config(folder).get("inputs")
    if saved is not None:
        return config.InputSettings(**saved)
    trained = os.path.join(folder, TRAIN_CONFIG_NAME) if os.path.isdir(folder) else ""
    if os.path.isfile(trained):
        return config.InputSettings.of(config.load_saved(trained).data)
    return config.InputSettings()


def has_tokenizer(folder):
    return os.path.isdir(folder) and any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES)


def read_state_dict(path):
    """The weights of checkpoint `path` (as resolve gives it): a folder's model.safetensors, or the
    `model_state_dict` of the original's .pt, read with torch.load(weights_only=True) and without torch.compile's
    `_orig_mod` prefixes. Neither runs code: a .pt that would need it is refused, named."""
    if os.path.isdir(path):
        return load_file(os.path.join(path, WEIGHTS_NAME))
    saved = load_tensors(path, mmap=True)
    state = saved.get("model_state_dict", saved) if isinstance(saved, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a checkpoint (expected a state dict, or a dict with `model_state_dict`)")
    return {_COMPILED_PREFIX.sub(r"\1", k): v for k, v in state.items()}


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


def load_tensors(file, advice="", mmap=False):
    """torch.load(file, weights_only=True): tensors and plain containers only. A file holding anything that
    unpickling would run as code is refused, named (ValueError, with `advice` on what to do instead), as is
    one that is not a torch save (a cut or foreign file). mmap: map the file rather than read it whole (the
    original's .pt and a training state hold the optimizer's state too, ~20 GB at 1.7B)."""
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


# ---------------------------------------------------------------- training checkpoints
def cuda_rng_state():
    """The RNG state of this process's CUDA device (torch.cuda.current_device()), or None without CUDA."""
    return torch.cuda.get_rng_state() if torch.cuda.is_available() else None


def rng_state(cuda_by_rank=None):
    """Python, NumPy and torch RNG states in types `torch.load(weights_only=True)` accepts, and `cuda_by_rank`, each
    rank's own CUDA device state (cuda_rng_state, gathered), on CUDA."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                     has_gauss, cached], "torch": torch.get_rng_state()}
    if cuda_by_rank is not None and any(s is not None for s in cuda_by_rank):
        state["cuda_by_rank"] = list(cuda_by_rank)
    return state


def set_rng_state(state, rank=0, local_rank=0):
    """Restore `rng_state`'s states. CUDA: this rank's own device only, with the state this rank saved, or in an
    older save (`cuda`: one state per device the saving process saw) the one of this local rank's device. A rank
    the save holds no state for (a run resumed on more GPUs) keeps the state its seed gave it; one resumed on
    fewer GPUs, or on one to debug, restores its own."""
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    saved, index = (state["cuda_by_rank"], rank) if "cuda_by_rank" in state else (state.get("cuda") or [], local_rank)
    if torch.cuda.is_available() and index < len(saved) and saved[index] is not None:
        torch.cuda.set_rng_state(saved[index])  # the current device's: distributed.init set it to the local rank's


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def _fsync_tree(path):
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())


def _link(save_dir, name, target):
    """Point the symlink `<save_dir>/<name>` at `target` (a folder name in save_dir), atomically."""
    tmp = os.path.join(save_dir, _TMP_PREFIX + name)
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, os.path.join(save_dir, name))


def save(save_dir, step, model, state, cfg, tokenizer=None, metric=None, keep_last=2, keep_best=1):
    """Write checkpoint `step` atomically, update `latest` / `best`, prune; returns the folder.
    `model` must be the plain FoveatedVLM (not DDP- or compile-wrapped); `state` is the training state dict;
    `metric` (lower is better) ranks checkpoints for keep_best."""
    assert not hasattr(model, "module") and not hasattr(model, "_orig_mod"), "save the unwrapped model"
    os.makedirs(save_dir, exist_ok=True)
    name = f"step_{step:08d}"
    tmp, final = os.path.join(save_dir, _TMP_PREFIX + name), os.path.join(save_dir, name)
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, tokenizer=tokenizer)
    config.save(cfg, os.path.join(tmp, TRAIN_CONFIG_NAME))
    torch.save(state, os.path.join(tmp, STATE_NAME))
    with open(os.path.join(tmp, METRICS_NAME), "w") as f:
        json.dump({"step": step, "metric": metric}, f)
    _fsync_tree(tmp)
    if os.path.exists(final):  # the same step saved again (e.g. the final save): swap the old one out
        _remove(final)
    os.replace(tmp, final)
    _link(save_dir, "latest", name)
    prune(save_dir, keep_last, keep_best)
    return final


def _remove(path):
    """Rename out of the `step_*` namespace first, so an interrupted delete never looks like a checkpoint."""
    trash = os.path.join(os.path.dirname(path), _TMP_PREFIX + "del-" + os.path.basename(path))
    os.replace(path, trash)
    shutil.rmtree(trash)


def _metric(path):
    with open(os.path.join(path, METRICS_NAME)) as f:
        return json.load(f)["metric"]


def prune(save_dir, keep_last, keep_best):
    """Keep the `keep_last` newest and the `keep_best` lowest-metric checkpoints; point `best` at the best."""
    found = checkpoints(save_dir)
    ranked = sorted((m, step, path) for step, path in found if (m := _metric(path)) is not None)
    keep = {path for _, path in found[-keep_last:]} if keep_last > 0 else set()
    keep |= {path for _, _, path in ranked[:keep_best]}
    if ranked and keep_best > 0:
        _link(save_dir, "best", os.path.basename(ranked[0][2]))
    for _, path in found:
        if path not in keep:
            _remove(path)


def clean_tmp(save_dir):
    """Remove what an interrupted save left behind."""
    if os.path.isdir(save_dir):
        for name in os.listdir(save_dir):
            path = os.path.join(save_dir, name)
            if name.startswith(_TMP_PREFIX):
                if os.path.islink(path) or not os.path.isdir(path):
                    os.remove(path)
                else:
                    shutil.rmtree(path)


def find_resume(save_dir, resume):
    """The checkpoint folder to resume from: `auto` -> the newest in save_dir (None if there is none), `none` ->
    None, anything else -> that checkpoint folder, or that training save_dir's newest (resolve's rule)."""
    if resume == "none":
        return None
    if resume == "auto":
        return newest(save_dir)
    if not os.path.isdir(resume):
        raise FileNotFoundError(f"checkpoint.resume: {resume} is neither a checkpoint folder nor a training "
                                "save_dir holding one: it does not exist")
    folder = resolve(resume)
    if not os.path.isfile(os.path.join(folder, STATE_NAME)):
        raise FileNotFoundError(f"checkpoint.resume: {resume} holds no training state ({STATE_NAME}): resume "
                                "takes a train.py checkpoint folder or save_dir; start from weights with "
                                "model.init_from instead")
    return folder


def load_state(path):
    """The training-state dict of checkpoint folder `path`, memory-mapped (the optimizer's state is copied into
    the optimizer, not held twice), tensors and plain containers only: a file holding anything that unpickling
    would run as code is refused (ValueError naming the file)."""
    return load_tensors(os.path.join(path, STATE_NAME),
                        "checkpoint.save never writes them: resume from another checkpoint (checkpoint.resume: a "
                        "step_* folder) or start afresh (checkpoint.resume: none).", mmap=True)
