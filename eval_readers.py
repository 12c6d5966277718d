"""Readers for the evaluation benchmarks in their published layouts (see the README's Evaluation section).

Every reader turns one benchmark into `MCQ` records: the user-turn text, the answer strings to score (one
per option), the index of the right one, the categories to break accuracy down by, and a `Media` that says
where the frames come from. The original fVLM's eval shards are read as its benchmark read them (options and
answer letter parsed by its rules, see `original_options`); for the raw layouts the question is laid out as
in training (`tokenization.format_mcq`: the question, then one 'A. option' line per candidate; the scored
answer is 'B. option', `mcq_answer`), whatever the benchmark's own harness prompt. Frames are decoded only
when the question is scored (`question_frames`: frames.load_clip with benchmark.py's protocol), so a missing or
unreadable video becomes a skip with a reason instead of a crash; a question with one frame is replicated to
8, as the original does.

Layouts: MVBench (OpenGVLab/MVBench: json/<task>.json + video/<folder>/...), Video-MME (lmms-lab/Video-MME:
videomme/test-*.parquet + data/{videoID}.mp4), ScienceQA (derek-thomas/ScienceQA test parquet, image subset),
POPE (lmms-lab/POPE test parquet), the original fVLM's eval shards (WebDataset, json user/assistant/source) and
the needle-in-a-haystack set of synthetic.py --niah (niah.json + video/).
"""

import dataclasses
import glob
import json
import os
import re
from dataclasses import dataclass, field

import pandas as pd

from config import MAX_FRAMES, EvalProtocol
from frames import VIDEO_FIELDS, Media, SkipSample, fit, load_clip, probe, sampled
from shards import expand_shards, iter_tar
from tokenization import MCQ_LETTERS, format_mcq, mcq_answer

# MVBench task -> video folder under <root>/video (the benchmark's own table). A task not listed here is
# looked up in <root>/video/<task>, which is how a locally written set in this layout is read.
MVBENCH_FOLDERS = {
    "action_sequence": "star/Charades_v1_480", "action_prediction": "star/Charades_v1_480",
    "object_interaction": "star/Charades_v1_480", "action_localization": "sta/sta_video",
    "episodic_reasoning": "tvqa/frames_fps3_hq", "action_antonym": "ssv2_video",
    "fine_grained_action": "Moments_in_Time_Raw/videos", "unexpected_action": "FunQA_test/test",
    "object_existence": "clevrer/video_validation", "moving_direction": "clevrer/video_validation",
    "moving_count": "clevrer/video_validation", "moving_attribute": "clevrer/video_validation",
    "counterfactual_inference": "clevrer/video_validation", "object_shuffle": "perception/videos",
    "action_count": "perception/videos", "state_change": "perception/videos",
    "character_order": "perception/videos", "scene_transition": "scene_qa/video",
    "fine_grained_pose": "nturgbd", "egocentric_navigation": "vlnqa",
}
YES_NO = ["Yes", "No"]  # POPE's options; "Yes" (option 0) is the positive class
POPE_INSTRUCTION = "Answer the question using a single word or phrase."


@dataclass
class MCQ:
    """One multiple-choice question: `prompt` is the user turn, `options` the answer strings scored."""

    qid: str
    prompt: str
    options: list
    answer: int
    media: Media
    categories: dict = field(default_factory=dict)
    skip: SkipSample = None  # set when the question cannot be scored (the benchmark counts it by reason)
    doc: dict = None  # the benchmark's own fields as published (question, candidates, ...), from which another
    #                   harness builds its prompt (lmms_protocol.py); None for the eval shards
    max_frames: int = MAX_FRAMES  # the benchmark's own frame count for a video (None: every frame at 1 fps)


# ---------------------------------------------------------------- options and letters

OPTION_RE = re.compile(r"^\s*\(?([A-Z])[.)]\s*(.*)$")


def parse_option(line):
    """'A. Apples.' or '(A) Apples.' -> ('A', 'Apples.'); None when the line is not an option."""
    m = OPTION_RE.match(line)
    return (m.group(1), m.group(2).strip()) if m else None


