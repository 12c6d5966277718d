"""benchmark.py and eval_readers.py on tiny fixtures written here in each published layout (README, Evaluation):
totals, per-category counts, skips and their reasons, answer letters, the MVBench frame-index rule, and
DINO work per question."""

import json
import os
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import benchmark
import eval_readers as er
from config import EvalProtocol, InputSettings
from conftest import DinoCounter, image_bytes, script_error, tiny_model_kwargs, write_members, write_video
from frames import denormalise, segment_indices
from model import FoveatedVLM
from tokenization import option_targets, prompt_ids

SIZE = 56  # the tiny DINO's image size


def question(media):
    return er.MCQ("q", "", [], 0, media)


def frames_of(q, max_frames):
    """A question's frames as benchmark.py reads them with --max-frames (None: the benchmark's own count)."""
    return er.question_frames(q, EvalProtocol(max_frames=max_frames, frame_size=SIZE))


def frame_ids(frames):
    """Which fixture frame each decoded frame is (grey level 8*i), from the ImageNet-normalised tensor."""
    rgb = denormalise(frames)  # [T, 3, H, W] in [0, 1]
    return [round(v) for v in (rgb.mean((1, 2, 3)) * 255 / 8).tolist()]


def mvbench_reference_index(bound, fps, max_frame, first_idx, num_segments):
    """MVBench's own get_index, as published with the benchmark."""
    start, end = bound if bound else (-100000, 100000)
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    return [int(start_idx + (seg_size / 2) + np.round(seg_size * idx)) for idx in range(num_segments)]


@pytest.fixture
def mvbench_root(tmp_path):
    """A bound video task (ext fall-back, a missing and a broken video), a frame-folder task, a local task."""
    root = tmp_path / "MVBench"
    (root / "json").mkdir(parents=True)
    sta = root / "video" / "sta" / "sta_video"
    write_video(str(sta / "clip.mp4"), 30, 10)
    sta.joinpath("broken.mp4").write_bytes(b"not a video")
    loc = [dict(video="clip.webm", question="What happens?", candidates=["open", "close", "wait"],
                answer="close", start=1.0, end=2.0),
           dict(video="missing.mp4", question="Q", candidates=["a", "b"], answer="a", start=0, end=1),
           dict(video="broken.mp4", question="Q", candidates=["a", "b"], answer="b", start=0, end=1)]
    (root / "json" / "action_localization.json").write_text(json.dumps(loc))
    ep = root / "video" / "tvqa" / "frames_fps3_hq" / "s01e01_clip"
    ep.mkdir(parents=True)
    for i in range(1, 13):  # 4 s at 3 fps, indexed from 1
        Image.new("RGB", (32, 32), (8 * i,) * 3).save(ep / f"{i:05d}.jpg", quality=100)
    episodic = [dict(video="s01e01_clip", question="Who?", candidates=["A man", "A dog", "(C) x", "D"],
                     answer="A dog", start=1.0, end=3.0)]
    (root / "json" / "episodic_reasoning.json").write_text(json.dumps(episodic))
    write_video(str(root / "video" / "shapes" / "v0.mp4"), 8, 4)
    (root / "json" / "shapes.json").write_text(json.dumps(
        [dict(video="v0.mp4", question="Colour?", candidates=["red", "blue"], answer="red")]))
    return str(root)


