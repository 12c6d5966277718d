r"""MCQ evaluation of a checkpoint on MVBench, Video-MME, ScienceQA (image subset), POPE and the original's
eval shards, in the three inference modes.

The protocol is the original fVLM benchmark's (spsanps/nanoSmol, fVLM/benchmark.py), so a published
checkpoint scores here what it scored there: the prompt is the system turn "You are a helpful AI assistant."
and the question as the user turn, then the assistant header; each option ("B. text") is the assistant turn,
and its score is the mean cross-entropy of the tokens after the prompt (the option, <|im_end|> and the
newline), with the <|im_end|> target counted as 0 (the original's `ignore_index=pad_id`, pad = eos); the
lowest score wins. Every one-frame question is replicated to 8 frames. `config.EvalProtocol` names each choice
(`--scoring`, `--system-prompt`, ...); `model.option_nll` runs DINOv2 once per question for all options and
modes, several questions per call with --batch-size. `--protocol lmms-eval` asks, generates and parses as
lmms-eval does instead (lmms_protocol.py), so that a score can stand beside those the field reports.

    python benchmark.py --checkpoint checkpoints/stage2_135M --data-config configs/eval_data.yaml \
        [--only MVBench ScienceQA] [--modes coarse_only coarse_fine autoregressive] [--limit N] [--out results.json]
        [--protocol original|lmms-eval]
    python benchmark.py --checkpoint ... --videomme data/videomme --max-frames 0 [--fps 1] [--chunk-frames 64]
    python benchmark.py --checkpoint ... --niah data/synthetic/niah --heatmap niah.png

Frames never exceed what the LLM's context holds beside a question (--max-frames 0: that many, uniformly; a
fixed --fps that does not fit skips the question as too_long), and a video longer than --chunk-frames is decoded
and encoded a chunk at a time into the model's KV cache (model.stream: constant memory, an hour of Video-MME's
long split included).
"""

import cli
from config import MODES, PROTOCOLS, SCORING

ROOT_FLAGS = {"MVBench": "mvbench", "Video-MME": "videomme", "ScienceQA": "scienceqa", "POPE": "pope",
              "shards": "shards", "NIAH": "niah"}  # the benchmarks, and the flag giving each one's data root


def arguments(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (model.save_pretrained / train.py output; "
                   "a save_dir means its newest), hub repo, or the original's training checkpoint (.pt)")
    p.add_argument("--tokenizer", help="the LLM's tokenizer: hub id, folder or .gguf (default: the checkpoint's)")
    p.add_argument("--data-config", help="YAML mapping benchmark name -> data root")
    for name, flag in ROOT_FLAGS.items():
        p.add_argument(f"--{flag}", help=f"{name} data root (overrides --data-config)")
    p.add_argument("--only", nargs="+", choices=list(ROOT_FLAGS), help="benchmarks to run (default: all given)")
    p.add_argument("--protocol", default="original", choices=PROTOCOLS, help="original (default): the original "
                   "benchmark's option scores; lmms-eval: lmms-eval's prompts, greedy answers and parse rules "
                   "(lmms_protocol.py: the lmms-eval version followed, the frames a video)")
    p.add_argument("--modes", nargs="+", choices=MODES, help="default: all three (lmms-eval: autoregressive)")
    p.add_argument("--limit", type=int, help="score only the first N questions of each benchmark")
    p.add_argument("--max-frames", type=int, help="at most this many frames per question (default: every frame "
                   "of an eval-shard sample, as the original; videos 64 by MVBench's segment rule; 0: no cap, as "
                   "many as the LLM's context holds beside the question, uniformly)")
    cli.add_long_video_args(p, fps_help="read videos at this fixed rate instead of the benchmark's rule (no cap "
                            "unless --max-frames); a question whose frames do not fit in the LLM's context is skipped")
    p.add_argument("--frame-size", type=int, help="frame side in pixels (default: the size the model was trained at)")
    p.add_argument("--batch-size", type=int, help="questions scored per forward (default 1; same scores)")
    p.add_argument("--scoring", choices=SCORING, help="option score: 'original' (default: the original benchmark's "
                   "mean over the tokens after the prompt, <|im_end|> counted as 0) or 'mean' (the mean over "
                   "the answer and its <|im_end|>, every token counted)")
    p.add_argument("--system-prompt", help="system turn of every question (default: the one the model was trained "
                   "with, else the original's); 'template' for the chat template's own default")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="model weights' dtype (auto: bfloat16 on CUDA, as the original benchmark; float32 on CPU)")
    p.add_argument("--yes-no", action="store_true", help="score eval-shard questions that have no option "
                   "lines but a yes/no answer (POPE written without options) as Yes/No; the original skips them")
    cli.add_device(p)
    p.add_argument("--out", help="write the results and per-question records as JSON here")
    p.add_argument("--heatmap", help="NIAH: draw accuracy by haystack length and needle depth into this PNG")
    cli.add_threads(p)
    return cli.check_long_video_args(p, p.parse_args(argv), default_max_frames=None)


