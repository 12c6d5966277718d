"""Mixed precision on the CPU (torch.autocast("cpu")), the path a GPU run takes in bf16: a training step in each
loss type, validation, generation and MCQ scoring stay finite and within the tolerances below of float32;
checkpoints keep float32 master weights; float16 trains with a GradScaler whose scale survives a resume.

Tolerances. bf16 keeps 8 significant bits (unit roundoff u = 2^-8 = 3.9e-3); autocast rounds each matmul's
inputs to it and accumulates in float32, so every layer adds errors of order u, and sums over many tokens
(losses, option scores) average them down. The tiny LLM uses initializer_range 0.2 so that its logits spread
(std ~1.6) and an argmax means something. Measured on it (max over the cases) vs allowed:
- loss (CE all-text, answer-only, DPO; validation): relative 4.3e-3 vs RTOL 2e-2 (5 u)
- gradient: cosine >= 0.9993 vs GRAD_COS 0.99; norm relative 1.2e-2 vs 5e-2
- logits during generation: 4.9% of the largest |logit| (~0.35 of 7) vs LOGIT_TOL = 10%: a 64-wide dot product
  of two vectors each off by a few u; generation must pick float32's token wherever float32's own top-2 gap
  exceeds twice that (coarse_only's first token differed where the gap was small)
- option scores (mean CE of an option, ~11 nats): 0.047 vs 0.1 nats (1%)
- DPO rewards (beta 0.1 x summed answer log-probabilities of ~60-125 nats, each off by up to 0.25 nats):
  0.0093 vs REWARD_ATOL 0.05; the reward accuracy is the same (its smallest |margin| is 0.14)
- a 2-step training run's logged losses: relative 7e-5 vs RTOL
"""

import copy
import json
import os

import pytest
import torch
from safetensors import safe_open

import checkpoint
import config
import distributed
import train
from conftest import TINY_LLM, rand_frames, read_log, tiny_model_kwargs, write_colour_shard, write_config
from model import MODES, FoveatedVLM

CPU = torch.device("cpu")
RTOL, GRAD_COS, GRAD_NORM_RTOL, LOGIT_TOL, SCORE_ATOL, REWARD_ATOL = 2e-2, 0.99, 5e-2, 0.1, 0.1, 0.05


def make_model(seed):
    torch.manual_seed(seed)
    return FoveatedVLM(**tiny_model_kwargs(llm_config=dict(TINY_LLM, initializer_range=0.2)))


@pytest.fixture(scope="module")
def models():
    """The policy and, for DPO, a different model as the reference (equal ones give a loss of exactly log 2)."""
    return make_model(0), make_model(1).eval().requires_grad_(False)


def text(B, S, seed):
    """Random ids with the second row padded after 15 tokens; the answer is tokens 10 onwards."""
    ids = torch.randint(3, 2000, (B, S), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 15:] = 0
    answer = torch.zeros_like(mask)
    answer[:, 10:] = 1
    return ids, mask, answer * mask


def batch(loss_type, B=3, T=4, S=20):
    """One micro-batch of `loss_type` with padded frames and text."""
    frames = rand_frames(B, T)
    frame_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    ids, mask, answer = text(B, S, 1)
    if loss_type == "dpo":
        (c, cm, cl), (r, rm, rl) = text(B, S, 2), text(B, S, 3)
        return {"frames": frames, "frame_mask": frame_mask, "chosen_ids": c, "chosen_mask": cm, "chosen_loss_mask": cl,
                "rejected_ids": r, "rejected_mask": rm, "rejected_loss_mask": rl}
    loss_mask = mask if loss_type == "text_ce_all" else answer
    return {"frames": frames, "frame_mask": frame_mask, "input_ids": ids, "attention_mask": mask,
            "loss_mask": loss_mask}


def loss_and_grad(models, loss_type, dtype):
    """compute_loss under `dtype` autocast and backward: (loss, flat gradient, metrics) of a fresh policy copy."""
    cfg = config.from_dict({"loss": {"type": loss_type}})
    policy = copy.deepcopy(models[0]).train()
    reference = models[1] if loss_type == "dpo" else None
    with distributed.autocast(CPU, dtype):
        loss, metrics = train.compute_loss(train.StepModule(policy, loss_type == "dpo", "coarse_fine"), reference,
                                           batch(loss_type), cfg)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])
    return loss.detach(), grad, metrics


