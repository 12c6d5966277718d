"""Checkpoints: `<save_dir>/step_XXXXXXXX/` folders that `FoveatedVLM.from_pretrained` loads, plus the state
needed to resume training.

A folder holds the model (config.json + model.safetensors via `save_pretrained`, with the tokenizer), the
resolved training config (train_config.yaml) and training_state.pt: optimizer, scheduler, step, samples seen,
RNG states, data position, loss scaler and metrics, read back with `torch.load(weights_only=True)` (a file
that would need code run to load is refused, naming it). A folder is written
under a temporary name and renamed into place, so a kill during a save leaves the previous checkpoints intact
and never a half-written `step_*` folder. `latest` and `best` are symlinks to the newest and lowest-metric
checkpoints; `keep_last` / `keep_best` prune the rest. The model saved is always the unwrapped, uncompiled one.
"""

import json
import os
import random
import re
import shutil

import numpy as np
import torch

import config as config_lib
from pretrained import TRAIN_CONFIG_NAME, load_tensors

STATE_NAME, METRICS_NAME = "training_state.pt", "metrics.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"


def rng_state():
    """Python, NumPy, torch (and CUDA) RNG states in types `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                     has_gauss, cached], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    config_lib.save(cfg, os.path.join(tmp, TRAIN_CONFIG_NAME))
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


def checkpoints(save_dir):
    """Complete checkpoints in save_dir as [(step, folder)], oldest first."""
    if not os.path.isdir(save_dir):
        return []
    found = []
    for name in os.listdir(save_dir):
        m = _STEP_DIR.match(name)
        path = os.path.join(save_dir, name)
        if m and not os.path.islink(path) and os.path.exists(os.path.join(path, STATE_NAME)):
            found.append((int(m.group(1)), path))
    return sorted(found)


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
    """The checkpoint folder to resume from: `auto` -> the newest complete one in save_dir (None if there is
    none), `none` -> None, anything else -> that folder, or that training save_dir's newest."""
    if resume == "none":
        return None
    if resume == "auto":
        found = checkpoints(save_dir)
        return found[-1][1] if found else None
    if os.path.exists(os.path.join(resume, STATE_NAME)):
        return resume
    found = checkpoints(resume) if os.path.isdir(resume) else []
    if not found:
        raise FileNotFoundError(f"checkpoint.resume: {resume} is neither a checkpoint folder (no {STATE_NAME}) nor "
                                "a training save_dir holding one")
    return found[-1][1]


def load_state(path):
    """The training-state dict of checkpoint folder `path`, loaded as tensors and plain containers only: a file
    holding anything that unpickling would run as code is refused (ValueError naming the file)."""
    return load_tensors(os.path.join(path, STATE_NAME),
                        "checkpoint.save never writes them: resume from another checkpoint (checkpoint.resume: a "
                        "step_* folder) or start afresh (checkpoint.resume: none).")