if __name__ == "__main__":  # parse before torch loads: --help and a flag error answer at once
    ARGS = arguments()

import itertools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from collections import Counter, defaultdict  # noqa: E402
from dataclasses import asdict, replace  # noqa: E402
from typing import NamedTuple  # noqa: E402

import distributed  # noqa: E402  before torch: it sets OpenMP's wait policy (README, CPU threads)
import torch  # noqa: E402
import yaml  # noqa: E402
from tqdm import tqdm  # noqa: E402

import eval_readers  # noqa: E402
import lmms_protocol  # noqa: E402
from collate import pad_frames  # noqa: E402
from config import EvalProtocol  # noqa: E402
from distributed import autocast  # noqa: E402
from frames import SkipSample, stream_clip  # noqa: E402
from model import load_checkpoint  # noqa: E402
from streaming import chunk_size, context_room  # noqa: E402
from tokenization import option_targets, prompt_ids  # noqa: E402

READERS = {
    "MVBench": eval_readers.read_mvbench,
    "Video-MME": eval_readers.read_videomme,
    "ScienceQA": eval_readers.read_scienceqa,
    "POPE": eval_readers.read_pope,
    "shards": eval_readers.read_eval_shards,
    "NIAH": eval_readers.read_niah,
}
WARN_SKIPS = 3  # name the first few skipped questions, then only count them
LMMS_DEFAULTS = {"modes": ("autoregressive",), "max_frames": lmms_protocol.MAX_FRAMES}  # unless given


def load_roots(config_path=None, flags=None):
    """Benchmark name -> data root, from a YAML mapping (`MVBench: data/eval/MVBench`, ...) and flags.

    Flags override the YAML. An unknown name in the YAML is an error naming it and the file.
    """
    roots = {}
    if config_path:
        with open(config_path) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{config_path}: expected a mapping of benchmark name -> data root")
        for name, root in loaded.items():
            if name not in READERS:
                raise ValueError(f"{config_path}: unknown benchmark {name!r}; known: {', '.join(READERS)}")
            roots[name] = str(root)
    for name, root in (flags or {}).items():
        if root:
            roots[name] = root
    return roots


