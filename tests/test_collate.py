"""Batching (distinct frames and their index, text padding, DPO, the plan), the frame and token budgets and the
text-retention schedule."""

from collections import Counter

import torch
from torch.utils.data import DataLoader

from collate import BudgetBatches, collate, row_tokens
from text_interleave import interleave, is_text_step

PAD = 2


def ce_sample(T, ids, mask, skipped=None):
    frames = torch.arange(1, T + 1, dtype=torch.float32).view(T, 1, 1, 1).expand(T, 3, 4, 4)
    return {"frames": frames, "input_ids": torch.tensor(ids), "loss_mask": torch.tensor(mask),
            "skipped": Counter(skipped or {})}


def test_ce_collate_pads_frames_and_text():
    batch = collate([ce_sample(2, [5, 6, 7], [0, 1, 1], {"bad_video": 1}),
                     ce_sample(4, [8, 9], [1, 1], {"bad_video": 2, "no_text": 1})], PAD)
    assert batch["pixels"].shape == (6, 3, 4, 4) and batch["pixels"][:, 0, 0, 0].tolist() == [1, 2, 1, 2, 3, 4]
    assert batch["frame_idx"].tolist() == list(range(6))
    assert batch["frame_mask"].tolist() == [[True, True, False, False], [True] * 4]
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1], [1, 1, 0]]
    assert batch["input_ids"].dtype == torch.long and batch["frame_mask"].dtype == torch.bool
    assert batch["skipped"] == {"bad_video": 3, "no_text": 1}
    plan = batch["plan"]  # the LLM rows [2 + 3 tokens], [4 + 2 tokens]; targets at compact positions i >= 1
    assert (plan.T, plan.L, plan.R) == (4, 6, 2) and plan.slot.tolist() == [0] * 6  # R: a spare slot, at least
    assert plan.row.tolist() == [0, 0, 1, 1, 1, 1] and plan.col.tolist() == [0, 1, 0, 1, 2, 3]
    assert plan.target_row.tolist() == [0, 0, 1] and plan.target_col.tolist() == [0, 1, 0]


def test_replicated_and_repeated_frames_travel_once():
    """An image's 8 views are one row of `pixels` read 8 times (no copy); consecutive equal frames, within a video
    or across samples, are kept once, as the model's content dedup would encode them; the pixels keep their dtype."""
    frame = torch.randint(0, 256, (3, 4, 4), dtype=torch.uint8)
    image = {"frames": frame.unsqueeze(0).expand(8, -1, -1, -1), "input_ids": torch.tensor([1]),
             "loss_mask": torch.tensor([1])}
    video = {"frames": torch.stack([frame, frame, frame + 1, frame]), "input_ids": torch.tensor([1]),
             "loss_mask": torch.tensor([1])}
    batch = collate([image, video, dict(image, frames=image["frames"][:1])], PAD)
    assert batch["pixels"].dtype == torch.uint8 and batch["pixels"].shape == (3, 3, 4, 4)
    assert torch.equal(batch["pixels"][0], frame) and torch.equal(batch["pixels"][1], frame + 1)
    assert torch.equal(batch["pixels"][2], frame)
    assert batch["frame_idx"].tolist() == [0] * 10 + [1, 2, 2]
    plan = batch["plan"]
    assert plan.R == 10 and plan.slot.tolist() == list(range(10)) + [0, 0, 1]


