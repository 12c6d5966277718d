"""How per-sample visual tokens and texts become the rows of one LLM pass.

Each row holds one sample's real tokens contiguously from position 0: its visual tokens, then its text, padding
after, so a sample gives the same outputs alone or in any padded batch. A text may also be a tree: a shared stem
(an MCQ prompt) followed by branches (the options) that each see the visual tokens and the stem but not each
other, all read in one pass. A branch's tokens take the positions they would have right after the stem, the
layout of tree attention in speculative decoding (SpecInfer, Miao et al., 2024): the options share the prefix's
computation with no copy of its KV cache.
"""

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


def compact_text(input_ids, attention_mask):
    """Move each row's real tokens to the front, in order (padding after). Returns (ids [B, S] with zeros as
    padding, dest [B, S] giving every original position's compact position, counts [B])."""
    mask = attention_mask.bool()
    counts = mask.sum(1)
    dest = torch.where(mask, torch.cumsum(mask, 1) - 1, counts[:, None] + torch.cumsum(~mask, 1) - 1)
    ids = torch.zeros_like(input_ids).scatter(1, dest, input_ids * mask)
    return ids, dest, counts


def pack(vis, n_vis, txt, n_txt, branch=None):
    """Rows [visual, text, padding] for the LLM.

    vis [B, Tv, D] and txt [B, S, D] hold their n_vis / n_txt real entries first; `branch` [B, S] gives each text
    token's branch (0 stem, k >= 1 branch k, PAD) for a tree, None for plain text. Returns (embeds [B, L, D],
    mask: [B, L] padding mask for plain text or [B, 1, L, L] boolean attention for a tree, position_ids [B, L] or
    None, text_index [B, S] where each text token sits in its row)."""
    Tv, S = vis.shape[1], txt.shape[1]
    L = max(int((n_vis + n_txt).max()), 1)
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