@torch.no_grad()
def evaluate(model, tokenizer, questions, protocol=EvalProtocol(), limit=None, desc="eval", task=None):
    """Score MCQ questions in every mode -> (result dict (see `summarize`), per-question records). Questions
    that cannot be scored are skipped, counted by reason, and never count as answers. `task` (an
    lmms_protocol.Task) asks them by lmms-eval's protocol; None, by the original's (option scores). A question's
    frames are at most what the LLM's context holds beside its text (eval_readers.question_clip); in the original
    protocol a video longer than a chunk (protocol.chunk_frames) is read a chunk at a time into the model's KV
    cache (model.stream)."""
    if limit is not None:
        questions = list(itertools.islice(questions, limit))
    total = len(questions) if hasattr(questions, "__len__") else None
    records, pending, skipped, fitted, start = [], [], Counter(), 0, time.perf_counter()
    chunk = chunk_size(protocol.chunk_frames, next(model.parameters()).device)
    if task is None:
        score = lambda batch: score_batch(model, batch, protocol)
    else:  # lmms-eval's prompts, greedy answers and parse rules
        score = lambda batch: lmms_protocol.score_batch(model, tokenizer, [(q, f) for q, _, f in batch], protocol,
                                                        task)
    for q in tqdm(questions, desc=desc, total=total, unit="q"):
        try:
            if q.skip is not None:
                raise q.skip
            text = question_text(tokenizer, q, protocol) if task is None else None
            tokens = text.tokens if task is None else lmms_protocol.text_tokens(tokenizer, q, protocol, task)
            media, cfg, n, note = eval_readers.question_clip(q, protocol, context_room(model, tokens))
            if note:
                fitted += 1
                if fitted <= WARN_SKIPS:
                    tqdm.write(f"{desc}: {q.qid}: {note}")
            if task is None and n is not None and n > chunk:
                records.append(score_streamed(model, q, text, media, cfg, n, protocol))
            else:
                pending.append((q, text, eval_readers.clip_frames(media, cfg)))
        except SkipSample as e:
            if sum(skipped.values()) < WARN_SKIPS:
                tqdm.write(f"{desc}: skipping {q.qid}: {e}")
            skipped[e.reason] += 1
        if len(pending) == protocol.batch_size:
            records += score(pending)
            pending = []
    if pending:
        records += score(pending)
    yes_no = bool(records) and all(r["options"] == eval_readers.YES_NO for r in records)
    result = summarize(records, protocol.modes, skipped, time.perf_counter() - start, yes_no)
    result["sampled_to_fit"] = fitted  # questions whose frames were sampled down to the LLM's context
    return result, records


class QuestionText(NamedTuple):
    """A question's token ids: the chat-formatted prompt, each option's targets and their weights."""

    prompt: list
    options: list
    weights: list

    @property
    def tokens(self):  # the longest text the frames are read with
        return len(self.prompt) + max(len(o) for o in self.options)


def question_text(tokenizer, q, protocol):
    """A question's QuestionText by the protocol's system prompt and scoring rule."""
    targets = [option_targets(tokenizer, q.prompt, o, protocol.scoring, protocol.system_prompt) for o in q.options]
    return QuestionText(prompt_ids(tokenizer, q.prompt, protocol.system_prompt), [ids for ids, _ in targets],
                        [w for _, w in targets])


def score_batch(model, questions, protocol):
    """Score (question, QuestionText, frames [T, 3, H, W]) triples in one batched call -> one record per question
    (`record`)."""
    param = next(model.parameters())
    frames, frame_mask = pad_frames([{"frames": f} for _, _, f in questions])
    with autocast(param.device, protocol.dtype):
        nll = model.option_nll(frames.to(param.device, param.dtype), [t.prompt for _, t, _ in questions],
                               [t.options for _, t, _ in questions], tuple(protocol.modes),
                               frame_mask=frame_mask.to(param.device))
    return [record(q, text, {mode: nll[mode][i] for mode in protocol.modes}, protocol)
            for i, (q, text, _) in enumerate(questions)]


def score_streamed(model, q, text, media, cfg, frames, protocol):
    """Score one question whose video is decoded and encoded a chunk at a time (frames.stream_clip into
    model.stream, every mode from one DINO pass per chunk) -> its record."""
    param = next(model.parameters())
    stream = model.stream(protocol.modes, cfg.chunk_frames)
    with autocast(param.device, protocol.dtype):
        stream.read(stream_clip(media, cfg, stream.chunk), total=frames, desc=q.qid, leave=False)
        nll = stream.option_nll(text.prompt, text.options)
    return record(q, text, nll, protocol)


