r"""MCQ evaluation of a checkpoint on MVBench, Video-MME, ScienceQA (image subset), POPE and the original's
eval shards, in the three inference modes.

Scoring follows the original fVLM benchmark: for each option, the mean cross-entropy of the option's answer
tokens after the chat-formatted question; the lowest wins. `model.score_options` runs DINOv2 once per
question for all modes and options and shares each mode's visual prefix through the LLM's KV cache.

    python benchmark.py --checkpoint checkpoints/stage2_135M --data-config configs/eval_data.yaml \
        [--only MVBench ScienceQA] [--modes coarse_only coarse_fine autoregressive] [--limit N] [--out results.json]
    python benchmark.py --speed          # shared-encoding scoring vs naive per-option re-encoding, 135M shapes
"""

import argparse
import itertools
import json
import os
import time
from collections import Counter, defaultdict

import torch
import yaml
from tqdm import tqdm

import eval_readers
from data import SkipSample
from distributed import autocast, parse_cli, run_cli
from model import MODES, FoveatedVLM
from pretrained import SHAPES, load_checkpoint
from tokenization import answer_ids, prompt_ids

READERS = {
    "MVBench": eval_readers.read_mvbench,
    "Video-MME": eval_readers.read_videomme,
    "ScienceQA": eval_readers.read_scienceqa,
    "POPE": eval_readers.read_pope,
    "shards": eval_readers.read_eval_shards,
}
ROOT_FLAGS = {"MVBench": "mvbench", "Video-MME": "videomme", "ScienceQA": "scienceqa", "POPE": "pope",
              "shards": "shards"}
WARN_SKIPS = 3  # name the first few skipped questions, then only count them


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


def option_scores_naive(model, frames, prompt, options, modes):
    """The naive reference: one full forward (DINO included) per option and mode -> {mode: [n_options]}."""
    out = {}
    for mode in modes:
        scores = []
        for option in options:
            ids = torch.tensor([prompt + option], device=frames.device)
            loss_mask = torch.zeros_like(ids)
            loss_mask[0, len(prompt):] = 1
            result = model(frames, ids, torch.ones_like(ids), loss_mask=loss_mask, mode=mode, return_logits=False)
            scores.append(result["loss"].float())
        out[mode] = torch.stack(scores)
    return out


@torch.no_grad()
def evaluate(model, tokenizer, questions, modes=MODES, max_frames=64, frame_size=224, limit=None, desc="eval"):
    """Score MCQ questions in every mode -> result dict (see `summarize`). Skips never count as answers."""
    device = next(model.parameters()).device
    if limit is not None:
        questions = list(itertools.islice(questions, limit))
    total = len(questions) if hasattr(questions, "__len__") else None
    answered, skipped, yes_no, start = [], Counter(), True, time.perf_counter()
    for q in tqdm(questions, desc=desc, total=total, unit="q"):
        try:
            frames = eval_readers.load_media(q.media, max_frames, frame_size)
        except SkipSample as e:
            if sum(skipped.values()) < WARN_SKIPS:
                tqdm.write(f"{desc}: skipping {q.qid}: {e}")
            skipped[e.reason] += 1
            continue
        frames = frames.unsqueeze(0).to(device)  # [1, T, 3, H, W]
        prompt = prompt_ids(tokenizer, q.prompt)
        options = [answer_ids(tokenizer, q.prompt, o) for o in q.options]
        with autocast(device):
            scores = model.score_options(frames, prompt, options, modes=tuple(modes))
        preds = {m: int(torch.argmin(scores[m]).item()) for m in modes}
        answered.append((q.answer, q.categories, preds))  # not q: its media may hold the frames' bytes
        yes_no = yes_no and q.options == eval_readers.YES_NO
    return summarize(answered, modes, skipped, time.perf_counter() - start, yes_no and bool(answered))


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


def summarize(answered, modes, skipped, seconds, yes_no=False):
    """answered: (answer, categories, {mode: prediction}) per question -> per mode: accuracy, counts and
    per-category accuracy, plus the yes/no metrics when the questions are yes/no; skips by reason; speed."""
    result = {"questions": len(answered) + sum(skipped.values()), "answered": len(answered),
              "skipped": sum(skipped.values()), "skip_reasons": dict(skipped), "seconds": seconds,
              "questions_per_s": len(answered) / seconds if seconds > 0 else 0.0, "modes": {}}
    for mode in modes:
        by_cat = defaultdict(lambda: defaultdict(lambda: [0, 0]))
        for answer, categories, preds in answered:
            for axis, value in categories.items():
                by_cat[axis][str(value)][0] += preds[mode] == answer
                by_cat[axis][str(value)][1] += 1
        stats = _accuracy(sum(preds[mode] == answer for answer, _, preds in answered), len(answered))
        stats["per_category"] = {axis: {v: _accuracy(*ct) for v, ct in sorted(values.items())}
                                 for axis, values in by_cat.items()}
        if yes_no:
            stats.update(pope_metrics([p[mode] for _, _, p in answered], [a for a, _, _ in answered]))
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


