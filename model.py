"""FoveatedVLM: one foveated visual token per frame, and an LLM that chooses where the next frame is looked at.

Frame t is read by the FoveatedEncoder with a query; the token `dino_to_llm(z_t) * visual_scale` enters the
LLM (SmolLM2) before the text, and `llm_to_query` of the LLM's hidden state at frame t is the query for frame
t+1. Modes:
- coarse_fine (training): a coarse pass with the static query on every frame, an LLM pass over those tokens
  only, then a fine pass whose queries are [q_init, the coarse pass's queries shifted by one frame].
- coarse_only: static-query tokens, then the text.
- autoregressive (inference): frame by frame with the LLM's KV cache, each query from the previous step.

Batches are variable length: the padded frames (frame_mask False) are never encoded, and each sample's real
tokens are laid out contiguously from position 0 ([its visual tokens, its text], padding after), so a sample
gives the same outputs alone or in any padded batch. DINOv2 runs once per distinct frame: consecutive
identical frames (a replicated image) are encoded once.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from encoder import FoveatedEncoder
from pretrained import PretrainedMixin, build_dino, build_llm

MODES = ("coarse_fine", "coarse_only", "autoregressive")


def _gather_rows(x, index):
    """x [B, L, D], index [B, S] -> [B, S, D]."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _pad_tokens(packed, counts):
    """Packed per-sample tokens [M, D] (sample-major) -> ([B, max(counts), D] right-padded, mask [B, max])."""
    L = int(counts.max()) if len(counts) else 0
    mask = torch.arange(L, device=counts.device) < counts[:, None]
    out = packed.new_zeros(len(counts), L, packed.shape[-1])
    return out.masked_scatter(mask[..., None], packed), mask


def _compact_text(input_ids, attention_mask):
    """Move each row's real tokens to the front, in order (padding after). Returns (ids [B,S] with zeros as
    padding, dest [B,S] giving every original position's compact position, counts [B])."""
    mask = attention_mask.bool()
    counts = mask.sum(1)
    dest = torch.where(mask, torch.cumsum(mask, 1) - 1, counts[:, None] + torch.cumsum(~mask, 1) - 1)
    ids = torch.zeros_like(input_ids).scatter(1, dest, input_ids * mask)
    return ids, dest, counts