def record(q, text, nll, protocol):
    """A question's record from its options' per-token NLLs ({mode: [n_options] tensors}): its answer, categories,
    and per mode every option's score and the prediction (the lowest score; the first of equal ones, as the
    original's min)."""
    modes = {}
    for mode in protocol.modes:
        scores = [float((n.float().cpu() * torch.tensor(w)).sum() / len(w)) for n, w in zip(nll[mode], text.weights)]
        pred = min(range(len(scores)), key=scores.__getitem__)
        modes[mode] = {"prediction": pred, "correct": pred == q.answer, "scores": scores}
    return {"id": q.qid, "answer": q.answer, "options": q.options, "categories": q.categories,
            "modes": modes}  # not q itself: its media may hold the frames' bytes


def _accuracy(correct, total):
    return {"accuracy": 100.0 * correct / total if total else 0.0, "correct": correct, "total": total}


def pope_metrics(preds, answers):
    """Yes/no metrics with 'yes' (option 0) as positive: accuracy, precision, recall, F1, yes-ratio (%)."""
    tp = sum(p == 0 and a == 0 for p, a in zip(preds, answers))
    fp = sum(p == 0 and a == 1 for p, a in zip(preds, answers))
    fn = sum(p == 1 and a == 0 for p, a in zip(preds, answers))
    n = len(preds)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    yes = sum(p == 0 for p in preds)
    return {"precision": 100 * precision, "recall": 100 * recall, "f1": 100 * f1,
            "yes_ratio": 100 * yes / n if n else 0.0}


def summarize(records, modes, skipped, seconds, yes_no=False):
    """Per-question records -> per mode: accuracy, counts and per-category accuracy, plus the yes/no metrics
    when the questions are yes/no; skips by reason; speed. A record a mode marks `counted: False` (lmms-eval's
    MVBench leaves out empty answers) is left out of that mode's figures."""
    result = {"questions": len(records) + sum(skipped.values()), "answered": len(records),
              "skipped": sum(skipped.values()), "skip_reasons": dict(skipped), "seconds": seconds,
              "questions_per_s": len(records) / seconds if seconds > 0 else 0.0, "modes": {}}
    for mode in modes:
        by_cat = defaultdict(lambda: defaultdict(lambda: [0, 0]))
        counted = [r for r in records if r["modes"][mode].get("counted", True)]
        for r in counted:
            for axis, value in r["categories"].items():
                by_cat[axis][str(value)][0] += r["modes"][mode]["correct"]
                by_cat[axis][str(value)][1] += 1
        stats = _accuracy(sum(r["modes"][mode]["correct"] for r in counted), len(counted))
        stats["per_category"] = {axis: {v: _accuracy(*ct) for v, ct in sorted(values.items())}
                                 for axis, values in by_cat.items()}
        if yes_no:
            stats.update(pope_metrics([r["modes"][mode]["prediction"] for r in counted],
                                      [r["answer"] for r in counted]))
        result["modes"][mode] = stats
    return result


def format_table(results):
    """One line per benchmark and mode (accuracy, counts, speed), then the per-category accuracies."""
    lines = [f"{'benchmark':<12} {'mode':<15} {'acc %':>7} {'right':>7} {'answered':>9} {'skipped':>8} {'q/s':>7}"]
    for name, r in results.items():
        for mode, s in r["modes"].items():
            extra = "".join(f"  {k} {s[k]:.1f}" for k in ("precision", "recall", "f1", "yes_ratio") if k in s)
            lines.append(f"{name:<12} {mode:<15} {s['accuracy']:>7.1f} {s['correct']:>7} {s['total']:>9} "
                         f"{r['skipped']:>8} {r['questions_per_s']:>7.2f}{extra}")
        if r["skip_reasons"]:
            lines.append(f"{'':<12} skipped: " + ", ".join(f"{k} {v}" for k, v in r["skip_reasons"].items()))
        for mode, s in r["modes"].items():
            for axis, values in s["per_category"].items():
                cells = ", ".join(f"{v} {c['accuracy']:.1f} ({c['total']})" for v, c in values.items())
                lines.append(f"{'':<12} {mode:<15} {axis}: {cells}")
    return "\n".join(lines)


