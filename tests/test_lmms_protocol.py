"""benchmark.py --protocol lmms-eval (lmms_protocol.py) without lmms-eval installed: the prompts and parse rules
on hand-made cases (tests/test_lmms_adapter.py checks them against lmms-eval's own code where it is installed),
the records and figures a run gives, and generation with the tiny model (batched as alone)."""

import json
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

import benchmark
import eval_readers as er
import lmms_protocol as lp
from config import EvalProtocol
from conftest import image_bytes, letter_prone_model, script_error, tiny_model_kwargs, write_video
from model import FoveatedVLM
from tokenization import prompt_ids

SIZE = 56  # the tiny DINO's image size


# ---------------------------------------------------------------- prompts

def test_prompts():
    mv = {"question": "What moves?", "candidates": ["a ball", "a cube"]}
    assert lp.mvbench_prompt(mv) == ("Question:What moves?\nOption:\n(A) a ball\n(B) a cube\n"
                                     "Only give the best option.\n")
    vm = {"question": "How many?", "options": ["A. One.", "B. Two."]}
    assert lp.videomme_prompt(vm) == (
        "Select the best answer to the following multiple-choice question based on the video and the subtitles. "
        "Respond with only the letter (A, B, C, or D) of the correct option.\nHow many?\nA. One.\nB. Two.\n\n"
        "Answer with the option's letter from the given choices directly.")
    sq = {"question": "Which is a mammal?", "choices": ["cat", "trout"], "hint": "Look."}
    assert lp.scienceqa_prompt(sq) == ("Context: Look.\nWhich is a mammal?\nA. cat\nB. trout\n"
                                       "Answer with the option's letter from the given choices directly.")
    assert lp.scienceqa_prompt(dict(sq, hint="")).startswith("Which is a mammal?\nA. cat")
    assert lp.pope_prompt({"question": " Is there a dog? "}) == (
        "Is there a dog?\nAnswer the question using a single word or phrase.")


# ---------------------------------------------------------------- parse rules

@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("(C) blue", "C"), ("d. yellow", "D"), ("B. blue", "B"), ("The answer is c", "C"),
    ("I think it's a cat", "A"),  # the article reads as A, as in lmms-eval
    ("E", "E"), ("F", None), ("", None), ("1 green", None), ("green", None), ("'B'", "B"), ("BC", None)])
def test_mvbench_rule(text, letter):
    assert lp.mvbench_answer(text) == letter


@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("(C)", "C"), ("The answer is D.", "D"), ("A and B", "A"), ("Answer: C", "C"),
    ("Dog", "D"),  # no letter format: any capital A-D, the last one, as in lmms-eval
    ("no idea", None), ("", None), ("E", None), ("B) blue, not (C)", "B"), ("the best answer is B or C", "C")])
def test_videomme_rule(text, letter):
    assert lp.videomme_answer(text) == letter


@pytest.mark.parametrize("text, letter", [("b", "B"), ("B. cat", "B"), (" C ", "C"), ("The answer is B", None),
                                          ("(B)", None), ("b. cat", None), ("", None)])
def test_scienceqa_rule(text, letter):
    assert lp.scienceqa_answer(text) == letter


@pytest.mark.parametrize("text, answer", [("Yes", "yes"), (" NO ", "no"), ("Yes.", None), ("yes, a dog", None)])
def test_pope_rule(text, answer):
    assert lp.pope_answer(text) == answer


def test_cut_at_the_stop_string():
    assert lp.cut(" B\n\nBecause it is blue.") == "B" and lp.cut("A\nB") == "A\nB" and lp.cut("x", ()) == "x"
    with pytest.raises(ValueError, match="shards"):
        lp.task("shards")


# ---------------------------------------------------------------- records and figures

