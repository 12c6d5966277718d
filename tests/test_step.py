"""The training step as the loader feeds it: uint8 pixels, replicated images as an index and the host-computed
plan give the float32 path's losses, logits and gradients; no host-device sync is left in a micro-batch."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import config
import train
from collate import collate, pad_frames
from conftest import TINY_LLM, tiny_model_kwargs
from frames import normalise_pixels
from model import MODES, FoveatedVLM

SIZE = 56


def pixels(T, seed):
    return torch.randint(0, 256, (T, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def text(n, seed, answer_from=2):
    ids = torch.randint(3, 2000, (n,), generator=torch.Generator().manual_seed(seed))
    return ids, (torch.arange(n) >= answer_from).long()


def samples(dpo=False):
    """A 3-frame video, an image as 4 views of one frame, a 2-frame video repeating its frame, text of 5-9 tokens."""
    clips = [pixels(3, 0), pixels(1, 1).expand(4, -1, -1, -1), pixels(1, 2).expand(2, -1, -1, -1).clone()]
    out = []
    for i, clip in enumerate(clips):
        ids, mask = text(5 + 2 * i, 10 + i)
        if dpo:
            rejected, rmask = text(9 - 2 * i, 20 + i)
            out.append({"frames": clip, "chosen_ids": ids, "chosen_loss_mask": mask, "rejected_ids": rejected,
                        "rejected_loss_mask": rmask})
        else:
            out.append({"frames": clip, "input_ids": ids, "loss_mask": mask})
    return out


def float_batch(batch, raw):
    """The same batch through the model's public path: normalised float frames [B, T, 3, H, W], no plan."""
    frames, frame_mask = pad_frames([{"frames": normalise_pixels(s["frames"])} for s in raw])
    keys = [k for k in batch if k not in ("pixels", "frame_idx", "plan", "skipped")]
    return {**{k: batch[k] for k in keys}, "frames": frames, "frame_mask": frame_mask}


def model(lambda_coarse=0.0):
    torch.manual_seed(0)
    return FoveatedVLM(**tiny_model_kwargs(llm_config=dict(TINY_LLM, initializer_range=0.2),
                                           lambda_coarse=lambda_coarse))


@pytest.mark.parametrize("dpo", [False, True])
def test_pixels_and_plan_give_the_float32_path(dpo):
    raw = samples(dpo)
    batch = collate(raw, pad_id=2)
    assert batch["pixels"].dtype == torch.uint8 and len(batch["pixels"]) == 3 + 1 + 1  # 9 real frames, 5 distinct
    reference = model().eval().requires_grad_(False) if dpo else None
    cfg = config.from_dict({"loss": {"type": "dpo" if dpo else "text_ce_answer_only"}})
    for mode in MODES:
        out = {}
        for name, b in (("pixels", batch), ("float", float_batch(batch, raw))):
            policy = model(lambda_coarse=0.5)
            loss, metrics = train.compute_loss(train.StepModule(policy, dpo, mode), reference, b, cfg, mode)
            loss.backward()
            out[name] = loss.detach(), metrics, torch.cat([p.grad.flatten() for p in policy.parameters()
                                                            if p.grad is not None])
        (loss, metrics, grad), (loss32, metrics32, grad32) = out["pixels"], out["float"]
        assert (loss - loss32).abs() <= 1e-6 * loss32.abs(), (mode, loss, loss32)
        assert (grad - grad32).abs().max() <= 1e-6 * grad32.abs().max(), mode
        assert all((metrics[k] - metrics32[k]).abs() <= 1e-5 for k in metrics32)


def test_pixels_give_the_float32_logits():
    raw = samples()
    batch = collate(raw, pad_id=2)
    f = float_batch(batch, raw)
    m = model().eval()
    encoded = train.encode(m, batch)
    for mode in MODES:
        got = m(None, batch["input_ids"], batch["attention_mask"], frame_mask=batch["frame_mask"], mode=mode,
                encoded=encoded, plan=batch["plan"])["logits"]
        want = m(f["frames"], f["input_ids"], f["attention_mask"], frame_mask=f["frame_mask"], mode=mode)["logits"]
        assert (got - want).abs().max() <= 1e-5, mode


