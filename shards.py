"""WebDataset tar shards through the `webdataset` library (1.0.2): naming them, sharing them across DDP ranks
and loader workers, and reading their samples.

Names: a local path or glob; a brace range or list (`shard-{000..099}.tar`, `{train,extra}-*.tar`, expanded
by webdataset); or any URL webdataset's gopen opens: `pipe:CMD` (the command's stdout), `http(s)://` (curl),
`hf://` (Hugging Face), `file:`. A config's list may mix them. Local names are globbed and must match a file;
URLs are only opened when read.

A sample is the run of consecutive tar members sharing a key: the member name up to the FIRST dot of its
basename (`abc.000.jpg` -> key `abc`, field `000.jpg`; `abc_000.jpg` -> key `abc_000`, field `jpg`); fields
are lowercased (webdataset's url_opener -> tar_file_expander -> group_by_keys, run one shard at a time).

Shares: in every pass each split (one loader worker of one rank) reads a disjoint share: whole shards when
there are at least as many shards as splits, else interleaved samples of a shared shard (`assign_shards`).
With `resampled`, each split instead draws shards with replacement (webdataset's ResampledShards).

Failures reach webdataset's handler hooks and are reported as `on_skip(reason, key, shard, detail)`:
`shard_unreadable` when nothing could be read (missing file, HTTP 404, refused connection, failing pipe:
command), `bad_shard` when it failed part way (truncated, corrupt): the samples before the damage are kept,
the one being read is dropped. A 404 or a refused connection fails at once: curl retries only timeouts and
HTTP 408/429/5xx (webdataset runs it with `--retry 30 --retry-delay 2`, about a minute for a 5xx).
"""

import glob
import logging
import os
import random
import re

import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

log = logging.getLogger("fvlm.shards")

URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # a scheme: pipe:, http://, hf://, file: (one letter = a drive)
CURL_EXIT = {6: "host not found", 7: "connection refused", 22: "HTTP error (e.g. 404)", 28: "timed out"}
SHOWN = 10  # shard names an error message lists
SHARD_REASONS = ("shard_unreadable", "bad_shard")  # skip reasons that name a shard, not a sample


def is_url(name):
    return bool(URL.match(name))