class FirstOptionModel(torch.nn.Module):
    """Stands in for FoveatedVLM in bookkeeping tests: always prefers option 0 (lowest score)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.frames_seen = []
        self.llm = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=8192))  # the context read

    def option_nll(self, frames, prompts, options, modes=("coarse_fine",), frame_mask=None):
        self.frames_seen.append(frames.shape)
        return {m: [[torch.full((len(o),), float(i)) for i, o in enumerate(opts)] for opts in options] for m in modes}


def run(questions, tokenizer, modes=("coarse_only", "coarse_fine"), max_frames=4, **protocol):
    protocol = EvalProtocol(modes=modes, max_frames=max_frames, frame_size=SIZE, **protocol)
    return benchmark.evaluate(FirstOptionModel(), tokenizer, questions, protocol)[0]


# ---------------------------------------------------------------- frames and letters

@pytest.mark.parametrize("bound,fps,n,first", [(None, 10, 30, 0), ((1.0, 2.0), 10, 30, 0), ((0.5, 9.0), 3, 12, 1),
                                               ((2.2, 7.9), 29.97, 300, 0), (None, 3, 100, 1)])
def test_segment_indices_follow_mvbench(bound, fps, n, first):
    ours = segment_indices(n, fps, 4, bound, first_idx=first)
    assert ours == mvbench_reference_index(bound, fps, n - 1 + first, first, 4)


def test_segment_indices_never_repeat_frames_of_a_short_range():
    assert segment_indices(3, 10, 64) == [0, 1, 2]


def test_option_parsing():
    assert er.parse_option("A. Apples.") == ("A", "Apples.")
    assert er.parse_option("(B) two red cubes") == ("B", "two red cubes")
    assert er.parse_option("Apples") is None
    assert er.split_options(["A. x", "B. y"], "q") == (["A", "B"], ["x", "y"])
    with pytest.raises(ValueError, match="lettered"):
        er.split_options(["A. x", "C. y"], "q")


# ---------------------------------------------------------------- MVBench

def test_mvbench_reader_bounds_folders_and_skips(mvbench_root, tokenizer):
    qs = {q.qid: q for q in er.read_mvbench(mvbench_root)}
    assert sorted(qs) == ["action_localization/0", "action_localization/1", "action_localization/2",
                          "episodic_reasoning/0", "shapes/0"]
    q = qs["action_localization/0"]
    assert q.answer == 1 and q.options[1] == "B. close" and "\nB. close\n" in q.prompt
    assert q.media.bound == (1.0, 2.0) and q.media.path.endswith(os.path.join("sta", "sta_video", "clip.webm"))
    # clip.webm is stored as clip.mp4; frames of the bound [1 s, 2 s] at 10 fps by the benchmark's rule
    assert frame_ids(frames_of(q, 4)) == [11, 13, 16, 19]
    ep = frames_of(qs["episodic_reasoning/0"], 4)
    assert frame_ids(ep) == mvbench_reference_index((1.0, 3.0), 3, 12, 1, 4) == [3, 5, 6, 7]
    assert qs["episodic_reasoning/0"].options[2] == "C. (C) x"  # candidate text kept as written

    result = run(list(qs.values()), tokenizer)
    assert (result["questions"], result["answered"], result["skipped"]) == (5, 3, 2)
    assert result["skip_reasons"] == {"video_not_found": 1, "bad_video": 1}
    cf = result["modes"]["coarse_fine"]
    assert (cf["correct"], cf["total"]) == (1, 3)  # only shapes/0 has answer A
    assert {k: v["total"] for k, v in cf["per_category"]["task"].items()} == {
        "action_localization": 1, "episodic_reasoning": 1, "shapes": 1}
    assert cf["per_category"]["task"]["shapes"]["accuracy"] == 100.0


def test_limit_and_unknown_benchmark_name(mvbench_root, tokenizer, tmp_path):
    protocol = EvalProtocol(modes=("coarse_only",), max_frames=4, frame_size=SIZE)
    result, records = benchmark.evaluate(FirstOptionModel(), tokenizer, er.read_mvbench(mvbench_root), protocol,
                                         limit=2)
    assert result["questions"] == 2 and len(records) == 1  # the second question's video is missing
    bad = tmp_path / "roots.yaml"
    bad.write_text("MVbench: data/mvbench\n")
    with pytest.raises(ValueError, match="MVbench"):
        benchmark.load_roots(str(bad))
    assert benchmark.load_roots(None, {"POPE": "p", "MVBench": None}) == {"POPE": "p"}


def test_no_benchmark_data_is_a_usage_error_naming_the_flags(tmp_path):
    """A checkpoint and no data: the message names the data flags, exit status 2, before any checkpoint is read
    (an empty table with status 0 would look like a result)."""
    assert script_error("benchmark.py", "--checkpoint", tmp_path) == (
        "error: no benchmark data given: pass --data-config FILE or a data root flag "
        "(--mvbench, --videomme, --scienceqa, --pope, --shards, --niah)\n")


# ---------------------------------------------------------------- Video-MME, ScienceQA, POPE

def test_videomme_reader(tmp_path, tokenizer):
    root = tmp_path / "Video-MME"
    (root / "videomme").mkdir(parents=True)
    write_video(str(root / "data" / "v1.mp4"), 12, 6)
    write_video(str(root / "data" / "v2.mkv"), 12, 6)
    rows = [dict(video_id="001", duration="short", domain="Sports", sub_category="s", url="u", videoID="v1",
                 question_id="001-1", task_type="Counting", question="How many?",
                 options=["A. One.", "B. Two.", "C. Three.", "D. Four."], answer="A"),
            dict(video_id="002", duration="long", domain="Sports", sub_category="s", url="u", videoID="v2",
                 question_id="002-1", task_type="OCR", question="What text?",
                 options=["A. x", "B. y", "C. z", "D. w"], answer="C"),
            dict(video_id="003", duration="long", domain="News", sub_category="s", url="u", videoID="gone",
                 question_id="003-1", task_type="OCR", question="Q?",
                 options=["A. x", "B. y", "C. z", "D. w"], answer="D")]
    pd.DataFrame(rows).to_parquet(root / "videomme" / "test-00000-of-00001.parquet")
    qs = er.read_videomme(str(root))
    assert [q.answer for q in qs] == [0, 2, 3] and qs[0].options[0] == "A. One."
    result = run(qs, tokenizer)
    assert (result["answered"], result["skip_reasons"]) == (2, {"video_not_found": 1})
    cats = result["modes"]["coarse_only"]["per_category"]
    assert {k: v["total"] for k, v in cats["duration"].items()} == {"long": 1, "short": 1}
    assert {k: v["total"] for k, v in cats["task_type"].items()} == {"Counting": 1, "OCR": 1}
    assert cats["domain"]["Sports"] == {"accuracy": 50.0, "correct": 1, "total": 2}


def test_scienceqa_image_subset(tmp_path, tokenizer):
    rows = [dict(image={"bytes": image_bytes(10), "path": "a.png"}, question="Which is a mammal?",
                 choices=["cat", "trout"], answer=0, hint="Look at the picture.", subject="natural science"),
            dict(image=None, question="No picture here?", choices=["a", "b"], answer=1, hint="",
                 subject="language science"),
            dict(image={"bytes": image_bytes(200, "JPEG"), "path": "b.jpg"}, question="Which map?",
                 choices=["x", "y", "z"], answer=2, hint=None, subject="social science"),
            dict(image={"bytes": b"not an image", "path": "c.png"}, question="Broken?", choices=["a", "b"],
                 answer=0, hint="", subject="natural science")]
    path = tmp_path / "test-00000-of-00001.parquet"
    pd.DataFrame(rows).to_parquet(path)
    qs = er.read_scienceqa(str(tmp_path))
    assert len(qs) == 3 and qs[0].prompt.startswith("Context: Look at the picture.\nWhich is a mammal?")
    assert not qs[1].prompt.startswith("Context")
    frames = frames_of(qs[0], 64)
    assert frames.shape == (8, 3, SIZE, SIZE) and frames.stride(0) == 0  # one image, replicated without copies
    result = run(qs, tokenizer)
    assert (result["questions"], result["answered"], result["skip_reasons"]) == (3, 2, {"bad_image": 1})
    subj = result["modes"]["coarse_fine"]["per_category"]["subject"]
    assert subj == {"natural science": {"accuracy": 100.0, "correct": 1, "total": 1},
                    "social science": {"accuracy": 0.0, "correct": 0, "total": 1}}


def test_pope_metrics(tmp_path, tokenizer):
    answers = ["yes", "no", "no", "yes", "no"]
    rows = [dict(id=i, question_id=str(i), question="Is there a dog in the image?", answer=a, image_source="s",
                 image={"bytes": image_bytes(40 * i), "path": f"{i}.png"}, category=c)
            for i, (a, c) in enumerate(zip(answers, ["random", "random", "popular", "adversarial", "popular"]))]
    pd.DataFrame(rows).to_parquet(tmp_path / "test-00000-of-00001.parquet")
    qs = er.read_pope(str(tmp_path))
    assert [q.options for q in qs] == [["Yes", "No"]] * 5
    s = run(qs, tokenizer)["modes"]["coarse_only"]  # always "Yes": 2 of 5 right
    assert (s["accuracy"], s["precision"], s["recall"], s["yes_ratio"]) == (40.0, 40.0, 100.0, 100.0)
    assert s["f1"] == pytest.approx(100 * 2 * 0.4 / 1.4)
    assert s["per_category"]["category"]["popular"]["total"] == 2
    assert benchmark.pope_metrics([1, 0, 1, 1], [0, 0, 1, 1]) == {
        "precision": 100.0, "recall": 50.0, "f1": pytest.approx(200 / 3), "yes_ratio": 25.0}


def test_eval_shards(tmp_path, tokenizer):
    def meta(user, assistant, source):
        return json.dumps(dict(user=user, assistant=assistant, source=source)).encode()

    video_q = "What is counted?\nA. three\nB. four\nC. five"
    write_members(tmp_path / "eval_000.tar", [
        ("s0.json", meta(video_q, "A. three", "mvbench/action_count")),
        *[(f"s0.{i:03d}.jpg", image_bytes(8 * i, "JPEG")) for i in range(5)],
        ("s1.jpg", image_bytes(50, "JPEG")),
        ("s1.json", meta("Which colour?\nA. red\nB. green", "B", "scienceqa")),
    ])
    write_members(tmp_path / "eval_001.tar", [("s2.json", meta("Q?\nA. x\nB. y", "A. x", "other")),
                                          ("s3.json", meta("Is there a cat?", "No.", "pope/adversarial")),
                                          ("s3.png", image_bytes()),
                                          ("s4.json", meta("Count?\n(A) one\n(B) two", "(A) one", "x")),
                                          ("s4.png", image_bytes()),
                                          ("s5.json", b"{broken"), ("s5.png", image_bytes())])
    qs = list(er.read_eval_shards(str(tmp_path / "eval_*.tar")))  # the original's rules: s3 has no options
    assert [(q.qid, q.answer, q.categories.get("source")) for q in qs if q.skip is None] == [
        ("s0", 0, "action_count"), ("s1", 1, "scienceqa"), ("s2", 0, "other")]
    assert [(q.qid, q.skip.reason) for q in qs if q.skip is not None] == [
        ("s3", "no_options"), ("s4", "no_options"), ("s5", "bad_json")]
    assert "--yes-no" in str(qs[3].skip) and "--yes-no" not in str(qs[4].skip)
    assert qs[0].options == ["A. three", "B. four", "C. five"] and qs[0].prompt == video_q
    assert frames_of(qs[0], 3).shape == (3, 3, SIZE, SIZE)
    assert frames_of(qs[1], 64).shape == (8, 3, SIZE, SIZE)  # an image, replicated
    long = er.Media(fields={f"{i}.jpg": image_bytes(i, "JPEG") for i in range(70)})  # the original keeps all
    assert frames_of(question(long), None).shape == (70, 3, SIZE, SIZE)
    assert torch.equal(frames_of(question(long), None)[-1], frames_of(question(er.Media(fields={"69.jpg": image_bytes(
        69, "JPEG")})), None)[0])  # in numeric order: 69.jpg last
    result = run(qs, tokenizer)
    assert (result["answered"], result["skip_reasons"]) == (2, {"no_frames": 1, "no_options": 2, "bad_json": 1})
    assert result["modes"]["coarse_fine"]["correct"] == 1  # s0 (A); s1 answers B
    yes_no = list(er.read_eval_shards(str(tmp_path / "eval_*.tar"), EvalProtocol(yes_no=True)))  # --yes-no
    assert (yes_no[3].skip, yes_no[3].options, yes_no[3].answer) == (None, er.YES_NO, 1)
    result = run(yes_no, tokenizer)
    assert (result["answered"], result["skip_reasons"]) == (3, {"no_frames": 1, "no_options": 1, "bad_json": 1})
    assert result["modes"]["coarse_fine"]["correct"] == 1  # s3 "No"
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        list(er.read_eval_shards(str(tmp_path / "nothing_here*.tar")))


def test_records_batches_and_protocol(mvbench_root, tokenizer):
    """Per-question records carry the answer, every option's score and the prediction per mode; batching
    questions does not change them."""
    questions = er.read_mvbench(mvbench_root)
    one = benchmark.evaluate(FirstOptionModel(), tokenizer, questions, EvalProtocol(frame_size=SIZE))[1]
    three = benchmark.evaluate(FirstOptionModel(), tokenizer, questions,
                               EvalProtocol(frame_size=SIZE, batch_size=3))[1]
    assert one == three and [r["id"] for r in one] == ["action_localization/0", "episodic_reasoning/0", "shapes/0"]
    r = one[0]
    assert (r["answer"], r["options"][1], r["categories"]) == (1, "B. close", {"task": "action_localization"})
    # Option i's tokens all score i: the original rule counts its <|im_end|> target as 0 in a mean over n
    n = [len(option_targets(tokenizer, questions[0].prompt, o)[0]) for o in r["options"]]
    assert r["modes"]["autoregressive"]["scores"] == pytest.approx([i * (k - 1) / k for i, k in enumerate(n)])
    assert (r["modes"]["autoregressive"]["prediction"], r["modes"]["autoregressive"]["correct"]) == (0, False)
    mean = benchmark.evaluate(FirstOptionModel(), tokenizer, questions[:1],
                              EvalProtocol(frame_size=SIZE, scoring="mean"))[1]
    assert mean[0]["modes"]["coarse_fine"]["scores"] == [0.0, 1.0, 2.0]


# ---------------------------------------------------------------- the real (tiny) model

def test_one_dino_encoding_per_question_and_shared_scores_equal_naive(mvbench_root, tokenizer):
    torch.manual_seed(0)
    model = FoveatedVLM(**tiny_model_kwargs()).eval()
    q = er.mcq("q", "What moves?", ["a red ball", "a blue cube", "nothing", "two cats"], 1,
               er.Media(path=os.path.join(mvbench_root, "video", "sta", "sta_video", "clip.mp4"), rule="segments"), {})
    with DinoCounter(model) as dino:
        result, _ = benchmark.evaluate(model, tokenizer, [q], EvalProtocol(max_frames=6, frame_size=SIZE))
    assert (dino.calls, dino.frames) == (1, 6)  # 6 distinct frames, encoded once for 4 options x 3 modes
    assert result["answered"] == 1

    frames = frames_of(q, 6).unsqueeze(0)
    prompt = prompt_ids(tokenizer, q.prompt)
    options = [option_targets(tokenizer, q.prompt, o)[0] for o in q.options]
    shared = model.score_options(frames, prompt, options, modes=benchmark.MODES)
    for mode in benchmark.MODES:  # the naive way: one full forward per option and mode
        for k, option in enumerate(options):
            ids = torch.tensor([prompt + option])
            loss_mask = (torch.arange(ids.shape[1]) >= len(prompt)).long()[None]
            naive = model(frames, ids, loss_mask=loss_mask, mode=mode, return_logits=False)["loss"]
            assert abs(shared[mode][k].item() - naive.item()) < 1e-5, (mode, k)


def test_replicated_image_costs_one_frame(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = FoveatedVLM(**tiny_model_kwargs()).eval()
    q = er.mcq("q", "Colour?", ["red", "green", "blue", "grey"], 0, er.Media(fields={"jpg": image_bytes()}), {})
    with DinoCounter(model) as dino:
        benchmark.evaluate(model, tokenizer, [q], EvalProtocol(frame_size=SIZE))
    assert dino.frames == 1


def test_a_saved_model_is_scored_at_the_size_it_was_trained_at(tmp_path, tokenizer, mvbench_root):
    """model.save_pretrained alone (no training config beside it) keeps the frame size and system prompt that
    benchmark.py scores with."""
    model = FoveatedVLM(**tiny_model_kwargs()).eval()
    model.inputs = InputSettings(frame_size=SIZE, system_prompt="Be brief.")
    model.save_pretrained(str(tmp_path / "mine"), tokenizer=tokenizer)
    _, _, protocol = benchmark.run(str(tmp_path / "mine"), {"MVBench": mvbench_root}, limit=1, modes=("coarse_only",))
    assert (protocol.frame_size, protocol.system_prompt) == (SIZE, "Be brief.")
