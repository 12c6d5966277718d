"""Long videos at constant memory, and live streams: frames read a chunk at a time into the LLM's KV cache.

A VideoStream (`model.stream(modes)`) takes a video's frames a chunk at a time (`add_frames`). DINOv2 encodes
each chunk once (its patches' keys and values in every layer, encoder.PatchKV: ~9.5 MB a frame at 224 px in
float32), the queries of every mode asked for read it, and the patches are dropped. What stays is one visual
token per frame and mode, held as keys and values in the LLM's KV cache (transformers' DynamicCache), so memory
grows by that cache (~46 kB a frame for SmolLM2-135M), not by frames or patches:
- autoregressive: frame t's query comes from the LLM's state after frame t-1 (q_init for frame 0), so a chunk's
  frames are read in order, one LLM step each, each step appending its token to the cache.
- coarse_only: the chunk's static-query tokens, one LLM pass over them with the cache.
- coarse_fine: coarse_only's pass is its coarse pass (one cache serves both); frame t's fine query comes from the
  coarse state at frame t-1 (carried from chunk to chunk), so the fine tokens are read from the same chunk's
  patches, one DINO pass serving both passes, and appended to a second cache.
Text (a question, multiple-choice options, a target) is read after the frames with its mode's cache, then cut
off again (DynamicCache.crop): frames added later extend the visual sequence as if nothing had been asked, and a
live stream answers at any moment from everything seen, without encoding a past frame again.

The values are the one-shot path's (FoveatedVLM.forward, generate, option_nll) up to float rounding: the same
operations on the same rows, with the visual tokens' keys and values computed a chunk (or a frame) at a time
instead of in one pass. At inference (no gradient) the model sends videos longer than `model.chunk_frames`
(config.CHUNK_FRAMES by device when None) through here, one sample at a time; training keeps the one-shot path.
`context_room` and frames.fit keep frames plus text within the LLM's context.
"""

import time

import torch
from tqdm import tqdm
from transformers import DynamicCache

from config import CHUNK_FRAMES, MODES
from inputs import prepare_frames, prompt_batch
from layout import tree_attention

CACHES = {"autoregressive": "autoregressive", "coarse_only": "coarse", "coarse_fine": "fine"}  # mode -> its cache


def chunk_size(chunk_frames, device):
    """Frames per chunk: `chunk_frames`, else config.CHUNK_FRAMES of the device's type."""
    return chunk_frames or CHUNK_FRAMES.get(torch.device(device).type, CHUNK_FRAMES["cpu"])


def context_room(model, text_tokens):
    """Frames the LLM's context (max_position_embeddings) holds beside `text_tokens` tokens of text."""
    return model.llm.config.max_position_embeddings - text_tokens


