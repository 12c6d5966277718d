"""Memory: bench.py memory's estimate of a training step (meta tensors) against the peak resident memory of the same
step run for real on the CPU, the largest batches it sizes by the budgets, and a resume that holds the training
state once."""

import gc
import json
import os
import subprocess
import sys
import weakref

import pytest
import torch

import checkpoint
import config
import distributed
import memory
import schedule
import train
from conftest import ROOT, TINY_DINO, TINY_LLM, tiny_model_kwargs
from model import FoveatedVLM

# Wider and deeper than the tiny test model, so that activations (~0.2-0.6 GB) dwarf the allocator's slack.
SMALL = {"llm_config": dict(TINY_LLM, hidden_size=256, intermediate_size=768, num_hidden_layers=4),
         "dino_config": dict(TINY_DINO, hidden_size=128, num_hidden_layers=4, num_attention_heads=4),
         "query_dim": 64}


def small_config(loss, dtype, checkpointing):
    return config.from_dict({
        "model": {**SMALL, "gradient_checkpointing": checkpointing, "lambda_coarse": 0.5},
        "data": {"frame_size": 112, "max_frames": 8, "max_text_tokens": 400, "max_batch_tokens": 1600,
                 "text_shards": "x", "text_ratio": 0.1},
        "training": {"batch_size": 4, "dtype": dtype}, "loss": {"type": loss}})


MEASURE = """
import gc, json, sys
import torch
import config, memory, train
from collate import collate
from model import FoveatedVLM

torch.set_num_threads(1)
spec = json.loads(sys.argv[1])
cfg = config.from_dict(spec["cfg"])
samples = memory.largest_batches(cfg, 49152)[spec["kind"]]
torch.manual_seed(0)
model, reference = train.build_model(cfg, torch.device("cpu"), FoveatedVLM.from_config(memory.model_settings(cfg)))
trained = [p for p in model.parameters() if p.requires_grad]
for p in trained:
    p.grad = torch.zeros_like(p)
batch = collate(samples, pad_id=0)

def step():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.training.dtype == "bfloat16"):
        loss, _ = train.compute_loss(train.StepModule(model, cfg.loss.type == "dpo", "coarse_fine"), reference,
                                     batch, cfg)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trained, 1.0)

def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

step()  # lazy initialisations
gc.collect()
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak resident set (VmHWM) starts again from now
step()
print(json.dumps(status("VmHWM") - base))
"""


def measured_activations(cfg, kind):
    """The step's peak resident memory above what it holds before (weights, gradients, reference), run for real in a
    fresh process. glibc serves every allocation of 64 KiB or more by its own mmap, given back on free, so the
    resident set follows the live tensors (its default threshold grows to 32 MB and keeps freed memory)."""
    spec = json.dumps({"cfg": cfg.to_dict(), "kind": kind})
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", MEASURE, spec], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's peak resident set reset")
@pytest.mark.parametrize("loss, kind, dtype, checkpointing", [
    ("text_ce_answer_only", "video", "float32", False),
    ("text_ce_answer_only", "text", "bfloat16", True),
    ("dpo", "dpo", "bfloat16", False),
])
def test_estimate_matches_the_measured_step(loss, kind, dtype, checkpointing):
    """Activations and temporaries at the peak, estimated on meta tensors, within 5% (+ 8 MiB of the allocator's
    and Python's own) of the peak resident memory the real step adds; measured: within 1%."""
    cfg = small_config(loss, dtype, checkpointing)
    samples = memory.largest_batches(cfg, TINY_LLM["vocab_size"])[kind]
    estimate = memory.estimate(cfg, memory.model_settings(cfg), kind, samples, device_type="cpu")
    measured = measured_activations(cfg, kind)
    assert measured > 150 * 2 ** 20  # large enough to mean something
    assert abs(estimate.activations - measured) <= 0.05 * measured + 8 * 2 ** 20, (estimate, measured)
    params = sum(p.numel() for p in FoveatedVLM.from_config(memory.model_settings(cfg)).parameters())
    assert estimate.weights >= 4 * params and estimate.optimizer == 2 * estimate.gradients
    assert (estimate.reference > 0) == (loss == "dpo")


def test_largest_batches_fill_the_budgets():
    cfg = small_config("text_ce_answer_only", "float32", False)  # 4 samples, 8 frames, 400 tokens, 1600 in all
    batches = memory.largest_batches(cfg, 100)
    assert [(len(s["frames"]), len(s["input_ids"])) for s in batches["video"]] == [(8, 392)] * 4
    assert [(len(s["frames"]), len(s["input_ids"])) for s in batches["text"]] == [(0, 400)] * 4
    dpo = memory.largest_batches(config.from_dict({**cfg.to_dict(), "loss": {"type": "dpo"}}), 100)
    assert set(dpo) == {"dpo", "text"} and [len(s["chosen_ids"]) for s in dpo["dpo"]] == [192] * 4  # 2 rows each
    cfg.data.max_total_frames, cfg.data.max_batch_tokens = 12, None
    assert [len(s["frames"]) for s in memory.largest_batches(cfg, 100)["video"]] == [8]


