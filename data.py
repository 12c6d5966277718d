"""WebDataset shard reading for all training stages: video2dataset mp4, pre-extracted frames, images, text.

A sample is the run of consecutive tar members sharing a key (the member name up to the first dot of its
basename; the rest, lowercased, is the field). Shards are local files, globs, brace ranges or any URL the
webdataset library opens (`pipe:`, http(s), `hf://`): see shards.py. The formats (the README's "Data"):
- `mp4` (+ `txt`/`json`, video2dataset): frames at `sample_fps` up to `max_frames`; a longer video is sampled
  uniformly over its whole length (`frame_sampling: uniform`) or keeps its first `max_frames` (`head`).
  Samples whose json `status` is not "success" (failed downloads, written without mp4) are skipped.
- pre-extracted frames: one image field (`jpg`/`jpeg`/`png`/`webp`) or numbered `000.jpg`, `001.jpg`, ...;
  one frame (an image, a single numbered frame, a one-frame video) becomes `replicate_image_frames` views of one
  tensor (stride 0, no copy), so the model's content dedup encodes it once.
- text: json `messages` | `user`+`assistant` | `question`+`chosen`+`rejected` (DPO; the original's
  `user`+`chosen_assistant`+`rejected_assistant` too) | `caption`, or `txt` | pre-tokenized `token_ids` +
  `loss_mask`. Prompts follow the original recipe (tokenization.py): an explicit system turn, and a
  caption's user prompt chosen by the sample's `source` unless it has its own `user` text.
Frames come from frames.load_clip with the data config: square-resized to `frame_size`, [T, 3, H, W] uint8 pixels
(a quarter of float32's bytes between the loader's processes and to the GPU; the model normalises them there).

Training reads an endless stream (each pass over this worker's shards in a new random order, or shards drawn
with replacement when `resampled`, then a shuffle buffer of undecoded samples); evaluation reads one ordered
pass. Shards are split across DDP ranks and DataLoader workers so no sample is read twice per pass. Bad samples
and shards are skipped and counted by reason; each yielded sample carries the counts since the previous one
(`sample["skipped"]`), so the counts reach the main process with the batches whatever the number of workers.

Inspector and decode throughput: `python data.py --config CONFIG [--workers N] [--limit K] [--set data.KEY=V]`
(see `inspect_main`).
"""

import argparse

import cli

STAGE_LOSS = {1: "text_ce_all", 2: "text_ce_answer_only", 3: "dpo"}
SPLITS = ("train", "text", "val")  # the shard sets of a config: data.<split>_shards


def inspect_arguments(argv=None):
    p = argparse.ArgumentParser(description="Inspect the shards of a training config and time decoding.")
    p.add_argument("--config", required=True, help="stage YAML")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. data.frame_size=224 (repeatable)")
    p.add_argument("--stage", type=int, choices=sorted(STAGE_LOSS), help="tokenize as this stage "
                   "(1 all-text CE, 2 answer-only CE, 3 DPO); default: the config's loss.type")
    p.add_argument("--limit", type=int, help="stop after this many samples (each pass)")
    p.add_argument("--split", choices=SPLITS, action="append",
                   help="shard sets to read (repeatable); default: every one the config sets")
    p.add_argument("--workers", type=int, default=0, help="then time a pass with this many loader workers")
    p.add_argument("--target", type=float, default=27.0, help="samples/s the GPU trains at (default: the "
                   "original fVLM's A100 bf16 rate for 135M): prints the loader workers needed to feed it")
    cli.add_threads(p, default=1)  # 1 thread, as in a DataLoader worker
    return p.parse_args(argv)


if __name__ == "__main__":  # parse before torch loads: --help and a flag error answer at once
    ARGS = inspect_arguments()

import functools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402

import distributed  # noqa: E402  before torch: it sets OpenMP's wait policy (README, CPU threads)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import webdataset as wds  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset, get_worker_info  # noqa: E402
from tqdm import tqdm  # noqa: E402

