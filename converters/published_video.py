"""Readers of the recipe's video training sets as published (the README's "Training data" section):
OpenVid-1M (CSV + zip parts), WebVid as video2dataset writes it, LLaVA-Video-178K (annotation jsons + tar.gz
video archives). The interface is published.py's: `<name>_inputs(args)` and `read_<name>(args, inputs, after)`,
a stream of Items and Skips in increasing input positions.
"""

import json
import os
import re
import tarfile
import zipfile
import zlib
from array import array

import webdataset as wds

from converters.published import InputError, Item, Sample, chat_meta, chat_problem, files, key, natural, video_ext
from converters.streams import CsvIndex, csv_header, json_array, open_zip, read_span
from frames import VIDEO_FIELDS, SkipSample

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
    """One zip member -> an Item or a SkipSample (None: at or before `after`, only marked as seen)."""
    name = os.path.basename(member.filename)
    found = index.find(name)
    if found is None:
        return SkipSample("not_in_csv", f"{label}:{member.filename}", pos=pos)
    r, row = found
    if index.seen[r]:
        return SkipSample("duplicate_video", f"{label}:{member.filename}", pos=pos)
    index.seen[r] = True
    if pos <= after:
        return None
    if not row["caption"].strip():
        return SkipSample("empty_caption", name, pos=pos)
    try:
        data = zf.read(member)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError) as e:
        return SkipSample("bad_video", f"{label}:{member.filename}: {e}", pos=pos)
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
            names = ", ".join(map(os.path.basename, pieces))
            yield SkipSample("unreadable_file", f"{label} ({names}): {e}", pos=(z, i + 1))
    col = index.header.index("video")
    for r, _, fields in index.records():
        if len(fields) != len(index.header):
            yield SkipSample("bad_record", f"{os.path.basename(table)} record {r + 1}", pos=(len(zips), r))
        elif not index.seen[r]:
            yield SkipSample("video_missing", fields[col], pos=(len(zips), r))
    index.close()


# ---------------------------------------------------------------- WebVid through video2dataset

def webvid_inputs(args):
    tars = files(os.path.join(args.src, "*.tar"))
    if not tars:
        raise InputError(f"no video2dataset shards (NNNNN.tar) in {args.src}")
    return tars


def webvid_sample(sample, pos, ident):
    """One video2dataset sample -> an Item, or a SkipSample (failed download, no video, no caption)."""
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except ValueError as e:
        return SkipSample("bad_json", f"{ident}: {e}", pos=pos)
    if not isinstance(meta, dict):
        return SkipSample("bad_json", f"{ident}: not an object", pos=pos)
    if meta.get("status", "success") != "success":
        return SkipSample("failed_download", f"{ident} ({meta['status']})", pos=pos)
    field = next((f for f in VIDEO_FIELDS if f in sample), None)
    if field is None:
        return SkipSample("no_video", ident, pos=pos)
    caption = meta.get("caption") or sample.get("txt", b"").decode("utf-8", "replace")
    if not isinstance(caption, str) or not caption.strip():
        return SkipSample("empty_caption", ident, pos=pos)
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
            yield SkipSample("unreadable_file", f"{path}: {str(errors[0])[:200]}", pos=(t, n))



# ---------------------------------------------------------------- LLaVA-Video-178K

TASKS = ("cap", "oe", "mc")


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
        """Read the jsons once; yields a SkipSample at (s, 0, record number) for each record that cannot be a sample."""
        r = 0
        for j, (_, path) in enumerate(self.paths):
            n = -1
            try:
                for n, (offset, length, record) in enumerate(json_array(path)):
                    problem = "bad_record"
                    if isinstance(record, dict) and isinstance(record.get("video"), str):
                        problem = llava_messages(record.get("conversations"))[1]
                    if problem:
                        yield SkipSample(problem, f"{os.path.basename(path)} #{n}", pos=(s, 0, r))
                    else:
                        self.videos.setdefault(record["video"].removeprefix("./"), []).append(r)
                    self._span(j, offset, length)
                    r += 1
            except (ValueError, OSError) as e:
                yield SkipSample("unreadable_file", f"{path} ({n + 1} records read): {str(e)[:200]}", pos=(s, 0, r))
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
                    yield SkipSample(reason, f"{os.path.basename(path)}:{member.name}", pos=pos)
                    continue
                if (*pos, len(records.videos[video]) - 1) > after:
                    data = tar.extractfile(member).read()  # a cut archive fails here: the video stays missing
                    seen.add(video)
                    yield llava_item(pos, name, video, data, records)
                else:
                    seen.add(video)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        yield SkipSample("unreadable_file", f"{path}: {str(e)[:200]}", pos=(s, 1 + a, m + 1))


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
            yield SkipSample("video_missing", f"{name}/{video}", pos=(s, end, r))