@pytest.mark.parametrize("loss_type", ["text_ce_all", "text_ce_answer_only", "dpo"])
def test_bf16_training_step_matches_float32(models, loss_type):
    loss32, grad32, metrics32 = loss_and_grad(models, loss_type, "float32")
    loss16, grad16, metrics16 = loss_and_grad(models, loss_type, "bfloat16")
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16) and torch.isfinite(grad16).all()
    assert abs(loss16 - loss32) <= RTOL * abs(loss32), (loss16, loss32)
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) >= GRAD_COS
    assert abs(grad16.norm() - grad32.norm()) <= GRAD_NORM_RTOL * grad32.norm()
    assert metrics16.keys() == metrics32.keys() == ({"reward_acc", "reward_margin", "reward_chosen", "reward_rejected"}
                                                    if loss_type == "dpo" else set())
    for name, value in metrics32.items():
        assert abs(metrics16[name] - value) <= REWARD_ATOL, (name, metrics16[name], value)
    # the whole step: bf16 compute, float32 parameters updated
    cfg = config.from_dict({"loss": {"type": loss_type}, "training": {"dtype": "bfloat16"}})
    policy = copy.deepcopy(models[0]).train()
    before = [p.detach().clone() for p in policy.parameters()]
    optimizer = train.build_optimizer(policy, cfg.training)
    stepped, _, _, _, _ = train.train_step(train.StepModule(policy, loss_type == "dpo", "coarse_fine"),
                                           models[1] if loss_type == "dpo" else None, iter([batch(loss_type)]),
                                           optimizer, cfg, distributed.Dist(0, 0, 1, CPU),
                                           distributed.grad_scaler(CPU, "bfloat16"))
    assert stepped and optimizer.defaults["fused"] is None  # fused AdamW only when every parameter is on CUDA
    params = list(policy.parameters())
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in params)
    assert sum(not torch.equal(a, p) for a, p in zip(before, params)) > len(params) // 2


def test_bf16_validation_matches_float32(models):
    policy = models[0]
    losses = {}
    for dtype in ("float32", "bfloat16"):
        cfg = config.from_dict({"loss": {"type": "text_ce_answer_only"}, "training": {"dtype": dtype},
                                "eval": {"modes": list(MODES)}})
        step_module = train.StepModule(policy, False, "coarse_fine")
        losses[dtype] = train.evaluate(step_module, None, [batch("text_ce_answer_only")], cfg,
                                       distributed.Dist(0, 0, 1, CPU))
    assert len(losses["bfloat16"]) == 3 and policy.training  # every mode, and training mode restored
    for name, value in losses["float32"].items():
        assert abs(losses["bfloat16"][name] - value) <= RTOL * value, (name, losses)


def recorded_generation(model, dtype, frames, ids, mask, frame_mask, mode):
    """Greedy tokens and the float32 logits each step chose from, under `dtype` autocast."""
    steps, logits = [], model._logits

    def record(h):
        steps.append(logits(h).float())
        return steps[-1]

    model._logits = record
    try:
        with distributed.autocast(CPU, dtype):
            tokens = model.generate(frames, ids, mask, frame_mask=frame_mask, max_new_tokens=6, mode=mode)
    finally:
        del model._logits
    return tokens, steps


@pytest.mark.parametrize("mode", MODES)
def test_bf16_generate_and_score_options_match_float32(models, mode):
    model, b = models[0], batch("text_ce_all")
    args = (b["frames"], b["input_ids"][:, :10], b["attention_mask"][:, :10], b["frame_mask"], mode)
    tokens32, logits32 = recorded_generation(model, "float32", *args)
    tokens16, logits16 = recorded_generation(model, "bfloat16", *args)
    tol = LOGIT_TOL * logits32[0].abs().max()
    for step, (a, b16) in enumerate(zip(logits32, logits16)):  # identical prefixes up to the first different token
        assert torch.isfinite(b16).all() and (a - b16).abs().max() <= tol, (step, (a - b16).abs().max(), tol)
        differs = tokens32[:, step] != tokens16[:, step]
        if differs.any():
            top2 = a[differs].topk(2, -1).values
            assert (top2[:, 0] - top2[:, 1] <= 2 * tol).all(), "bf16 chose another token where float32 was sure"
            break
    prompt, options = list(range(5, 15)), [[20, 21, 22], [30, 31], [40, 41, 42, 43], [50]]
    scores32 = model.score_options(b["frames"][:1], prompt, options, modes=(mode,))[mode]
    with distributed.autocast(CPU, "bfloat16"):
        scores16 = model.score_options(b["frames"][:1], prompt, options, modes=(mode,))[mode]
    assert scores16.dtype == torch.float32 and (scores16 - scores32).abs().max() <= SCORE_ATOL, (scores16, scores32)


@pytest.fixture
def shard(tmp_path):
    write_colour_shard(tmp_path / "train.tar", 32, 0)
    return str(tmp_path / "train.tar")