# ---------------------------------------------------------------- frames

def question_frames(q, protocol=EvalProtocol(), room=None):
    """A question's frames [T, 3, H, W] by the protocol's frame settings (see question_clip). Raises
    frames.SkipSample."""
    media, cfg, _, _ = question_clip(q, protocol, room)
    return clip_frames(media, cfg)


def clip_frames(media, cfg):
    """The frames [T, 3, H, W] of a question_clip's media; none is SkipSample `no_frames`."""
    clip = load_clip(media, cfg)
    if clip.kind == "text":
        raise SkipSample("no_frames")
    return clip.frames


def question_clip(q, protocol=EvalProtocol(), room=None):
    """Where a question's frames come from and how they are taken, decoding nothing -> (Media, FrameConfig, the
    number of frames or None when not counted, a note when they were sampled down to fit). The protocol's
    `max_frames` None is the benchmark's own count: every frame of a shard sample (as the original reads its eval
    shards), the question's `max_frames` of a video (MAX_FRAMES by MVBench's rule); 0 is no cap. Its `fps` reads
    videos at that fixed rate instead of the benchmark's rule. With `room` (the frames the LLM's context holds
    beside the question's text) more frames are sampled uniformly down to it (frames.fit), or with a fixed fps
    the question is skipped as `too_long`. A video is opened to count its frames only when the cap allows more
    than `room`. Raises frames.SkipSample."""
    cap = protocol.max_frames
    if cap is None:
        video = q.media.path is not None or any(f in VIDEO_FIELDS for f in q.media.fields or {})
        cap = q.max_frames if video else None
    media = q.media if protocol.fps is None else dataclasses.replace(q.media, rule="fps")
    cfg = dataclasses.replace(protocol, max_frames=cap or None, sample_fps=protocol.fps or protocol.sample_fps)
    if room is None or (cfg.max_frames is not None and cfg.max_frames <= room):
        return media, cfg, None, None
    source = probe(media)
    try:
        cfg, note = fit(media, cfg, room, protocol.fps is not None, source)
    except ValueError as e:
        raise SkipSample("too_long", f"{q.qid}: {e}") from None
    return media, cfg, sampled(source, media, cfg), note


# ---------------------------------------------------------------- readers

def read_parquets(root, pattern):
    """One DataFrame from `root` (a parquet file) or from the files matching `pattern` under it."""
    files = [root] if os.path.isfile(root) else sorted(glob.glob(os.path.join(root, pattern), recursive=True))
    if not files:
        raise FileNotFoundError(f"no parquet files matching {pattern!r} under {root!r}")
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def _text(value):
    """A parquet string cell that may be null (None or NaN) -> str."""
    return value if isinstance(value, str) else ""


def mcq(qid, question, candidates, answer, media, categories, doc=None):
    """An MCQ in the training layout: `format_mcq` lines 'A. c0' as the user turn, 'A. c0' as the answer."""
    options = [mcq_answer(candidates, i) for i in range(len(candidates))]
    return MCQ(qid, format_mcq(question, candidates), options, answer, media, categories, doc=doc)


def read_mvbench(root, protocol=EvalProtocol()):
    """MVBench: <root>/json/<task>.json records {video, question, candidates, answer[, start, end]}.

    `answer` is the text of one candidate. The video is <root>/video/<task folder>/<video> (a file, or a
    folder of frames at 3 fps), read within its start/end bound when the record has one.
    """
    files = sorted(glob.glob(os.path.join(root, "json", "*.json")))
    if not files:
        raise FileNotFoundError(f"no MVBench task files: {os.path.join(root, 'json', '*.json')} matches nothing")
    questions = []
    for file in files:
        task = os.path.splitext(os.path.basename(file))[0]
        folder = os.path.join(root, "video", MVBENCH_FOLDERS.get(task, task))
        with open(file) as f:
            records = json.load(f)
        for i, r in enumerate(records):
            if r["answer"] not in r["candidates"]:
                raise ValueError(f"{file} record {i}: answer {r['answer']!r} is not one of its candidates")
            bound = (float(r["start"]), float(r["end"])) if "start" in r and "end" in r else None
            media = Media(path=os.path.join(folder, r["video"]), rule="segments", bound=bound)
            questions.append(mcq(f"{task}/{i}", r["question"], r["candidates"],
                                 r["candidates"].index(r["answer"]), media, {"task": task},
                                 doc={"question": r["question"], "candidates": r["candidates"]}))
    return questions


