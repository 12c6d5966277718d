r"""lmms-eval's generation protocol for MVBench, Video-MME, POPE and ScienceQA (image subset), so that an fVLM
score can stand beside the scores the field reports (SmolVLM2's MVBench, ...), which lmms-eval computes.

The rules are those of lmms-eval 0.7.3 (EvolvingLMMs-Lab/lmms-eval, lmms_eval/tasks/<task>/*.yaml and utils.py;
VERSION), restated here and checked against lmms-eval's own functions where it is installed
(tests/test_lmms_adapter.py). For each question:
- the user turn is the task's `doc_to_text` with its default `lmms_eval_specific_kwargs` (`*_prompt` below),
  behind the checkpoint's system turn, as benchmark.py's original protocol;
- the answer is generated greedily (the tasks' generation_kwargs: temperature 0, max_new_tokens 16, POPE 128)
  with the model's KV cache (FoveatedVLM.generate), cut at the first stop string (`until`, lmms-eval's default
  ["\n\n"]: the tasks set none) and stripped, as lmms-eval's adapters and its process_results do;
- the answer is parsed by the task's process_results rule (`*_answer` below) and scored against the right one;
  MVBench's accuracy leaves empty answers out, as its aggregation does.
Frames: 32 per video (MAX_FRAMES: the default max_frames_num / max_num_frames of lmms-eval's llava_onevision,
llava_hf, qwen2_vl, qwen2_5_vl and huggingface adapters) through this project's sampler
(eval_readers.question_frames); an image is replicated to 8 frames, as fVLM is trained on images.
"""

import re
from dataclasses import dataclass
from typing import Callable

from distributed import autocast  # before torch: it sets OpenMP's wait policy (README)
import torch

from collate import pad_frames
from tokenization import MCQ_LETTERS, prompt_ids

VERSION = "0.7.3"  # the lmms-eval release these rules were read from
MAX_FRAMES = 32
UNTIL = ("\n\n",)  # lmms-eval's default stop string (ConfigurableTask: the fewshot_delimiter)
MVBENCH_POST = "Only give the best option.\n"
VIDEOMME_PRE = ("Select the best answer to the following multiple-choice question based on the video and the "
                "subtitles. Respond with only the letter (A, B, C, or D) of the correct option.")
LETTER_POST = "\nAnswer with the option's letter from the given choices directly."  # Video-MME, ScienceQA
POPE_POST = "\nAnswer the question using a single word or phrase."


# ---------------------------------------------------------------- prompts (doc_to_text)

def mvbench_prompt(doc):
    """mvbench_doc_to_text: 'Question:' + question, 'Option:' and '(A) candidate' lines, the post-prompt."""
    options = "".join(f"({MCQ_LETTERS[i]}) {c}\n" for i, c in enumerate(doc["candidates"]))
    return "Question:" + doc["question"] + "\nOption:\n" + options + MVBENCH_POST


def videomme_prompt(doc):
    """videomme_doc_to_text: the instruction, the question, the options as published ('A. ...'), the post-prompt
    (which starts with a newline, so a blank line precedes it)."""
    return VIDEOMME_PRE + "\n" + doc["question"] + "\n" + "\n".join(doc["options"]) + "\n" + LETTER_POST


def scienceqa_prompt(doc):
    """sqa_doc_to_text (format default): 'Context: hint' when there is a hint, the question, 'A. choice' lines."""
    context = f"Context: {doc['hint']}\n" if doc["hint"] else ""
    choices = "\n".join(f"{MCQ_LETTERS[i]}. {c}" for i, c in enumerate(doc["choices"]))
    return f"{context}{doc['question']}\n{choices}{LETTER_POST}"


def pope_prompt(doc):
    """pope_doc_to_text: the stripped question and the post-prompt."""
    return doc["question"].strip() + POPE_POST


# ---------------------------------------------------------------- answers (process_results)

MVBENCH_OPTION = re.compile(r"^([A-E])\.\s*(.+)$", re.IGNORECASE)
MVBENCH_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                 "?", "!")
MVBENCH_LETTER = re.compile(r"\b([A-E])\b", re.IGNORECASE)