def test_bf16_run_saves_float32_master_weights_and_logs_float32s_losses(tmp_path, shard):
    losses = {}
    for dtype in ("float32", "bfloat16"):
        path = write_config(tmp_path, dtype, data={"train_shards": shard},
                            training={"total_samples": 8, "batch_size": 4, "dtype": dtype, "log_every": 1})
        train.main(["--config", path])
        losses[dtype] = [float(r["loss"]) for r in read_log(str(tmp_path / dtype)) if r.get("loss")]
    with safe_open(os.path.join(tmp_path, "bfloat16", "latest", "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes == {"F32"}
    assert len(losses["bfloat16"]) == 2 and losses["bfloat16"][1] < losses["bfloat16"][0], losses  # both steps
    assert all(abs(b - a) <= RTOL * a for a, b in zip(losses["float32"], losses["bfloat16"])), losses


@pytest.mark.slow
def test_float16_scales_the_loss_counts_overflow_and_resumes_the_scale(tmp_path, shard, monkeypatch):
    """float16 (a GPU without bf16): a GradScaler. An overflowing step is skipped, counted and halves the scale;
    the scale is saved in training_state.pt and restored on resume (else a resumed run would start over at
    65536 and skip steps again)."""
    forward, calls = train.StepModule.forward, []

    def overflow_third(self, *args, **kwargs):  # the third micro-batch's gradients are infinite
        out = forward(self, *args, **kwargs)
        calls.append(1)
        return {**out, "loss": out["loss"] * float("inf")} if len(calls) == 3 else out

    monkeypatch.setattr(train.StepModule, "forward", overflow_third)
    sets = {"batch_size": 2, "dtype": "float16", "max_nonfinite_steps": 2}
    path = write_config(tmp_path, data={"train_shards": shard, "max_frames": 2, "replicate_image_frames": 2},
                        training={**sets, "total_samples": 6}, checkpoint={"save_every_steps": 1})
    train.main(["--config", path])
    save_dir = str(tmp_path / "run")
    state = checkpoint.load_state(os.path.join(save_dir, "latest"))
    assert state["step"] == 3 and len(calls) == 4  # 4 micro-batches for 3 steps: one was skipped
    assert state["scaler"]["scale"] == 65536.0 * 0.5
    assert [r["nonfinite_skipped"] for r in read_log(save_dir) if r.get("nonfinite_skipped")] == ["1"]
    longer = write_config(tmp_path, data={"train_shards": shard, "max_frames": 2, "replicate_image_frames": 2},
                          training={**sets, "total_samples": 8}, checkpoint={"save_every_steps": 1})
    train.main(["--config", longer])
    state = checkpoint.load_state(os.path.join(save_dir, "latest"))
    assert state["step"] == 4 and state["scaler"]["scale"] == 65536.0 * 0.5  # restored, not reset


def test_float16_backs_off_overflowing_gradients_without_stopping(tmp_path, shard, monkeypatch):
    """Gradients that overflow float16 at the scaler's initial scale skip steps until it has halved enough:
    steps in a row, more than max_nonfinite_steps, that must not stop the run (a finite loss each time)."""
    scalers = []

    def high_scale(device, dtype):
        scalers.append(torch.amp.GradScaler(device.type, init_scale=2.0 ** 40, growth_interval=10 ** 6))
        return scalers[-1]
    monkeypatch.setattr(distributed, "grad_scaler", high_scale)
    path = write_config(tmp_path, data={"train_shards": shard, "max_frames": 2, "replicate_image_frames": 2},
                        training={"batch_size": 2, "dtype": "float16", "max_nonfinite_steps": 2, "total_samples": 8})
    train.main(["--config", path])
    skipped = [int(r["nonfinite_skipped"]) for r in read_log(str(tmp_path / "run")) if r.get("nonfinite_skipped")]
    assert max(skipped) > 2, skipped  # more in a row than max_nonfinite_steps
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 4
    assert scalers[0].get_scale() == 2.0 ** (40 - len(skipped))


def test_bf16_dpo_reference_gives_float32_references_rewards(models):
    """On CUDA in bf16 the frozen DPO reference holds bf16 weights (train.reference_dtype: half its memory). Its
    rewards stay within REWARD_ATOL of a float32 reference's, both under bf16 autocast (measured: 0.005, the
    reward accuracy the same)."""
    cfg = config.from_dict({"loss": {"type": "dpo"}, "training": {"dtype": "bfloat16"}})
    assert train.reference_dtype(torch.device("cuda"), "auto") == torch.bfloat16
    assert train.reference_dtype(torch.device("cuda"), "float16") == train.reference_dtype(CPU, "bfloat16") \
        == torch.float32
    policy = copy.deepcopy(models[0]).eval()
    metrics = {}
    with torch.no_grad(), distributed.autocast(CPU, "bfloat16"):
        for dtype in (torch.float32, torch.bfloat16):
            reference = copy.deepcopy(models[1]).to(dtype)
            _, metrics[dtype] = train.compute_loss(train.StepModule(policy, True, "coarse_fine"), reference,
                                                   batch("dpo"), cfg)
    for name, value in metrics[torch.float32].items():
        assert abs(metrics[torch.bfloat16][name] - value) <= REWARD_ATOL, (name, metrics[torch.bfloat16][name], value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gets_tf32_matmuls_and_fused_adamw():
    dist = distributed.init(0, "cuda")
    assert torch.get_float32_matmul_precision() == "high"
    model = make_model(0).to(dist.device)
    assert train.build_optimizer(model, config.TrainingConfig()).defaults["fused"] is True
    assert distributed.resolve_dtype(dist.device) == "bfloat16"
