"""FoveatedVLM: one foveated visual token per frame, and an LLM that chooses where the next frame is looked at.

Frame t is read by the FoveatedEncoder with a query; the token `dino_to_llm(z_t) * visual_scale` enters the
LLM (SmolLM2) before the text, and `llm_to_query` of the LLM's hidden state at frame t is the query for frame
t+1. The visual tokens of each mode:
- coarse_fine (training): a coarse pass with the static query on every frame, an LLM pass over those tokens,
  then a fine pass whose queries are [q_init, the coarse pass's queries shifted by one frame].
- coarse_only: static-query tokens.
- autoregressive (inference): frame by frame with the LLM's KV cache, each query from the previous step.
Then one LLM pass reads [visual tokens, text]. Batches are variable length (layout.py): padded frames
(frame_mask False) are never encoded, and a sample gives the same outputs alone or in any padded batch.
DINOv2 runs once per distinct frame: consecutive identical frames (a replicated image) are encoded once.
At inference (no gradient) a video longer than `chunk_frames` is read a chunk at a time into the LLM's KV cache
(streaming.py: constant memory, the same values); `model.stream(...)` reads one as it comes, a live stream too.
"""

import contextlib
import dataclasses
import os
import warnings
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as recompute
from transformers import DynamicCache

import checkpoint
import streaming
from config import MODES, PARAM_GROUPS, InputSettings, ModelSettings
from encoder import FoveatedEncoder
from frames import normalise_pixels
from inputs import mcq_ids, prepare_frames, prompt_batch, question_ids
from layout import (causal_mask, compact_text, gather_rows, option_tree, pack, pad_packed, pair_rows, targets,
                    text_weights, visual_rows)
from pretrained import build_dino, build_llm, load_tokenizer, plain_config

LOGIT_PIECES, LOGIT_CHUNK = 8, 2048  # training's vocabulary projection: in 8 pieces beyond 2048 targets (_target_logps)


class _Text(NamedTuple):
    """Text in compact form: ids [B, S] (real tokens first), embeds [B, S, D], n [B] real tokens per row, and
    branch [B, S] for an option tree (layout.pack), else None."""

    ids: torch.Tensor
    embeds: torch.Tensor
    n: torch.Tensor
    branch: Optional[torch.Tensor] = None


