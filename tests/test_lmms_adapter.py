"""lmms_adapter.py through lmms-eval itself, where lmms_eval imports (the lmms environment: README, lmms-eval;
skipped elsewhere): lmms_protocol.py's prompts and parse rules against lmms-eval's own task code, and the `fvlm`
model run by simple_evaluate on tasks written here over local files (no hub). The generate_until tasks are
lmms-eval's own MVBench, Video-MME and POPE task files with only the data swapped: their answers and parsed
letters must equal benchmark.py --protocol lmms-eval's. A multiple_choice task's choices (lmms-eval's argmin of
`loglikelihood`) must equal benchmark.py's default protocol."""

import json
import os
import random

import pytest

lmms_eval = pytest.importorskip("lmms_eval")

import datasets  # noqa: E402  (lmms-eval's dependency, as the imports below)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from lmms_eval.api.task import TaskConfig  # noqa: E402
from lmms_eval.tasks._task_utils.mcq_extract import extract_mcq_answer  # noqa: E402
from lmms_eval.tasks.mvbench.utils import mcq_acc  # noqa: E402
from lmms_eval.tasks.pope.utils import pope_process_results  # noqa: E402
from lmms_eval.tasks.scienceqa.utils import sqa_process_results  # noqa: E402
from lmms_eval.utils import load_yaml_config  # noqa: E402

import benchmark  # noqa: E402
import lmms_adapter  # noqa: E402
import lmms_protocol as lp  # noqa: E402
from conftest import SMOLLM2_GGUF, image_bytes, letter_prone_model, write_video  # noqa: E402
from pretrained import load_tokenizer  # noqa: E402

TASKS = os.path.join(os.path.dirname(lmms_eval.__file__), "tasks")
SIZE = 56  # the tiny DINO's image size
MODE = "autoregressive"
ANSWERS = ["red", "green", "blue", "yellow", "a small square", "the circle on the left", "nothing moves", "up",
           "it turns around twice", "Paris"]  # candidates of unlike lengths: the random model's choices then differ


# ---------------------------------------------------------------- the rules against lmms-eval's code

def answers_to_parse():
    """Answers a model might give, the rule-bending ones included, and random strings of their pieces."""
    fixed = ["", " ", "A", "b", "(C)", "D.", "B. blue", "b. blue", "(B) blue", "The answer is C.", "answer: D",
             "I think it's a cat", "A and B", "Dog", "no idea", "E", "A\nB", "B)", "C:", "Option B", "yes", "Yes.",
             " NO ", "The best answer is:\n(D) red", "1,2 (A)", "[B]", "'C'", "\"A\"", "a.", "F. x", "答案是B"]
    pieces = ["A", "B", "C", "D", "E", "a", "b", "c", "(", ")", ".", ",", ":", " ", "\n", "the answer is ",
              "best option is ", "yes", "no", "cat", "Dog", "1,2", "3.5", "'", '"', "!", "-", "选"]
    rng = random.Random(0)
    return fixed + ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 8))) for _ in range(400)]


def test_mvbench_rule_is_lmms_evals():
    for text in answers_to_parse():
        theirs = [letter for letter in "ABCDE" if mcq_acc(letter, text)]
        assert theirs == ([lp.mvbench_answer(text)] if lp.mvbench_answer(text) else []), repr(text)


def test_videomme_rule_is_lmms_evals():
    for text in answers_to_parse():
        assert (lp.videomme_answer(text) or "") == extract_mcq_answer(text, choices=list("ABCD")), repr(text)


def test_scienceqa_and_pope_rules_are_lmms_evals():
    for text in answers_to_parse():
        for i, letter in enumerate("ABCD"):
            doc = {"choices": ["w", "x", "y", "z"], "answer": i}
            assert sqa_process_results(doc, [text])["exact_match"] == (lp.scienceqa_answer(text) == letter), repr(text)
        for truth in ("yes", "no"):
            score = pope_process_results({"answer": truth, "question_id": 0}, [text])["pope_accuracy"]["score"]
            assert score == (lp.pope_answer(text) == truth), repr(text)


