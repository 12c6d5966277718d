"""prepare.py (converters/) on tiny folders in each published layout (as converters/published.py and
published_video.py read them): exact counts by reason, sample kinds and turns, frames through the loader, resume
after a crash, --limit, and a training start."""

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

import train
from conftest import SMOLLM2_GGUF, TINY_DINO, TINY_LLM, image_bytes, shard_dataset, write_members
import prepare
from converters import convert
from synthetic import encode_mp4, render, write_tar

SIZE = 32
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


# ---------------------------------------------------------------- media

def mp4(seconds, colour="red", fps=4):
    """A clip of `seconds` at 4 fps: training's 1 fps sampling takes `seconds` frames."""
    return encode_mp4(render({"colour": colour, "shape": "square", "direction": "left"}, SIZE, seconds * fps), fps)


def image(fmt, value=128, size=SIZE):
    """Random pixels seeded by `value`: images that do not compress to nothing, told apart by the seed."""
    return image_bytes(fmt=fmt, pixels=np.random.default_rng(value).integers(0, 255, (size, size, 3), np.uint8))


def truncated_jpg():
    """A JPEG cut short: it opens (the header is whole), then fails to decode."""
    data = image("JPEG", size=96)[:-2000]
    Image.open(io.BytesIO(data))
    return data


BAD_MP4 = mp4(2)[:400]  # the moov box sits at the end: a cut mp4 does not open


# ---------------------------------------------------------------- the published layouts

def write_parquet(path, rows, schema):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=2)


def write_zip(path, members, zip64=False):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(zipfile.ZipInfo("OpenVid_part/"), b"")  # the undocumented folder inside the zips
        for name, data in members:
            with zf.open(f"OpenVid_part/{name}", "w", force_zip64=zip64) as f:
                f.write(data)