class FoveatedVLM(nn.Module):
    def __init__(self, llm_name=None, dino_name=None, query_dim=ModelSettings.query_dim,
                 visual_scale=ModelSettings.visual_scale, deep_query=ModelSettings.deep_query,
                 lambda_coarse=ModelSettings.lambda_coarse, *, llm_config=None, dino_config=None, dtype=None):
        super().__init__()
        if not (llm_name or llm_config):
            raise ValueError("FoveatedVLM needs llm_name (hub id, folder or .gguf) or llm_config")
        if not (dino_name or dino_config):
            raise ValueError("FoveatedVLM needs dino_name (hub id or folder) or dino_config")
        self.settings = ModelSettings(llm_name, dino_name, llm_config, dino_config, query_dim, visual_scale,
                                      deep_query, lambda_coarse)
        self.llm = build_llm(llm_name, llm_config, dtype)
        self.encoder = FoveatedEncoder(build_dino(dino_name, dino_config, dtype), query_dim, deep_query)
        llm_dim = self.llm.config.hidden_size
        self.dino_to_llm = nn.Linear(self.encoder.dim, llm_dim)
        self.llm_to_query = nn.Linear(llm_dim, query_dim)
        # Unit-variance queries: with a small init the projection's output is too weak to shape attention.
        self.q_static = nn.Parameter(torch.randn(1, query_dim))
        self.q_init = nn.Parameter(torch.randn(1, query_dim))
        self.tokenizer = None  # from_pretrained sets the folder's; lets generate / score_options take strings
        self.inputs = None  # config.InputSettings the model was trained with (from_pretrained, train.py); None: unknown
        self._size_warned = False  # frames of another size than the trained one are warned of once
        self.chunk_frames = None  # inference: longer videos go through streaming.py (None: config.CHUNK_FRAMES)

    @classmethod
    def from_config(cls, settings):
        """Build from ModelSettings, config.ModelConfig (which extends it) or a dict of settings."""
        return cls(**ModelSettings.of(settings).constructor_kwargs())

    @property
    def llm_name(self):
        """The constructor's llm_name (settings.llm)."""
        return self.settings.llm

    # ---------------------------------------------------------------- vision
    def encode(self, frames, frame_mask=None):
        """frames [B, T, 3, H, W] (what else is accepted: inputs.prepare_frames) -> (PatchKV of the distinct
        real frames, frame_idx [M] for the M real frames in sample-major order, counts [B] real frames per sample)."""
        return self._encode(*prepare_frames(frames, frame_mask, self.encoder.patch_size))

    def _encode(self, frames, frame_mask):
        """encode, of frames already through prepare_frames."""
        counts = frame_mask.sum(1)
        real = frames[frame_mask].to(self.encoder.query_input_proj.weight.dtype)  # [M, 3, H, W]
        new = torch.ones(real.shape[0], dtype=torch.bool, device=real.device)
        if real.shape[0] > 1:
            new[1:] = (real[1:] != real[:-1]).flatten(1).any(1)
        frame_idx = torch.cumsum(new, 0) - 1
        kv = self.encoder.encode_patches(real[new]) if real.shape[0] else None
        return kv, frame_idx, counts

    def encode_pixels(self, pixels, frame_idx, frame_mask):
        """encode, of a batch whose distinct frames the loader found (collate.pack_frames): pixels [U, 3, H, W]
        (uint8, ImageNet-normalised here on their device; float: normalised already), frame_idx [M] (the distinct
        frame of each real frame, sample-major), frame_mask [B, T]. No host sync."""
        frames = normalise_pixels(pixels) if pixels.dtype == torch.uint8 else pixels
        frames = frames.to(self.encoder.query_input_proj.weight.dtype)
        kv = self.encoder.encode_patches(frames) if pixels.shape[0] else None
        return kv, frame_idx, frame_mask.sum(1)

    def _tokens(self, queries, kv, frame_idx, slots=None):
        """queries [M, query_dim] -> LLM-space visual tokens [M, llm_dim] (slots: encoder.query_attend's)."""
        if kv is None:  # no frames at all (a text-only batch)
            return queries.new_zeros(queries.shape[0], self.dino_to_llm.out_features)
        tokens = self.encoder.query_attend(queries, kv, frame_idx, slots=slots)
        return self.dino_to_llm(tokens) * self.settings.visual_scale

    def visual_tokens(self, kv, frame_idx, counts, mode, text=None, plan=None):
        """Packed visual tokens [M, llm_dim] of `mode`, and for coarse_fine given `text` coarse_only's hidden states
        at the text [B, S, D] (else None): the coarse LLM pass then reads [coarse tokens, text], and causal
        attention leaves its states at the coarse tokens as over those tokens alone, so coarse_only's reading of
        the text costs only the text's tokens (lambda_coarse's loss; scoring both modes). `plan`: the batch's
        layout.Plan, when the loader made one."""
        M = frame_idx.shape[0]
        if mode == "autoregressive":
            return self._autoregressive_tokens(kv, frame_idx, counts)[0], None
        slots = None if plan is None else (plan.slot, plan.R)
        coarse = self._tokens(self.q_static.expand(M, -1), kv, frame_idx, slots)
        if mode == "coarse_only" or (M == 0 and text is None):
            return coarse, None
        coarse_h, text_h = self._llm(coarse, counts, text, plan)
        return self._tokens(self._fine_queries(coarse_h, counts, plan), kv, frame_idx, slots), text_h

    def _fine_queries(self, coarse_h, counts, plan=None):
        """The fine pass's queries [M, query_dim]: frame t+1's from the LLM's state at coarse token t (coarse_h
        [M, D], packed), and q_init for each sample's first frame."""
        col = plan.col if plan is not None else visual_rows(counts)[2]
        first = col == 0  # [M]
        shifted = torch.cat([self.q_init, self.llm_to_query(coarse_h)])[:-1]  # [M, query_dim]
        return torch.where(first[:, None], self.q_init, shifted)

    def _autoregressive_tokens(self, kv, frame_idx, counts):
        """Frame t read with the query the LLM proposes after frames < t (KV cache), frame 0 with q_init ->
        packed tokens [M, llm_dim] and the queries that read them [M, query_dim]. The text is read afterwards by
        one pass over the tokens, like the other modes."""
        B, T = counts.shape[0], int(counts.max()) if counts.numel() else 0
        dev, dtype = counts.device, self.llm.get_input_embeddings().weight.dtype
        cache, mask = DynamicCache(config=self.llm.config), torch.zeros(B, 0, dtype=torch.bool, device=dev)
        start = torch.cumsum(counts, 0) - counts
        q, toks, queries = self.q_init.expand(B, -1), [], []
        for t in range(T):
            live = t < counts  # [B]: the samples with a frame t; the others read a placeholder, masked out
            queries.append(q)
            toks.append(self._tokens(q, kv, frame_idx[(start + t).clamp(max=frame_idx.shape[0] - 1)]))
            if t + 1 < T:  # the state after the last frame proposes no query
                mask = torch.cat([mask, live[:, None]], 1)
                tok = (toks[-1] * live[:, None]).to(dtype)[:, None]  # [B, 1, D]
                q = self.llm_to_query(self._llm_hidden(tok, mask, torch.full((B, 1), t, device=dev), cache)[:, 0])
        if not toks:  # no frames at all
            return q.new_zeros(0, self.dino_to_llm.out_features), q.new_zeros(0, q.shape[-1])
        real = torch.arange(T, device=dev) < counts[:, None]  # [B, T]
        return torch.stack(toks, 1)[real], torch.stack(queries, 1)[real]

    # ---------------------------------------------------------------- language
    def _llm_hidden(self, embeds, mask, position_ids=None, cache=None):
        """The LLM's last hidden states [B, L, D]. A pass that fills a KV cache (the autoregressive queries,
        generation) runs without gradient checkpointing: transformers' checkpointed layers drop the cache in
        training mode, and such a pass holds one token per sample."""
        with _unchecked(self.llm) if cache is not None else contextlib.nullcontext():
            out = self.llm.base_model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                                      past_key_values=cache, use_cache=cache is not None)
        return out.last_hidden_state

    def _llm(self, vis, counts, text=None, plan=None):
        """One LLM pass over each sample's [visual tokens, text]: vis [M, D] packed, text a _Text or None, plan the
        batch's layout.Plan (else its sizes are found here). Returns (hidden states at the visual tokens [M, D]
        packed, at the text [B, S, D] or None)."""
        T, row, col = (plan.T, plan.row, plan.col) if plan is not None else visual_rows(counts)
        rows = vis.new_zeros(len(counts), T, vis.shape[-1]).index_put((row, col), vis)  # [B, T, D]
        if text is None:
            text = _Text(None, rows[:, :0], torch.zeros_like(counts))
        L = max(T, 1) if text.ids is None else (plan.L if plan is not None else None)
        embeds, mask, position_ids, text_index = pack(rows, counts, text.embeds, text.n, text.branch, L)
        if plan is not None and text.branch is None:  # the mask as the LLM would make it, or none for full rows
            padded = plan.text_padded if text.ids is not None else plan.visual_padded
            # compiled, padded and full rows take one graph: the flag would be a guard, each value a graph
            mask = causal_mask(mask) if torch.compiler.is_compiling() or padded else None
        h = self._llm_hidden(embeds, mask, position_ids)
        text_h = gather_rows(h, text_index) if text.ids is not None else None
        return h[row, col], text_h

    def _text(self, input_ids, attention_mask):
        """-> (_Text, dest [B, S]: where each input position went in the compact text)."""
        ids, dest, n = compact_text(input_ids, attention_mask)
        return _Text(ids, self.llm.get_input_embeddings()(ids), n), dest

    def _logits(self, h):
        return self.llm.get_output_embeddings()(h)

    def _target_logps(self, h, ids, weights, plan=None):
        """Log-probabilities of the target tokens: compact text token i >= 1 with weight > 0, predicted from
        h[:, i-1] (layout.targets; the plan's when given). The vocabulary projection runs on those positions only,
        and under autograd, beyond LOGIT_CHUNK of them, in LOGIT_PIECES pieces recomputed in the backward: the
        float32 logits of a long batch and their gradient (~200 KiB a target each for SmolLM2's 49,152 words) never
        exist whole. (A fixed number of pieces, not of rows, keeps one compiled graph for any number of targets.)
        Returns (logp [K], row [K], w [K])."""
        row, col = (plan.target_row, plan.target_col) if plan is not None else targets(weights)
        h, target = h[row, col], ids[row, col + 1]  # [K, D], [K]
        if torch.is_grad_enabled() and h.shape[0] > LOGIT_CHUNK:
            logp = torch.cat([recompute(self._logp, a, b, use_reentrant=False) for a, b in
                              zip(h.tensor_split(LOGIT_PIECES), target.tensor_split(LOGIT_PIECES))])
        else:
            logp = self._logp(h, target)
        return logp, row, weights[row, col + 1]

    def _logp(self, h, target):
        """h [K, D] -> log p(target [K]) in float32."""
        return -F.cross_entropy(self._logits(h).float(), target, reduction="none")

    def _ce(self, h, ids, weights, plan=None):
        logp, _, w = self._target_logps(h, ids, weights, plan)
        return -(logp * w).sum() / w.sum().clamp(min=1.0)

    # ---------------------------------------------------------------- training API
    def forward(self, frames, input_ids, attention_mask=None, loss_mask=None, frame_mask=None,
                mode="coarse_fine", return_logits=True, encoded=None, plan=None):
        """frames [B, T, 3, H, W], input_ids [B, S] -> {"loss", "logits" [B, S, V]}; logits[:, i] predicts token
        i+1. The loss is the mean cross-entropy over text tokens i >= 1 whose loss_mask (default attention_mask)
        is 1. Training passes return_logits=False: the vocabulary projection then runs on the targets only.
        `encoded`, this model's `encode(frames, frame_mask)` (or encode_pixels), lets several modes share one DINO
        pass; `plan`, the batch's layout.Plan (collate makes one), spares the host syncs that find its sizes."""
        check_modes([mode])
        if encoded is None:
            frames, frame_mask = prepare_frames(frames, frame_mask, self.encoder.patch_size)
        _check_rows(encoded[2] if encoded is not None else frame_mask.sum(1), input_ids.shape[0], "input_ids")
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        loss_mask = attention_mask if loss_mask is None else loss_mask * attention_mask
        text, dest = self._text(input_ids, attention_mask)
        weights = text_weights(dest, loss_mask)
        lambda_coarse = self.settings.lambda_coarse if mode == "coarse_fine" else 0.0
        if encoded is None and self._streamed(frame_mask):
            states = streaming.text_states(self, frames, frame_mask, text, (mode,), coarse=lambda_coarse > 0)
            h, coarse_h = states[mode], states.get("coarse")
        else:
            kv, frame_idx, counts = encoded if encoded is not None else self._encode(frames, frame_mask)
            vis, coarse_h = self.visual_tokens(kv, frame_idx, counts, mode, text if lambda_coarse > 0 else None,
                                               plan)
            _, h = self._llm(vis, counts, text, plan)
        loss = self._ce(h, text.ids, weights, plan)
        if coarse_h is not None:
            loss = loss + lambda_coarse * self._ce(coarse_h, text.ids, weights, plan)
        logits = None
        if return_logits:  # back to the input's layout
            logits = gather_rows(self._logits(h), dest) * attention_mask[..., None]
        return {"loss": loss, "logits": logits}

    def forward_dpo(self, frames, frame_mask, chosen_ids, chosen_mask, chosen_loss_mask, rejected_ids,
                    rejected_mask, rejected_loss_mask, mode="coarse_fine", encoded=None, plan=None):
        """Summed log-probabilities of the chosen and rejected answers (loss-mask tokens). The frames are encoded
        and turned into visual tokens once; both answers are read in one LLM pass of 2B rows (chosen, then
        rejected: layout.pair_rows). `encoded` and `plan` as in forward (the plan's L and targets are the paired
        rows'). Returns {"chosen_logps": [B], "rejected_logps": [B]}."""
        check_modes([mode])
        kv, frame_idx, counts = encoded if encoded is not None else self.encode(frames, frame_mask)
        B = chosen_ids.shape[0]
        _check_rows(counts, B, "chosen_ids")
        mask = pair_rows(chosen_mask, rejected_mask)  # [2B, S]
        text, dest = self._text(pair_rows(chosen_ids, rejected_ids), mask)
        weights = text_weights(dest, pair_rows(chosen_loss_mask, rejected_loss_mask) * mask)
        vis, _ = self.visual_tokens(kv, frame_idx, counts, mode, plan=plan)
        paired = None if plan is None else plan.paired(B)
        _, h = self._llm(torch.cat([vis, vis]), counts.repeat(2), text, paired)
        logp, rows, w = self._target_logps(h, text.ids, weights, paired)
        logps = torch.zeros(2 * B, dtype=logp.dtype, device=h.device).index_add(0, rows, logp * w)
        return {"chosen_logps": logps[:B], "rejected_logps": logps[B:]}

    # ---------------------------------------------------------------- inference API
    def _use(self):
        """How the model is used: as trained (model.inputs), else the original recipe's defaults."""
        return self.inputs if self.inputs is not None else InputSettings()

    def _inference_frames(self, frames, frame_mask):
        """What the inference API takes (inputs.prepare_frames, one image replicated as the model was trained to
        see images) -> (frames [B, T, 3, H, W], frame_mask [B, T]); a warning, once per model, when the frames'
        size is not the one the model was trained at."""
        frames, frame_mask = prepare_frames(frames, frame_mask, self.encoder.patch_size,
                                            self._use().replicate_image_frames)
        size = self.inputs.frame_size if self.inputs is not None else None
        if size is not None and tuple(frames.shape[-2:]) != (size, size) and not self._size_warned:
            self._size_warned = True
            warnings.warn(f"frames of {frames.shape[-2]}x{frames.shape[-1]} px, but this model was trained at "
                          f"{size}x{size} (model.inputs.frame_size): answers and scores differ from the trained "
                          f"model's; resize to {size} (frames.load_clip with FrameConfig(frame_size={size}))",
                          stacklevel=3)
        return frames, frame_mask

    @torch.no_grad()
    def generate(self, frames, input_ids, attention_mask=None, frame_mask=None, max_new_tokens=64,
                 mode="autoregressive", do_sample=False, temperature=1.0, top_p=1.0, eos_token_id=None,
                 tokenizer=None):
        """New token ids [B, <= max_new_tokens] after [frames, prompt], read with the LLM's KV cache. Rows that
        finish early are filled with eos_token_id. The prompt is input_ids [B, S], or a user message string (or
        B of them), chat-formatted behind the model's system prompt (model.inputs) with `tokenizer` (default
        model.tokenizer), whose eos then ends a row. Frames as `_inference_frames` takes them: a single image
        ([3, H, W], uint8 [H, W, 3]) or one-frame clip is replicated as the model was trained to see images.
        `generate_stream` gives the same ids one step at a time."""
        for new in self.generate_stream(frames, input_ids, attention_mask, frame_mask, max_new_tokens, mode,
                                        do_sample, temperature, top_p, eos_token_id, tokenizer):
            pass
        return new

    @torch.no_grad()
    def generate_stream(self, frames, input_ids, attention_mask=None, frame_mask=None, max_new_tokens=64,
                        mode="autoregressive", do_sample=False, temperature=1.0, top_p=1.0, eos_token_id=None,
                        tokenizer=None, encoded=None, visual=None):
        """generate, step by step: yields the new ids so far [B, n] after each step (n = 1, 2, ...; a single
        [B, 0] when max_new_tokens is 0), so that an answer can be shown as it is written. Questions about frames
        already read pass `encoded` (`_encode(*_inference_frames(frames, frame_mask))`: DINO is not run, `frames`
        not read) and `visual` (`visual_tokens(*encoded, mode)[0]`: the mode's queries are not run again)."""
        check_modes([mode])
        if isinstance(input_ids, (str, list)):
            tokenizer = tokenizer if tokenizer is not None else self.tokenizer
            input_ids, attention_mask = prompt_batch(input_ids, tokenizer, self.q_init.device,
                                                     self._use().system_prompt)
            eos_token_id = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        sampling = dict(do_sample=do_sample, temperature=temperature, top_p=top_p)
        if encoded is None:
            frames, frame_mask = self._inference_frames(frames, frame_mask)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        text, _ = self._text(input_ids, attention_mask)
        if encoded is None and self._streamed(frame_mask):
            _check_rows(frame_mask.sum(1), input_ids.shape[0], "input_ids")
            yield from streaming.generate(self, frames, frame_mask, text, mode, max_new_tokens, eos_token_id,
                                          **sampling)
            return
        kv, frame_idx, counts = encoded if encoded is not None else self._encode(frames, frame_mask)
        _check_rows(counts, input_ids.shape[0], "input_ids")
        vis = visual if visual is not None else self.visual_tokens(kv, frame_idx, counts, mode)[0]
        embeds, mask, _, _ = pack(pad_packed(vis, counts)[0], counts, text.embeds, text.n)
        cache = DynamicCache(config=self.llm.config)
        h = self._llm_hidden(embeds, mask, None, cache)
        last, next_pos = gather_rows(h, (counts + text.n - 1).clamp(min=0)[:, None])[:, 0], counts + text.n
        yield from self._decode(last, mask, next_pos, cache, max_new_tokens, eos_token_id, **sampling)

    def _decode(self, last, mask, next_pos, cache, max_new_tokens, eos_token_id=None, do_sample=False,
                temperature=1.0, top_p=1.0):
        """generate's token-by-token loop: last [B, D] the states at each row's last prompt token, mask [B, L]
        the cached positions, next_pos [B] the next token's position. Yields the new ids so far [B, n] after each
        step (a single [B, 0] when max_new_tokens is 0)."""
        done = torch.zeros(last.shape[0], dtype=torch.bool, device=last.device)
        if max_new_tokens <= 0:
            yield next_pos.new_zeros(last.shape[0], 0)
        out = []
        for _ in range(max_new_tokens):
            tok = _pick(self._logits(last).float(), do_sample, temperature, top_p)
            if eos_token_id is not None:
                tok = torch.where(done, eos_token_id, tok)
                done |= tok == eos_token_id
            out.append(tok)
            yield torch.stack(out, 1)
            if bool(done.all()) or len(out) == max_new_tokens:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            embed = self.llm.get_input_embeddings()(tok[:, None])
            last = self._llm_hidden(embed, mask, next_pos[:, None], cache)[:, 0]
            next_pos = next_pos + 1

    @torch.no_grad()
    def option_nll(self, frames, prompts, options, modes=("coarse_fine",), frame_mask=None, encoded=None):
        """Per-token negative log-likelihoods of multiple-choice options, for a batch of Q questions.

        frames [Q, T, 3, H, W] (frame_mask [Q, T] for questions with fewer frames); prompts: Q token-id lists;
        options: Q lists of option token-id lists (any number per question, any lengths). Returns {mode: [Q] lists
        of [n_options] float32 tensors [len(option)]}: -log p(option[j] | frames, prompt, option[:j]) in `mode`.
        DINO runs once for the batch. Each mode is one LLM pass per question in which every option reads the
        shared [visual tokens, prompt] (layout.option_tree: no per-option copy of it); with both coarse modes,
        coarse_only's pass is coarse_fine's coarse pass. `encoded` as in forward."""
        modes = check_modes(modes)
        prompts, options = question_ids(prompts, options)
        if encoded is None:
            frames, frame_mask = prepare_frames(frames, frame_mask, self.encoder.patch_size)
            if self._streamed(frame_mask):
                _check_rows(frame_mask.sum(1), len(prompts), "prompts")
                text, source, target = self._option_text(prompts, options, frames.device)
                states = streaming.text_states(self, frames, frame_mask, text, modes)
                return self._option_nll(states, modes, options, source, target)
        kv, frame_idx, counts = encoded if encoded is not None else self._encode(frames, frame_mask)
        _check_rows(counts, len(prompts), "prompts")
        text, source, target = self._option_text(prompts, options, counts.device)
        states = {}
        if "coarse_fine" in modes:
            vis, states["coarse_only"] = self.visual_tokens(kv, frame_idx, counts, "coarse_fine",
                                                            text if "coarse_only" in modes else None)
            states["coarse_fine"] = self._llm(vis, counts, text)[1]
        for mode in set(modes) - set(states):
            states[mode] = self._llm(self.visual_tokens(kv, frame_idx, counts, mode)[0], counts, text)[1]
        return self._option_nll(states, modes, options, source, target)

    def _option_text(self, prompts, options, device):
        """MCQ text as option trees (layout.option_tree) -> (_Text, source [K], target [K])."""
        ids, branch, n_txt, source, target = option_tree(prompts, options, device)
        return _Text(ids, self.llm.get_input_embeddings()(ids), n_txt, branch), source, target

    def _option_nll(self, states, modes, options, source, target):
        """{mode: states at the option trees [Q, S, D]} -> option_nll's {mode: [Q] lists of [n_options] NLLs}."""
        h = torch.cat([states[mode].flatten(0, 1)[source] for mode in modes])  # [modes * K, D], K option tokens
        nll = iter(F.cross_entropy(self._logits(h).float(), target.repeat(len(modes)), reduction="none")
                   .split([len(option) for _ in modes for question in options for option in question]))
        return {mode: [[next(nll) for _ in question] for question in options] for mode in modes}

    @torch.no_grad()
    def score_options(self, frames, prompt, options, modes=("coarse_fine",), frame_mask=None, tokenizer=None):
        """Each option's score after [frames, prompt] (lower is more likely), per mode: {mode: [n_options]}. One
        question: frames [T, 3, H, W] or [1, T, 3, H, W], or one image. Token ids give the mean negative
        log-likelihood of the option's tokens. Strings are chat-formatted behind the model's system prompt with
        `tokenizer` (default model.tokenizer) and scored as benchmark.py does by default
        (tokenization.option_targets: the original benchmark's rule). option_nll scores a batch of questions."""
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        prompt, options, weights = mcq_ids(prompt, options, tokenizer, self._use().system_prompt)
        frames, frame_mask = self._inference_frames(frames, frame_mask)
        nll = self.option_nll(frames, [prompt], [options], modes, frame_mask)
        return {mode: torch.stack([(t * w.to(t)).sum() / len(w) for t, w in zip(per_question[0], weights)])
                for mode, per_question in nll.items()}

    @torch.no_grad()
    def attention_maps(self, frames, frame_mask=None, encoded=None):
        """Per-layer attention over each frame's tokens of the queries each mode reads it with: the static query
        (coarse_only, and coarse_fine's coarse pass), coarse_fine's fine queries and the autoregressive queries:
        {"coarse"|"fine"|"autoregressive": [L, B, T, heads, 1+P]} (CLS first; zeros at padded frames).
        `encoded` as in generate_stream (then `frames` give only the layout)."""
        frames, frame_mask = self._inference_frames(frames, frame_mask)
        kv, frame_idx, counts = encoded if encoded is not None else self._encode(frames, frame_mask)
        q_static = self.q_static.expand(frame_idx.shape[0], -1)
        coarse_h, _ = self._llm(self._tokens(q_static, kv, frame_idx), counts)
        queries = {"coarse": q_static, "fine": self._fine_queries(coarse_h, counts),
                   "autoregressive": self._autoregressive_tokens(kv, frame_idx, counts)[1]}
        B, T = frames.shape[:2]
        out = {}
        for name, q in queries.items():
            _, maps = self.encoder.query_attend(q, kv, frame_idx, return_attention=True)
            grid = maps[0].new_zeros(len(maps), B, T, *maps[0].shape[1:])
            grid[:, frame_mask] = torch.stack(maps)
            out[name] = grid
        return out

    def stream(self, modes=("autoregressive",), chunk_frames=None):
        """A streaming.VideoStream reading a video into the LLM's KV cache of each mode a chunk at a time (DINOv2
        once per chunk, then dropped): `add_frames(frames)` as they come, then `ask(question)`, `generate(ids)` or
        `option_nll(prompt, options)` at any moment, without encoding a past frame again. An hour at 1 fps is
        3,600 tokens: constant memory besides the cache. `chunk_frames`: default model.chunk_frames."""
        return streaming.VideoStream(self, modes, chunk_frames or self.chunk_frames)

    def _streamed(self, frame_mask):
        """Whether frames go through streaming.py: at inference (no gradient), a sample longer than a chunk. (Under
        autograd nothing is read from the device: training makes no host sync here.)"""
        if torch.is_grad_enabled() or not frame_mask.numel():
            return False
        return int(frame_mask.sum(1).max()) > streaming.chunk_size(self.chunk_frames, frame_mask.device)

    # ---------------------------------------------------------------- training helpers
    def param_groups(self):
        """Trainable parameters by group (config.PARAM_GROUPS), for differential learning rates."""
        groups = {group: [] for group in PARAM_GROUPS}
        for name, p in self.named_parameters():
            if p.requires_grad:
                groups[param_group(name)].append(p)
        return groups

    def count_parameters(self):
        counts = dict.fromkeys(PARAM_GROUPS, 0)
        for name, p in self.named_parameters():
            counts[param_group(name)] += p.numel()
        counts["total"] = sum(counts.values())
        return counts

    def set_trainable(self, frozen=()):
        """Train every parameter group but those in `frozen`."""
        for name, p in self.named_parameters():
            p.requires_grad_(param_group(name) not in frozen)
        return self

    def enable_gradient_checkpointing(self):
        self.llm.activation_checkpointing_enable({"use_reentrant": False})
        self.encoder.gradient_checkpointing = True
        return self

    # ---------------------------------------------------------------- checkpoint folders (checkpoint.py)
    @classmethod
    def from_pretrained(cls, path, **kwargs):
        """A checkpoint folder written by save_pretrained or train.py, a training save_dir (its newest checkpoint),
        a hub repo, or weights without settings: a folder / hub repo with only `model.safetensors` (a published
        checkpoint) or the original's training checkpoint (.pt). For those, kwargs name the backbones
        (llm_name=..., dino_name=... or *_config=...), else they are the published SmolLM2 and DINOv2 of the
        weights' widths (checkpoint.weights_settings). The folder's tokenizer, when it holds one, is
        `model.tokenizer` (else None). In eval mode."""
        folder = checkpoint.resolve(path)
        saved = checkpoint.read_settings(folder)
        where = os.path.join(folder, checkpoint.CONFIG_NAME)
        args = ModelSettings.of(saved, where).constructor_kwargs() if saved else {}
        args.update(kwargs)
        state = checkpoint.read_state_dict(folder)
        model = cls(**(args or checkpoint.weights_settings(state, folder)))
        try:
            model.load_state_dict(state)
        except RuntimeError as e:  # weights of other backbones or settings than those given: a user error
            raise ValueError(f"{folder}: {e}") from None
        model.tokenizer = load_tokenizer(folder) if checkpoint.has_tokenizer(folder) else None
        model.inputs = checkpoint.read_inputs(folder)
        return model.eval()

    def save_pretrained(self, path, tokenizer=None):
        """Write config.json (the settings, and how the model is used: `inputs`), model.safetensors (and the
        tokenizer) into the folder `path`."""
        settings = {k: v for k, v in dataclasses.asdict(self.settings).items() if k not in checkpoint.BACKBONE_CONFIGS}
        inputs = dataclasses.asdict(self.inputs) if self.inputs is not None else None
        configs = {"llm_config": plain_config(self.llm.config), "dino_config": plain_config(self.encoder.dino.config)}
        state = checkpoint.convert_state_dict(self.state_dict(), self._tied())
        checkpoint.write_model(path, settings, inputs, configs, state, tokenizer)

    def _tied(self):
        out, inp = self.llm.get_output_embeddings(), self.llm.get_input_embeddings()
        return out is not None and out.weight is inp.weight

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """nn.Module's, taking the original's names too (checkpoint.convert_state_dict)."""
        state_dict = checkpoint.convert_state_dict(state_dict, self._tied())
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if not (k == "llm.lm_head.weight" and self._tied())]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"checkpoint does not match the model: missing {missing[:8]} "
                               f"(of {len(missing)}), unexpected {result.unexpected_keys[:8]} "
                               f"(of {len(result.unexpected_keys)})")
        return result