import checkpoint  # noqa: E402
import config  # noqa: E402
from collate import BudgetBatches, collate  # noqa: E402
from config import LOSS_TYPES, ConfigError  # noqa: E402
from frames import IMAGE_FIELDS, NUMBERED_FRAME, VIDEO_FIELDS, Media, SkipSample, load_clip  # noqa: E402
from pretrained import load_tokenizer  # noqa: E402
from shards import SHARD_REASONS, ShardStream, expand_shards, names  # noqa: E402
from tokenization import PromptTooLong, caption_messages, caption_prompt, tokenize_chat, tokenize_dpo  # noqa: E402

log = logging.getLogger("fvlm.data")


# ---------------------------------------------------------------- text

def sample_meta(fields):
    """The json metadata (or {}), with failed video2dataset downloads rejected."""
    if "json" not in fields:
        return {}
    try:
        meta = json.loads(fields["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SkipSample("bad_json", str(e)) from e
    if not isinstance(meta, dict):
        raise SkipSample("bad_json", f"expected an object, got {type(meta).__name__}")
    if "status" in meta and meta["status"] != "success":
        raise SkipSample("failed_download", f"status {meta['status']!r}")
    return meta


def conversation(meta, fields, data):
    """Metadata -> ("tokens", {input_ids, loss_mask}) when the shard is pre-tokenized (the original's
    `token_ids` + `loss_mask`), ("chat", messages), or ("dpo", (question, chosen, rejected)) from
    `question`/`user` + `chosen`/`chosen_assistant` + `rejected`/`rejected_assistant` (the original's keys).
    A sample without its own user text gets `data.prompt` when set, else its source's caption prompt."""
    if "token_ids" in meta and "loss_mask" in meta:
        ids, mask = meta["token_ids"], meta["loss_mask"]
        if not (isinstance(ids, list) and isinstance(mask, list) and len(ids) == len(mask) and ids):
            raise SkipSample("bad_json", "token_ids and loss_mask must be lists of the same non-zero length")
        return "tokens", {"input_ids": torch.tensor(ids, dtype=torch.long),
                          "loss_mask": torch.tensor(mask, dtype=torch.float).round().long()}
    if "messages" in meta:
        return "chat", meta["messages"]
    user = meta.get("user") or meta.get("question") or data.prompt or caption_prompt(meta.get("source"),
                                                                                       data.caption_prompts)
    chosen, rejected = meta.get("chosen", meta.get("chosen_assistant")), meta.get("rejected",
                                                                                  meta.get("rejected_assistant"))
    if chosen is not None or rejected is not None:
        if not (chosen and rejected):
            raise SkipSample("missing_field", "a preference pair needs both a chosen and a rejected answer")
        return "dpo", (user, chosen, rejected)
    if "user" in meta or "assistant" in meta:
        if not meta.get("assistant"):
            raise SkipSample("missing_field", "needs an assistant answer")
        return "chat", [{"role": "user", "content": user}, {"role": "assistant", "content": meta["assistant"]}]
    caption = meta.get("caption")
    if not caption and "txt" in fields:
        caption = fields["txt"].decode("utf-8", errors="replace")
    if not caption or not caption.strip():
        raise SkipSample("no_text")
    return "chat", caption_messages(caption, user)


def tokenize_sample(tokenizer, meta, fields, data, loss):
    """Token ids and loss masks for the loss type, with data.system_prompt, cut to data.max_text_tokens."""
    form, content = conversation(meta, fields, data)
    n, system = data.max_text_tokens, data.system_prompt
    try:
        if form == "tokens":
            if loss == "dpo":
                raise SkipSample("not_dpo", "a pre-tokenized sample cannot be a preference pair")
            return {k: v[:n] for k, v in content.items()}
        if loss == "dpo":
            if form != "dpo":
                raise SkipSample("not_dpo", "loss.type dpo needs a chosen and a rejected answer")
            return tokenize_dpo(tokenizer, *content, max_tokens=n, system_prompt=system)
        if form == "dpo":  # a preference pair in a CE stage trains on its chosen answer
            content = [{"role": "user", "content": content[0]}, {"role": "assistant", "content": content[1]}]
        targets = "all" if loss == "text_ce_all" else "assistant"
        return tokenize_chat(tokenizer, content, loss=targets, max_tokens=n, system_prompt=system)
    except PromptTooLong as e:
        raise SkipSample("prompt_too_long", str(e)) from e
    except (ValueError, TypeError, AttributeError) as e:
        raise SkipSample("bad_text", str(e)) from e


def decode_sample(key, fields, shard, tokenizer, data, loss):
    """Raw tar fields -> a training sample dict, its frames by data (a config.DataConfig). Raises SkipSample."""
    meta = sample_meta(fields)
    visual = any(f in VIDEO_FIELDS or f in IMAGE_FIELDS or NUMBERED_FRAME.match(f) for f in fields)
    if "status" in meta and not visual:  # a video2dataset sample must have its video
        raise SkipSample("no_video", "status success but no video or image field")
    text = tokenize_sample(tokenizer, meta, fields, data, loss)  # first: cheap, and it rejects before decoding
    clip = load_clip(Media(fields=fields), data, pixels=True)  # uint8: the model normalises them on its device
    return {"kind": "dpo" if loss == "dpo" else clip.kind, "format": clip.format, "key": key, "shard": shard,
            "frames": clip.frames, **text}


# ---------------------------------------------------------------- the stream

class ShardDataset(IterableDataset):
    """Decoded samples from WebDataset shards: endless and shuffled (train=True) or one ordered pass.

    `data` (a config.DataConfig) says how samples are read: their frames, text length, prompts, shuffle buffer
    and `resampled`. rank/world default to torch.distributed when it is initialised (else 0/1); DataLoader workers
    split the rank's share further (resampled: each draws shards with replacement instead, training only). Each
    sample carries `skipped`: a Counter of samples and shards skipped (by reason) since the previous sample from
    the same worker; the last sample of a pass also carries the skips after it. A worker that yields no sample
    at all has nobody to carry its counts: they show only in its warnings and in `dataset.skipped` when
    iterating in-process.
    """

    def __init__(self, shards, tokenizer, data, *, loss="text_ce_all", train=True, seed=0, rank=None, world=None,
                 warn_limit=5):
        if loss not in LOSS_TYPES:
            raise ValueError(f"loss must be one of {LOSS_TYPES}, got {loss!r}")
        self.shards = expand_shards(shards)
        self.tokenizer, self.data, self.loss = tokenizer, data, loss
        self.train, self.seed, self.warn_limit = train, seed, warn_limit
        if rank is None:
            ddp = dist.is_available() and dist.is_initialized()
            rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
        self.rank, self.world = rank, world

    def _split(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return self.rank * workers + worker, self.world * workers

    def _count(self, reason, key, shard, detail=""):
        self._skipped[reason] += 1
        self.skipped[reason] += 1
        if reason in SHARD_REASONS:  # a shard: always named, once per pass
            if shard not in self._warned_shards:
                self._warned_shards.add(shard)
                log.warning("skipping shard %s: %s (%s)", shard, reason, detail)
            return
        self._warned += 1
        if self._warned <= self.warn_limit:
            log.warning("skipping sample %r in %s: %s%s", key, shard, reason, f" ({detail})" if detail else "")

    def _check_all_bad(self, stream):
        """An endless stream whose samples are all bad would loop forever: stop once it is certain. A sample
        survives 20 * buffer draws from the shuffle buffer with probability (1 - 1/buffer)^(20 buffer) < e^-20."""
        limit = stream.pass_size + 20 * self.data.shuffle_buffer
        if self.train and self._good == 0 and stream.pass_size and sum(self.skipped.values()) > limit:
            raise RuntimeError(f"no usable sample in {names(stream.shards)}: skipped {dict(self.skipped)}")

    def __iter__(self):
        split, n_splits = self._split()
        rng = random.Random(self.seed * 100003 + split)
        stream = ShardStream(self.shards, split, n_splits, self._count, train=self.train,
                             resampled=self.data.resampled, seed=self.seed, rng=rng)
        raw = iter(stream)
        if self.train:  # a buffer of undecoded samples, as webdataset's shuffle stage
            buffer = self.data.shuffle_buffer
            raw = wds.shuffle(buffer, initial=buffer, rng=rng)(raw)
        self._skipped, self._warned, self._warned_shards, self._good = Counter(), 0, set(), 0
        self.skipped = Counter()  # this pass's totals in this process (the inspector, num_workers=0)
        held = None  # one sample of look-ahead, so skips after the last sample still travel with it
        for key, fields, shard in raw:
            start = time.perf_counter()
            try:
                sample = decode_sample(key, fields, shard, self.tokenizer, self.data, self.loss)
                sample["seconds"] = time.perf_counter() - start  # decode + tokenize time
            except SkipSample as e:
                self._count(e.reason, key, shard, str(e))
                self._check_all_bad(stream)
                continue
            self._good += 1
            if held is not None:
                held["skipped"], self._skipped = self._skipped, Counter()
                yield held
            held = sample
        if held is not None:
            held["skipped"] = self._skipped
            yield held


def make_loader(dataset, batch_size, pad_id, num_workers=None, pin_memory=False):
    """Batches from a ShardDataset (see collate.collate), with its data config's num_workers (unless given),
    prefetch_factor, max_total_frames and max_batch_tokens (a batch then holds at most that many padded frames and
    LLM tokens, so long videos and long texts make smaller batches). Workers persist across passes (validation
    re-reads its loader) and ignore Ctrl-C (the training process stops them once it has saved: train.Stop);
    pin_memory (for CUDA) puts batches in page-locked memory, which is what lets `tensor.to(device,
    non_blocking=True)` copy asynchronously."""
    data = dataset.data
    workers = data.num_workers if num_workers is None else num_workers
    kwargs = dict(num_workers=workers, prefetch_factor=data.prefetch_factor if workers else None,
                  persistent_workers=workers > 0, pin_memory=pin_memory, worker_init_fn=_ignore_ctrl_c,
                  collate_fn=functools.partial(collate, pad_id=pad_id))
    if data.max_total_frames or data.max_batch_tokens:
        budget = BudgetBatches(dataset, batch_size, data.max_total_frames, data.max_batch_tokens)
        return DataLoader(budget, batch_size=None, **kwargs)
    return DataLoader(dataset, batch_size=batch_size, **kwargs)


def _ignore_ctrl_c(worker_id):
    """A loader worker outlives a Ctrl-C (the terminal, and torchrun, send it to the whole process group) until its
    loader ends it: its parent finishes the step and saves first. SIGTERM still ends it (a process that ignored it
    would hang multiprocessing's exit, which terminates and joins its children)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ---------------------------------------------------------------- from a config, and the inspector

def inspect_shards(datasets, limit=None):
    """One ordered pass over each dataset (up to `limit` samples in all).

    Returns (per-sample rows (kind, format, frames, text tokens, decode seconds), skipped Counter, wall seconds).
    """
    rows, skipped, start = [], Counter(), time.perf_counter()
    with tqdm(total=limit, unit="sample", desc="reading") as bar:
        for dataset in datasets:
            for sample in dataset:
                tokens = len(sample["input_ids" if "input_ids" in sample else "chosen_ids"])
                rows.append((sample["kind"], sample["format"], sample["frames"].shape[0], tokens, sample["seconds"]))
                bar.update(1)
                if limit and len(rows) >= limit:
                    break
            skipped.update(dataset.skipped)
            if limit and len(rows) >= limit:
                break
    return rows, skipped, time.perf_counter() - start


def _min_med_max(values):
    return f"{min(values)} / {int(np.median(values))} / {max(values)}"


def format_report(rows, skipped, seconds, target=None):
    """The inspector's table: samples by kind, decode rate by format, skips by reason, and the totals; with
    `target` (samples/s the GPU trains at), the loader workers one-process decoding needs to feed it."""
    lines = [f"{'kind':<6} {'samples':>8} {'frames min/med/max':>20} {'text tokens min/med/max':>25}"]
    for kind in ("video", "image", "text", "dpo"):
        mine = [r for r in rows if r[0] == kind]
        if mine:
            lines.append(f"{kind:<6} {len(mine):>8} {_min_med_max([r[2] for r in mine]):>20} "
                         f"{_min_med_max([r[3] for r in mine]):>25}")
    lines.append("decode + tokenize throughput per worker by format (one process, 1 thread):")
    for fmt in sorted({r[1] for r in rows}):
        lines.append(f"  {fmt:<12} " + _rate([r for r in rows if r[1] == fmt]))
    if rows and target:
        per_worker = len(rows) / max(sum(r[4] for r in rows), 1e-9)
        lines.append(f"  all          {_rate(rows)}: data.num_workers >= {math.ceil(target / per_worker)} "
                     f"to feed {target:g} samples/s")
    lines.append("skipped by reason: " + (", ".join(f"{r} {c}" for r, c in sorted(skipped.items())) or "none"))
    lines.append(f"read + decode + tokenize: {len(rows) / seconds:.1f} samples/s over {seconds:.1f}s")
    lines.append(f"samples: {len(rows)}  skipped: {sum(skipped.values())}")
    return "\n".join(lines)


def _rate(rows):
    busy = sum(r[4] for r in rows)  # decode + tokenize seconds
    return f"{len(rows) / busy:>9.1f} samples/s {sum(r[2] for r in rows) / busy:>9.1f} frames/s"


def loader_throughput(datasets, workers, batch_size, pad_id, limit=None):
    """One pass over each dataset through make_loader with `workers` worker processes, up to `limit` samples.

    Returns (samples, frames, seconds, start-up seconds): counted and timed from each loader's first batch on,
    so the workers' start-up (process start, imports) is reported apart.
    """
    samples, frames, seconds, startup = 0, 0, 0.0, 0.0
    for dataset in datasets:
        created = time.perf_counter()
        batches = iter(make_loader(dataset, batch_size, pad_id, num_workers=workers))
        if next(batches, None) is None:
            continue
        first = time.perf_counter()
        startup += first - created
        for batch in batches:
            samples, frames = samples + batch["frame_mask"].shape[0], frames + int(batch["frame_mask"].sum())
            if limit and samples >= limit:
                break
        seconds += time.perf_counter() - first
        del batches  # stops the workers
    return samples, frames, seconds, startup


def check_shards(cfg, source):
    """Every local shard name or glob of the config's shard sets must match a file (URLs and pipe: commands are
    opened when read): a ConfigError naming the key and `source` (the config file) otherwise."""
    for split in SPLITS:
        patterns = getattr(cfg.data, f"{split}_shards")
        try:
            if patterns:
                expand_shards(patterns)
        except FileNotFoundError as e:
            raise ConfigError(f"{source}: 'data.{split}_shards': {e}") from None


def inspect_main(argv=None, args=None):
    """`python data.py --config CONFIG [--workers N] [--limit K] [--split ...] [--set data.KEY=VALUE]`: read a
    config's shards once in this process (kinds, lengths, skips, decode rate per worker), then with N loader
    workers as training reads them."""
    args = args or inspect_arguments(argv)
    distributed.set_threads(args.threads)
    cfg = config.load(args.config, args.set)
    check_shards(cfg, config.source_name(args.config, args.set))
    splits = args.split or [s for s in SPLITS if getattr(cfg.data, f"{s}_shards")]
    missing = [s for s in splits if not getattr(cfg.data, f"{s}_shards")]
    if missing:
        raise ValueError(f"{args.config}: data.{missing[0]}_shards is not set")
    tokenizer = load_tokenizer(checkpoint.tokenizer_source(cfg.model))
    loss = STAGE_LOSS.get(args.stage) or cfg.loss.type
    datasets = []
    for split in splits:  # inspect: one ordered pass of each
        shards = getattr(cfg.data, f"{split}_shards")
        datasets.append(ShardDataset(shards, tokenizer, cfg.data, loss=loss, train=False, seed=cfg.training.seed))
        print(f"{split}: {len(datasets[-1].shards)} shard(s) from {shards}")
    print(f"frames at {cfg.data.frame_size} px, up to {cfg.data.max_frames} per video at {cfg.data.sample_fps:g} fps")
    rows, skipped, seconds = inspect_shards(datasets, args.limit)
    print(format_report(rows, skipped, seconds, args.target))
    if args.workers:
        n, frames, seconds, startup = loader_throughput(datasets, args.workers, cfg.training.batch_size,
                                                        tokenizer.pad_token_id, args.limit)
        one = len(rows) / max(sum(r[4] for r in rows), 1e-9)
        print(f"{args.workers} loader workers (batches of {cfg.training.batch_size}): {n / seconds:.1f} samples/s "
              f"{frames / seconds:.1f} frames/s = {n / seconds / one:.2f} x one worker's decode rate "
              f"({n} samples after the first batch; worker start-up {startup:.1f}s)")


if __name__ == "__main__":
    cli.run(inspect_main, args=ARGS)
