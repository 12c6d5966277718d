"""Readers of the recipe's training sets as published (the README's "Training data" section):
the types and helpers they share, and the parquet sets (The Cauldron, SmolTalk, RLAIF-V); the video sets are
in published_video.py.

Each dataset has `<name>_inputs(args)`, its input files in reading order (a missing one is an InputError
naming the path), and `read_<name>(args, inputs, after)`, a stream of `Item`s (media and the samples that
share it) and `SkipSample`s (rows that become no sample, with their reason and position) for the writer
(converters/convert.py) to check and write.
Positions are tuples of ints, strictly increasing in reading order; a reader does not read the bytes of
anything at or before `after` (the resume position), but walks past it to rebuild what it tracks.
"""

import glob
import os
import re
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from converters.streams import parquet_rows
from frames import VIDEO_FIELDS, SkipSample

END = 1 << 62  # a position component after any real one


class InputError(Exception):
    """The download folder is not laid out as published (a missing file or column)."""


class Sample(NamedTuple):
    pos: tuple
    key: str  # unique, no dot (the tar member name up to the first dot is the key)
    kind: str  # video caption | video qa | image qa | text chat | dpo pair
    meta: dict  # the sample's json


class Item(NamedTuple):
    """Media (`{"video": bytes, "ext": str}`, `{"images": [bytes, ...]}` or `{}`) and the samples sharing it."""
    media: dict
    samples: list
    ident: str


# ---------------------------------------------------------------- helpers