def param_group(name):
    """The parameter group (config.PARAM_GROUPS) of parameter `name`."""
    if name.startswith("encoder.dino."):
        return "dino"
    if name.startswith("llm."):
        return "llm"
    return "connector"


def load_checkpoint(path, device="cpu", tokenizer=None):
    """(model, tokenizer, frame_size) of checkpoint `path` (see checkpoint.resolve), the model in eval mode on
    `device`; `frame_size` is the one the model was trained at (model.inputs). The tokenizer (also
    `model.tokenizer`) is the one `tokenizer` names, else the one saved in the folder, else the one the training
    config or the model's `llm` names."""
    folder = checkpoint.resolve(path)
    model = FoveatedVLM.from_pretrained(folder).to(device).eval()
    cfg = checkpoint.training_config(folder)
    frame_size = model.inputs.frame_size
    if tokenizer is not None:
        model.tokenizer = load_tokenizer(tokenizer)
    if model.tokenizer is None:
        name = (cfg and (cfg.model.tokenizer or cfg.model.llm)) or model.llm_name
        if not name:
            raise ValueError(f"{folder} holds no tokenizer and names no LLM to take one from; save one "
                             "with model.save_pretrained(path, tokenizer=tokenizer)")
        model.tokenizer = load_tokenizer(name)
    return model, model.tokenizer, frame_size


@contextlib.contextmanager
def _unchecked(module):
    """Gradient checkpointing off inside the block for the parts of `module` that have it on."""
    parts = [m for m in module.modules() if getattr(m, "gradient_checkpointing", False)]
    for m in parts:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in parts:
            m.gradient_checkpointing = True


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


# ---------------------------------------------------------------- argument checks
def check_modes(modes):
    """modes (one name or several) -> a tuple of distinct modes; an unknown one is a ValueError."""
    modes = (modes,) if isinstance(modes, str) else tuple(dict.fromkeys(modes))
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"mode must be one of {MODES}, got {unknown or modes!r}")
    return modes


def _check_rows(counts, rows, name):
    if counts.shape[0] != rows:
        raise ValueError(f"frames hold {counts.shape[0]} clip(s) [B, T, 3, H, W] but {name} has {rows}: one each")