def test_dpo_collate():
    def pair(T, c, r):
        return {"frames": torch.zeros(T, 3, 4, 4), "skipped": Counter(),
                "chosen_ids": torch.tensor(c), "chosen_loss_mask": torch.ones(len(c), dtype=torch.long),
                "rejected_ids": torch.tensor(r), "rejected_loss_mask": torch.ones(len(r), dtype=torch.long)}

    batch = collate([pair(1, [3, 4], [3, 5, 6]), pair(2, [3], [3])], PAD)
    assert set(batch) == {"pixels", "frame_idx", "frame_mask", "chosen_ids", "chosen_mask", "chosen_loss_mask",
                          "rejected_ids", "rejected_mask", "rejected_loss_mask", "plan", "skipped"}
    assert batch["chosen_ids"].tolist() == [[3, 4], [3, PAD]]
    assert batch["rejected_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["rejected_loss_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["frame_mask"].tolist() == [[True, False], [True, True]]
    plan = batch["plan"]  # 4 rows (chosen 0, 1, rejected 0, 1) of [1 + 3], [2 + 1], [1 + 3], [2 + 1] tokens
    assert plan.L == 4 and plan.target_row.tolist() == [0, 2, 2] and plan.target_col.tolist() == [0, 0, 1]


def test_budget_batches_respect_max_total_frames():
    Ts = [4, 4, 4, 10, 2, 2, 20, 0, 0, 0]
    samples = [ce_sample(T, [1], [1]) for T in Ts]
    batches = list(BudgetBatches(samples, batch_size=3, max_total_frames=12))
    sizes = [[b["frames"].shape[0] for b in batch] for batch in batches]
    assert sizes == [[4, 4, 4], [10], [2, 2], [20], [0, 0, 0]]
    for batch in sizes[:3]:
        assert len(batch) * max(batch) <= 12


def test_budget_batches_respect_max_batch_tokens():
    """Padded LLM tokens (samples x longest row of frames + text) stay within the budget, text-only batches too;
    a DPO pair is two rows, each padded to its longer answer; a sample beyond the budget is a batch of one."""
    text = [ce_sample(0, [1] * n, [1] * n) for n in (100, 300, 200, 50, 60, 1000, 20)]
    batches = list(BudgetBatches(text, batch_size=8, max_batch_tokens=600))
    assert [[len(s["input_ids"]) for s in b] for b in batches] == [[100, 300], [200, 50, 60], [1000], [20]]
    video = [ce_sample(T, [1] * n, [1] * n) for T, n in ((4, 40), (8, 20), (2, 90), (2, 120))]
    batches = list(BudgetBatches(video, batch_size=8, max_total_frames=24, max_batch_tokens=200))
    # 3 x 92 tokens > 200 though 3 x 8 frames fit; 2 x 122 > 200
    assert [[s["frames"].shape[0] for s in b] for b in batches] == [[4, 8], [2], [2]]
    pair = {"frames": torch.zeros(2, 3, 4, 4), "chosen_ids": torch.ones(10), "rejected_ids": torch.ones(30)}
    assert row_tokens(pair) == (2, 32)
    assert [len(b) for b in BudgetBatches([pair] * 5, batch_size=8, max_batch_tokens=130)] == [2, 2, 1]
    for budget in (None, 10_000):  # the frame budget alone, and both: batch_size still bounds the batch
        assert [len(b) for b in BudgetBatches(text, batch_size=3, max_batch_tokens=budget)] == [3, 3, 1]


def test_text_steps_exact_share_and_seeded():
    steps = [is_text_step(i, 0.14, seed=0) for i in range(1000)]
    assert sum(steps) == 140
    assert all(sum(steps[i:i + 50]) in (7, 8) for i in range(0, 950, 50))  # spread, not bunched
    assert steps == [is_text_step(i, 0.14, seed=0) for i in range(1000)]
    assert steps != [is_text_step(i, 0.14, seed=1) for i in range(1000)]
    assert not any(is_text_step(i, 0.0, seed=0) for i in range(100))


def test_interleave_uses_text_batches_at_text_steps():
    visual = ({"frames": torch.zeros(2, 3, 3, 4, 4), "i": i} for i in range(1000))
    text = ({"frames": torch.zeros(2, 0, 3, 4, 4), "i": i} for i in range(1000))
    out = [b for _, b in zip(range(100), interleave(visual, text, 0.25, seed=3))]
    kinds = [b["frames"].shape[1] == 0 for _, b in out]
    assert kinds == [is_text_step(i, 0.25, seed=3) for i in range(100)] and sum(kinds) == 25
    assert [b["i"] for _, b in out if b["frames"].shape[1]] == list(range(75))  # each stream in order
    resumed = interleave(iter([{"frames": torch.zeros(1, 3, 3, 4, 4)}] * 10),
                         iter([{"frames": torch.zeros(1, 0, 3, 4, 4)}] * 10), 0.25, seed=3, start_step=40)
    got = [(step, b["frames"].shape[1] == 0) for step, b in (next(resumed) for _ in range(5))]
    assert got == [(40 + i, kinds[40 + i]) for i in range(5)]  # a resumed run continues the same schedule


def test_worker_batches_are_built_in_shared_memory():
    """In a loader worker the distinct frames are written straight into shared memory (nothing copied again to
    reach the main process), though the tensor starts uninitialised."""
    samples = [ce_sample(2, [5], [1]), ce_sample(3, [6], [1])]
    loader = DataLoader([samples], batch_size=None, num_workers=1,
                        collate_fn=lambda s: (collate(s, PAD)["pixels"].is_shared(), collate(s, PAD)["pixels"]))
    shared, pixels = next(iter(loader))
    assert shared and not collate(samples, PAD)["pixels"].is_shared()
    assert torch.equal(pixels, collate(samples, PAD)["pixels"])
