"""Batching variable-length samples into the batches FoveatedVLM.forward and forward_dpo take (train.py's
model_outputs):

CE batch:  pixels [U, 3, H, W] (the batch's distinct frames: uint8 from the loader), frame_idx [M] long (the
           distinct frame of each of the M real frames, sample-major), frame_mask [B, T] bool (real frames first),
           input_ids [B, S] long, attention_mask [B, S] long (right padding), loss_mask [B, S] long, and `plan`
           (layout.Plan: the sizes and indices the model would otherwise find with host syncs).
DPO batch: pixels, frame_idx, frame_mask, chosen_ids, chosen_mask, chosen_loss_mask, rejected_ids, rejected_mask,
           rejected_loss_mask, plan.
T is the batch's longest clip (0 for a text-only batch); text is padded with the tokenizer's pad id. A
replicated image (8 stride-0 views of one frame) is one row of `pixels` read by 8 entries of frame_idx: its
copies are never made, in the worker, in shared memory or on the GPU. `pad_frames` pads frames [B, T, 3, H, W]
as they are (benchmark.py's question batches).
Every batch also has `skipped`: a Counter of samples the loader skipped, by reason, since the previous batch
(pop it before calling the model). `BudgetBatches` makes batches that hold at most `max_total_frames` frames and
`max_batch_tokens` LLM tokens.
"""

import math
from collections import Counter

import torch
from torch.utils.data import IterableDataset, get_worker_info

from layout import pair_rows, plan


def batch_tensor(shape, dtype):
    """An uninitialised tensor for a batch. In a DataLoader worker it is allocated in shared memory, as torch's
    default_collate does: sending it to the main process then copies nothing (for 224 px frames, ~6 MB a
    sample that would otherwise be copied once more)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def pad_frames(samples):
    """Stack each sample's frames [T_i, 3, H, W] into [B, T, 3, H, W] with frame_mask [B, T]."""
    shapes = {tuple(s["frames"].shape[1:]) for s in samples}
    assert len(shapes) == 1, f"frames of different sizes in one batch: {shapes}"
    T = max(s["frames"].shape[0] for s in samples)
    frames = batch_tensor((len(samples), T, *shapes.pop()), samples[0]["frames"].dtype)  # [B, T, 3, H, W]
    frame_mask = torch.zeros(len(samples), T, dtype=torch.bool)  # [B, T]
    for b, s in enumerate(samples):
        t = s["frames"].shape[0]
        frames[b, :t] = s["frames"]  # materialises replicated (stride-0) image frames
        frames[b, t:] = 0
        frame_mask[b, :t] = True
    return frames, frame_mask


def pack_frames(samples):
    """Each sample's frames [T_i, 3, H, W] -> (pixels [U, 3, H, W]: the distinct frames, each run of consecutive
    identical frames kept once, as the model encodes them; frame_idx [M]; frame_mask [B, T]). Replicated views
    (stride 0) are known equal without a look at their bytes."""
    clips = [s["frames"] for s in samples]
    shapes = {tuple(c.shape[1:]) for c in clips}
    assert len(shapes) == 1, f"frames of different sizes in one batch: {shapes}"
    frame_mask = torch.zeros(len(clips), max(len(c) for c in clips), dtype=torch.bool)  # [B, T]
    fresh, last = [], None  # per clip: [T_i] whether each frame differs from the one before it
    for b, c in enumerate(clips):
        frame_mask[b, :len(c)] = True
        if len(c):
            new = torch.zeros(len(c), dtype=torch.bool)
            if c.stride(0) != 0:
                new[1:] = (c[1:] != c[:-1]).flatten(1).any(1)
            new[0] = last is None or not torch.equal(c[0], last)
            fresh.append(new)
            last = c[-1]
    new = torch.cat(fresh) if fresh else torch.zeros(0, dtype=torch.bool)  # [M]
    pixels = batch_tensor((int(new.sum()), *shapes.pop()), clips[0].dtype)
    u = 0
    for c, keep in zip([c for c in clips if len(c)], fresh):
        n = int(keep.sum())
        pixels[u:u + n] = c[keep]
        u += n
    return pixels, torch.cumsum(new, 0) - 1, frame_mask


