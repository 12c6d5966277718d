"""The needle-in-a-haystack set: its needles are where and what its records say, training reads it, and
benchmark.py scores it by length and depth and draws the heatmap."""

import json

import av
import numpy as np
import pytest
import torch
from PIL import Image

import attention_viz
import benchmark
import eval_readers as er
from config import EvalProtocol
from conftest import shard_dataset, tiny_model_kwargs
from model import FoveatedVLM
from synthetic import BACKGROUND, COLOURS, GREYS, main

ARGS = ["--niah", "--niah-lengths", "12", "40", "--niah-depths", "0", "50", "100", "--niah-videos", "1",
        "--niah-train", "6", "--val", "2", "--niah-train-frames", "4", "8", "--per-shard", "3"]


@pytest.fixture(scope="module")
def niah(tmp_path_factory):
    out = tmp_path_factory.mktemp("niah")
    main(["--out", str(out), *ARGS])
    return out


def coloured_frames(path):
    """Indices of the frames holding a coloured (not grey) shape, and the colour of each."""
    with av.open(str(path)) as c:
        video = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]).astype(np.int32)
    spread = video.max(-1) - video.min(-1)  # [T, H, W]: 0 for greys
    found = {}
    for t in np.nonzero((spread > 80).sum((1, 2)) > 10)[0]:
        mean = video[t][spread[t] > 80].mean(0)
        found[int(t)] = min(COLOURS, key=lambda c: np.abs(mean - COLOURS[c]).sum())
    return len(video), found


def test_one_needle_where_the_record_says(niah):
    records = json.load(open(niah / "eval" / "niah.json"))
    assert len(records) == 2 * 3 * 2 and {r["task"] for r in records} == {"colour", "shape"}
    for r in records:
        if r["task"] != "colour":
            continue
        frames, found = coloured_frames(niah / "eval" / "video" / r["video"])
        assert frames == r["length"] and list(found) == [round(r["depth"] / 100 * (r["length"] - 1))]
        assert list(found.values()) == [r["answer"]]
    assert all(g != BACKGROUND for g in GREYS)


def test_training_reads_the_haystacks(niah, tokenizer):
    ds = shard_dataset(str(niah / "train" / "niah-*.tar"), tokenizer, loss="text_ce_answer_only", train=False,
                       frame_size=32, max_frames=48)
    samples = list(ds)
    assert len(samples) == 6 and not ds.skipped and all(4 <= len(s["frames"]) <= 8 for s in samples)
    answers = tokenizer.decode(samples[0]["input_ids"][samples[0]["loss_mask"].bool()])
    assert answers.count("<|im_end|>") == 2  # the colour and the shape, both answered


def test_benchmark_scores_by_length_and_depth_and_draws_the_heatmap(niah, tokenizer, tmp_path, one_thread):
    questions = er.read_niah(str(niah / "eval"))
    assert questions[0].categories == {"task": "colour", "length": 12, "depth": 0}
    frames = er.question_frames(questions[-1], EvalProtocol(frame_size=32))
    assert frames.shape[0] == 40  # its own count: every frame at 1 fps, not MVBench's 64 cap
    torch.manual_seed(0)
    model = FoveatedVLM(**tiny_model_kwargs(dino_config=dict(tiny_model_kwargs()["dino_config"], image_size=28)))
    result, records = benchmark.evaluate(model.eval(), tokenizer, questions,
                                         EvalProtocol(frame_size=28, modes=("coarse_only",), chunk_frames=16))
    assert result["answered"] == 12 and set(result["modes"]["coarse_only"]["per_category"]) == {"task", "length",
                                                                                                 "depth"}
    out = attention_viz.accuracy_heatmap(records, ("coarse_only",), str(tmp_path / "niah.png"))
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size[0] > 100