def split_options(lines, where):
    """Option lines 'A. x' / '(A) x', lettered A, B, C... in order -> (letters, texts)."""
    parsed = [parse_option(line) for line in lines]
    letters = [p[0] if p else None for p in parsed]
    if letters != list(MCQ_LETTERS[:len(lines)]):
        raise ValueError(f"{where}: options {lines!r} are not lettered A, B, C... in order")
    return letters, [p[1] for p in parsed]


def read_videomme(root, protocol=EvalProtocol()):
    """Video-MME: <root>/videomme/test-*.parquet (options 'A. ...', answer a letter) and
    <root>/data/{videoID}.mp4 (other extensions tried)."""
    if not os.path.isdir(root):
        raise NotADirectoryError(f"Video-MME root {root!r} must be the dataset folder (videomme/ and data/)")
    df = read_parquets(root, os.path.join("videomme", "test-*.parquet"))
    questions = []
    for row in df.itertuples():
        where = f"Video-MME question {row.question_id}"
        raw = [str(o) for o in row.options]
        letters, texts = split_options([o.strip() for o in raw], where)
        if row.answer not in letters:
            raise ValueError(f"{where}: answer {row.answer!r} is not one of {letters}")
        media = Media(path=os.path.join(root, "data", f"{row.videoID}.mp4"), rule="segments")
        categories = {"duration": row.duration, "domain": row.domain, "task_type": row.task_type}
        questions.append(mcq(str(row.question_id), row.question, texts, letters.index(row.answer), media,
                             categories, doc={"question": row.question, "options": raw}))
    return questions


def read_scienceqa(root, protocol=EvalProtocol()):
    """ScienceQA image subset: test rows whose `image` is not null (one image replicated to 8 frames); the
    hint, when there is one, goes before the question as 'Context: ...'."""
    df = read_parquets(root, os.path.join("**", "test-*.parquet"))
    questions = []
    for i, row in enumerate(df.itertuples()):
        image = row.image if isinstance(row.image, dict) else None
        if image is None or image.get("bytes") is None:
            continue  # a text-only question: not in the image subset
        hint = _text(row.hint).strip()
        question = f"Context: {hint}\n{row.question}" if hint else row.question
        media = Media(fields={"jpg": image["bytes"]})
        doc = {"question": row.question, "choices": list(row.choices), "hint": _text(row.hint)}
        questions.append(mcq(str(i), question, list(row.choices), int(row.answer), media, {"subject": row.subject},
                             doc=doc))
    return questions


def read_pope(root, protocol=EvalProtocol()):
    """POPE: yes/no questions about an image; options ('Yes', 'No'), 'Yes' is the positive class."""
    df = read_parquets(root, os.path.join("**", "test-*.parquet"))
    questions = []
    for row in df.itertuples():
        truth = str(row.answer).strip().lower()
        if truth not in ("yes", "no"):
            raise ValueError(f"POPE question {row.question_id}: answer {row.answer!r} is not yes/no")
        prompt = f"{row.question}\n{POPE_INSTRUCTION}"
        questions.append(MCQ(str(row.question_id), prompt, list(YES_NO), 0 if truth == "yes" else 1,
                             Media(fields={"jpg": row.image["bytes"]}), {"category": row.category},
                             doc={"question": row.question}))
    return questions


