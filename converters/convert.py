"""Convert the recipe's training sets, as published, into this project's WebDataset shards: `convert(args)`, run by
prepare.py (one command per dataset, its flags there), on the files the publisher's download leaves on disk (the
README's "Training data" section; each reader in published.py and published_video.py names the files it reads).

Output, through webdataset's ShardWriter: `<out>/<name>-000000.tar`, ... A sample is `<key>.mp4` (the video
bytes as published, never re-encoded), `<key>.jpg|png|webp` (the image bytes as published) or numbered
frames `<key>.000.jpg`, `<key>.001.png`, ... (several images), and `<key>.json`: {caption, source} (video
caption), {user, assistant, source} (one exchange), {messages, source} (several, or text-only chat) or
{question, chosen, rejected, source} (DPO), plus a few metadata fields. `source` is `openvid`, `webvid`,
`cauldron/<subset>`, `smoltalk/<its source>`, `rlaif_v` or `llava_video/<subset>`.

Every medium is decoded before it is written: images fully with PIL (a truncated JPEG opens, then fails),
videos at the frames training takes (1 fps up to --max-frames) with frames.read_video. Bad rows are skipped
and counted by reason; the counts, with a few example ids each, go to `<out>/report.json`.

Inputs are read in a fixed order and streamed (parquet by row group, zips and tars member by member).
Shards are written as `.tar.tmp` and renamed when closed; `<out>/state.json` then records the input position
of the shard's last sample and the counts so far. A re-run after an interruption (Ctrl-C, kill -9) deletes
the unfinished shard and goes on after that position: no sample is lost or written twice.
"""

import collections
import ctypes
import io
import json
import os
import re
import signal
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor

import torch
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from converters import DATASETS, published, published_video
from converters.published import END, InputError, Item
from frames import IMAGE_ERRORS, VIDEO_FIELDS, SkipSample, frame_indices, read_video

CHECK_SIZE = 32  # frame side for the decode check: every frame is still decoded in full
IMAGE_FIELDS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # formats the loader reads
EXAMPLES = 5  # example ids kept per skip reason


# ---------------------------------------------------------------- decode checks

def image_field(data, name):
    """Image bytes, decoded fully -> (field name of its format, bytes). A format the loader cannot read
    (gif, bmp, tiff) is re-encoded losslessly as png: the only case where bytes change."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            fmt = IMAGE_FIELDS.get(img.format)
            if fmt:
                return f"{name}{fmt}", data
            buf = io.BytesIO()
            img.convert("RGB").save(buf, "PNG")
            return f"{name}png", buf.getvalue()
    except IMAGE_ERRORS as e:
        raise SkipSample("bad_image", str(e)[:200]) from e


def check_media(media, max_frames):
    """An Item's media -> the tar fields to write, after decoding them as training will. Raises SkipSample."""
    if "video" in media:
        try:
            read_video(media["video"], CHECK_SIZE, lambda n, fps: frame_indices(n, fps, max_frames))
        except SkipSample as e:  # empty_video, too: a video with no frame to train on
            raise SkipSample("bad_video", e.detail or e.reason) from e
        return {media["ext"] if media["ext"] in VIDEO_FIELDS else "mp4": media["video"]}
    images = media.get("images", [])
    if len(images) == 1:
        return dict([image_field(images[0], "")])
    return dict(image_field(data, f"{i:03d}.") for i, data in enumerate(images))


def checked(media, max_frames):
    """check_media's fields, or its SkipSample (returned, so that it travels back from a worker process)."""
    try:
        return check_media(media, max_frames)
    except SkipSample as e:
        return e


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def check_worker(parent):
    """A check process: one thread (as a DataLoader worker), and on Linux ended with its parent, which a kill -9
    of prepare.py would otherwise leave running (PR_SET_PDEATHSIG: no Python API has it)."""
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl
            os._exit(1)


def with_checks(events, workers, max_frames):
    """(event, fields or SkipSample; None for a SkipSample event) in input order; with workers > 1 the checks run in
    a process pool, at most 2 per worker ahead of the writer (Pool.imap would read the whole input ahead)."""
    def now(e):
        return None if isinstance(e, SkipSample) else checked(e.media, max_frames) if e.media else {}

    if workers <= 1:
        yield from ((e, now(e)) for e in events)
        return
    with ProcessPoolExecutor(workers, initializer=check_worker, initargs=(os.getpid(),)) as pool:
        ahead = collections.deque()
        for e in events:
            ahead.append((e, pool.submit(checked, e.media, max_frames) if isinstance(e, Item) and e.media else now(e)))
            while len(ahead) > 2 * workers or (ahead and not isinstance(ahead[0][1], Future)):
                e0, result = ahead.popleft()
                yield e0, result.result() if isinstance(result, Future) else result
        for e0, result in ahead:
            yield e0, result.result() if isinstance(result, Future) else result