class HostSyncs(TorchDispatchMode):
    """Counts the ops that make the host wait for the device on CUDA: a tensor's value read on the host
    (`.item()`, `int(t)`, `bool(t)`, `.tolist()`: aten._local_scalar_dense), and ops whose output size is
    data-dependent (nonzero, boolean-mask indexing, masked_select, unique, bincount without a known size,
    repeat_interleave without output_size). `.tolist()` of a CPU tensor dispatches no op: it is counted by name."""

    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_consecutive", "unique_dim",
               "bincount", "repeat_interleave"}

    def __init__(self):
        super().__init__()
        self.seen, self.paused = [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if self.paused:
            return func(*args, **(kwargs or {}))
        indices = args[1] if name in ("index", "index_put", "index_put_") else ()
        bool_index = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
        if name in self.SYNCING or bool_index:
            self.seen.append(name + (" (boolean mask)" if bool_index else ""))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        tolist = self.tolist = torch.Tensor.tolist
        torch.Tensor.tolist = lambda t: (self.paused or self.seen.append("tolist"), tolist(t))[1]
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self.tolist
        return super().__exit__(*exc)


@pytest.mark.parametrize("loss_type", ["text_ce_answer_only", "dpo"])
def test_a_micro_batch_makes_no_host_sync(loss_type):
    """forward + backward of a loader batch (its plan made on the host) reads nothing back from the device; the
    same batch without its plan (the model finding its own sizes) does, which is what the counter catches. The
    optimizer step adds one read: whether every rank's loss and gradient norm were finite (the optimizer's own,
    on the CPU, aside)."""
    dpo = loss_type == "dpo"
    batch = collate(samples(dpo), pad_id=2)
    cfg = config.from_dict({"loss": {"type": loss_type}, "model": {"lambda_coarse": 0.5}})
    reference = model().eval().requires_grad_(False) if dpo else None
    counts = {}
    for name, b in (("plan", batch), ("no plan", {k: v for k, v in batch.items() if k != "plan"})):
        step_module = train.StepModule(model(lambda_coarse=0.5), dpo, "coarse_fine")
        with HostSyncs() as syncs:
            loss, _ = train.compute_loss(step_module, reference, b, cfg)
            loss.backward()
        counts[name] = syncs.seen
    assert counts["plan"] == [] and len(counts["no plan"]) >= 8, counts
    policy = model()
    optimizer = train.build_optimizer(policy, cfg.training)
    step_module = train.StepModule(policy, dpo, "coarse_fine")
    dist = train.distributed.Dist(0, 0, 1, torch.device("cpu"))
    adamw_step = optimizer.step

    def step_uncounted():  # the CPU's AdamW reads each parameter's step count; CUDA's fused AdamW reads nothing
        syncs.paused = True
        adamw_step()
        syncs.paused = False

    optimizer.step = step_uncounted
    with HostSyncs() as syncs:
        stepped, *_ = train.train_step(step_module, reference, iter([copy.copy(batch)]), optimizer, cfg, dist,
                                       train.distributed.grad_scaler(dist.device, "float32"))
    assert stepped and syncs.seen == ["tolist"], syncs.seen


def test_the_vocabulary_projection_in_pieces_gives_the_same_loss_and_gradients(monkeypatch):
    """Beyond LOGIT_CHUNK targets the logits are made in LOGIT_PIECES pieces, each recomputed in the backward."""
    import model as model_module

    batch = collate(samples(), pad_id=2)
    cfg = config.from_dict({"loss": {"type": "text_ce_all"}})
    out = []
    for chunk in (10_000, 4):  # 15 targets: whole, then in 8 pieces
        monkeypatch.setattr(model_module, "LOGIT_CHUNK", chunk)
        policy = model()
        loss, _ = train.compute_loss(train.StepModule(policy, False, "coarse_fine"), None, batch, cfg)
        loss.backward()
        out.append((loss.detach(), torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])))
    assert batch["plan"].target_row.numel() == 15
    (loss, grad), (pieces, pieces_grad) = out  # the weight gradient is a sum of 8 products, not one: rounding
    assert (loss - pieces).abs() <= 1e-6 and (grad - pieces_grad).abs().max() <= 1e-5 * grad.abs().max()


def stream(sizes, seed):
    """Collated batches of samples with (frames, text tokens) each: frames a video's count, 0 for text only, or
    "image" (one frame as 4 views)."""
    batches = []
    for i, batch in enumerate(sizes):
        raw = []
        for j, (T, S) in enumerate(batch):
            ids, mask = text(S, seed + 10 * i + j)
            clip = (pixels(1, seed + i + j).expand(4, -1, -1, -1) if T == "image" else pixels(T, seed + i + j) if T
                    else torch.zeros(0, 3, SIZE, SIZE, dtype=torch.uint8))
            raw.append({"frames": clip, "input_ids": ids, "loss_mask": mask})
        batches.append(collate(raw, pad_id=2))
    return batches


@pytest.mark.slow
def test_compiled_step_has_no_graph_break_and_a_graph_per_batch_kind(monkeypatch):
    """training.compile's step (traced by dynamo with the eager backend: graph capture without code generation)
    over batches of different frame counts, text lengths and sizes, videos and images: no graph break; one graph
    for every batch of several samples with frames, one for text-only batches, one for a single video, one for a
    single image (sizes 1 are specialised); a second pass over new sizes compiles nothing, and validation (eager,
    in every mode) neither."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(train, "COMPILE", {**train.COMPILE, "backend": "eager"})
    cfg = config.from_dict({"loss": {"type": "text_ce_answer_only"}, "training": {"compile": True}})
    dist = train.distributed.Dist(0, 0, 1, torch.device("cpu"))
    step_module = train.wrap(model(), cfg, dist)
    first = stream([[(3, 6), (2, 7)], [("image", 9), (4, 5), ("image", 8)], [(0, 9), (0, 12)], [(6, 5)],
                    [("image", 7)]], seed=0)
    second = stream([[(2, 11), (5, 4)], [("image", 6), ("image", 5)], [(0, 7), (0, 3), (0, 5)], [(7, 9)],
                     [(1, 3), (3, 3)], [("image", 9)]], seed=1)
    graphs = []
    for batches in (first, second):
        for batch in batches:
            loss, _ = train.compute_loss(step_module, None, batch, cfg)
            loss.backward()
        graphs.append(counters["stats"]["unique_graphs"])
    cfg.eval.modes = list(MODES)
    train.evaluate(step_module, None, first, cfg, dist)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert graphs == [4, 4] and counters["stats"]["unique_graphs"] == 4