class VideoStream:
    """One video read a chunk at a time into the LLM's KV cache of each mode in `modes` (see the module's
    docstring). `add_frames` as they come; `generate`, `ask`, `option_nll` and `text_states` at any moment read
    what was added so far, and leave the stream as they found it. Built by `FoveatedVLM.stream`."""

    def __init__(self, model, modes=("autoregressive",), chunk_frames=None):
        modes = (modes,) if isinstance(modes, str) else tuple(dict.fromkeys(modes))
        if not modes or any(m not in MODES for m in modes):
            raise ValueError(f"mode must be one of {MODES}, got {modes!r}")
        self.model, self.modes = model, modes
        self.device = model.q_init.device
        self.chunk = chunk_size(chunk_frames, self.device)
        names = {CACHES[m] for m in modes} | ({"coarse"} if "coarse_fine" in modes else set())
        self.caches = {name: DynamicCache(config=model.llm.config) for name in sorted(names)}
        self.length = 0  # frames read: the visual tokens in each cache
        self._query = model.q_init  # autoregressive: the next frame's query [1, query_dim]
        self._fine_query = model.q_init  # coarse_fine: the next frame's fine query
        self._last = None  # (the last frame read [3, H, W], its PatchKV): a repeat across chunks is not re-encoded

    # ---------------------------------------------------------------- frames in
    @torch.no_grad()
    def add_frames(self, frames):
        """Read frames [n, 3, H, W] (ImageNet-normalised float or uint8 pixels; what else: inputs.prepare_frames),
        `chunk` at a time. Returns the stream."""
        for chunk in frames.split(self.chunk):  # uint8 pixels are normalised a chunk at a time too
            chunk, _ = prepare_frames(chunk, None, self.model.encoder.patch_size)  # [1, n, 3, H, W]
            self._add(chunk[0].to(self.device, self.model.encoder.query_input_proj.weight.dtype))
        return self

    def read(self, chunks, total=None, desc="frames", leave=True):
        """add_frames for each chunk of an iterator (frames.stream_clip's), with a progress bar showing frames/s
        of decoding (the iterator's time) and of encoding (add_frames's). Returns the seconds of each, wall clock
        and CPU (this process's): {"decode": s, "encode": s, "decode_cpu": s, "encode_cpu": s}, and "chunks": each
        chunk's (frames, encoding seconds), which show whether encoding slows as the cache grows."""
        seconds = dict.fromkeys(("decode", "encode", "decode_cpu", "encode_cpu"), 0.0)
        seconds["chunks"] = []
        bar = tqdm(total=total, desc=desc, unit="frame", dynamic_ncols=True, leave=leave)
        clock = (time.perf_counter(), time.process_time())
        for chunk in chunks:
            clock = _lap(seconds, "decode", clock)
            self.add_frames(chunk)
            before = seconds["encode"]
            clock = _lap(seconds, "encode", clock)
            seconds["chunks"].append((chunk.shape[0], seconds["encode"] - before))
            bar.set_postfix_str(", ".join(f"{k} {(bar.n + chunk.shape[0]) / max(seconds[k], 1e-9):.1f} frames/s"
                                          for k in ("decode", "encode")), refresh=False)
            bar.update(chunk.shape[0])
        bar.close()
        return seconds

    def _add(self, frames):
        m = self.model
        kv, frame_idx = self._patches(frames)
        if "autoregressive" in self.modes:
            self._autoregressive(kv, frame_idx)
        if "coarse" in self.caches:
            h = self._extend("coarse", m._tokens(m.q_static.expand(len(frame_idx), -1), kv, frame_idx))  # [n, D]
            if "coarse_fine" in self.modes:  # frame t's fine query from the coarse state at t-1
                queries = torch.cat([self._fine_query, m.llm_to_query(h)])  # [n + 1, query_dim]
                self._fine_query = queries[-1:]
                self._extend("fine", m._tokens(queries[:-1], kv, frame_idx))
        self.length += len(frame_idx)

    def _patches(self, frames):
        """DINOv2 on the chunk's distinct frames -> (PatchKV, frame_idx [n]): consecutive identical frames (a
        replicated image) are encoded once, across chunks too, as the one-shot path encodes them."""
        new = torch.ones(frames.shape[0], dtype=torch.bool, device=frames.device)
        new[1:] = (frames[1:] != frames[:-1]).flatten(1).any(1)
        if self._last is not None:
            new[0] = bool((frames[0] != self._last[0]).any())
        kv = self.model.encoder.encode_patches(frames[new]) if bool(new.any()) else None
        frame_idx = torch.cumsum(new, 0) - 1
        if not new[0]:  # the previous chunk's last frame again: its patches, kept
            kv = self._last[1] if kv is None else _cat(self._last[1], kv)
            frame_idx = frame_idx + 1
        self._last = (frames[-1].clone(), kv.select(frame_idx[-1:]))  # not a view: the chunk goes
        return kv, frame_idx

    def _autoregressive(self, kv, frame_idx):
        """Frame by frame: its token from the current query, one LLM step appending it to the cache, whose state
        gives the next frame's query (FoveatedVLM._autoregressive_tokens, a chunk at a time)."""
        m, cache = self.model, self.caches["autoregressive"]
        for i in range(len(frame_idx)):
            token = m._tokens(self._query, kv, frame_idx[i:i + 1])  # [1, D]
            position = torch.tensor([[self.length + i]], device=self.device)
            self._query = m.llm_to_query(m._llm_hidden(self._embeds(token)[None], None, position, cache)[:, 0])

    def _extend(self, name, tokens):
        """One LLM pass over visual tokens [n, D] after those in cache `name`, appending them -> states [n, D]."""
        position = self.length + torch.arange(tokens.shape[0], device=self.device)[None]
        return self.model._llm_hidden(self._embeds(tokens)[None], None, position, self.caches[name])[0]

    def _embeds(self, x):
        return x.to(self.model.llm.get_input_embeddings().weight.dtype)

    # ---------------------------------------------------------------- text out
    def _mode(self, mode):
        mode = mode or self.modes[0]
        if mode not in self.modes:
            raise ValueError(f"this stream reads frames in {self.modes}, not {mode!r}: model.stream(modes=...)")
        return mode

    @torch.no_grad()
    def text_states(self, mode, embeds, branch=None, cache=None):
        """The LLM's states [S, D] at text embeds [S, D] read after the frames in `mode` (or in cache `cache`:
        "coarse" is coarse_fine's coarse pass); `branch` [S] lays the text out as an option tree (layout.py).
        The text is cut off the cache again."""
        name = cache or CACHES[self._mode(mode)]
        S, T = embeds.shape[0], self.length
        if branch is None:
            mask, position = None, torch.arange(S, device=self.device)[None]
        else:  # the tree's own mask beside the frames, which every text token sees
            allowed, position = tree_attention(branch[None])  # [1, 1, S, S], [1, S]
            mask = torch.cat([allowed.new_ones(1, 1, S, T), allowed], -1)
        try:
            h = self.model._llm_hidden(embeds[None], mask, T + position, self.caches[name])
        finally:
            _crop(self.caches[name], T)
        return h[0]

    @torch.no_grad()
    def generate_steps(self, input_ids, mode=None, max_new_tokens=64, eos_token_id=None, **sampling):
        """Yields the new token ids so far [n] after each step, after [the frames so far, prompt ids] (a list or
        1-D tensor), as FoveatedVLM.generate_stream (greedy unless do_sample=True). The prompt and answer are cut
        off the cache when the answer ends (or the generator is closed)."""
        name, T = CACHES[self._mode(mode)], self.length
        ids = torch.as_tensor(input_ids, device=self.device).view(1, -1)  # [1, S]
        S, cache = ids.shape[1], self.caches[name]
        try:
            position = T + torch.arange(S, device=self.device)[None]
            h = self.model._llm_hidden(self.model.llm.get_input_embeddings()(ids), None, position, cache)
            mask = torch.ones(1, T + S, dtype=torch.bool, device=self.device)
            for out in self.model._decode(h[:, -1], mask, torch.tensor([T + S], device=self.device), cache,
                                          max_new_tokens, eos_token_id, **sampling):
                yield out[0]
        finally:
            _crop(cache, T)

    def generate(self, input_ids, mode=None, max_new_tokens=64, eos_token_id=None, **sampling):
        """generate_steps' whole answer: new token ids [<= max_new_tokens]."""
        return _last(self.generate_steps(input_ids, mode, max_new_tokens, eos_token_id, **sampling))

    def ask(self, question, mode=None, max_new_tokens=64, tokenizer=None, **sampling):
        """The answer (text) to `question` (a user message, chat-formatted as in training) about the frames so
        far, with `tokenizer` (default model.tokenizer)."""
        tokenizer = tokenizer if tokenizer is not None else self.model.tokenizer
        ids, _ = prompt_batch(question, tokenizer, self.device, self.model._use().system_prompt)
        out = self.generate(ids[0], mode, max_new_tokens, tokenizer.eos_token_id, **sampling)
        return tokenizer.decode(out, skip_special_tokens=True).strip()

    @torch.no_grad()
    def option_nll(self, prompt, options, modes=None):
        """FoveatedVLM.option_nll for one question about the frames so far: prompt ids and a list of option ids
        -> {mode: [n_options] tensors [len(option)] of per-token NLLs}."""
        modes = [self._mode(m) for m in (modes or self.modes)]
        text, source, target = self.model._option_text([prompt], [options], self.device)
        states = {mode: self.text_states(mode, text.embeds[0], text.branch[0])[None] for mode in modes}
        return {mode: nll[0] for mode, nll in self.model._option_nll(states, modes, [options], source, target).items()}

    def cache_bytes(self):
        """Bytes held in the KV caches (every mode's, keys and values of every layer)."""
        return sum(t.numel() * t.element_size() for cache in self.caches.values() for layer in cache.layers
                   for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None)