def task_file(path):
    """An lmms-eval task yaml of the installed package, its includes and !function tags resolved, and the
    lmms_eval_specific_kwargs a model without its own entry gets."""
    cfg = load_yaml_config(os.path.join(TASKS, path))
    kwargs = dict(cfg.get("lmms_eval_specific_kwargs", {}).get("default", {}))
    return cfg, kwargs


def test_prompts_and_generation_settings_are_lmms_evals():
    mv = {"question": "What moves?", "candidates": ["a ball", "a cube", "nothing"], "answer": "a cube"}
    subtasks = sorted(f for f in os.listdir(os.path.join(TASKS, "mvbench")) if f.startswith("mvbench_"))
    assert len(subtasks) == 20
    for file in subtasks:
        cfg, kwargs = task_file(os.path.join("mvbench", file))
        assert cfg["doc_to_text"](mv, kwargs) == lp.mvbench_prompt(mv), file
    vm = {"question": "How many?", "options": ["A. One.", "B. Two.", "C. Three.", "D. Four."]}
    sq = [{"question": "Which is a mammal?", "choices": ["cat", "trout"], "hint": hint} for hint in ("Look.", "")]
    pope = {"question": " Is there a dog in the image? "}
    cases = {"MVBench": ("mvbench/mvbench_action_antonym.yaml", [mv]), "Video-MME": ("videomme/videomme.yaml", [vm]),
             "ScienceQA": ("scienceqa/scienceqa_img.yaml", sq), "POPE": ("pope/pope.yaml", [pope])}
    for name, (path, docs) in cases.items():
        cfg, kwargs = task_file(path)
        task = lp.TASKS[name]
        group = "mvbench" if name == "MVBench" else cfg["task"]  # MVBench's is the group of 20 subtasks
        assert (group, cfg["output_type"]) == (task.name, "generate_until"), name
        gen = cfg["generation_kwargs"]
        assert (gen["max_new_tokens"], gen["temperature"], gen.get("num_beams", 1)) == (task.max_new_tokens, 0, 1)
        assert "until" not in gen and TaskConfig().fewshot_delimiter == lp.UNTIL[0]  # so lmms-eval stops there
        for doc in docs:
            assert cfg["doc_to_text"](doc, kwargs) == task.prompt(doc), name


# ---------------------------------------------------------------- the adapter on local tasks

def test_generation_kwargs():
    greedy = {"max_new_tokens": 16, "temperature": 0, "top_p": 1.0, "num_beams": 1, "do_sample": False,
              "until": ["\n\n"], "image_aspect_ratio": "pad"}  # a task's model-specific key is not used
    assert lmms_adapter.generation(greedy) == {"max_new_tokens": 16, "until": ("\n\n",)}
    assert lmms_adapter.generation({"temperature": 0.7, "top_p": 0.9, "until": "Q:"}) == {
        "max_new_tokens": lmms_adapter.DEFAULT_MAX_NEW_TOKENS, "until": ("Q:",), "do_sample": True,
        "temperature": 0.7, "top_p": 0.9}
    with pytest.raises(ValueError, match="num_beams 4"):
        lmms_adapter.generation({"num_beams": 4})


