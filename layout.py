"""How per-sample visual tokens and texts become the rows of one LLM pass.

Each row holds one sample's real tokens contiguously from position 0: its visual tokens, then its text, padding
after, so a sample gives the same outputs alone or in any padded batch. A text may also be a tree: a shared stem
(an MCQ prompt) followed by branches (the options) that each see the visual tokens and the stem but not each
other, all read in one pass. A branch's tokens take the positions they would have right after the stem, the
layout of tree attention in speculative decoding (SpecInfer, Miao et al., 2024): the options share the prefix's
computation with no copy of its KV cache.

A batch's data-dependent sizes and indices (where each visual token sits, the query grid, the row length, the
text's targets) are one `Plan`. collate.py computes it on the host from the batch's masks, so the training step
runs with no host-device sync and no data-dependent shape (torch.compile sees none); without one, the model finds
the same from its inputs on their device.
"""

from typing import NamedTuple

import torch

PAD = -1  # branch id of padding; 0 is the stem (and every visual token), k >= 1 is branch k


def gather_rows(x, index):
    """x [B, L, D], index [B, S] -> [B, S, D]."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def pad_packed(packed, counts):
    """Packed per-sample tokens [M, D] (sample-major) -> ([B, max(counts), D] right-padded, mask [B, max])."""
    L = int(counts.max()) if len(counts) else 0
    mask = torch.arange(L, device=counts.device) < counts[:, None]
    out = packed.new_zeros(len(counts), L, packed.shape[-1])
    return out.masked_scatter(mask[..., None], packed), mask


def group_slots(frame_idx, num_frames):
    """Lay out M queries as [U, R] slots, R = most queries on one frame, so that attention over each
    frame's keys needs no copy of those keys (encoder.query_attend). Returns (frame, slot, R) with frame/slot of
    shape [M]."""
    order = torch.argsort(frame_idx, stable=True)
    counts = torch.bincount(frame_idx, minlength=num_frames)
    starts = torch.cumsum(counts, 0) - counts
    slot_sorted = torch.arange(len(frame_idx), device=frame_idx.device) - starts[frame_idx[order]]
    slot = torch.empty_like(frame_idx)
    slot[order] = slot_sorted
    return frame_idx, slot, int(counts.max()) if len(counts) else 0


def visual_rows(counts, T=None):
    """Where packed per-sample visual tokens (sample-major) sit in rows of T columns (default: the most tokens of
    a sample): (T, row [M], col [M])."""
    T = (int(counts.max()) if len(counts) else 0) if T is None else T
    row, col = (torch.arange(T, device=counts.device) < counts[:, None]).nonzero(as_tuple=True)
    return T, row, col


def text_weights(dest, loss_mask):
    """The loss weight at each compact text position [B, S] (dest: compact_text's) from loss_mask [B, S], 0 at
    padding."""
    return torch.zeros_like(dest, dtype=torch.float).scatter(1, dest, loss_mask.float())


def targets(weights):
    """The text's targets, compact positions i >= 1 with weight > 0 (weights [B, S]), as (row [K], i - 1 [K]): the
    position whose state predicts each."""
    return (weights[:, 1:] > 0).nonzero(as_tuple=True)


def pair_rows(chosen, rejected):
    """DPO's chosen [B, S_c] and rejected [B, S_r] rows as one [2B, S] (chosen first), zero-padded to the longer."""
    S = max(chosen.shape[1], rejected.shape[1])
    pad = lambda x: torch.nn.functional.pad(x, (0, S - x.shape[1]))  # noqa: E731
    return torch.cat([pad(chosen), pad(rejected)])


class Plan(NamedTuple):
    """A batch's data-dependent sizes and indices, found once (see `plan`)."""

    T: int  # columns of visual tokens: the longest clip
    row: torch.Tensor  # [M] the row of each packed visual token (sample-major)
    col: torch.Tensor  # [M] its column, t
    slot: torch.Tensor  # [M] each frame's query slot among the queries on its distinct frame (group_slots)
    R: int  # the most real frames on one distinct frame
    L: int  # the row length of the LLM pass over [visual tokens, text]
    visual_padded: bool  # whether some clip has fewer than T frames (the pass over the visual tokens alone)
    text_padded: bool  # whether some row of the pass over [visual tokens, text] is shorter than L
    target_row: torch.Tensor  # [K] targets(): the text rows of the targets
    target_col: torch.Tensor  # [K] and the positions predicting them

    def to(self, device, non_blocking=False):
        return Plan(*(x.to(device, non_blocking=non_blocking) if torch.is_tensor(x) else x for x in self))

    def paired(self, B):
        """The plan of DPO's pass over 2B rows (chosen, then rejected, each row with its sample's visual tokens):
        the visual rows doubled; L and the targets are those of the paired rows already (plan's `pairs`)."""
        return self._replace(row=torch.cat([self.row, self.row + B]), col=self.col.repeat(2))


def plan(frame_mask, frame_idx, num_frames, attention_mask, loss_mask):
    """The Plan of a batch: frame_mask [B, T] (real frames first), frame_idx [M] (the distinct frame each real frame
    reads, of num_frames), and the text's attention_mask / loss_mask [B, S], or DPO's paired rows [2B, S]
    (pair_rows), whose L and targets are then those of the 2B rows."""
    B, T = frame_mask.shape
    counts = frame_mask.sum(1)
    _, row, col = visual_rows(counts, T)
    _, slot, R = group_slots(frame_idx, num_frames)
    R = max(R, 2)  # a spare slot for videos (each frame read once): compiled, videos and images share a graph
    _, dest, n_txt = compact_text(attention_mask, attention_mask)  # the positions only: the ids are not needed
    target_row, target_col = targets(text_weights(dest, loss_mask * attention_mask))
    lengths = counts.repeat(attention_mask.shape[0] // max(B, 1)) + n_txt
    L = max(int(lengths.max()), 1) if B else 1  # as pack's
    return Plan(T, row, col, slot, R, L, bool((counts < T).any()), bool((lengths < L).any()), target_row,
                target_col)


def causal_mask(valid):
    """A padding mask [B, L] (real tokens first) -> the boolean attention [B, 1, L, L] the LLM would build from it:
    causal over the real tokens (a padding position reads the real ones, so no row is empty). Given this, the LLM
    need not read the padding mask back to see whether it may skip it (transformers' sdpa mask: a host sync)."""
    L = valid.shape[1]
    return torch.ones(L, L, dtype=torch.bool, device=valid.device).tril() & valid[:, None, None, :]


def compact_text(input_ids, attention_mask):
    """Move each row's real tokens to the front, in order (padding after). Returns (ids [B, S] with zeros as
    padding, dest [B, S] giving every original position's compact position, counts [B])."""
    mask = attention_mask.bool()
    counts = mask.sum(1)
    dest = torch.where(mask, torch.cumsum(mask, 1) - 1, counts[:, None] + torch.cumsum(~mask, 1) - 1)
    ids = torch.zeros_like(input_ids).scatter(1, dest, input_ids * mask)
    return ids, dest, counts


def pack(vis, n_vis, txt, n_txt, branch=None, L=None):
    """Rows [visual, text, padding] for the LLM.

    vis [B, Tv, D] and txt [B, S, D] hold their n_vis / n_txt real entries first; `branch` [B, S] gives each text
    token's branch (0 stem, k >= 1 branch k, PAD) for a tree, None for plain text. L, the row length, is
    max(n_vis + n_txt) (a Plan's, or found here: a host sync). Returns (embeds [B, L, D],
    mask: [B, L] padding mask for plain text or [B, 1, L, L] boolean attention for a tree, position_ids [B, L] or
    None, text_index [B, S] where each text token sits in its row)."""
    Tv, S = vis.shape[1], txt.shape[1]
    L = max(int((n_vis + n_txt).max()), 1) if L is None else L
    col = torch.arange(L, device=vis.device)[None]
    src = torch.where(col < n_vis[:, None], col, Tv + col - n_vis[:, None]).clamp(max=Tv + S - 1)
    valid = col < (n_vis + n_txt)[:, None]  # [B, L]
    embeds = gather_rows(torch.cat([vis.to(txt.dtype), txt], 1), src) * valid[..., None]
    text_index = (n_vis[:, None] + torch.arange(S, device=vis.device)).clamp(max=L - 1)
    if branch is None:
        return embeds, valid, None, text_index
    seg = torch.cat([torch.zeros_like(vis[..., 0], dtype=torch.long), branch], 1).gather(1, src)
    seg = seg.masked_fill(~valid, PAD)  # [B, L]
    mask, position_ids = tree_attention(seg)
    return embeds, mask, position_ids, text_index


def tree_attention(seg):
    """seg [B, L] (0 stem, k branch k, PAD) -> (attention [B, 1, L, L] bool, position_ids [B, L]).

    Token i sees token j <= i of the stem or of its own branch; its position is the number of tokens it sees,
    minus one, i.e. where it would sit in its own branch's plain sequence. A padding row sees only itself, so
    no attention row is empty."""
    L = seg.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=seg.device).tril()
    si, sj = seg[:, :, None], seg[:, None, :]
    real = (si != PAD) & (sj != PAD)
    allowed = causal & real & ((sj == 0) | (sj == si))
    position_ids = (allowed.sum(-1) - 1).clamp(min=0)
    allowed = allowed | (torch.eye(L, dtype=torch.bool, device=seg.device) & (si == PAD))
    return allowed[:, None], position_ids


def option_tree(prompts, options, device):
    """MCQ text as trees: per question, the prompt then every option but its last token (the last is only a
    target). Returns (ids [Q, S], branch [Q, S], n_txt [Q], source [K] flat text index (row * S + column) of
    the state that predicts each option token, target [K] the option tokens, in question, option, token order)."""
    rows, branches, source, target = [], [], [], []
    for prompt, opts in zip(prompts, options):
        row, branch = list(prompt), [0] * len(prompt)
        for k, opt in enumerate(opts, start=1):
            start = len(row)
            source += [len(prompt) - 1] + [start + j for j in range(len(opt) - 1)]
            target += opt
            row += opt[:-1]
            branch += [k] * (len(opt) - 1)
        rows.append(row)
        branches.append(branch)
    S = max(len(r) for r in rows)
    offsets = [q * S for q, opts in enumerate(options) for opt in opts for _ in opt]
    ids = torch.tensor([r + [0] * (S - len(r)) for r in rows], device=device)
    branch = torch.tensor([b + [PAD] * (S - len(b)) for b in branches], device=device)
    n_txt = torch.tensor([len(r) for r in rows], device=device)
    source = torch.tensor(source, device=device) + torch.tensor(offsets, dtype=torch.long, device=device)
    return ids, branch, n_txt, source, torch.tensor(target, device=device)