class ScriptedModel(torch.nn.Module):
    """Stands in for FoveatedVLM.generate: answers each prompt whose text holds a key of `answers` with its
    value (then eos)."""

    def __init__(self, tokenizer, answers):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.answers, self.batches = tokenizer, answers, []
        self.llm = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=8192))  # the context benchmark fits

    def generate(self, frames, input_ids, attention_mask, frame_mask, max_new_tokens, mode, eos_token_id=None):
        self.batches.append((frames.shape[0], frame_mask.sum(1).tolist(), mode, max_new_tokens))
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = self.tokenizer.decode(ids[mask.bool()])
            text = next(a for q, a in self.answers.items() if q in prompt)
            rows.append(self.tokenizer(text, add_special_tokens=False)["input_ids"][:max_new_tokens])
        width = max(len(r) for r in rows) + 1
        return torch.tensor([r + [eos_token_id] * (width - len(r)) for r in rows])


@pytest.fixture
def mvbench_root(tmp_path):
    """Four colour questions on short videos in the MVBench layout."""
    root = tmp_path / "MVBench"
    (root / "json").mkdir(parents=True)
    docs = []
    for i in range(4):
        write_video(str(root / "video" / "colour" / f"v{i}.mp4"), 6 + 10 * i, 4)
        docs.append(dict(video=f"v{i}.mp4", question=f"Question {i}?", candidates=["red", "green", "blue"],
                         answer="green"))
    (root / "json" / "colour.json").write_text(json.dumps(docs))
    return str(root)


def test_mvbench_records_and_accuracy(mvbench_root, tokenizer):
    answers = {"Question 0?": "B. green", "Question 1?": "(A) red, not green", "Question 2?": "",
               "Question 3?": "It is green."}  # right, wrong, empty (left out), unparsed (counted, wrong)
    model = ScriptedModel(tokenizer, answers)
    protocol = EvalProtocol(name="lmms-eval", modes=("autoregressive", "coarse_only"), max_frames=32,
                                  frame_size=SIZE, batch_size=3)
    questions = er.read_mvbench(mvbench_root)
    result, records = benchmark.evaluate(model, tokenizer, questions, protocol,
                                         task=lp.TASKS["MVBench"])
    assert [b[1] for b in model.batches] == [[6, 16, 26], [6, 16, 26], [32], [32]]  # up to 32 frames a video
    assert {b[3] for b in model.batches} == {16}
    r = records[0]
    assert r["prompt"] == lp.mvbench_prompt(questions[0].doc) and r["answer"] == 1
    assert r["modes"]["autoregressive"] == {"text": "B. green", "parsed": "B", "prediction": 1, "correct": True,
                                            "counted": True}
    assert [records[i]["modes"]["coarse_only"]["parsed"] for i in range(4)] == ["B", "A", None, None]
    assert [records[i]["modes"]["coarse_only"]["counted"] for i in range(4)] == [True, True, False, True]
    stats = result["modes"]["autoregressive"]
    assert (stats["correct"], stats["total"], stats["accuracy"]) == (1, 3, pytest.approx(100 / 3))
    assert result["answered"] == 4


def test_pope_records_and_metrics(tmp_path, tokenizer):
    rows = [dict(question_id=str(i), question=f"Is there thing {i}?", answer=a, category="random",
                 image={"bytes": image_bytes(50 * i), "path": f"{i}.png"})
            for i, a in enumerate(["yes", "no", "yes", "no"])]
    pd.DataFrame(rows).to_parquet(tmp_path / "test-00000-of-00001.parquet")
    questions = er.read_pope(str(tmp_path))
    assert questions[2].doc == {"question": "Is there thing 2?"}
    answers = {"thing 0": "Yes", "thing 1": "Yes", "thing 2": "Yes.", "thing 3": "no"}  # "Yes." parses to nothing
    model = ScriptedModel(tokenizer, answers)
    protocol = EvalProtocol(name="lmms-eval", modes=("autoregressive",), frame_size=SIZE)
    result, records = benchmark.evaluate(model, tokenizer, questions, protocol,
                                         task=lp.TASKS["POPE"])
    assert [r["modes"]["autoregressive"]["prediction"] for r in records] == [0, 0, -1, 1]
    assert {b[3] for b in model.batches} == {128} and model.batches[0][1] == [8]  # an image: 8 frames
    s = result["modes"]["autoregressive"]
    assert (s["accuracy"], s["precision"], s["recall"], s["yes_ratio"]) == (50.0, 50.0, 100.0, 50.0)


