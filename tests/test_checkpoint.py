"""checkpoint.py: atomic folders that from_pretrained loads, pruning, a kill during a save, a refused unsafe
training state; resolving a save_dir to its newest checkpoint; hub ids that fail fast offline."""

import json
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import checkpoint
import config
import pretrained
from conftest import tiny_model_kwargs
from model import FoveatedVLM, load_checkpoint


def state(step):
    return {"step": step, "samples_seen": 8 * step, "rng": checkpoint.rng_state(), "data": {"batches": step}}


def test_save_prune_links_and_reload(tmp_path, tiny_model):
    cfg = config.from_dict({"model": {"llm_config": {"hidden_size": 64}}})
    save_dir = str(tmp_path / "run")
    for step, metric in [(10, 3.0), (20, 1.0), (30, 2.0), (40, 2.5)]:
        checkpoint.save(save_dir, step, tiny_model, state(step), cfg, metric=metric, keep_last=2, keep_best=1)
    assert [s for s, _ in checkpoint.checkpoints(save_dir)] == [20, 30, 40]  # 2 newest + the best
    assert os.path.realpath(os.path.join(save_dir, "best")).endswith("step_00000020")
    assert checkpoint.find_resume(save_dir, "auto").endswith("step_00000040")
    other = str(tmp_path / "elsewhere")
    assert checkpoint.find_resume(other, save_dir).endswith("step_00000040")  # resume: another run's save_dir
    assert checkpoint.find_resume(other, os.path.join(save_dir, "step_00000030")).endswith("step_00000030")
    with pytest.raises(FileNotFoundError, match="elsewhere is neither a checkpoint folder"):
        checkpoint.find_resume(save_dir, other)
    loaded = checkpoint.load_state(os.path.join(save_dir, "latest"))
    assert loaded["step"] == 40 and loaded["data"] == {"batches": 40}
    reloaded = FoveatedVLM.from_pretrained(os.path.join(save_dir, "best"))
    for (name, a), b in zip(tiny_model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert config.load_saved(os.path.join(save_dir, "best", checkpoint.TRAIN_CONFIG_NAME)) == cfg


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    torch.save(checkpoint.rng_state(), tmp_path / "rng.pt")
    a = (torch.rand(3), random.random(), np.random.rand())
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_each_rank_restores_its_own_cuda_rng_state_on_fewer_or_more_gpus(tmp_path, monkeypatch):
    """A state saved by 8 ranks (each its device's CUDA state) resumes on 4 GPUs or on one: each rank sets its own
    device's state, never a list of 8 into the devices it sees (which raised IndexError); a rank the save holds no
    state for keeps its seeded one. An older save (one state per device the saving process saw) restores the
    device of the local rank. Simulated on the CPU: the states are built, CUDA's calls recorded."""
    saved = [torch.full((16,), rank, dtype=torch.uint8) for rank in range(8)]
    torch.save(checkpoint.rng_state(cuda_by_rank=saved), tmp_path / "rng.pt")
    state = torch.load(tmp_path / "rng.pt", weights_only=True)
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("set every device's state"))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": restored.append(int(s[0])))
    for rank in range(4):  # 4 GPUs
        checkpoint.set_rng_state(state, rank=rank, local_rank=rank)
    checkpoint.set_rng_state(state, rank=0, local_rank=0)  # one GPU, to debug
    checkpoint.set_rng_state(state, rank=11, local_rank=3)  # 16 GPUs: rank 11 has no saved state
    assert restored == [0, 1, 2, 3, 0]
    older = {**state, "cuda": saved}
    del older["cuda_by_rank"]
    checkpoint.set_rng_state(older, rank=13, local_rank=5)
    assert restored[-1] == 5
    assert "cuda_by_rank" not in checkpoint.rng_state(cuda_by_rank=[None, None])  # ranks on the CPU