def _lap(seconds, part, clock):
    """Add the wall and CPU seconds since `clock` to `part`'s; the new clock."""
    now = (time.perf_counter(), time.process_time())
    seconds[part] += now[0] - clock[0]
    seconds[part + "_cpu"] += now[1] - clock[1]
    return now


def _last(steps):
    """The last of a generator's steps (the whole answer), without keeping the others."""
    for out in steps:
        pass
    return out


def _crop(cache, length):
    """Cut a DynamicCache back to its first `length` positions (the frames): what a question added goes."""
    cache.crop(length - cache.get_seq_length())  # crop(-n) drops the last n


def _cat(a, b):
    """Two PatchKVs as one (a's frames first)."""
    cat = lambda x, y: None if x is None else torch.cat([x, y])
    return type(a)([cat(x, y) for x, y in zip(a.keys, b.keys)], [cat(x, y) for x, y in zip(a.values, b.values)],
                   cat(a.features, b.features))


# ---------------------------------------------------------------- the model's routes for long videos
def streams(model, frames, frame_mask, modes):
    """A VideoStream per sample of frames [B, T, 3, H, W] (its real frames), read in `modes`."""
    for b in range(frames.shape[0]):
        yield VideoStream(model, modes, model.chunk_frames).add_frames(frames[b][frame_mask[b]])