def openvid(root):
    columns = ["video", "caption", "aesthetic score", "motion score", "temporal consistency score",
               "camera motion", "frame", "fps", "seconds"]
    rows = [("abc_13_0to241.mp4", 'A man, smiling, says "hi".', 3), ("-dash_start_1.mp4", "line one\nline two", 2),
            ("pixabay_x_025.mp4", "", 2), ("celebv_-_id_0.mp4", "a corrupt clip", 2), ("split_a.mp4", "left", 2),
            ("split_b.mp4", "right", 3), ("gone_1.mp4", "not downloaded", 2), ("gone_2.mp4", "nor this", 2)]
    os.makedirs(root / "data" / "train")
    with open(root / "data" / "train" / "OpenVid-1M.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        w.writerows([name, cap, 5.5, 1.25, 0.99, "pan_right", secs * 4, 4, secs] for name, cap, secs in rows)
        f.write("short_row.mp4,only two fields\n")
    (root / "data" / "train" / "OpenVidHD.csv").write_text("video,caption\nabc_13_0to241.mp4,HD copy\n")
    os.makedirs(root / "OpenVidHD")
    write_zip(root / "OpenVidHD" / "OpenVidHD_part_1.zip", [("abc_13_0to241.mp4", mp4(3))])
    secs = {name: s for name, _, s in rows}
    write_zip(root / "OpenVid_part0.zip", [(n, mp4(secs[n])) for n in ("abc_13_0to241.mp4", "-dash_start_1.mp4",
                                                                       "pixabay_x_025.mp4")]
              + [("celebv_-_id_0.mp4", BAD_MP4), ("stray.mp4", mp4(2))])
    write_zip(root / "whole.zip", [(n, mp4(secs[n], "blue")) for n in ("split_a.mp4", "split_b.mp4")], zip64=True)
    data = (root / "whole.zip").read_bytes()
    (root / "OpenVid_part1_partaa").write_bytes(data[:len(data) // 2])
    (root / "OpenVid_part1_partab").write_bytes(data[len(data) // 2:])
    os.remove(root / "whole.zip")


def v2d(key, caption, video=None, status="success"):
    meta = {"videoid": key[-3:], "page_idx": 1, "page_dir": "000001_000050", "duration": "PT00H00M03S",
            "caption": caption, "url": f"https://example.invalid/{key}.mp4", "key": key, "status": status,
            "error_message": None if status == "success" else "HTTP Error 404", "yt_meta_dict": None}
    fields = {"json": meta, **({"mp4": video} if video is not None else {}), "txt": caption}
    return key, fields


def webvid(root):
    """video2dataset output: samples in completion order, failures kept without mp4, parquet and stats beside."""
    shards = [[v2d("00000002", "two", mp4(3)), v2d("00000000", "lost", status="failed_to_download"),
               v2d("00000001", "one", mp4(2)), v2d("00000003", "broken", BAD_MP4)],
              [v2d("00010000", "ten", mp4(2)), v2d("00010001_0", "a clip", mp4(3)), v2d("00010002", "", mp4(2))]]
    for i, samples in enumerate(shards):
        write_tar(str(root / f"{i:05d}.tar"), samples)
        pq.write_table(pa.Table.from_pylist([{k: v for k, v in f["json"].items() if k != "yt_meta_dict"}
                                             for _, f in samples]), root / f"{i:05d}.parquet")
        (root / f"{i:05d}_stats.json").write_text(json.dumps({"count": len(samples), "successes": len(samples) - 1}))


def turns(*pairs):
    return [{"user": u, "assistant": a, "source": "TQA"} for u, a in pairs]


def cauldron(root):
    schema = pa.schema([("images", pa.list_(IMAGE)), ("texts", pa.list_(pa.struct(
        [("user", pa.string()), ("assistant", pa.string()), ("source", pa.string())])))])
    img = lambda fmt, v=1: {"bytes": image(fmt, v), "path": None}  # noqa: E731
    write_parquet(root / "ai2d" / "train-00000-of-00001-aaaa.parquet", [
        {"images": [img("JPEG")], "texts": turns(("Which part?", "The leaf."))},
        {"images": [img("PNG")], "texts": turns(("Colour?", "Red."), ("Shape?", "Round."))},
        {"images": [{"bytes": truncated_jpg(), "path": None}], "texts": turns(("Q?", "A."))},
        {"images": [], "texts": turns(("Q?", "A."))},
        {"images": [img("JPEG")], "texts": turns(("Q?", ""))}], schema)
    nlvr2 = [{"images": [img("PNG", 2), img("JPEG", 3)], "texts": turns(("Are both the same?", "No."))},
             {"images": [img("GIF", 4)], "texts": turns(("Is it a gif?", "Yes."))}]
    write_parquet(root / "nlvr2" / "train-00000-of-00001-bbbb.parquet", nlvr2, schema)
    write_parquet(root / "nlvr2" / "train" / "0000.parquet", nlvr2, schema)  # refs/convert/parquet: not read too
    write_parquet(root / "docvqa" / "train" / "0000.parquet",
                  [{"images": [img("WEBP", 5)], "texts": turns(("Title?", "Report."))}], schema)
    os.makedirs(root / ".cache" / "huggingface")


def smoltalk(root):
    schema = pa.schema([("messages", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
                        ("source", pa.string())])
    chat = lambda *turns: [{"role": r, "content": c} for r, c in turns]  # noqa: E731
    rows = [{"messages": chat(("system", "Speak like a pirate."), ("user", "Hi"), ("assistant", "Arr, hi.")),
             "source": "systemchats-30k"},
            {"messages": chat(("user", "2+2?"), ("assistant", "4"), ("user", "3+3?"), ("assistant", "6")),
             "source": "everyday-conversations"},
            {"messages": chat(("user", "Say nothing."), ("assistant", "  ")), "source": "smol-rewrite"},
            {"messages": chat(("system", "Tools: [get_time]"), ("user", "Time?"), ("assistant", "get_time()")),
             "source": "apigen-80k"},
            {"messages": chat(("system", ""), ("user", "A colour?"), ("assistant", "Blue.")),  # no system turn
             "source": "smol-magpie-ultra"}]
    write_parquet(root / "data" / "all" / "train-00000-of-00001.parquet", rows, schema)
    write_parquet(root / "data" / "all" / "test-00000-of-00001.parquet", rows[:1], schema)
    write_parquet(root / "data" / "smol-rewrite" / "train-00000-of-00001.parquet", rows[:2], schema)


def rlaif(root):
    schema = pa.schema([("ds_name", pa.string()), ("image", IMAGE), ("question", pa.string()), ("chosen", pa.string()),
                        ("rejected", pa.string()), ("origin_dataset", pa.string()), ("origin_split", pa.string()),
                        ("idx", pa.string()), ("image_path", pa.string())])
    shared = {"bytes": image("JPEG", 7), "path": "coco/1.jpg"}

    def pair(idx, question, chosen, rejected, img=shared):
        return {"ds_name": "RLAIF-V", "image": img, "question": question, "chosen": chosen, "rejected": rejected,
                "origin_dataset": "COCO", "origin_split": '{"model": "x"}', "idx": idx, "image_path": "coco/1.jpg"}

    write_parquet(root / "RLAIF-V-Dataset_000.parquet", [
        pair("0", "What is shown?", "A cat.", "A dog."), pair("1", "Colour?", "Grey.", "Pink."),
        pair("2", "Count?", "Two.", ""), pair("3", "Where?", "Home.", "Mars.", img=None)], schema)
    write_parquet(root / "RLAIF-V-Dataset_001.parquet", [pair("4", "Why?", "Because.", "No idea.",
                                                              {"bytes": image("PNG", 8), "path": None})], schema)


def conv(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def llava(root):
    sub, a, b, c = root / "0_30_s_academic_v0_1", "academic_source/Charades/A1.mp4", \
        "academic_source/Charades/B2.mp4", "NextQA/NExTVideo/1006/C3.mp4"
    os.makedirs(sub)
    record = lambda i, video, *values: {"id": i, "conversations": conv(*values), "data_source": sub.name,  # noqa
                                        "video": video}
    (sub / "0_30_s_academic_v0_1_cap_processed.json").write_text(json.dumps([
        record("c0", a, "<image>\nDescribe this video in detail.", "A person opens a door."),
        record("c1", b, "<image>\nDescribe it.", "Broken."),
        record("c2", "academic_source/Charades/MISSING.mp4", "<image>\nDescribe it.", "Never downloaded.")], indent=2))
    (sub / "0_30_s_academic_oe_v0_1_qa_processed.json").write_text(json.dumps([
        record("o0", a, "<image>\nWhat opens?", "A door.", "Who opens it?", "A person."),
        record("o1", b, "<image>\nWhat?", "Nothing."),
        record("o2", a, "<image>\nWhen?", "")]))
    (sub / "0_30_s_academic_mc_v0_1_qa_processed.json").write_text(json.dumps([
        record("m0", c, "<image>\nWhat is lit?\nA. a lamp\nB. a candle", "B.")], ensure_ascii=False))
    write_members(sub / "0_30_s_academic_v0_1_videos_1.tar.gz", [
        ("academic_source", None), ("academic_source/Charades", None), (a, mp4(3)),
        ("academic_source/extra.mp4", mp4(2))], "w:gz")
    write_members(sub / "0_30_s_academic_v0_1_videos_2.tar.gz", [(b, BAD_MP4), (c, mp4(2))], "w:gz")
    other = root / "1_2_m_nextqa"
    os.makedirs(other)
    (other / "1_2_m_nextqa_oe_qa_processed.json").write_text("\ufeff" + json.dumps([  # with a byte-order mark
        {"id": "n0", "conversations": conv("<image>\nWhat happens? — ünïcode", "Ça tourne."), "data_source": "x",
         "video": "NextQA/NExTVideo/7/D4.mp4"}]))
    write_members(other / "1_2_m_nextqa_videos_1.tar.gz", [("NextQA/NExTVideo/7/D4.mp4", mp4(2))], "w:gz")
    os.makedirs(root / "llava_hound")


LAYOUTS = {"openvid": openvid, "webvid": webvid, "cauldron": cauldron, "smoltalk": smoltalk, "rlaif-v": rlaif,
           "llava-video": llava}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    for name, build in LAYOUTS.items():
        os.makedirs(root / name)
        build(root / name)
    return root


def run(src, dataset, out, *extra):
    return prepare.main([dataset, "--src", str(src / dataset), "--out", str(out), "--shard-size", "2", "--workers", "1",
                         *extra])


@pytest.fixture(scope="module")
def converted(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    return out, {name: run(src, name, out / name) for name in LAYOUTS}


def skipped(rep):
    return {reason: v["count"] for reason, v in rep["skipped"].items()}


def shard_samples(out):
    """{key: {field: bytes}} of every shard under `out`, each key once."""
    samples = {}
    for name in sorted(os.listdir(out)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(out, name)) as tar:
                for m in tar:
                    k, field = m.name.split(".", 1)
                    samples.setdefault(k, {})[field] = tar.extractfile(m).read()
    return samples


def load(out, tokenizer, loss="text_ce_answer_only"):
    """The shards through the training loader: {json source/id: sample}."""
    ds = shard_dataset(os.path.join(out, "*.tar"), tokenizer, loss=loss, train=False, frame_size=SIZE, max_frames=8,
                      max_text_tokens=256)
    samples = list(ds)
    assert not ds.skipped, ds.skipped
    return samples


# ---------------------------------------------------------------- per dataset

def test_openvid_csv_and_zip_parts_split_included(src, converted, tokenizer):
    out, reports = converted
    rep = reports["openvid"]
    assert rep["written"] == 4 and rep["by_kind"] == {"video caption": 4} and rep["complete"]
    assert skipped(rep) == {"empty_caption": 1, "bad_video": 1, "not_in_csv": 1, "video_missing": 2, "bad_record": 1}
    assert rep["skipped"]["video_missing"]["examples"] == ["gone_1.mp4", "gone_2.mp4"]
    assert "stray.mp4" in rep["skipped"]["not_in_csv"]["examples"][0]
    assert rep["shards"] == ["openvid-000000.tar", "openvid-000001.tar"]
    assert json.loads((out / "openvid" / "report.json").read_text()) == rep
    raw = shard_samples(out / "openvid")
    metas = {json.loads(f["json"])["video"]: json.loads(f["json"]) for f in raw.values()}
    assert metas["abc_13_0to241.mp4"]["caption"] == 'A man, smiling, says "hi".'
    assert metas["-dash_start_1.mp4"]["caption"] == "line one\nline two"
    assert metas["split_b.mp4"]["source"] == "openvid" and metas["split_b.mp4"]["aesthetic_score"] == 5.5
    with zipfile.ZipFile(src / "openvid" / "OpenVid_part0.zip") as zf:  # the mp4 bytes, never re-encoded
        original = zf.read("OpenVid_part/abc_13_0to241.mp4")
    assert any(f.get("mp4") == original for f in raw.values())
    by_caption = {m["caption"]: m["video"] for m in metas.values()}
    seconds = {"abc_13_0to241.mp4": 3, "-dash_start_1.mp4": 2, "split_a.mp4": 2, "split_b.mp4": 3}  # 1 fps: frames
    for s in load(out / "openvid", tokenizer, "text_ce_all"):
        text = tokenizer.decode(s["input_ids"])
        video = next(v for c, v in by_caption.items() if c in text)
        assert s["kind"] == "video" and s["frames"].shape[0] == seconds[video], video


def test_webvid_from_video2dataset_skips_failed_downloads(converted, tokenizer):
    out, reports = converted
    rep = reports["webvid"]
    assert rep["written"] == 4 and rep["by_kind"] == {"video caption": 4}
    assert skipped(rep) == {"failed_download": 1, "bad_video": 1, "empty_caption": 1}
    raw = shard_samples(out / "webvid")
    assert sorted(raw) == ["00000001", "00000002", "00010000", "00010001_0"]  # video2dataset's keys, clip key kept
    assert all(json.loads(f["json"])["source"] == "webvid" and "status" not in json.loads(f["json"])
               for f in raw.values())
    frames = {s["key"]: s["frames"].shape[0] for s in load(out / "webvid", tokenizer, "text_ce_all")}
    assert frames == {"00000002": 3, "00000001": 2, "00010000": 2, "00010001_0": 3}


def test_cauldron_images_kept_as_published_multi_image_and_multi_turn(src, converted, tokenizer):
    out, reports = converted
    rep = reports["cauldron"]
    assert rep["written"] == 5 and rep["by_kind"] == {"image qa": 5}
    assert rep["by_source"] == {"cauldron/ai2d": 2, "cauldron/nlvr2": 2, "cauldron/docvqa": 1}  # one nlvr2 copy
    assert skipped(rep) == {"bad_image": 1, "no_image": 1, "empty_turn": 1}
    raw = shard_samples(out / "cauldron")
    fields = sorted(tuple(sorted(f)) for f in raw.values())
    assert fields == [("000.png", "001.jpg", "json"), ("jpg", "json"), ("json", "png"), ("json", "png"),
                      ("json", "webp")]  # the gif re-encoded as png: the loader reads jpg/png/webp
    first = pq.read_table(src / "cauldron" / "ai2d" / "train-00000-of-00001-aaaa.parquet").to_pylist()[0]
    assert any(f.get("jpg") == first["images"][0]["bytes"] for f in raw.values())
    metas = [json.loads(f["json"]) for f in raw.values()]
    assert sorted(len(m["messages"]) if "messages" in m else 2 for m in metas) == [2, 2, 2, 2, 4]
    frames = sorted(s["frames"].shape[0] for s in load(out / "cauldron", tokenizer))
    assert frames == [1, 1, 1, 1, 2]  # the nlvr2 pair: two frames


def test_smoltalk_reads_data_all_train_only(converted, tokenizer):
    out, reports = converted
    rep = reports["smoltalk"]
    assert rep["written"] == 4 and rep["by_kind"] == {"text chat": 4} and skipped(rep) == {"empty_turn": 1}
    metas = sorted((json.loads(f["json"]) for f in shard_samples(out / "smoltalk").values()), key=lambda m: m["source"])
    assert [m["source"] for m in metas] == ["smoltalk/apigen-80k", "smoltalk/everyday-conversations",
                                           "smoltalk/smol-magpie-ultra", "smoltalk/systemchats-30k"]
    assert [m["role"] for m in metas[3]["messages"]] == ["system", "user", "assistant"]
    assert [m["role"] for m in metas[2]["messages"]] == ["user", "assistant"]  # an empty system turn is dropped
    samples = load(out / "smoltalk", tokenizer)
    assert all(s["kind"] == "text" for s in samples) and len(samples) == 4
    assert any("Speak like a pirate." in tokenizer.decode(s["input_ids"]) for s in samples)


def test_rlaif_v_dpo_pairs(converted, tokenizer):
    out, reports = converted
    rep = reports["rlaif-v"]
    assert rep["written"] == 3 and rep["by_kind"] == {"dpo pair": 3}
    assert skipped(rep) == {"empty_turn": 1, "no_image": 1}
    samples = load(out / "rlaif-v", tokenizer, "dpo")
    assert len(samples) == 3 and all(s["kind"] == "dpo" and s["frames"].shape[0] == 1 for s in samples)
    metas = [json.loads(f["json"]) for f in shard_samples(out / "rlaif-v").values()]
    assert {(m["question"], m["chosen"], m["rejected"], m["source"]) for m in metas} >= {
        ("What is shown?", "A cat.", "A dog.", "rlaif_v")}


def test_llava_video_records_share_videos_across_archives(converted, tokenizer):
    out, reports = converted
    rep = reports["llava-video"]
    assert rep["written"] == 4 and rep["by_kind"] == {"video caption": 1, "video qa": 3}
    assert skipped(rep) == {"bad_video": 2, "video_missing": 1, "empty_turn": 1, "unreferenced_video": 1}
    metas = {m["id"]: m for m in (json.loads(f["json"]) for f in shard_samples(out / "llava-video").values())}
    assert set(metas) == {"c0", "o0", "m0", "n0"}
    assert metas["c0"]["user"] == "Describe this video in detail." and metas["c0"]["assistant"].startswith("A person")
    assert metas["c0"]["source"] == "llava_video/0_30_s_academic_v0_1" and metas["c0"]["task"] == "cap"
    assert [m["content"] for m in metas["o0"]["messages"]] == ["What opens?", "A door.", "Who opens it?", "A person."]
    assert metas["m0"]["user"].endswith("B. a candle") and metas["n0"]["assistant"] == "Ça tourne."
    frames = Counter(s["frames"].shape[0] for s in load(out / "llava-video", tokenizer))
    assert frames == {3: 2, 2: 2}  # A1 (3 s) twice, C3 and D4 (2 s)


# ---------------------------------------------------------------- resume, limit, errors, training

class Crash(Exception):
    pass


def test_resume_after_a_crash_neither_loses_nor_duplicates(src, converted, tmp_path, monkeypatch):
    check, calls = convert.check_media, []

    def crash_on_second_video(media, max_frames):
        calls.append(1)
        if len(calls) == 2:  # after shard 0 closed, while shard 1 (half of a shared video's samples) is open
            raise Crash
        return check(media, max_frames)

    monkeypatch.setattr(convert, "check_media", crash_on_second_video)
    with pytest.raises(Crash):
        run(src, "llava-video", tmp_path / "out", "--shard-size", "1")
    assert sorted(os.listdir(tmp_path / "out")) == ["llava_video-000000.tar", "llava_video-000001.tar.tmp",
                                                   "state.json"]
    rep = run(src, "llava-video", tmp_path / "out", "--shard-size", "1")
    clean = run(src, "llava-video", tmp_path / "clean", "--shard-size", "1")
    assert rep["written"] == clean["written"] == 4 and skipped(rep) == skipped(clean)
    for name in clean["shards"]:  # byte for byte what an uninterrupted run writes
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name
    again = run(src, "llava-video", tmp_path / "out", "--shard-size", "1")  # complete: nothing to do
    assert again["written"] == 4 and sorted(os.listdir(tmp_path / "out"))[-2:] == ["report.json", "state.json"]


def test_limit_then_resume_gives_the_full_set(src, converted, tmp_path, capsys):
    out, reports = converted
    rep = run(src, "cauldron", tmp_path / "c", "--limit", "3")
    assert rep["written"] == 3 and not rep["complete"] and len(shard_samples(tmp_path / "c")) == 3
    rep = run(src, "cauldron", tmp_path / "c")
    assert rep["complete"] and rep == {**reports["cauldron"], "seconds": rep["seconds"],
                                       "samples_per_s": rep["samples_per_s"]}
    assert shard_samples(tmp_path / "c") == shard_samples(out / "cauldron")
    err = user_error(capsys, run, src, "cauldron", tmp_path / "c", "--shard-size", "3")  # other settings: no resume
    assert "state.json records a conversion with other inputs or settings" in err and "--overwrite" in err
    rep = run(src, "cauldron", tmp_path / "c", "--subsets", "nlvr2", "--overwrite")
    assert rep["written"] == 2 and rep["by_source"] == {"cauldron/nlvr2": 2}


def test_decode_checks_in_worker_processes_write_the_same_shards(src, converted, tmp_path):
    out, reports = converted
    rep = run(src, "webvid", tmp_path / "w", "--workers", "2")
    assert skipped(rep) == skipped(reports["webvid"]) and rep["shards"] == reports["webvid"]["shards"]
    for name in rep["shards"]:
        assert (tmp_path / "w" / name).read_bytes() == (out / "webvid" / name).read_bytes()


def user_error(capsys, fn, *args):
    """What fn(*args) printed on stderr when it stopped with exit status 2 (a user error, no traceback)."""
    with pytest.raises(SystemExit) as stop:
        fn(*args)
    assert stop.value.code == 2
    return capsys.readouterr().err


def test_missing_inputs_are_errors_naming_the_path(tmp_path, capsys):
    err = user_error(capsys, prepare.main, ["openvid", "--src", str(tmp_path), "--out", str(tmp_path / "o")])
    assert err.startswith("error: ") and "OpenVid-1M.csv" in err
    err = user_error(capsys, prepare.main, ["cauldron", "--src", str(tmp_path), "--subsets", "nosuch", "--out",
                                            str(tmp_path / "o")])
    assert "nosuch" in err


def test_the_three_stages_start_on_the_converted_sets(converted, tmp_path, one_thread):
    """Two steps of each stage with the tiny model: stage 1 on OpenVid + WebVid, stage 2 (from stage 1) on The
    Cauldron + LLaVA-Video, both with SmolTalk text, stage 3 (DPO, from stage 2) on RLAIF-V: nothing skipped."""
    out, _ = converted
    stages = [("stage1", ["openvid", "webvid"], "text_ce_all", None),
              ("stage2", ["cauldron", "llava-video"], "text_ce_answer_only", "stage1"),
              ("stage3", ["rlaif-v"], "dpo", "stage2")]
    for name, sets, loss, init in stages:
        model = {"init_from": str(tmp_path / init / "latest")} if init else {
            "llm_config": TINY_LLM, "dino_config": TINY_DINO, "query_dim": 24, "tokenizer": SMOLLM2_GGUF}
        data = {"train_shards": [str(out / s / "*.tar") for s in sets], "frame_size": 56, "max_frames": 4,
                "num_workers": 0, "max_text_tokens": 128, "replicate_image_frames": 2}
        if loss != "dpo":
            data.update(text_shards=str(out / "smoltalk" / "*.tar"), text_ratio=0.5)
        cfg = {"model": model, "data": data,
               "training": {"total_samples": 4, "batch_size": 2, "warmup_ratio": 0.5, "device": "cpu", "seed": 0},
               "loss": {"type": loss}, "checkpoint": {"save_dir": str(tmp_path / name), "save_every_steps": 2}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        train.main(["--config", str(tmp_path / f"{name}.yaml")])
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["steps"] == 2 and summary["samples"] == 4 and summary["skipped"] == 0, summary


def test_damaged_archives_and_files_are_counted_never_a_crash(src, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    os.remove(bad / "openvid" / "OpenVid_part1_partab")  # half of a split zip: no central directory
    tar = (bad / "webvid" / "00000.tar").read_bytes()
    (bad / "webvid" / "00000.tar").write_bytes(tar[:len(tar) // 2])
    gz = bad / "llava-video" / "0_30_s_academic_v0_1" / "0_30_s_academic_v0_1_videos_2.tar.gz"
    gz.write_bytes(gz.read_bytes()[:-40])
    (bad / "smoltalk" / "data" / "all" / "train-00001-of-00002.parquet").write_bytes(b"PAR1 not a parquet file")
    reports = {name: run(bad, name, tmp_path / name) for name in ("openvid", "webvid", "llava-video", "smoltalk")}
    assert {k: (r["written"], skipped(r)) for k, r in reports.items()} == {
        # part1's two videos are now missing from the archives
        "openvid": (2, {"unreadable_file": 1, "video_missing": 4, "bad_record": 1, "bad_video": 1,
                        "empty_caption": 1, "not_in_csv": 1}),
        # the shard ends inside 00000001's mp4: its json came through without it
        "webvid": (3, {"unreadable_file": 1, "no_video": 1, "failed_download": 1, "empty_caption": 1}),
        # the cut falls after the last video: every video is read, then the archive's end is missing
        "llava-video": (4, {"unreadable_file": 1, "bad_video": 2, "video_missing": 1, "empty_turn": 1,
                            "unreferenced_video": 1}),
        "smoltalk": (4, {"unreadable_file": 1, "empty_turn": 1})}
    assert "OpenVid_part1_partaa" in reports["openvid"]["skipped"]["unreadable_file"]["examples"][0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_check_workers_end_with_a_killed_converter():
    """kill -9 of prepare.py leaves no check process behind (they would sleep on, orphaned, for good)."""
    code = ("import os, signal\nfrom concurrent.futures import ProcessPoolExecutor\nfrom converters import convert\n"
            "with ProcessPoolExecutor(2, initializer=convert.check_worker, initargs=(os.getpid(),)) as pool:\n"
            "    print(*{f.result() for f in [pool.submit(os.getpid) for _ in range(8)]}, flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout
    workers = [int(p) for p in out.split()]
    assert workers

    def alive(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
        except FileNotFoundError:
            return False
    deadline = time.time() + 10
    while any(map(alive, workers)) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(map(alive, workers)), workers