def natural(path):
    """Sort key: numbers in names compare as numbers (part2 before part10)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def files(pattern):
    return sorted(glob.glob(pattern), key=natural)


def relative(found, src):
    """The input structure with paths relative to `src` (for the resume signature)."""
    if isinstance(found, dict):
        return {k: relative(v, src) for k, v in found.items()}
    if isinstance(found, list):
        return [relative(v, src) for v in found]
    return os.path.relpath(found, src)


def key(*parts):
    return "_".join(str(p) for p in parts).replace(".", "_")


def video_ext(name):
    ext = os.path.splitext(name)[1][1:].lower()
    return ext if ext in VIDEO_FIELDS else "mp4"


def chat_problem(messages):
    """The skip reason for a conversation the loader cannot train on, or None."""
    for m in messages:
        if m["content"] is None or (isinstance(m["content"], str) and not m["content"].strip()):
            return "empty_turn"
        if m["role"] not in ("system", "user", "assistant") or not isinstance(m["content"], str):
            return "bad_record"
    if not any(m["role"] == "assistant" for m in messages):
        return "empty_turn" if not messages else "bad_record"
    return None


def chat_meta(messages, source, **extra):
    """One user/assistant exchange -> {user, assistant, source}; anything else -> {messages, source}."""
    if [m["role"] for m in messages] == ["user", "assistant"]:
        meta = {"user": messages[0]["content"], "assistant": messages[1]["content"]}
    else:
        meta = {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    return {**meta, "source": source, **extra}


def parquet_events(paths, after, columns, event):
    """event(pos (file, row), path, row dict) for each parquet row past `after`; a file that cannot be read
    further becomes a SkipSample."""
    for f, path in enumerate(paths):
        if (f,) < after[:1]:
            continue
        row = after[1] + 1 if after[:1] == (f,) and len(after) > 1 else 0
        try:
            for row, values in parquet_rows(path, row, columns):
                yield event((f, row), path, values)
                row += 1
        except (pa.ArrowException, OSError) as e:
            yield SkipSample("unreadable_file", f"{path}: {str(e)[:200]}", pos=(f, row))


def parquet_inputs(pattern, what, required):
    """The files matching `pattern`, in natural order, each with the `required` columns."""
    found = files(pattern)
    if not found:
        raise InputError(f"no {what} files {pattern}")
    for path in found:
        try:
            names = pq.read_schema(path).names
        except (pa.ArrowException, OSError):
            continue  # unreadable: counted when read
        if not set(required) <= set(names):
            raise InputError(f"{path}: needs columns {list(required)}, has {names}")
    return found


# ---------------------------------------------------------------- The Cauldron, SmolTalk, RLAIF-V (parquet)

def cauldron_inputs(args):
    """`<subset>/train-*.parquet` of every subset (or --subsets); `<subset>/train/*.parquet` (the hub's
    refs/convert/parquet copy) only where the first is absent."""
    names = args.subsets or sorted(d for d in os.listdir(args.src)
                                   if not d.startswith(".") and os.path.isdir(os.path.join(args.src, d)))
    found = []
    for name in names:
        main, copy = os.path.join(args.src, name, "train-*.parquet"), os.path.join(args.src, name, "train", "*.parquet")
        if files(main) or files(copy):
            found += parquet_inputs(main if files(main) else copy, "The Cauldron", ("images", "texts"))
        elif args.subsets:
            raise InputError(f"no The Cauldron training files {main}")
    if not found:
        raise InputError(f"no The Cauldron subset folders <subset>/train-*.parquet in {args.src}")
    return found


def cauldron_row(args, pos, path, row):
    subset = os.path.relpath(path, args.src).split(os.sep)[0]
    ident = f"{subset}/{os.path.basename(path)}:{pos[1]}"
    images = [(im or {}).get("bytes") for im in row["images"] or []]
    if not images or not all(images):
        return SkipSample("no_image", ident, pos=pos)
    messages = [{"role": role, "content": (t or {}).get(role)} for t in row["texts"] or []
                for role in ("user", "assistant")]
    problem = chat_problem(messages)
    if problem:
        return SkipSample(problem, ident, pos=pos)
    sample = Sample(pos, key(subset, f"{pos[0]:04d}", f"{pos[1]:06d}"), "image qa",
                    chat_meta(messages, f"cauldron/{subset}"))
    return Item({"images": images}, [sample], ident)


def read_cauldron(args, paths, after):
    """The Cauldron -> image QA: one image or numbered frames; one exchange or several."""
    return parquet_events(paths, after, ("images", "texts"), lambda *e: cauldron_row(args, *e))


def smoltalk_inputs(args):
    return parquet_inputs(os.path.join(args.src, "data", "all", "train-*.parquet"), "SmolTalk", ("messages",))


def smoltalk_row(pos, path, row):
    ident = f"{os.path.basename(path)}:{pos[1]}"
    messages = [{"role": (m or {}).get("role"), "content": (m or {}).get("content")} for m in row["messages"] or []]
    messages = [m for m in messages if m["role"] != "system" or (m["content"] or "").strip()]  # empty: no turn
    problem = chat_problem(messages)
    if problem:
        return SkipSample(problem, ident, pos=pos)
    meta = {"messages": messages, "source": f"smoltalk/{row['source']}" if row.get("source") else "smoltalk"}
    return Item({}, [Sample(pos, key("smoltalk", f"{pos[0]:04d}", f"{pos[1]:07d}"), "text chat", meta)], ident)


def read_smoltalk(args, paths, after):
    """SmolTalk (data/all/train-*) -> text chat, its system turns kept."""
    return parquet_events(paths, after, ("messages", "source"), smoltalk_row)


RLAIF_TEXTS = ("question", "chosen", "rejected")


def rlaif_inputs(args):
    return parquet_inputs(os.path.join(args.src, "RLAIF-V-Dataset_*.parquet"), "RLAIF-V", ("image", *RLAIF_TEXTS))


def rlaif_row(pos, path, row):
    ident = f"{os.path.basename(path)}:{pos[1]}" + (f" (idx {row['idx']})" if row.get("idx") else "")
    image = (row["image"] or {}).get("bytes")
    if not image:
        return SkipSample("no_image", ident, pos=pos)
    if not all(isinstance(row[k], str) and row[k].strip() for k in RLAIF_TEXTS):
        return SkipSample("empty_turn", ident, pos=pos)
    meta = {**{k: row[k] for k in RLAIF_TEXTS}, "source": "rlaif_v",
            **{k: row[k] for k in ("idx", "origin_dataset") if row.get(k)}}
    return Item({"images": [image]}, [Sample(pos, key("rlaif_v", f"{pos[0]:03d}", f"{pos[1]:06d}"), "dpo pair", meta)],
                ident)


def read_rlaif(args, paths, after):
    """RLAIF-V -> DPO pair (the image, the question, the chosen and the rejected answer)."""
    return parquet_events(paths, after, ("image", *RLAIF_TEXTS, "idx", "origin_dataset"), rlaif_row)