def test_bench_memory_reports_each_batch_kind(capsys):
    """`bench.py memory` on the quickstart config: a line per batch kind with its peak split into parts that add
    up, whether it fits, and the loader's shared memory; a card too small says NO."""
    import bench

    for gib, verdict in ((80, "yes"), (1, "NO")):
        bench.main(["memory", "--config", os.path.join(ROOT, "configs", "quickstart.yaml"), "--gpu-gb", str(gib)])
        rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:1] in (["video"],
                                                                                                   ["text"])]
        assert [r[0] for r in rows] == ["video", "text"] and all(r[12] == verdict for r in rows), rows
        for r in rows:  # kind peak = weights + grads + AdamW + ref + activations
            assert abs(float(r[1]) - sum(float(x) for x in r[3:12:2])) <= 0.25, r


def test_resume_holds_the_training_state_once(tmp_path, monkeypatch):
    """After train.resume, no tensor of the loaded training state or weights is alive but those the optimizer
    adopted as its own state (memory-mapped, held once), and the loop keeps plain numbers (Progress). The state
    was saved by 8 GPUs; rank 2 of 4 resumes it, restoring its own CUDA RNG state (CUDA simulated)."""
    cfg = config.from_dict({"checkpoint": {"save_dir": str(tmp_path)}, "training": {"device": "cpu"}})
    dist = distributed.Dist(2, 2, 4, torch.device("cpu"))

    def setup():
        torch.manual_seed(0)
        model = FoveatedVLM(**tiny_model_kwargs())
        optimizer = train.build_optimizer(model, cfg.training)
        return model, optimizer, schedule.build(optimizer, cfg.training, 10), distributed.grad_scaler(dist.device)

    model, optimizer, scheduler, scaler = setup()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    state = {**train.Progress(step=1, samples_seen=8).state(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
             "rng": checkpoint.rng_state([torch.full((16,), r, dtype=torch.uint8) for r in range(8)])}
    checkpoint.save(str(tmp_path), 1, model, state, cfg)
    del model, optimizer, state

    loaded = []  # weak references to every tensor read from the checkpoint
    for name in ("load_state", "read_state_dict"):
        def watched(*args, _read=getattr(checkpoint, name)):
            out = _read(*args)
            loaded.extend(weakref.ref(t) for t in tree_tensors(out))
            return out
        monkeypatch.setattr(checkpoint, name, watched)
    cuda_states = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": cuda_states.append(s.tolist()))
    model, optimizer, scheduler, scaler = setup()
    progress = train.resume(cfg, model, optimizer, scheduler, scaler, dist)
    monkeypatch.undo()
    assert cuda_states == [[2] * 16]
    gc.collect()
    adopted = {id(t) for s in optimizer.state.values() for t in s.values()}
    alive = [ref() for ref in loaded if ref() is not None]
    assert progress.step == 1 and len(loaded) > 100
    assert [t.shape for t in alive if id(t) not in adopted] == []
    states = sum(t.numel() for s in optimizer.state.values() for k, t in s.items() if k != "step")
    assert states == 2 * sum(p.numel() for p in model.parameters())  # exp_avg and exp_avg_sq, once
    assert not any(torch.is_tensor(v) for v in vars(progress).values())


def tree_tensors(x):
    if torch.is_tensor(x):
        return [x]
    if isinstance(x, dict):
        x = list(x.values())
    return [t for v in x for t in tree_tensors(v)] if isinstance(x, (list, tuple)) else []


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_shipped_1_7B_configs_fit_an_80_gb_card(stage):
    """Every batch kind of the shipped 1.7B configs at its largest fits 80 GiB with the allocator's and the CUDA
    context's allowances (memory.Estimate.fits), the DPO reference included."""
    cfg = config.load(os.path.join(ROOT, "configs", f"stage{stage}_1.7B.yaml"))
    settings = memory.model_settings(cfg, ("smollm2-1.7b", "dinov2-small"))
    kinds = memory.largest_batches(cfg, 49152)
    assert set(kinds) == ({"dpo"} if stage == 3 else {"video", "text"})
    for kind, samples in kinds.items():
        estimate = memory.estimate(cfg, settings, kind, samples)
        assert estimate.fits(80) and estimate.peak > 40 * memory.GIB, (kind, estimate)
        assert (estimate.reference > 0) == (stage == 3)