def mvbench_answer(text):
    """mcq_acc's rule -> the letter, or None: 'X. ...' (X in A-E, any case) gives X; else the text, with newlines
    and tabs as spaces, loses its punctuation (removed where it touches a space or the text holds a digit-comma-digit,
    else replaced by a space) and its periods not followed by a digit (the first 32: lmms-eval passes re.UNICODE
    as the count), is stripped of quotes and brackets and lower-cased, and its first standalone a-e is the answer
    (so an article 'a' reads as A, as there)."""
    m = MVBENCH_OPTION.match(text.strip())
    if m:
        return m.group(1).upper()
    s = text.replace("\n", " ").replace("\t", " ").strip()
    drop_all = re.search(r"\d,\d", s) is not None
    out = s
    for p in MVBENCH_PUNCT:
        out = out.replace(p, "" if drop_all or p + " " in s or " " + p in s else " ")
    out = re.sub(r"\.(?!\d)", "", out, count=32)
    out = out.strip("'").strip('"').strip(")").strip("(").strip().lower()
    m = MVBENCH_LETTER.search(out)
    return m.group(1).upper() if m else None


ANSWER_PHRASES = ("the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
                  "best answer is", "the correct option is", "correct option is", "the best option is",
                  "best option is", "the choice is", "choice is", "the correct choice is", "correct choice is",
                  "i choose", "i select", "i pick", "my answer is", "my choice is", "옵션", "정답은", "답은",
                  "답:", "答案是", "答案为", "选", "答えは")
LETTER_FORMATS = (("({})", 6), ("{}.", 5), ("{}:", 4), ("{})", 3), ("{} ", 2))  # (format, priority)


def videomme_answer(text, letters="ABCD"):
    """extract_mcq_answer's rule (lmms_eval/tasks/_task_utils/mcq_extract.py) -> the letter, or None.

    The stripped text loses its outer , . ! ? ; : ' " (one character kind after another) and is padded with a
    space each side. Candidates, by priority: a standalone letter starting (10) or ending (9) the text; the
    first letter after an answer phrase (7); the last '(X)' (6), 'X.' (5), 'X:' (4), 'X)' (3), 'X ' (2); only
    when there is none of these, the last bare X (0). The highest priority wins, then the later position."""
    if not text.strip():
        return None
    t = text.strip()
    for ch in ",.!?;:'\"":
        t = t.strip(ch)
    padded, found = f" {t} ", []  # found: (priority, position, letter)
    for fmt, priority in LETTER_FORMATS:
        found += [(priority, padded.rfind(fmt.format(c)), c) for c in letters if fmt.format(c) in padded]
    lower = padded.lower()
    for phrase in ANSWER_PHRASES:
        at = lower.find(phrase)
        if at >= 0:
            found += [(7, padded.find(c, at + len(phrase)), c) for c in letters if c in padded[at + len(phrase):]]
    bare = padded.strip()
    found += [(10, 0, c) for c in letters if bare.startswith(c) and (len(bare) == 1 or not bare[1].isalpha())]
    found += [(9, len(padded) - 1, c) for c in letters
              if bare.endswith(c) and (len(bare) == 1 or not bare[-2].isalpha())]
    if not found:
        found = [(0, padded.rfind(c), c) for c in letters if c in padded]
    return max(found)[2] if found else None


def scienceqa_answer(text):
    """sqa_process_results' rule -> the letter, or None: the whole stripped answer is one letter (any case), or
    it starts with a capital and a period ('B. ...')."""
    t = text.strip()
    if len(t) == 1:
        return t.upper()
    return t[0] if len(t) >= 2 and t[0].isupper() and t[1] == "." else None


def pope_answer(text):
    """pope_process_results' rule -> 'yes' or 'no' when the whole answer, lower-cased and stripped, is one, else
    None ('Yes.' is neither, as there)."""
    t = text.lower().strip()
    return t if t in ("yes", "no") else None


# ---------------------------------------------------------------- tasks

@dataclass(frozen=True)
class Task:
    """One benchmark as lmms-eval asks and scores it."""

    name: str  # lmms-eval's task name
    prompt: Callable  # doc -> user turn
    answer: Callable  # generated text -> the parsed answer (a letter, 'yes' / 'no'), or None
    max_new_tokens: int
    yes_no: bool = False  # the parsed answer is 'yes' / 'no' (options Yes, No), not a letter
    drop_empty: bool = False  # the aggregation leaves out questions answered with no text (MVBench)

    def labels(self, options):
        """The parsed answer that names each option."""
        return [o.lower() for o in options] if self.yes_no else list(MCQ_LETTERS[:len(options)])