def local_task(folder, name, include, data_files, **fields):
    """A task yaml `name` in `folder`: lmms-eval's task file `include` (a path under its tasks, or None) with its
    data swapped for local files (no hub) and `fields` (values starting '!function ' become tags)."""
    lines = [f"include: {os.path.join(TASKS, include)}"] if include else []
    lines += [f"task: {name}", "dataset_path: json" if data_files.endswith(".json") else "dataset_path: parquet",
              "dataset_name: null", "test_split: train",
              f"dataset_kwargs: {json.dumps({'data_files': {'train': data_files}})}"]
    for key, value in fields.items():
        lines.append(f"{key}: {value}" if str(value).startswith("!function") else f"{key}: {json.dumps(value)}")
    (folder / f"{name}.yaml").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """A tiny random fVLM saved with its tokenizer, six videos asked as MVBench, Video-MME and a multiple-choice
    task, four images asked as POPE, in benchmark.py's layouts, and the lmms-eval task files over them."""
    tmp = tmp_path_factory.mktemp("lmms")
    tokenizer = load_tokenizer(SMOLLM2_GGUF)
    letter_prone_model(tokenizer).save_pretrained(tmp / "ckpt", tokenizer=tokenizer)
    mvbench, videomme, pope, tasks = tmp / "MVBench", tmp / "Video-MME", tmp / "POPE", tmp / "tasks"
    for folder in (mvbench / "json", videomme / "videomme", pope, tasks):
        folder.mkdir(parents=True)
    colours, docs, rows = ["red", "green", "blue", "yellow"], [], []
    for i in range(6):
        write_video(mvbench / "video" / "shapes" / f"v{i}.mp4", 3 + i, 4, width=SIZE, camera=i % 2 == 1)
        os.makedirs(videomme / "data", exist_ok=True)
        os.link(mvbench / "video" / "shapes" / f"v{i}.mp4", videomme / "data" / f"v{i}.mp4")
        question = ["What colour is it?", "Where does it go?", "Which shape is it?"][i % 3] + " " * (i // 3)
        candidates = [ANSWERS[(3 * i + k) % len(ANSWERS)] for k in range(2 + i % 3)]
        docs.append({"video": f"v{i}.mp4", "question": question, "candidates": candidates,
                     "answer": candidates[i % 2]})
        rows.append({"question_id": f"q{i}", "videoID": f"v{i}", "duration": "short", "domain": "Knowledge",
                     "sub_category": "Astronomy", "task_type": "Counting Problem", "question": question,
                     "answer": "ABCD"[i % 4],
                     "options": [f"{letter}. {c}" for letter, c in zip("ABCD", colours)]})
    (mvbench / "json" / "shapes.json").write_text(json.dumps(docs))
    pd.DataFrame(rows).to_parquet(videomme / "videomme" / "test-00000-of-00001.parquet")
    (tmp / "videomme.json").write_text(json.dumps(rows))
    images = [{"bytes": image_bytes(60 * i), "path": f"{i}.png"} for i in range(3)]
    datasets.Dataset.from_dict(  # written by datasets, so that lmms-eval reads PIL images, pandas the bytes
        {"question_id": ["0", "1", "2"], "question": ["Is there a dog?", "Is it red?", "A cat?"],
         "answer": ["yes", "no", "no"], "category": ["random"] * 3, "image": images},
        features=datasets.Features({k: datasets.Value("string") for k in ("question_id", "question", "answer",
                                                                            "category")} | {"image": datasets.Image()}),
    ).to_parquet(str(pope / "test-00000-of-00001.parquet"))
    (tasks / "utils.py").write_text(
        "import os\n"
        "from tokenization import format_mcq, mcq_answer\n"
        f"MVBENCH, VIDEOMME = {str(mvbench / 'video' / 'shapes')!r}, {str(videomme / 'data')!r}\n"
        "def mvbench_visual(doc):\n    return [os.path.join(MVBENCH, doc['video'])]\n"
        "def videomme_visual(doc):\n    return [os.path.join(VIDEOMME, doc['videoID'] + '.mp4')]\n"
        "def mcq_text(doc):\n    return format_mcq(doc['question'], doc['candidates'])\n"
        "def mcq_choices(doc):\n    return [mcq_answer(doc['candidates'], i) for i in range(len(doc['candidates']))]\n"
        "def mcq_target(doc):\n    return doc['candidates'].index(doc['answer'])\n")
    local_task(tasks, "local_mvbench", "mvbench/mvbench_action_antonym.yaml", str(mvbench / "json" / "shapes.json"),
               doc_to_visual="!function utils.mvbench_visual")
    local_task(tasks, "local_videomme", "videomme/videomme.yaml", str(tmp / "videomme.json"),
               doc_to_visual="!function utils.videomme_visual")
    local_task(tasks, "local_pope", "pope/pope.yaml", str(pope / "test-00000-of-00001.parquet"))
    local_task(tasks, "local_mcq", None, str(mvbench / "json" / "shapes.json"), output_type="multiple_choice",
               doc_to_visual="!function utils.mvbench_visual", doc_to_text="!function utils.mcq_text",
               doc_to_choice="!function utils.mcq_choices", doc_to_target="!function utils.mcq_target",
               metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}])
    return {"ckpt": str(tmp / "ckpt"), "tasks": str(tasks),
            "roots": {"MVBench": str(mvbench), "Video-MME": str(videomme), "POPE": str(pope)}}