def test_readers_keep_each_benchmarks_own_fields(mvbench_root, tmp_path):
    q = er.read_mvbench(mvbench_root)[0]
    assert q.doc == {"question": "Question 0?", "candidates": ["red", "green", "blue"]}
    root = tmp_path / "Video-MME"
    (root / "videomme").mkdir(parents=True)
    pd.DataFrame([dict(videoID="v", question_id="1", duration="short", domain="d", task_type="t",
                       question="How many?", options=["A. One.", "B.  Two."], answer="B")]).to_parquet(
        root / "videomme" / "test-00000-of-00001.parquet")
    q = er.read_videomme(str(root))[0]
    assert q.doc == {"question": "How many?", "options": ["A. One.", "B.  Two."]} and q.options[1] == "B. Two."
    pd.DataFrame([dict(image={"bytes": image_bytes(), "path": "a.png"}, question="Which?", choices=["x", "y"],
                       answer=1, hint=None, subject="s")]).to_parquet(tmp_path / "test-00000-of-00001.parquet")
    assert er.read_scienceqa(str(tmp_path / "test-00000-of-00001.parquet"))[0].doc == {
        "question": "Which?", "choices": ["x", "y"], "hint": ""}


# ---------------------------------------------------------------- the tiny model

def test_generation_batched_equals_alone_and_generate(mvbench_root, tokenizer):
    model = letter_prone_model(tokenizer)
    questions = er.read_mvbench(mvbench_root)
    task = lp.TASKS["MVBench"]
    runs = [benchmark.evaluate(model, tokenizer, questions, EvalProtocol(
        name="lmms-eval", modes=("autoregressive", "coarse_fine"), max_frames=8, frame_size=SIZE, batch_size=b),
        task=task)[1] for b in (1, 4)]
    assert runs[0] == runs[1]
    texts = [r["modes"][m]["text"] for r in runs[0] for m in r["modes"]]
    assert all(texts) and len(set(texts)) > 1, texts
    frames = er.question_frames(questions[1], EvalProtocol(max_frames=8, frame_size=SIZE)).unsqueeze(0)
    ids = torch.tensor([prompt_ids(tokenizer, lp.mvbench_prompt(questions[1].doc))])
    new = model.generate(frames, ids, max_new_tokens=16, mode="coarse_fine", eos_token_id=tokenizer.eos_token_id)
    assert runs[0][1]["modes"]["coarse_fine"]["text"] == lp.cut(tokenizer.decode(new[0], skip_special_tokens=True))


def test_cli_states_the_protocol(mvbench_root, tokenizer, tmp_path):
    torch.manual_seed(0)
    FoveatedVLM(**tiny_model_kwargs()).save_pretrained(tmp_path / "ckpt", tokenizer=tokenizer)
    out = tmp_path / "results.json"
    benchmark.main(["--checkpoint", str(tmp_path / "ckpt"), "--mvbench", mvbench_root, "--protocol", "lmms-eval",
                    "--frame-size", str(SIZE), "--limit", "2", "--out", str(out), "--threads", "1"])
    saved = json.loads(out.read_text())
    assert (saved["protocol"]["name"], saved["protocol"]["modes"], saved["protocol"]["max_frames"]) == (
        "lmms-eval", ["autoregressive"], lp.MAX_FRAMES)
    assert saved["lmms_eval"]["version"] == lp.VERSION and saved["lmms_eval"]["tasks"]["MVBench"]["task"] == "mvbench"
    assert set(saved["questions"]["MVBench"][0]["modes"]["autoregressive"]) == {
        "text", "parsed", "prediction", "correct", "counted"}
    assert "no lmms-eval task" in script_error("benchmark.py", "--checkpoint", tmp_path / "ckpt", "--shards",
                                               tmp_path / "x.tar", "--protocol", "lmms-eval")
    assert "original protocol" in script_error("benchmark.py", "--checkpoint", tmp_path / "ckpt", "--mvbench",
                                               mvbench_root, "--protocol", "lmms-eval", "--scoring", "mean")