def expand_shards(patterns):
    """One name or pattern, or a list of them -> the shard list: braces expanded (webdataset's expand_urls),
    local globs matched (sorted), URLs kept as they are; in order, without duplicates.

    A local name or glob that matches no file is an error naming it.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise FileNotFoundError("no shard pattern given")
    shards = {}
    for pattern in patterns:
        for name in wds.shardlists.expand_urls(pattern):
            matches = [name] if is_url(name) else sorted(f for f in glob.glob(name) if os.path.isfile(f))
            if not matches:
                origin = "" if name == pattern else f" (from {pattern})"
                raise FileNotFoundError(f"shard pattern matches no file: {name}{origin}")
            shards.update(dict.fromkeys(matches))
    return list(shards)


def assign_shards(shards, split, n_splits):
    """This split's share as (shard, stride, offset): read samples i of `shard` with i % stride == offset.

    With at least as many shards as splits, each split reads whole shards (shards[split::n_splits]). With
    fewer, the splits that share a shard take interleaved samples of it. Either way every sample belongs to
    exactly one split.
    """
    assert 0 <= split < n_splits, (split, n_splits)
    if len(shards) >= n_splits:
        return [(s, 1, 0) for s in shards[split::n_splits]]
    sharing = [s for s in range(n_splits) if s % len(shards) == split % len(shards)]
    return [(shards[split % len(shards)], len(sharing), sharing.index(split))]


def names(shards):
    """A shard list for an error message: the first few names and the count."""
    more = f" ... ({len(shards)} in all)" if len(shards) > SHOWN else ""
    return ", ".join(shards[:SHOWN]) + more


def _close(stream):
    """Close a shard stream. For pipe: and curl streams this waits for the command: returns its failure."""
    if stream is None:
        return None
    try:
        stream.close()
    except OSError as e:  # webdataset's Pipe raises on a non-zero exit status
        return e
    return None


def _describe(error, stream):
    """An error of webdataset's pipeline as one line, with the command's exit status for pipe:/curl streams."""
    first = error.args[0] if error.args else ""  # webdataset appends the stream and URL to args
    text = getattr(error, "strerror", None) or str(first) or type(error).__name__
    status = getattr(stream, "status", None)
    if status:
        text += f"; exit status {status}" + (f" ({CURL_EXIT[status]})" if status in CURL_EXIT else "")
    return text


def iter_tar(shard, stride=1, offset=0, on_skip=None):
    """Yield (key, {field: bytes}, shard) for the samples i of `shard` with i % stride == offset.

    Without on_skip a failure raises; with it, it is reported once (see the module docstring) and the shard
    ends there.
    """
    errors, members = [], [0]

    def failed(exn):  # webdataset's handler hook for opening and reading: stop this shard
        if on_skip is None:
            raise exn
        errors.append(exn)
        return False

    def duplicate(exn):  # group_by_keys: two members with the same field in one sample
        log.warning("%s in %s: keeping the first", exn.args[0] if exn.args else exn, shard)
        return True

    def counted(files):
        for f in files:
            members[0] += bool(f)  # {} marks the end of the shard
            yield f

    source = {"url": shard}  # url_opener adds the opened "stream"
    files = tar_file_expander(url_opener([source], handler=failed), handler=failed)
    held, index = None, 0
    try:
        for sample in group_by_keys(counted(files), handler=duplicate):
            if held is not None and index % stride == offset:
                yield _unpack(held)
            index += held is not None
            held = sample  # one behind: a sample is whole only once the next one (or the clean end) is read
    finally:
        closed = _close(source.get("stream"))  # when the reader stopped early, a SIGPIPE status says nothing
    error = errors[0] if errors else closed
    if error is not None:
        if on_skip is None:
            raise error
        reason = "bad_shard" if members[0] else "shard_unreadable"
        on_skip(reason, held and held["__key__"], shard, _describe(error, source.get("stream")))
        return
    if held is not None and index % stride == offset:
        yield _unpack(held)


def _unpack(sample):
    return sample["__key__"], {k: v for k, v in sample.items() if not k.startswith("__")}, sample["__url__"]


class ShardStream:
    """The raw samples (key, fields, shard) that one split (a loader worker of a DDP rank) reads.

    train=False: one ordered pass over the split's share. train=True: endless, each pass over the share in a
    new order from `rng`; with resampled=True, shards drawn with replacement from the whole list (webdataset's
    ResampledShards, seeded by (seed, split)). Failed shards are reported through on_skip and passed over.
    When every shard of the split's share fails to open: if every shard of the list does, an error naming them;
    else training goes on drawing from the whole list (resampled) and evaluation ends this split's pass.
    """

    def __init__(self, shards, split, n_splits, on_skip, *, train, resampled=False, seed=0, rng=None):
        self.shards, self.split, self.on_skip = shards, split, on_skip
        self.train, self.resampled, self.seed = train, resampled, seed
        self.rng = rng or random.Random(seed * 100003 + split)
        self.parts = assign_shards(shards, split, n_splits)
        self.count = 0  # samples read
        self.pass_size = 0  # samples in one pass over the share (resampled: in the first len(shards) draws)
        self.unreadable = set()  # shards that failed to open since the last sample

    def __iter__(self):
        return self._draws() if self.resampled and self.train else self._passes()

    def _skip(self, reason, key, shard, detail):
        if reason == "shard_unreadable":
            self.unreadable.add(shard)
        self.on_skip(reason, key, shard, detail)

    def _read(self, shard, stride=1, offset=0):
        for item in iter_tar(shard, stride, offset, self._skip):
            self.count += 1
            self.unreadable.clear()
            yield item

    def _passes(self):
        while True:
            start = self.count
            order = self.rng.sample(self.parts, len(self.parts)) if self.train else self.parts
            for shard, stride, offset in order:
                yield from self._read(shard, stride, offset)
            if self.count == start and self._share_unreadable():
                if self.train:
                    yield from self._draws()
                return
            if not self.train:
                return
            if self.count == start:
                raise RuntimeError(f"no sample in {names([p[0] for p in self.parts])}")
            self.pass_size = self.count - start

    def _share_unreadable(self):
        """Whether every shard of this split's share failed to open; an error if every shard of the list does."""
        mine = [p[0] for p in self.parts]
        if not set(mine) <= self.unreadable:
            return False
        if not any(_opens(s) for s in self.shards if s not in mine):
            raise RuntimeError(f"every shard is unreadable: {names(self.shards)} (the warnings above say why)")
        log.warning("every shard of split %d's share failed to open (%s); %s", self.split, names(mine),
                    "drawing from all shards instead" if self.train else "the other splits read the rest")
        return True

    def _draws(self):
        barren = set()  # shards drawn since the last sample that gave none
        draws = wds.ResampledShards(self.shards, seed=self.seed, worker_seed=lambda: self.split, deterministic=True)
        for n, draw in enumerate(draws, 1):
            start = self.count
            yield from self._read(draw["url"])
            barren = set() if self.count > start else barren | {draw["url"]}
            if not self.pass_size and n >= len(self.shards):
                self.pass_size = self.count
            if len(barren) == len(self.shards):
                what = "is unreadable" if barren <= self.unreadable else "gave no sample (empty or unreadable)"
                raise RuntimeError(f"every shard {what}: {names(self.shards)} (the warnings above say why)")


def _opens(shard):
    """Whether a shard's first tar block can be read (a probe, once a split's whole share failed to open)."""
    stream = None
    try:
        stream = wds.gopen(shard)
        return len(stream.read(512)) == 512
    except (OSError, ValueError):  # gopen: OSError for files and commands, ValueError for an unknown scheme
        return False
    finally:
        _close(stream)  # after a 512-byte read the command's exit status says nothing