GENERATE_TASKS = {"MVBench": "local_mvbench", "Video-MME": "local_videomme", "POPE": "local_pope"}


@pytest.fixture(scope="module")
def lmms_results(local):
    """lmms-eval's results of the `fvlm` model on the four local tasks, two questions a batch."""
    model = lmms_adapter.FVLM(local["ckpt"], MODE, batch_size=2, device="cpu", frame_size=SIZE)
    with pytest.MonkeyPatch.context() as env:  # lmms-eval's datasets cache, else under ~/.cache/huggingface
        env.setenv("LMMS_EVAL_DATASETS_CACHE", os.path.join(local["tasks"], "hf"))
        return lmms_adapter.evaluate(model, [*GENERATE_TASKS.values(), "local_mcq"], local["tasks"])


def samples(results, task):
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


def test_generate_until_answers_equal_benchmark_lmms_protocol(local, lmms_results):
    tasks, results = GENERATE_TASKS, lmms_results
    ours, records, protocol = benchmark.run(local["ckpt"], local["roots"], name="lmms-eval", frame_size=SIZE,
                                            batch_size=3)
    assert (protocol.modes, protocol.max_frames) == ((MODE,), lp.MAX_FRAMES)
    metric = {"MVBench": "mvbench_accuracy", "Video-MME": "videomme_perception_score", "POPE": "pope_accuracy"}
    for name, task in tasks.items():
        theirs = samples(results, task)
        assert len(theirs) == len(records[name]) == ours[name]["answered"]
        for sample, record in zip(theirs, records[name]):
            mine = record["modes"][MODE]
            assert sample["filtered_resps"][0] == mine["text"], (name, sample["doc_id"])
            assert lmms_letter(name, sample) == mine["parsed"], (name, sample["doc_id"], mine["text"])
        accuracy = results["results"][task][f"{metric[name]},none"]
        assert accuracy * (1 if name != "POPE" else 100) == pytest.approx(ours[name]["modes"][MODE]["accuracy"])
    answers = [(r["modes"][MODE]["text"], r["modes"][MODE]["parsed"]) for recs in records.values() for r in recs]
    assert len({t for t, _ in answers}) > 2 and any(p for _, p in answers), answers  # the comparison can fail


def lmms_letter(name, sample):
    """The answer lmms-eval parsed from a sample, as lmms_protocol names it."""
    text = sample["filtered_resps"][0]
    if name == "MVBench":
        letters = [letter for letter in "ABCDE" if mcq_acc(letter, text)]
        return letters[0] if letters else None
    if name == "Video-MME":
        return sample["videomme_perception_score"]["pred_answer"] or None
    prediction = sample["pope_accuracy"]["prediction"]
    return prediction if prediction in ("yes", "no") else None


def test_multiple_choice_choices_equal_benchmark_default_protocol(local, lmms_results):
    results = lmms_results
    ours, records, _ = benchmark.run(local["ckpt"], {"MVBench": local["roots"]["MVBench"]}, modes=(MODE,),
                                     frame_size=SIZE, max_frames=lp.MAX_FRAMES)
    choices = []
    for sample, record in zip(samples(results, "local_mcq"), records["MVBench"]):
        lls = [resp[0][0] for resp in sample["resps"]]  # one (score, greedy) per option
        assert lls == pytest.approx(record["modes"][MODE]["scores"], abs=1e-5)
        assert int(np.argmin(lls)) == record["modes"][MODE]["prediction"]
        choices.append(int(np.argmin(lls)))
        assert all(isinstance(resp[0][1], bool) for resp in sample["resps"])
    accuracy = ours["MVBench"]["modes"][MODE]["accuracy"]
    assert results["results"]["local_mcq"]["acc,none"] * 100 == pytest.approx(accuracy)
    assert len(set(choices)) > 1, choices