def text_states(model, frames, frame_mask, text, modes, coarse=False):
    """{mode: the LLM's states at the text [B, S, D]} (and with `coarse`, coarse_fine's coarse pass at the text as
    "coarse"), a sample at a time through a VideoStream: what FoveatedVLM's one-shot path computes with
    visual_tokens and _llm. `text` is model._Text (compact rows, optionally an option tree)."""
    B, S = text.ids.shape
    names = list(modes) + (["coarse"] if coarse else [])
    out = {name: text.embeds.new_zeros(B, S, text.embeds.shape[-1]) for name in names}
    for b, stream in enumerate(streams(model, frames, frame_mask, modes)):
        n = int(text.n[b])
        branch = None if text.branch is None else text.branch[b, :n]
        for name in names:
            mode, cache = (modes[0], "coarse") if name == "coarse" else (name, None)
            out[name][b, :n] = stream.text_states(mode, text.embeds[b, :n], branch, cache)
    return out


def generate(model, frames, frame_mask, text, mode, max_new_tokens, eos_token_id, **sampling):
    """FoveatedVLM.generate_stream a sample at a time through a VideoStream: yields the new ids so far [B, n], for
    one sample after each step, for more once every row is done (a row that ends before the others is filled with
    eos_token_id, as the batched path fills it)."""
    steps = lambda b, stream: stream.generate_steps(text.ids[b, :int(text.n[b])], mode, max_new_tokens,
                                                    eos_token_id, **sampling)
    if frames.shape[0] == 1:
        for out in steps(0, next(streams(model, frames, frame_mask, (mode,)))):
            yield out[None]
        return
    rows = [_last(steps(b, stream)) for b, stream in enumerate(streams(model, frames, frame_mask, (mode,)))]
    L = max(len(r) for r in rows)
    fill = eos_token_id if eos_token_id is not None else 0
    yield torch.stack([torch.cat([r, r.new_full((L - len(r),), fill)]) for r in rows])