def run(checkpoint, roots, only=None, modes=MODES, limit=None, max_frames=64, frame_size=None, device="cpu"):
    """Evaluate a checkpoint folder on the benchmarks in `roots` (name -> data root) -> results dict."""
    names = only or list(roots)
    missing = [n for n in names if n not in roots]
    if missing:
        raise ValueError(f"no data root for {', '.join(missing)}: give it in --data-config or its flag")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {unknown}; choose from {MODES}")
    model, tokenizer, saved_size = load_checkpoint(checkpoint, device)
    frame_size = frame_size or saved_size
    results = {}
    for name in names:
        questions = READERS[name](roots[name])
        results[name] = evaluate(model, tokenizer, questions, modes, max_frames, frame_size, limit, desc=name)
    return results


def _best_times(fns, repeats):
    """{name: fastest of `repeats` runs in seconds} and {name: last result}. The runs are interleaved and
    the minimum kept, so work by other processes on a shared machine disturbs both sides alike and little."""
    best, out = {name: float("inf") for name in fns}, {}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            out[name] = fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, out


@torch.no_grad()
def speed_report(num_frames=16, num_options=4, prompt_len=60, option_len=8, modes=MODES, repeats=3, seed=0):
    """Questions/s of shared scoring (`score_options`) vs the naive per-option, per-mode forward, for one
    video question and one replicated-image question at the 135M shapes on this machine's CPU."""
    torch.manual_seed(seed)
    model = FoveatedVLM(llm_config=SHAPES["smollm2-135m"], dino_config=SHAPES["dinov2-small"]).eval()
    prompt = torch.randint(3, 49152, (prompt_len,)).tolist()
    options = [torch.randint(3, 49152, (option_len,)).tolist() for _ in range(num_options)]
    inputs = {f"{num_frames}-frame video": torch.randn(1, num_frames, 3, 224, 224),
              "image x8": torch.randn(1, 1, 3, 224, 224).expand(1, 8, -1, -1, -1)}
    lines = [f"MCQ scoring, 135M shapes (random weights), CPU {torch.get_num_threads()} threads, "
             f"{num_options} options x {len(modes)} modes, best of {repeats}"]
    for name, frames in inputs.items():
        t, scores = _best_times({
            "shared": lambda: model.score_options(frames, prompt, options, tuple(modes)),
            "naive": lambda: option_scores_naive(model, frames, prompt, options, modes),
            "naive, no frame dedup": lambda: _without_dedup(model, option_scores_naive, frames, prompt, options,
                                                            modes)}, repeats)
        diff = max((scores["shared"][m] - scores["naive"][m]).abs().max().item() for m in modes)
        lines.append(f"{name:<16} shared {1 / t['shared']:.3f} q/s | naive (a forward per option and mode) "
                     f"{1 / t['naive']:.3f} q/s: {t['naive'] / t['shared']:.1f}x | the same re-encoding every "
                     f"frame {1 / t['naive, no frame dedup']:.3f} q/s: {t['naive, no frame dedup'] / t['shared']:.1f}x"
                     f"  (max score difference {diff:.1e})")
    return "\n".join(lines)


def _without_dedup(model, fn, *args):
    """fn(model, *args) with the model's frame dedup off (the original's per-forward re-encoding)."""
    model.dedup_frames = False
    try:
        return fn(model, *args)
    finally:
        model.dedup_frames = True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="checkpoint folder (model.save_pretrained / train.py output)")
    p.add_argument("--data-config", help="YAML mapping benchmark name -> data root")
    for name, flag in ROOT_FLAGS.items():
        p.add_argument(f"--{flag}", help=f"{name} data root (overrides --data-config)")
    p.add_argument("--only", nargs="+", choices=list(READERS), help="benchmarks to run (default: all given)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--limit", type=int, help="score only the first N questions of each benchmark")
    p.add_argument("--max-frames", type=int, default=64)
    p.add_argument("--frame-size", type=int, help="frame side in pixels (default: the checkpoint's training config)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--speed", action="store_true", help="time shared vs naive scoring (random 135M shapes)")
    args = parse_cli(p, argv)
    if args.speed:
        print(speed_report())
        return
    if not args.checkpoint:
        p.error("--checkpoint is required (or --speed)")
    roots = load_roots(args.data_config, {n: getattr(args, f) for n, f in ROOT_FLAGS.items()})
    results = run(args.checkpoint, roots, args.only, args.modes, args.limit, args.max_frames, args.frame_size,
                  args.device)
    print(format_table(results))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"checkpoint": args.checkpoint, "benchmarks": results}, f, indent=2)
        print(f"results written to {args.out}")


if __name__ == "__main__":
    run_cli(main)
