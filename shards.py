"""WebDataset tar shards: finding them, splitting them across DDP ranks and loader workers, reading samples.

A sample is the run of consecutive tar members sharing a key: the member name up to the FIRST dot of its
basename (`abc.000.jpg` -> key `abc`, field `000.jpg`; `abc_000.jpg` -> key `abc_000`, field `jpg`).
Field names are lowercased. Reading uses Python's tarfile, so every sample (and every bad shard) is
accounted for exactly.
"""

import glob
import os
import re
import tarfile

BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def _braces(pattern):
    """Expand WebDataset-style numeric ranges: `shard-{000..002}.tar` -> three names (zero padding kept)."""
    m = BRACE_RANGE.search(pattern)
    if not m:
        return [pattern]
    lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
    head, tail = pattern[:m.start()], pattern[m.end():]
    return [name for i in range(lo, hi + 1) for name in _braces(f"{head}{i:0{width}d}{tail}")]


def expand_shards(patterns):
    """One glob (or brace range) or a list of them -> the list of shard files, each pattern's matches sorted.

    A pattern that matches no file is an error naming it.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise FileNotFoundError("no shard pattern given")
    shards = []
    for pattern in patterns:
        matches = sorted(f for p in _braces(pattern) for f in glob.glob(p) if os.path.isfile(f))
        if not matches:
            raise FileNotFoundError(f"shard pattern matches no file: {pattern}")
        shards += [m for m in matches if m not in shards]
    return shards


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


def split_name(name):
    """Tar member name -> (key, field)."""
    folder, base = os.path.split(name)
    stem, dot, field = base.partition(".")
    return os.path.join(folder, stem), field.lower() if dot else ""


def iter_tar(shard, stride=1, offset=0, on_skip=None):
    """Yield (key, {field: bytes}, shard) for the samples i of `shard` with i % stride == offset.

    A shard that cannot be opened or ends early stops with `on_skip("bad_shard", key, shard, detail)`;
    the samples read before the damage are still yielded.
    """
    index, key, fields = 0, None, {}
    try:
        with tarfile.open(shard, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, field = split_name(member.name)
                if k != key:
                    if key is not None and index % stride == offset:
                        yield key, fields, shard
                    index += key is not None
                    key, fields = k, {}
                if field and index % stride == offset:
                    fields[field] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        if on_skip is None:
            raise
        on_skip("bad_shard", key, shard, str(e))
        return
    if key is not None and index % stride == offset:
        yield key, fields, shard