TASKS = {
    "MVBench": Task("mvbench", mvbench_prompt, mvbench_answer, 16, drop_empty=True),
    "Video-MME": Task("videomme", videomme_prompt, videomme_answer, 16),
    "ScienceQA": Task("scienceqa_img", scienceqa_prompt, scienceqa_answer, 16),
    "POPE": Task("pope", pope_prompt, pope_answer, 128, yes_no=True),
}


def task(name):
    """The lmms-eval task of a benchmark.py benchmark name; one lmms-eval has no task for is a ValueError."""
    if name not in TASKS:
        raise ValueError(f"the lmms-eval protocol covers {', '.join(TASKS)}; {name!r} has no lmms-eval task "
                         "(score it with --protocol original)")
    return TASKS[name]


def describe(names):
    """What results.json states about the protocol besides config.EvalProtocol's fields."""
    return {"version": VERSION, "until": list(UNTIL), "image_frames": "one image replicated to 8 frames",
            "tasks": {n: {"task": TASKS[n].name, "max_new_tokens": TASKS[n].max_new_tokens} for n in names}}


# ---------------------------------------------------------------- generation and scoring

def cut(text, until=UNTIL):
    """The text before the first stop string, stripped."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text.strip()


@torch.no_grad()
def generate_ids(model, tokenizer, frames, frame_mask, prompts, protocol, mode, max_new_tokens, **kwargs):
    """New token ids [B, <= max_new_tokens] after user turns `prompts` (B strings) about frames [B, T, 3, H, W]
    (frame_mask [B, T]), with the system turn and dtype of `protocol` (config.EvalProtocol). `kwargs` go to
    FoveatedVLM.generate (sampling; eos_token_id, default the tokenizer's, None to run on past it)."""
    param = next(model.parameters())
    rows = [prompt_ids(tokenizer, p, protocol.system_prompt) for p in prompts]
    S = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (S - len(r)) for r in rows], device=param.device)  # [B, S], right-padded
    mask = torch.tensor([[1] * len(r) + [0] * (S - len(r)) for r in rows], device=param.device)  # [B, S]
    kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    with autocast(param.device, protocol.dtype):
        return model.generate(frames.to(param.device, param.dtype), ids, mask, frame_mask.to(param.device),
                              max_new_tokens=max_new_tokens, mode=mode, **kwargs)


def generate(model, tokenizer, frames, frame_mask, prompts, protocol, mode, max_new_tokens, until=UNTIL,
             **sampling):
    """`generate_ids`' answers decoded without special tokens and `cut` at `until`. Greedy unless `sampling`
    says do_sample=True."""
    out = generate_ids(model, tokenizer, frames, frame_mask, prompts, protocol, mode, max_new_tokens, **sampling)
    return [cut(tokenizer.decode(row, skip_special_tokens=True), until) for row in out.tolist()]


def text_tokens(tokenizer, q, protocol, task):
    """The most text tokens a question is read with: its prompt and the longest answer allowed (what the LLM's
    context must hold beside the frames)."""
    return len(prompt_ids(tokenizer, task.prompt(q.doc), protocol.system_prompt)) + task.max_new_tokens


def score_batch(model, tokenizer, questions, protocol, task):
    """benchmark.py's scorer for this protocol: (question, frames [T, 3, H, W]) pairs -> one record per question
    with, per mode, the generated text, the parsed answer, the prediction (the option it names, -1 for none), whether
    it is right and whether the task's aggregation counts it."""
    frames, frame_mask = pad_frames([{"frames": f} for _, f in questions])
    prompts = [task.prompt(q.doc) for q, _ in questions]
    texts = {mode: generate(model, tokenizer, frames, frame_mask, prompts, protocol, mode, task.max_new_tokens)
             for mode in protocol.modes}
    records = []
    for i, (q, _) in enumerate(questions):
        labels, modes = task.labels(q.options), {}
        for mode in protocol.modes:
            text = texts[mode][i]
            parsed = task.answer(text)
            pred = labels.index(parsed) if parsed in labels else -1
            modes[mode] = {"text": text, "parsed": parsed, "prediction": pred, "correct": pred == q.answer,
                           "counted": bool(text) or not task.drop_empty}
        records.append({"id": q.qid, "answer": q.answer, "options": q.options, "categories": q.categories,
                        "prompt": prompts[i], "modes": modes})
    return records