def pad_text(id_list, mask_list, pad_id):
    """Right-pad 1-D id and loss-mask tensors -> ids, attention_mask, loss_mask, each [B, S]."""
    S = max(len(x) for x in id_list)
    ids = torch.full((len(id_list), S), pad_id, dtype=torch.long)
    attention = torch.zeros(len(id_list), S, dtype=torch.long)
    loss = torch.zeros(len(id_list), S, dtype=torch.long)
    for b, (x, m) in enumerate(zip(id_list, mask_list)):
        assert len(x) == len(m), f"sample {b}: {len(x)} ids but {len(m)} loss-mask entries"
        ids[b, :len(x)], attention[b, :len(x)], loss[b, :len(x)] = x, 1, m
    return ids, attention, loss


def _skipped(samples):
    total = Counter()
    for s in samples:
        total.update(s.get("skipped", {}))
    return total


def collate_ce(samples, pad_id):
    pixels, frame_idx, frame_mask = pack_frames(samples)
    ids, attention, loss = pad_text([s["input_ids"] for s in samples], [s["loss_mask"] for s in samples], pad_id)
    return {"pixels": pixels, "frame_idx": frame_idx, "frame_mask": frame_mask, "input_ids": ids,
            "attention_mask": attention, "loss_mask": loss,
            "plan": plan(frame_mask, frame_idx, len(pixels), attention, loss), "skipped": _skipped(samples)}


def collate_dpo(samples, pad_id):
    pixels, frame_idx, frame_mask = pack_frames(samples)
    batch = {"pixels": pixels, "frame_idx": frame_idx, "frame_mask": frame_mask}
    for side in ("chosen", "rejected"):
        ids, attention, loss = pad_text([s[f"{side}_ids"] for s in samples],
                                        [s[f"{side}_loss_mask"] for s in samples], pad_id)
        batch.update({f"{side}_ids": ids, f"{side}_mask": attention, f"{side}_loss_mask": loss})
    rows = [pair_rows(batch[f"chosen_{k}"], batch[f"rejected_{k}"]) for k in ("mask", "loss_mask")]
    batch["plan"] = plan(frame_mask, frame_idx, len(pixels), *rows)
    batch["skipped"] = _skipped(samples)
    return batch


def collate(samples, pad_id):
    """A list of samples (all CE or all DPO) -> one batch."""
    assert samples, "empty batch"
    return collate_dpo(samples, pad_id) if "chosen_ids" in samples[0] else collate_ce(samples, pad_id)


def row_tokens(sample):
    """(LLM rows, tokens per row) of a sample: one row of its visual tokens (a frame each) and its text, or for a
    DPO pair two rows (chosen and rejected, each padded to the longer answer), as FoveatedVLM lays them out."""
    T = sample["frames"].shape[0]
    if "chosen_ids" in sample:
        return 2, T + max(len(sample["chosen_ids"]), len(sample["rejected_ids"]))
    return 1, T + len(sample["input_ids"])


class BudgetBatches(IterableDataset):
    """Group a sample stream into lists of at most `batch_size` samples whose padded frames (len(batch) x the
    longest T) stay within `max_total_frames` and whose padded LLM tokens (len(batch) x rows per sample x the
    longest row, see row_tokens) stay within `max_batch_tokens` (None: no such cap). A sample beyond a budget on
    its own is a batch of one. Text-only samples (T = 0) are bounded by the token budget and batch_size."""

    def __init__(self, samples, batch_size, max_total_frames=None, max_batch_tokens=None):
        assert batch_size >= 1 and (max_total_frames or 1) >= 1 and (max_batch_tokens or 1) >= 1, \
            (batch_size, max_total_frames, max_batch_tokens)
        self.samples, self.batch_size = samples, batch_size
        self.max_total_frames, self.max_batch_tokens = max_total_frames, max_batch_tokens

    def fits(self, n, frames, rows, row):
        """Whether n samples, the longest with `frames` frames and a row of `row` tokens, fit the budgets."""
        return (n <= self.batch_size and (self.max_total_frames is None or n * frames <= self.max_total_frames)
                and (self.max_batch_tokens is None or n * rows * row <= self.max_batch_tokens))

    def __iter__(self):
        batch, frames, row = [], 0, 0
        for s in self.samples:
            rows, tokens = row_tokens(s)
            t = s["frames"].shape[0]
            if batch and not self.fits(len(batch) + 1, max(frames, t), rows, max(row, tokens)):
                yield batch
                batch, frames, row = [], 0, 0
            batch.append(s)
            frames, row = max(frames, t), max(row, tokens)
        if batch:
            yield batch