def run(checkpoint, roots, only=None, limit=None, device="cpu", tokenizer=None, **protocol):
    """Evaluate a checkpoint folder on the benchmarks in `roots` (name -> data root) -> (results, records,
    the EvalProtocol used). `tokenizer` names one (default: the checkpoint's). Protocol fields not given come from
    how the checkpoint's model was trained (model.inputs: frame size, system prompt), else the defaults; the
    protocol returned holds the dtype the weights were cast to ("auto": bfloat16 on CUDA, the original
    benchmark's `model.to(bfloat16)`, float32 elsewhere)."""
    if not roots:
        raise ValueError("no benchmark data given: pass --data-config FILE or a data root flag "
                         f"({', '.join('--' + f for f in ROOT_FLAGS.values())})")
    names = only or list(roots)
    missing = [n for n in names if n not in roots]
    if missing:
        raise ValueError(f"no data root for {', '.join(missing)}: give it in --data-config or its flag")
    unknown = [m for m in protocol.get("modes", ()) if m not in MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {unknown}; choose from {MODES}")
    if protocol.get("name", "original") not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol['name']!r}; choose from {PROTOCOLS}")
    if protocol.get("name") == "lmms-eval":
        tasks = {name: lmms_protocol.task(name) for name in names}  # before loading: shards have no lmms-eval task
        protocol = {**LMMS_DEFAULTS, **protocol}
    else:
        tasks = dict.fromkeys(names)
    model, tokenizer, _ = load_checkpoint(checkpoint, device, tokenizer)
    used = model.inputs  # as trained: config.json's, else the training config's, else the original's defaults
    protocol = replace(EvalProtocol(frame_size=used.frame_size, system_prompt=used.system_prompt), **protocol)
    if protocol.dtype == "auto":
        protocol = replace(protocol, dtype="bfloat16" if torch.device(device).type == "cuda" else "float32")
    model.to(getattr(torch, protocol.dtype))
    model.chunk_frames = protocol.chunk_frames
    results, records = {}, {}
    for name in names:
        questions = READERS[name](roots[name], protocol)
        results[name], records[name] = evaluate(model, tokenizer, questions, protocol, limit, name, tasks[name])
    return results, records, protocol


def main(argv=None, args=None):
    args = args or arguments(argv)
    distributed.set_threads(args.threads)
    if args.protocol == "lmms-eval" and (args.scoring or args.yes_no):
        raise ValueError("--scoring and --yes-no belong to the original protocol, not lmms-eval's")
    roots = load_roots(args.data_config, {n: getattr(args, f) for n, f in ROOT_FLAGS.items()})
    if args.heatmap and "NIAH" not in (args.only or roots):
        raise ValueError("--heatmap draws the NIAH benchmark's accuracy: give --niah (or NIAH: in --data-config)")
    flags = {"name": args.protocol, "modes": args.modes and tuple(args.modes), "max_frames": args.max_frames,
             "fps": args.fps, "chunk_frames": args.chunk_frames,
             "scoring": args.scoring, "frame_size": args.frame_size, "batch_size": args.batch_size, "dtype": args.dtype,
             "system_prompt": None if args.system_prompt == "template" else args.system_prompt,
             "yes_no": args.yes_no or None}
    keep = {k: v for k, v in flags.items() if v is not None or (k == "system_prompt" and args.system_prompt)}
    device = str(distributed.pick_device(args.device))
    results, records, protocol = run(args.checkpoint, roots, args.only, args.limit, device, args.tokenizer, **keep)
    print(format_table(results))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            lmms = {"lmms_eval": lmms_protocol.describe(results)} if protocol.name == "lmms-eval" else {}
            json.dump({"checkpoint": args.checkpoint, "protocol": asdict(protocol), **lmms,
                       "benchmarks": results, "questions": records}, f, indent=2)
        print(f"results and per-question records written to {args.out}")
    if args.heatmap:
        from attention_viz import accuracy_heatmap  # matplotlib, only for the picture
        accuracy_heatmap(records["NIAH"], protocol.modes, args.heatmap)
        print(f"accuracy by length and depth drawn in {args.heatmap}")


if __name__ == "__main__":
    cli.run(main, args=ARGS)