def after_resume(events, after):
    """The events past the resume position `after` (a shared video's samples are trimmed one by one)."""
    last = ()
    for e in events:
        pos = e.pos if isinstance(e, SkipSample) else e.samples[0].pos
        assert pos > last, f"input positions must increase: {pos} after {last}"
        last = e.pos if isinstance(e, SkipSample) else e.samples[-1].pos
        if isinstance(e, SkipSample):
            if e.pos > after:
                yield e
        elif e.samples[-1].pos > after:
            yield e._replace(samples=[s for s in e.samples if s.pos > after])


# ---------------------------------------------------------------- counts, state, shards

class Tally:
    """Counts of written samples (by kind and source) and of skips (by reason, with example ids)."""

    def __init__(self, saved=None):
        saved = saved or {}
        self.written = saved.get("written", 0)
        self.by_kind = collections.Counter(saved.get("by_kind", {}))
        self.by_source = collections.Counter(saved.get("by_source", {}))
        self.skipped = collections.Counter(saved.get("skipped", {}))
        self.examples = {r: list(v) for r, v in saved.get("examples", {}).items()}

    def add(self, sample):
        self.written += 1
        self.by_kind[sample.kind] += 1
        self.by_source[sample.meta["source"]] += 1

    def skip(self, reason, ident):
        self.skipped[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES:
            examples.append(ident)

    def snapshot(self):
        return {"written": self.written, "by_kind": dict(self.by_kind), "by_source": dict(self.by_source),
                "skipped": dict(self.skipped), "examples": {r: list(v) for r, v in self.examples.items()}}


def write_json(path, obj):
    """Write atomically (a kill leaves the old file or the new one, never half of one)."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def shard_files(out, name):
    """{path: shard number} of `<out>/<name>-NNNNNN.tar`, and of unfinished `.tar.tmp` files (number -1)."""
    found = {}
    for f in os.listdir(out):
        m = re.fullmatch(re.escape(name) + r"-(\d{6})\.tar(\.tmp)?", f)
        if m:
            found[os.path.join(out, f)] = -1 if m.group(2) else int(m.group(1))
    return found


def start_state(out, name, signature, overwrite):
    """The saved state to resume from (or a fresh one), after deleting shards no state records as complete."""
    os.makedirs(out, exist_ok=True)
    path, shards = os.path.join(out, "state.json"), shard_files(out, name)
    state = None
    if overwrite:
        for f in [*shards, path, os.path.join(out, "report.json")]:
            if os.path.exists(f):
                os.remove(f)
        shards = {}
    elif os.path.exists(path):
        with open(path) as f:
            state = json.load(f)
        if state["signature"] != signature:
            raise InputError(f"{path} records a conversion with other inputs or settings "
                             f"({state['signature']}); pass --overwrite to start again")
    elif any(n >= 0 for n in shards.values()):
        raise InputError(f"{out} holds {name}-*.tar shards but no state.json; pass --overwrite to start again")
    state = state or {"signature": signature, "shards": 0, "position": [], "seconds": 0.0, "done": False}
    for f, n in shards.items():
        if n < 0 or n >= state["shards"]:
            print(f"deleting unfinished shard {f}")
            os.remove(f)
    return state


class Shards:
    """wds.ShardWriter into `<name>-%06d.tar.tmp` files, each renamed and recorded in state.json when closed,
    with the position and counts as of its last sample."""

    def __init__(self, out, name, state, maxcount, maxsize):
        self.path, self.state = os.path.join(out, "state.json"), state
        self.pattern, self.maxcount, self.maxsize = os.path.join(out, f"{name}-%06d.tar"), maxcount, maxsize
        self.writer = self.file = self.checkpoint = None
        self.start = time.time()
        self.seconds = state["seconds"]

    def write(self, sample, pos, tally):
        if self.writer is None:
            self.writer = wds.ShardWriter(self.pattern, self.maxcount, self.maxsize, post=self._closed,
                                          start_shard=self.state["shards"], verbose=0, opener=self._open,
                                          encoder=False, mtime=0)
        self.writer.write(sample)
        self.checkpoint = (pos, tally.snapshot())

    def _open(self, fname):
        self.file = open(fname + ".tmp", "wb")
        return self.file

    def _closed(self, fname):
        self.file.close()
        os.replace(fname + ".tmp", fname)
        self.state["shards"] += 1
        self.save(*self.checkpoint)

    def save(self, pos, counts, done=False):
        self.state.update(counts, position=list(pos), done=done,
                          seconds=self.seconds + time.time() - self.start)
        write_json(self.path, self.state)

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def abandon(self):
        """After an error: end the open shard's file as it is; it stays `.tmp`, unrecorded (a re-run deletes it)."""
        if self.writer is not None and self.writer.tarstream is not None:
            self.writer.tarstream.close()
            self.file.close()
        self.writer = None


# ---------------------------------------------------------------- the run

def report(out, name, args, state, tally):
    """report.json beside the shards, and the summary printed at the end."""
    shards = sorted(os.path.basename(f) for f, n in shard_files(out, name).items() if n >= 0)
    rep = {"dataset": args.dataset, "src": os.path.abspath(args.src), "complete": state["done"], **tally.snapshot(),
           "shards": shards, "seconds": round(state["seconds"], 1),
           "samples_per_s": round(tally.written / max(state["seconds"], 1e-9), 2)}
    rep["skipped"] = {r: {"count": c, "examples": tally.examples[r]} for r, c in sorted(tally.skipped.items())}
    del rep["examples"]
    write_json(os.path.join(out, "report.json"), rep)
    kinds = ", ".join(f"{k} {c}" for k, c in sorted(tally.by_kind.items()))
    print(f"{args.dataset}: wrote {tally.written} samples ({kinds or 'none'}) in {len(shards)} shard(s) under {out}, "
          f"{rep['seconds']} s ({rep['samples_per_s']} samples/s)"
          + ("" if state["done"] else "; stopped before the end of the input (re-run to go on)"))
    print(f"skipped {sum(tally.skipped.values())}: " + (", ".join(
        f"{r} {v['count']} (e.g. {v['examples'][0]})" for r, v in rep["skipped"].items()) or "none"))
    print(f"report: {os.path.join(out, 'report.json')}")
    return rep


def write_events(events, shards, tally, limit, bar):
    """Write the checked events' samples and count the skips; returns True if it stopped at `limit`."""
    for event, fields in events:
        if isinstance(event, SkipSample):
            tally.skip(event.reason, event.detail)
            continue
        for sample in event.samples:
            if isinstance(fields, SkipSample):
                tally.skip(fields.reason, f"{event.ident}: {fields.detail}")
                continue
            tally.add(sample)
            meta = json.dumps(sample.meta, ensure_ascii=False).encode()
            shards.write({"__key__": sample.key, **fields, "json": meta}, sample.pos, tally)
            bar.update(1)
            if limit is not None and tally.written >= limit:
                return True
        bar.set_postfix(skipped=sum(tally.skipped.values()), refresh=False)
    return False


def convert(args):
    """Run one converter (args from parse_args) to the end of its input or --limit; returns the report."""
    name, (inputs, read) = DATASETS[args.dataset][0], READERS[args.dataset]
    found = inputs(args)
    signature = {"dataset": args.dataset, "src": os.path.abspath(args.src),
                 "inputs": published.relative(found, args.src), "shard_size": args.shard_size,
                 "shard_mb": args.shard_mb, "max_frames": args.max_frames}
    state = start_state(args.out, name, signature, args.overwrite)
    tally = Tally(state)
    if state["done"] or (args.limit is not None and tally.written >= args.limit):
        print(f"{args.out}: nothing to do (already complete or at --limit; --overwrite starts again)")
        return report(args.out, name, args, state, tally)
    after = tuple(state["position"])
    shards = Shards(args.out, name, state, args.shard_size, args.shard_mb * 1e6)
    events = with_checks(after_resume(read(args, found, after), after), args.workers, args.max_frames)
    try:
        with tqdm(total=args.limit, initial=tally.written, unit="sample", desc=name, dynamic_ncols=True) as bar:
            limited = write_events(events, shards, tally, args.limit, bar)
    except BaseException:
        shards.abandon()
        raise
    shards.close()  # saves the state as of the last sample written
    if not limited:
        shards.save((END,), tally.snapshot(), done=True)
    return report(args.out, name, args, state, tally)


READERS = {  # command (converters.DATASETS) -> (input finder, reader)
    "openvid": (published_video.openvid_inputs, published_video.read_openvid),
    "webvid": (published_video.webvid_inputs, published_video.read_webvid),
    "cauldron": (published.cauldron_inputs, published.read_cauldron),
    "smoltalk": (published.smoltalk_inputs, published.read_smoltalk),
    "rlaif-v": (published.rlaif_inputs, published.read_rlaif),
    "llava-video": (published_video.llava_inputs, published_video.read_llava),
}
