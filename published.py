"""Readers of the recipe's training sets as published (../shared/FORMATS.md, "Training sets as published").

Each dataset has `<name>_inputs(args)`, its input files in reading order (a missing one is an InputError
naming the path), and `read_<name>(args, inputs, after)`, a stream of `Item`s (media and the samples that
share it) and `Skip`s (rows that become no sample, with their reason) for prepare.py to check and write.
Positions are tuples of ints, strictly increasing in reading order; a reader does not read the bytes of
anything at or before `after` (the resume position), but walks past it to rebuild what it tracks.
"""

import glob
import json
import os
import re
import tarfile
import zipfile
import zlib
from array import array
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from data import VIDEO_FIELDS
from streams import CsvIndex, csv_header, json_array, open_zip, parquet_rows, read_span

END = 1 << 62  # a position component after any real one


class InputError(Exception):
    """The download folder is not laid out as published (a missing file or column)."""


class Skip(NamedTuple):
    """An input row that becomes no sample, counted under `reason`."""
    pos: tuple
    reason: str
    ident: str


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
    further becomes a Skip."""
    for f, path in enumerate(paths):
        if (f,) < after[:1]:
            continue
        row = after[1] + 1 if after[:1] == (f,) and len(after) > 1 else 0
        try:
            for row, values in parquet_rows(path, row, columns):
                yield event((f, row), path, values)
                row += 1
        except (pa.ArrowException, OSError) as e:
            yield Skip((f, row), "unreadable_file", f"{path}: {str(e)[:200]}")


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


# ---------------------------------------------------------------- OpenVid-1M

OPENVID_PART = re.compile(r"(OpenVid_part\d+)(\.zip|_part[a-z]{2})")


def openvid_inputs(args):
    """[CSV path, [[zip path] or [piece paths] per part, by part number]]; OpenVidHD* is not read."""
    table = os.path.join(args.src, "data", "train", "OpenVid-1M.csv")
    if not os.path.isfile(table):
        raise InputError(f"OpenVid-1M's CSV is missing: {table}")
    if not {"video", "caption"} <= set(csv_header(table)):
        raise InputError(f"{table}: needs columns video and caption, has {csv_header(table)}")
    parts = {}
    for name in os.listdir(args.src):
        m = OPENVID_PART.fullmatch(name)
        if m:
            parts.setdefault(m.group(1), {})[m.group(2)] = os.path.join(args.src, name)
    if not parts:
        raise InputError(f"no OpenVid_partN.zip (or OpenVid_partN_partaa, _partab) in {args.src}")
    zips = []
    for part in sorted(parts, key=natural):  # a whole .zip beside its pieces is the same archive: read it alone
        pieces = parts[part]
        zips.append([pieces[".zip"]] if ".zip" in pieces else [pieces[p] for p in sorted(pieces)])
    return [table, zips]


def _number(text):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def openvid_member(zf, member, pos, label, index, after):
    """One zip member -> an Item or a Skip (None: at or before `after`, only marked as seen)."""
    name = os.path.basename(member.filename)
    found = index.find(name)
    if found is None:
        return Skip(pos, "not_in_csv", f"{label}:{member.filename}")
    r, row = found
    if index.seen[r]:
        return Skip(pos, "duplicate_video", f"{label}:{member.filename}")
    index.seen[r] = True
    if pos <= after:
        return None
    if not row["caption"].strip():
        return Skip(pos, "empty_caption", name)
    try:
        data = zf.read(member)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError) as e:
        return Skip(pos, "bad_video", f"{label}:{member.filename}: {e}")
    extra = {k.replace(" ", "_"): _number(v) for k, v in row.items() if k not in ("video", "caption")}
    meta = {"caption": row["caption"], "source": "openvid", "video": name, **extra}
    return Item({"video": data, "ext": video_ext(name)}, [Sample(pos, key(label, f"{pos[1]:06d}"), "video caption",
                                                                 meta)], name)


def read_openvid(args, found, after):
    """OpenVid-1M (CSV + zip parts) -> video caption: zip members matched to CSV rows by basename."""
    table, zips = found
    index = CsvIndex(table, "video")
    for z, pieces in enumerate(zips):
        label, i = OPENVID_PART.match(os.path.basename(pieces[0])).group(1), -1
        try:
            with open_zip(pieces) as zf:
                for i, member in enumerate(m for m in zf.infolist() if not m.is_dir()):
                    event = openvid_member(zf, member, (z, i), label, index, after)
                    if event is not None:
                        yield event
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            yield Skip((z, i + 1), "unreadable_file", f"{label} ({', '.join(map(os.path.basename, pieces))}): {e}")
    col = index.header.index("video")
    for r, _, fields in index.records():
        if len(fields) != len(index.header):
            yield Skip((len(zips), r), "bad_record", f"{os.path.basename(table)} record {r + 1}")
        elif not index.seen[r]:
            yield Skip((len(zips), r), "video_missing", fields[col])
    index.close()


# ---------------------------------------------------------------- WebVid through video2dataset

def webvid_inputs(args):
    tars = files(os.path.join(args.src, "*.tar"))
    if not tars:
        raise InputError(f"no video2dataset shards (NNNNN.tar) in {args.src}")
    return tars


def webvid_sample(sample, pos, ident):
    """One video2dataset sample -> an Item, or a Skip (failed download, no video, no caption)."""
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except ValueError as e:
        return Skip(pos, "bad_json", f"{ident}: {e}")
    if not isinstance(meta, dict):
        return Skip(pos, "bad_json", f"{ident}: not an object")
    if meta.get("status", "success") != "success":
        return Skip(pos, "failed_download", f"{ident} ({meta['status']})")
    field = next((f for f in VIDEO_FIELDS if f in sample), None)
    if field is None:
        return Skip(pos, "no_video", ident)
    caption = meta.get("caption") or sample.get("txt", b"").decode("utf-8", "replace")
    if not isinstance(caption, str) or not caption.strip():
        return Skip(pos, "empty_caption", ident)
    out = {"caption": caption, "source": "webvid", **{k: meta[k] for k in ("videoid", "duration") if k in meta}}
    return Item({"video": sample[field], "ext": field}, [Sample(pos, sample["__key__"], "video caption", out)], ident)


def read_webvid(args, tars, after):
    """WebVid as video2dataset writes it (NNNNN.tar) -> video caption; failed downloads are skipped."""
    for t, path in enumerate(tars):
        if (t,) < after[:1]:
            continue
        errors, n = [], 0
        for n, sample in enumerate(wds.tarfile_samples([{"url": path}], handler=lambda e: errors.append(e) or True), 1):
            if (t, n - 1) > after:
                yield webvid_sample(sample, (t, n - 1), f"{os.path.basename(path)}:{sample['__key__']}")
        if errors:
            yield Skip((t, n), "unreadable_file", f"{path}: {str(errors[0])[:200]}")


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
        return Skip(pos, "no_image", ident)
    messages = [{"role": role, "content": (t or {}).get(role)} for t in row["texts"] or []
                for role in ("user", "assistant")]
    problem = chat_problem(messages)
    if problem:
        return Skip(pos, problem, ident)
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
    problem = chat_problem(messages)
    if problem:
        return Skip(pos, problem, ident)
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
        return Skip(pos, "no_image", ident)
    if not all(isinstance(row[k], str) and row[k].strip() for k in RLAIF_TEXTS):
        return Skip(pos, "empty_turn", ident)
    meta = {**{k: row[k] for k in RLAIF_TEXTS}, "source": "rlaif_v",
            **{k: row[k] for k in ("idx", "origin_dataset") if row.get(k)}}
    return Item({"images": [image]}, [Sample(pos, key("rlaif_v", f"{pos[0]:03d}", f"{pos[1]:06d}"), "dpo pair", meta)],
                ident)


def read_rlaif(args, paths, after):
    """RLAIF-V -> DPO pair (the image, the question, the chosen and the rejected answer)."""
    return parquet_events(paths, after, ("image", *RLAIF_TEXTS, "idx", "origin_dataset"), rlaif_row)


# ---------------------------------------------------------------- LLaVA-Video-178K

TASKS = ("cap", "oe", "mc")
JSON_SEPARATORS = re.compile(r"[ \t\n\r,]*")


def llava_inputs(args):
    """Per subset folder: its *cap*, *oe*, *mc* jsons and its *.tar.gz video archives (llava_hound/ is not read)."""
    names = args.subsets or sorted(d for d in os.listdir(args.src) if d != "llava_hound" and not d.startswith(".")
                                   and os.path.isdir(os.path.join(args.src, d)))
    found = []
    for name in names:
        d, taken, subset = os.path.join(args.src, name), set(), {}
        for task in TASKS:  # a name matching two patterns is read once, as the first
            subset[task] = [p for p in files(os.path.join(d, f"*{task}*.json")) if p not in taken]
            taken.update(subset[task])
        if not taken:
            if args.subsets:
                raise InputError(f"no LLaVA-Video *cap*.json, *oe*.json or *mc*.json in {d}")
            continue
        found.append({"dir": d, **subset, "archives": files(os.path.join(d, "*.tar.gz"))})
    if not found:
        raise InputError(f"no LLaVA-Video subset folders (with *cap*/*oe*/*mc*.json) in {args.src}")
    return found


def llava_messages(conversations):
    """[{from: human | gpt, value}] -> (chat messages, skip reason or None); the `<image>` placeholder (the
    video) that starts the first human turn is removed."""
    roles = {"human": "user", "gpt": "assistant"}
    if not isinstance(conversations, list) or not all(isinstance(t, dict) for t in conversations):
        return [], "bad_record"
    if any(t.get("from") not in roles for t in conversations):
        return [], "bad_record"
    messages = [{"role": roles[t["from"]], "content": t.get("value")} for t in conversations]
    if messages and messages[0]["role"] == "user" and isinstance(messages[0]["content"], str):
        messages[0]["content"] = re.sub(r"^\s*<image>\s*", "", messages[0]["content"])
    return messages, chat_problem(messages)


class LlavaRecords:
    """A subset's annotation records, indexed by video: {video: [record numbers]} and, by record number, the
    byte span of the record in its json (20 bytes a record); records are re-read when their video turns up."""

    def __init__(self, subset):
        self.paths = [(task, p) for task in TASKS for p in subset[task]]
        self.videos, self.spans, self.files = {}, (array("i"), array("q"), array("q")), {}

    def index(self, s):
        """Read the jsons once; yields a Skip at (s, 0, record number) for each record that cannot be a sample."""
        r = 0
        for j, (task, path) in enumerate(self.paths):
            n = -1
            try:
                for n, (offset, length, record) in enumerate(json_array(path)):
                    problem = "bad_record"
                    if isinstance(record, dict) and isinstance(record.get("video"), str):
                        problem = llava_messages(record.get("conversations"))[1]
                    if problem:
                        yield Skip((s, 0, r), problem, f"{os.path.basename(path)} #{n}")
                    else:
                        self.videos.setdefault(record["video"].removeprefix("./"), []).append(r)
                    self._span(j, offset, length)
                    r += 1
            except (ValueError, OSError) as e:
                yield Skip((s, 0, r), "unreadable_file", f"{path} after #{n}: {str(e)[:200]}")
                self._span(j, 0, 0)
                r += 1

    def _span(self, *values):
        for column, value in zip(self.spans, values):
            column.append(value)

    def record(self, r):
        """(task, record) of record number r."""
        task, path = self.paths[self.spans[0][r]]
        if path not in self.files:
            self.files[path] = open(path, "rb")
        return task, read_span(self.files[path], self.spans[1][r], self.spans[2][r])

    def close(self):
        for f in self.files.values():
            f.close()


def llava_item(pos, name, video, data, records):
    """The samples of one video (at `pos`, (subset, 1 + archive, member)): one per record that names it."""
    samples = []
    for k, r in enumerate(records.videos[video]):
        task, record = records.record(r)
        meta = chat_meta(llava_messages(record["conversations"])[0], f"llava_video/{name}", task=task,
                         id=record.get("id"), video=video)
        samples.append(Sample((*pos, k), key(name, *(f"{p:06d}" for p in pos[1:]), k),
                              "video caption" if task == "cap" else "video qa", meta))
    return Item({"video": data, "ext": video_ext(video)}, samples, f"{name}/{video}")


def llava_archive(s, a, path, name, records, seen, after):
    """One `<subset>_videos_K.tar.gz`, streamed member by member: an Item per video some record names."""
    m = -1
    try:
        with tarfile.open(path, "r|gz") as tar:
            for m, member in enumerate(tar):
                tar.members = []  # a streamed tar would keep every header otherwise
                video, pos = member.name.removeprefix("./"), (s, 1 + a, m)
                if not member.isfile():
                    continue
                if video in seen or video not in records.videos:
                    reason = "duplicate_video" if video in seen else "unreferenced_video"
                    yield Skip(pos, reason, f"{os.path.basename(path)}:{member.name}")
                    continue
                seen.add(video)
                if (*pos, len(records.videos[video]) - 1) > after:
                    yield llava_item(pos, name, video, tar.extractfile(member).read(), records)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        yield Skip((s, 1 + a, m + 1), "unreadable_file", f"{path}: {str(e)[:200]}")


def read_llava(args, subsets, after):
    """LLaVA-Video-178K -> video caption (cap) and video QA (oe, mc): each record naming a video is a sample."""
    for s, subset in enumerate(subsets):
        if (s,) < after[:1]:
            continue
        name, records, seen = os.path.basename(subset["dir"]), LlavaRecords(subset), set()
        yield from records.index(s)
        for a, path in enumerate(subset["archives"]):
            yield from llava_archive(s, a, path, name, records, seen, after)
        records.close()
        end = 1 + len(subset["archives"])
        missing = sorted((r, video) for video, rs in records.videos.items() if video not in seen for r in rs)
        for r, video in missing:
            yield Skip((s, end, r), "video_missing", f"{name}/{video}")