CHILD = """
import json, os, signal, sys, torch
import checkpoint, config
from model import FoveatedVLM
torch.manual_seed(0)
model = FoveatedVLM(**json.loads(sys.argv[2]))
cfg, save_dir = config.Config(), sys.argv[1]
checkpoint.save(save_dir, 1, model, {"step": 1}, cfg)
def dying_save(obj, path):  # half a file, then the process dies mid-save
    open(path, "wb").write(b"partial")
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save
checkpoint.save(save_dir, 2, model, {"step": 2}, cfg)
"""


def test_kill_during_save_leaves_previous_checkpoint(tmp_path):
    save_dir = str(tmp_path / "run")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", CHILD, save_dir, json.dumps(tiny_model_kwargs())], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert any(name.startswith(".tmp-") for name in os.listdir(save_dir))  # the interrupted save's folder
    path = checkpoint.find_resume(save_dir, "auto")
    assert path.endswith("step_00000001") and checkpoint.load_state(path)["step"] == 1
    FoveatedVLM.from_pretrained(path)
    checkpoint.clean_tmp(save_dir)
    assert sorted(os.listdir(save_dir)) == ["latest", "step_00000001"]


def test_a_training_state_holding_code_is_refused_naming_the_file(tmp_path):
    folder = tmp_path / "step_00000001"
    folder.mkdir()
    torch.save({"step": 1, "hook": print}, folder / checkpoint.STATE_NAME)  # unpickling would call up a function
    with pytest.raises(ValueError) as err:
        checkpoint.load_state(str(folder))
    message = str(err.value)
    assert str(folder / checkpoint.STATE_NAME) in message and "refused as unsafe" in message and "print" in message
    assert "weights_only" not in message  # torch's own text suggests loading it with weights_only=False
    torch.save({"step": 1}, folder / checkpoint.STATE_NAME)
    whole = (folder / checkpoint.STATE_NAME).read_bytes()
    for damaged in (b"not a torch save", whole[:len(whole) // 2]):  # a foreign file, a cut one: not "unsafe"
        (folder / checkpoint.STATE_NAME).write_bytes(damaged)
        with pytest.raises(ValueError, match=f"{folder / checkpoint.STATE_NAME}: not readable"):
            checkpoint.load_state(str(folder))


def test_load_checkpoint_takes_a_folder_or_a_save_dir(tmp_path, tiny_model, tokenizer):
    cfg = config.from_dict({"data": {"frame_size": 56}})
    save_dir = str(tmp_path / "run")
    for step in (1, 2):
        checkpoint.save(save_dir, step, tiny_model, state(step), cfg, tokenizer)
    for path in (save_dir, os.path.join(save_dir, "step_00000002")):
        model, tok, frame_size = load_checkpoint(path)
        assert frame_size == 56 and tok.eos_token == "<|im_end|>" and model.tokenizer is tok and not model.training
        for (name, a), b in zip(tiny_model.state_dict().items(), model.state_dict().values()):
            assert torch.equal(a, b), name
    (tmp_path / "empty").mkdir()
    for name, expected in [("empty", "neither a checkpoint folder"), ("nowhere", "does not exist")]:
        with pytest.raises(FileNotFoundError, match=expected):
            load_checkpoint(str(tmp_path / name))


def test_an_uncached_hub_id_fails_at_once_and_a_cached_one_needs_no_network(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.time()
    with pytest.raises(FileNotFoundError) as err:
        pretrained.resolve_source("fvlm-tests/no-such-model")
    assert time.time() - start < 10  # transformers alone retries for ~30 s offline
    message = str(err.value)
    assert "fvlm-tests/no-such-model" in message and "neither in the Hugging Face cache" in message
    assert "give a local folder" in message and str(tmp_path / "hub") in message
    snapshot = tmp_path / "hub" / "models--fvlm-tests--cached" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    assert pretrained.resolve_source("fvlm-tests/cached") == (str(snapshot), None)