class FoveatedVLM(PretrainedMixin, nn.Module):
    def __init__(self, llm_name=None, dino_name=None, query_dim=384, visual_scale=0.14, deep_query=True,
                 lambda_coarse=0.0, *, llm_config=None, dino_config=None, dtype=None):
        super().__init__()
        assert llm_name or llm_config, "give llm_name (hub id, folder or .gguf) or llm_config"
        assert dino_name or dino_config, "give dino_name (hub id or folder) or dino_config"
        self.llm = build_llm(llm_name, llm_config, dtype)
        self.encoder = FoveatedEncoder(build_dino(dino_name, dino_config, dtype), query_dim, deep_query)
        llm_dim = self.llm.config.hidden_size
        self.dino_to_llm = nn.Linear(self.encoder.dim, llm_dim)
        self.llm_to_query = nn.Linear(llm_dim, query_dim)
        # Unit-variance queries: with a small init the projection's output is too weak to shape attention.
        self.q_static = nn.Parameter(torch.randn(1, query_dim))
        self.q_init = nn.Parameter(torch.randn(1, query_dim))
        self.llm_name, self.dino_name = llm_name, dino_name
        self.query_dim, self.visual_scale = query_dim, visual_scale
        self.deep_query, self.lambda_coarse = deep_query, lambda_coarse
        self.dedup_frames = True  # encode consecutive identical frames once (off only to measure its worth)

    # ---------------------------------------------------------------- vision
    def encode(self, frames, frame_mask=None):
        """frames [B,T,3,H,W] -> (PatchKV of the distinct real frames, frame_idx [M] for the M real frames in
        sample-major order, counts [B] of real frames per sample)."""
        B, T = frames.shape[:2]
        if frame_mask is None:
            frame_mask = torch.ones(B, T, dtype=torch.bool, device=frames.device)
        frame_mask = frame_mask.bool()
        counts = frame_mask.sum(1)
        real = frames[frame_mask]  # [M, 3, H, W]
        real = real.to(self.encoder.query_input_proj.weight.dtype)
        new = torch.ones(real.shape[0], dtype=torch.bool, device=frames.device)
        if self.dedup_frames and real.shape[0] > 1:
            new[1:] = (real[1:] != real[:-1]).flatten(1).any(1)
        frame_idx = torch.cumsum(new, 0) - 1
        kv = self.encoder.encode_patches(real[new]) if real.shape[0] else None
        return kv, frame_idx, counts

    def _tokens(self, queries, kv, frame_idx):
        """queries [M, query_dim] -> LLM-space visual tokens [M, llm_dim]."""
        if kv is None:  # no frames at all (a text-only batch)
            return queries.new_zeros(queries.shape[0], self.dino_to_llm.out_features)
        return self.dino_to_llm(self.encoder.query_attend(queries, kv, frame_idx)) * self.visual_scale

    def _first_in_sample(self, counts):
        """[M] bool: which packed frame is the first of its sample."""
        starts = torch.cumsum(counts, 0) - counts
        first = torch.zeros(int(counts.sum()), dtype=torch.bool, device=counts.device)
        first[starts[counts > 0]] = True
        return first

    def _fine_queries(self, coarse, counts):
        """The coarse tokens go through the LLM alone; the query for frame t+1 comes from its state at t."""
        has = counts > 0
        vis, mask = _pad_tokens(coarse, counts[has])
        h = self._llm_hidden(vis, mask)  # [B', T, D]
        q_next = self.llm_to_query(h[mask])  # [M, query_dim], the query each frame proposes for the next
        q_prev = torch.cat([self.q_init, q_next[:-1]])
        return torch.where(self._first_in_sample(counts)[:, None], self.q_init, q_prev)

    def visual_tokens(self, kv, frame_idx, counts, mode):
        """Packed visual tokens [M, llm_dim] for coarse_only or coarse_fine (plus the coarse ones)."""
        M = frame_idx.shape[0]
        coarse = self._tokens(self.q_static.expand(M, -1), kv, frame_idx)
        if mode == "coarse_only" or M == 0:
            return coarse, coarse
        return self._tokens(self._fine_queries(coarse, counts), kv, frame_idx), coarse

    # ---------------------------------------------------------------- language
    def _llm_hidden(self, embeds, mask, position_ids=None, cache=None):
        out = self.llm.base_model(inputs_embeds=embeds, attention_mask=mask.long(), position_ids=position_ids,
                                  past_key_values=cache, use_cache=cache is not None)
        return out.last_hidden_state

    def _pack(self, vis, n_vis, txt, n_txt):
        """[vis_b, txt_b] per sample, contiguous from position 0 and right-padded. vis [B,Tv,D] and txt [B,S,D]
        hold their n_vis / n_txt real entries first. Returns embeds [B,L,D], mask [B,L], text index [B,S]."""
        Tv, S = vis.shape[1], txt.shape[1]
        L = max(int((n_vis + n_txt).max()), 1)
        col = torch.arange(L, device=vis.device)[None]
        src = torch.where(col < n_vis[:, None], col, Tv + col - n_vis[:, None]).clamp(max=Tv + S - 1)
        mask = col < (n_vis + n_txt)[:, None]
        embeds = _gather_rows(torch.cat([vis.to(txt.dtype), txt], 1), src) * mask[..., None]
        text_index = (n_vis[:, None] + torch.arange(S, device=vis.device)).clamp(max=L - 1)
        return embeds, mask, text_index

    def _text_hidden(self, vis, n_vis, txt, n_txt):
        """One LLM pass over [visual tokens, text]; the hidden states at the text positions [B, S, D]."""
        embeds, mask, text_index = self._pack(vis, n_vis, txt, n_txt)
        return _gather_rows(self._llm_hidden(embeds, mask), text_index)

    def _autoregressive(self, kv, frame_idx, counts):
        """Frame by frame with the KV cache; returns the cache state after the last frame."""
        B, Tv = counts.shape[0], int(counts.max()) if counts.numel() else 0
        dev = counts.device
        cache, mask = DynamicCache(config=self.llm.config), torch.zeros(B, 0, dtype=torch.bool, device=dev)
        start = torch.cumsum(counts, 0) - counts
        q = self.q_init.expand(B, -1)
        for t in range(Tv):
            live = t < counts  # samples that have a frame t; the others get a masked placeholder
            idx = frame_idx[(start + t).clamp(max=frame_idx.shape[0] - 1)]
            tok = self._tokens(q, kv, idx).to(self.llm.get_input_embeddings().weight.dtype)
            mask = torch.cat([mask, live[:, None]], 1)
            pos = torch.full((B, 1), t, device=dev)
            h = self._llm_hidden(tok[:, None] * live[:, None, None], mask, pos, cache)
            q = self.llm_to_query(h[:, 0])
        return _State(cache, mask, counts.clone(), None)

    def _continue(self, state, txt, n_txt):
        """Append compact text [B,S,D] (n_txt real per row) to a cached state; returns its hidden [B,S,D]."""
        S = txt.shape[1]
        ar = torch.arange(S, device=txt.device)
        mask = torch.cat([state.mask, ar[None] < n_txt[:, None]], 1)
        h = self._llm_hidden(txt, mask, state.next_pos[:, None] + ar, state.cache)
        last = _gather_rows(h, (n_txt - 1).clamp(min=0)[:, None])[:, 0]
        keep = (n_txt > 0)[:, None]
        prev = state.last_hidden if state.last_hidden is not None else torch.zeros_like(last)
        return h, _State(state.cache, mask, state.next_pos + n_txt, torch.where(keep, last, prev))

    def _prefix_state(self, kv, frame_idx, counts, mode, txt, n_txt):
        """KV-cached state after [visual tokens, txt] in a mode, for generation and option scoring."""
        if mode == "autoregressive":
            return self._continue(self._autoregressive(kv, frame_idx, counts), txt, n_txt)[1]
        vis = _pad_tokens(self.visual_tokens(kv, frame_idx, counts, mode)[0], counts)[0]
        embeds, mask, _ = self._pack(vis, counts, txt, n_txt)
        cache = DynamicCache(config=self.llm.config)
        h = self._llm_hidden(embeds, mask, None, cache)
        last = _gather_rows(h, (counts + n_txt - 1).clamp(min=0)[:, None])[:, 0]
        return _State(cache, mask, counts + n_txt, last)

    def _logits(self, h):
        return self.llm.get_output_embeddings()(h)

    # ---------------------------------------------------------------- training API
    def _check_mode(self, mode):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")

    def _text_states(self, frames, frame_mask, txts, mode, encoded=None):
        """Hidden states of each text in `txts` (list of (embeds, counts)) after the same frames; DINO and the
        visual tokens are computed once (DINO not at all when `encoded` is given). Returns (list of hidden
        [B,S,D], the first text's hidden after the coarse tokens when lambda_coarse adds their loss, else None)."""
        kv, frame_idx, counts = encoded if encoded is not None else self.encode(frames, frame_mask)
        k, S = len(txts), max(t.shape[1] for t, _ in txts)
        txt = torch.stack([F.pad(t, (0, 0, 0, S - t.shape[1])) for t, _ in txts], 1)  # [B, k, S, D]
        n_txt = torch.stack([n for _, n in txts], 1)  # [B, k]
        if mode == "autoregressive":
            state = self._autoregressive(kv, frame_idx, counts).repeat(k)
            hs = self._continue(state, txt.flatten(0, 1), n_txt.flatten())[0].unflatten(0, (-1, k))
            return [hs[:, i, :t.shape[1]] for i, (t, _) in enumerate(txts)], None
        fine, coarse = self.visual_tokens(kv, frame_idx, counts, mode)
        vis = _pad_tokens(fine, counts)[0].repeat_interleave(k, 0)
        hs = self._text_hidden(vis, counts.repeat_interleave(k), txt.flatten(0, 1), n_txt.flatten())
        hs = hs.unflatten(0, (-1, k))
        hs = [hs[:, i, :t.shape[1]] for i, (t, _) in enumerate(txts)]
        coarse_hs = None
        if self.lambda_coarse > 0 and mode == "coarse_fine" and fine.shape[0] > 0:
            coarse_hs = self._text_hidden(_pad_tokens(coarse, counts)[0], counts, txts[0][0], txts[0][1])
        return hs, coarse_hs

    def _embed_text(self, input_ids, attention_mask):
        ids, index, counts = _compact_text(input_ids, attention_mask)
        return ids, index, counts, self.llm.get_input_embeddings()(ids)

    def _target_logps(self, h, ids, weights):
        """Log-probabilities of the target tokens: compact text token i >= 1 with weight > 0, predicted from
        h[:, i-1]. The vocabulary projection runs on those positions only. Returns (logp [K], row [K], w [K])."""
        sel = weights[:, 1:] > 0  # [B, S-1]
        logits = self._logits(h[:, :-1][sel]).float()  # [K, V]
        logp = -F.cross_entropy(logits, ids[:, 1:][sel], reduction="none")
        rows = torch.arange(h.shape[0], device=h.device)[:, None].expand_as(sel)[sel]
        return logp, rows, weights[:, 1:][sel]

    def _ce(self, h, ids, weights):
        logp, _, w = self._target_logps(h, ids, weights)
        return -(logp * w).sum() / w.sum().clamp(min=1.0)

    def forward(self, frames, input_ids, attention_mask=None, loss_mask=None, frame_mask=None,
                mode="coarse_fine", return_logits=True, encoded=None):
        """frames [B,T,3,H,W], input_ids [B,S] -> {"loss", "logits" [B,S,V]}; logits[:, i] predicts token i+1.
        The loss is the mean cross-entropy over text tokens i >= 1 whose loss_mask (default attention_mask)
        is 1. Training passes return_logits=False: the vocabulary projection then runs on the targets only.
        `encoded`, this model's `encode(frames, frame_mask)`, lets several modes share one DINO pass."""
        self._check_mode(mode)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        loss_mask = attention_mask if loss_mask is None else loss_mask * attention_mask
        ids, index, n_txt, txt = self._embed_text(input_ids, attention_mask)
        weights = torch.zeros_like(ids, dtype=torch.float).scatter(1, index, loss_mask.float())
        (h,), coarse_h = self._text_states(frames, frame_mask, [(txt, n_txt)], mode, encoded)
        loss = self._ce(h, ids, weights)
        if coarse_h is not None:
            loss = loss + self.lambda_coarse * self._ce(coarse_h, ids, weights)
        logits = None
        if return_logits:  # back to the input's layout
            logits = _gather_rows(self._logits(h), index) * attention_mask[..., None]
        return {"loss": loss, "logits": logits}

    def forward_dpo(self, frames, frame_mask, chosen_ids, chosen_mask, chosen_loss_mask, rejected_ids,
                    rejected_mask, rejected_loss_mask, mode="coarse_fine", encoded=None):
        """Summed log-probabilities of the chosen and rejected answers (loss-mask tokens), both read after ONE
        encoding of the frames (`encoded`, as in forward). Returns {"chosen_logps": [B], "rejected_logps": [B]}."""
        self._check_mode(mode)
        texts = [(chosen_ids, chosen_mask, chosen_loss_mask), (rejected_ids, rejected_mask, rejected_loss_mask)]
        embedded = [self._embed_text(i, m) for i, m, _ in texts]
        hs, _ = self._text_states(frames, frame_mask, [(e[3], e[2]) for e in embedded], mode, encoded)
        out = {}
        for name, h, (ids, index, _, _), (_, m, lm) in zip(("chosen", "rejected"), hs, embedded, texts):
            w = torch.zeros_like(ids, dtype=torch.float).scatter(1, index, (lm * m).float())
            logp, rows, w = self._target_logps(h, ids, w)
            out[f"{name}_logps"] = torch.zeros(h.shape[0], device=h.device).index_add(0, rows, logp * w)
        return out

    # ---------------------------------------------------------------- inference API
    @torch.no_grad()
    def generate(self, frames, input_ids, attention_mask=None, frame_mask=None, max_new_tokens=64,
                 mode="autoregressive", do_sample=False, temperature=1.0, top_p=1.0, eos_token_id=None):
        """New token ids [B, <= max_new_tokens] after [frames, prompt], read with the LLM's KV cache. Rows that
        finish early are filled with eos_token_id."""
        self._check_mode(mode)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        kv, frame_idx, counts = self.encode(frames, frame_mask)
        _, _, n_txt, txt = self._embed_text(input_ids, attention_mask)
        state = self._prefix_state(kv, frame_idx, counts, mode, txt, n_txt)
        embed = self.llm.get_input_embeddings()
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        out = []
        for _ in range(max_new_tokens):
            tok = _pick(self._logits(state.last_hidden).float(), do_sample, temperature, top_p)
            if eos_token_id is not None:
                tok = torch.where(done, eos_token_id, tok)
                done |= tok == eos_token_id
            out.append(tok)
            if bool(done.all()) or len(out) == max_new_tokens:
                break
            _, state = self._continue(state, embed(tok[:, None]), torch.ones_like(tok))
        return torch.stack(out, 1) if out else input_ids.new_zeros(input_ids.shape[0], 0)

    @torch.no_grad()
    def score_options(self, frames, prompt_ids, options, modes=("coarse_fine",), frame_mask=None):
        """Mean cross-entropy of each option's tokens after [frames, prompt], per mode: {mode: [n_options]}.
        DINO runs once for every mode and option; each mode's prefix is computed once and its KV cache
        shared by the options."""
        dev = frames.device
        kv, frame_idx, counts = self.encode(frames[:1], None if frame_mask is None else frame_mask[:1])
        embed = self.llm.get_input_embeddings()
        prompt = embed(torch.tensor([prompt_ids], device=dev))
        n_opt, S = len(options), max(len(o) for o in options)
        ids = torch.tensor([o + [0] * (S - len(o)) for o in options], device=dev)
        n = torch.tensor([len(o) for o in options], device=dev)
        scores = {}
        for mode in modes:
            self._check_mode(mode)
            state = self._prefix_state(kv, frame_idx, counts, mode, prompt, torch.tensor([len(prompt_ids)], device=dev))
            state = state.repeat(n_opt)
            h, _ = self._continue(state, embed(ids), n)
            h = torch.cat([state.last_hidden[:, None], h[:, :-1]], 1)  # state before each option token
            ce = F.cross_entropy(self._logits(h).float().transpose(1, 2), ids, reduction="none")  # [n_opt, S]
            valid = torch.arange(S, device=dev) < n[:, None]
            scores[mode] = (ce * valid).sum(1) / n
        return scores

    @torch.no_grad()
    def attention_maps(self, frames, frame_mask=None):
        """Per-layer attention of the coarse (static) and fine (LLM-chosen) queries over each frame's tokens:
        {"coarse"|"fine": [L, B, T, heads, 1+P]} (CLS first; zeros at padded frames)."""
        kv, frame_idx, counts = self.encode(frames, frame_mask)
        M = frame_idx.shape[0]
        coarse = self.visual_tokens(kv, frame_idx, counts, "coarse_only")[0]
        queries = {"coarse": self.q_static.expand(M, -1), "fine": self._fine_queries(coarse, counts)}
        B, T = frames.shape[:2]
        fm = torch.ones(B, T, dtype=torch.bool, device=frames.device) if frame_mask is None else frame_mask.bool()
        out = {}
        for name, q in queries.items():
            _, maps = self.encoder.query_attend(q, kv, frame_idx, return_attention=True)
            grid = maps[0].new_zeros(len(maps), B, T, *maps[0].shape[1:])
            grid[:, fm] = torch.stack(maps)
            out[name] = grid
        return out

    # ---------------------------------------------------------------- training helpers
    def param_groups(self):
        """Trainable parameters by part, for differential learning rates."""
        groups = {"connector": [], "dino": [], "llm": []}
        for name, p in self.named_parameters():
            if p.requires_grad:
                groups[_part(name)].append(p)
        return groups

    def count_parameters(self):
        counts = {"connector": 0, "dino": 0, "llm": 0}
        for name, p in self.named_parameters():
            counts[_part(name)] += p.numel()
        counts["total"] = sum(counts.values())
        return counts

    def set_trainable(self, dino=True, llm=True, connector=True):
        wanted = {"dino": dino, "llm": llm, "connector": connector}
        for name, p in self.named_parameters():
            p.requires_grad_(wanted[_part(name)])
        return self

    def enable_gradient_checkpointing(self):
        self.llm.activation_checkpointing_enable({"use_reentrant": False})
        self.encoder.gradient_checkpointing = True
        return self


def _part(name):
    if name.startswith("encoder.dino."):
        return "dino"
    if name.startswith("llm."):
        return "llm"
    return "connector"


def _pick(logits, do_sample, temperature, top_p):
    """Next token [B] from logits [B, V]: argmax, or nucleus sampling at a temperature."""
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits / max(temperature, 1e-5), -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set whose mass reaches top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1)[:, 0]


class _State:
    """The LLM's KV cache after a prefix: mask [B, C] over cached columns, next position [B], and the last
    real token's hidden state [B, D] (which predicts the next token)."""

    def __init__(self, cache, mask, next_pos, last_hidden):
        self.cache, self.mask, self.next_pos, self.last_hidden = cache, mask, next_pos, last_hidden

    def repeat(self, n):
        """The state for n continuations of each row (rows repeated in place)."""
        self.cache.batch_repeat_interleave(n)
        rep = lambda x: None if x is None else x.repeat_interleave(n, 0)
        return _State(self.cache, rep(self.mask), rep(self.next_pos), rep(self.last_hidden))
