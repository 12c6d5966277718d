"""The synthetic set: deterministic from the seed, readable by the shard reader, and its labels are true."""

import io
import json
import os

import av
import numpy as np

from conftest import shard_dataset
from shards import iter_tar
from synthetic import BACKGROUND, COLOURS, DIRECTIONS, main

TINY = ["--captions", "6", "--mcq", "8", "--dpo", "2", "--text", "2", "--val", "2", "--eval", "4", "--per-shard", "4"]


def write(out, seed):
    main(["--out", str(out), "--seed", str(seed), *TINY])
    return {os.path.relpath(os.path.join(d, f), out): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(out) for f in files}


def colour_and_direction(mp4_bytes):
    """The shape's colour name and motion direction, measured from the decoded pixels."""
    with av.open(io.BytesIO(mp4_bytes)) as c:  # PyAV: installed everywhere, unlike decord
        video = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)][:6]).astype(np.float32)
    shape = np.abs(video - BACKGROUND).sum(-1) > 100  # [T, H, W]
    mean = video[shape].mean(0)
    colour = min(COLOURS, key=lambda c: np.abs(mean - COLOURS[c]).sum())
    ys, xs = zip(*[np.nonzero(m) for m in shape[[0, -1]]])
    dx, dy = xs[1].mean() - xs[0].mean(), ys[1].mean() - ys[0].mean()
    motion = (np.sign(dx), 0) if abs(dx) > abs(dy) else (0, np.sign(dy))
    return colour, next(d for d, v in DIRECTIONS.items() if v == motion)


def test_deterministic_from_seed(tmp_path):
    a, b, c = write(tmp_path / "a", 0), write(tmp_path / "b", 0), write(tmp_path / "c", 1)
    assert a == b
    assert a["stage1/train-00000.tar"] != c["stage1/train-00000.tar"]
    assert {"stage2/frames-00000.tar", "stage2/image-00000.tar", "stage3/dpo-00000.tar", "text/text-00000.tar",
            "mvbench/json/colour.json", "mvbench/json/direction.json", "mvbench/json/shape.json"} <= set(a)


def test_captions_and_eval_answers_match_the_pixels(tmp_path):
    write(tmp_path, 0)
    for _, fields, _ in iter_tar(str(tmp_path / "stage1/train-00000.tar")):
        colour, direction = colour_and_direction(fields["mp4"])
        assert fields["txt"].decode() == json.loads(fields["json"])["caption"]
        assert f"A {colour} " in fields["txt"].decode() and fields["txt"].decode().endswith(f" {direction}.")
    for task in ("colour", "direction"):
        for r in json.load(open(tmp_path / f"mvbench/json/{task}.json")):
            video = open(tmp_path / "mvbench/video" / task / r["video"], "rb").read()
            measured = colour_and_direction(video)[0 if task == "colour" else 1]
            assert r["answer"] == measured and sorted(r["candidates"]) == sorted(
                COLOURS if task == "colour" else DIRECTIONS)


def test_every_stage_reads_without_skips(tmp_path, tokenizer):
    write(tmp_path, 0)
    for pattern, loss, n in [("stage1/*.tar", "text_ce_all", 8), ("stage2/*.tar", "text_ce_answer_only", 14),
                             ("stage3/*.tar", "dpo", 2), ("text/*.tar", "text_ce_answer_only", 2)]:
        ds = shard_dataset(str(tmp_path / pattern), tokenizer, loss=loss, train=False, frame_size=28,
                          replicate_image_frames=8)
        samples = list(ds)
        assert len(samples) == n and not ds.skipped, (pattern, ds.skipped)
    mcq = [s for s in shard_dataset(str(tmp_path / "stage2/video-*.tar"), tokenizer, loss="text_ce_answer_only",
                                   train=False, frame_size=28)]
    answer = tokenizer.decode(mcq[0]["input_ids"][mcq[0]["loss_mask"].bool()])
    assert answer[0] in "ABCD" and answer[1:3] == ". " and answer.endswith("<|im_end|>\n")