def read_niah(root, protocol=EvalProtocol()):
    """The needle-in-a-haystack set synthetic.py --niah writes: <root>/niah.json records {video, question,
    candidates, answer, task, length, depth} and <root>/video/<video>, read at 1 fps with every frame (the
    haystack is the test: its own count is no cap), by categories task, length and depth."""
    file = os.path.join(root, "niah.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no needle-in-a-haystack set: {file} does not exist (python synthetic.py --niah)")
    with open(file) as f:
        records = json.load(f)
    questions = []
    for i, r in enumerate(records):
        q = mcq(f"{r['video']}/{r['task']}", r["question"], r["candidates"], r["candidates"].index(r["answer"]),
                Media(path=os.path.join(root, "video", r["video"])),
                {"task": r["task"], "length": r["length"], "depth": r["depth"]})
        questions.append(dataclasses.replace(q, max_frames=None))
    return questions


ORIGINAL_OPTION_RE = re.compile(r"([A-Z])\.\s*(.+?)(?=\n[A-Z]\.|$)", re.DOTALL)


def original_options(user):
    """The options the original benchmark scores for a `user` text: every 'X.' (X a capital letter) starts an
    option that runs to the next line starting 'Y.' or to the end of the text (so a trailing instruction line
    stays part of the last option, and a capital followed by a dot inside the question starts one too: the
    original's rule, kept so that its eval shards score the same). -> (sorted letters, 'X. text' strings)."""
    options = {m.group(1): f"{m.group(1)}. {m.group(2).strip()}" for m in ORIGINAL_OPTION_RE.finditer(user)}
    letters = sorted(options)
    return letters, [options[letter] for letter in letters]


def original_answer_letter(assistant):
    """The original's answer letter: the capital before the first '.', else the first character."""
    text = assistant.strip()
    m = re.match(r"([A-Z])\.", text)
    return m.group(1) if m else (text[0] if text else "?")


def _shard_question(meta, where, yes_no=False):
    """(options, answer index) of an eval-shard sample as the original scores it. An answer letter that names
    no option gives index -1: counted, never right (the original counts it so). A question without options is
    skipped (SkipSample "no_options"), as there, unless `yes_no` and its answer is yes or no: then it is scored
    as Yes/No (POPE written without option lines)."""
    user, assistant = meta.get("user"), meta.get("assistant")
    if not isinstance(user, str) or not isinstance(assistant, str):
        raise SkipSample("missing_field", f"{where}: json needs string user and assistant")
    letters, options = original_options(user)
    if not letters:
        truth = assistant.strip().rstrip(".").lower()
        if yes_no and truth in ("yes", "no"):
            return list(YES_NO), 0 if truth == "yes" else 1
        raise SkipSample("no_options", f"{where}: no 'A.'-style option in the question"
                         + (" (benchmark.py --yes-no scores it as Yes/No)" if truth in ("yes", "no") else ""))
    letter = original_answer_letter(assistant)
    return options, letters.index(letter) if letter in letters else -1


def read_eval_shards(root, protocol=EvalProtocol()):
    """The original's eval shards: json {user, assistant[, source]} with one image or numbered frames. MCQs
    carry their options as lines 'A. ...' inside `user` and `assistant` starts with the letter (both parsed
    by the original's rules); protocol.yes_no: see _shard_question. Yields questions lazily (shards
    can be large); the last path part of `source` is the category. A sample whose question cannot be scored
    is yielded as an MCQ with `skip` set (its reason), so the benchmark counts it."""
    for path in expand_shards(root):
        for key, sample, _ in iter_tar(path):
            where = f"{path} sample {key}"
            try:
                meta = json.loads(sample["json"])
                options, answer = _shard_question(meta, where, protocol.yes_no)
            except SkipSample as e:
                yield MCQ(key, "", [], -1, Media(fields={}), {}, skip=e)
                continue
            except (KeyError, ValueError) as e:  # no json member, or not JSON
                yield MCQ(key, "", [], -1, Media(fields={}), {}, skip=SkipSample("bad_json", f"{where}: {e}"))
                continue
            source = str(meta.get("source", "unknown"))
            yield MCQ(key, meta["user"], options, answer, Media(fields=sample), {"source": source.split("/")[-1]})
