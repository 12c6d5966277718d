r"""fVLM as an lmms-eval model (`fvlm`), and a script that runs lmms-eval's tasks on a checkpoint by handing
lmms-eval an instance (`simple_evaluate(model=FVLM(...))`), so that nothing is installed as a package.

    python lmms_adapter.py --checkpoint checkpoints/stage2_135M --tasks mvbench videomme pope scienceqa_img \
        [--mode autoregressive] [--max-frames 32] [--batch-size 8] [--limit N] [--include-path my_tasks] \
        [--device cuda] [--out results.json]

It needs lmms-eval, in an environment of its own (requirements-lmms.txt; README, lmms-eval). The API followed
is lmms-eval 0.7.3's (lmms_eval/api/model.py):
- `generate_until`: each request's context is the user turn behind the checkpoint's system turn, answered by
  FoveatedVLM.generate (the KV cache) with the request's generation_kwargs (max_new_tokens, temperature / do_sample,
  top_p; num_beams 1 only) and cut at its `until` strings: what benchmark.py --protocol lmms-eval generates.
- `loglikelihood`: each request's continuation (lmms-eval's target_delimiter, a space, dropped: the assistant turn
  starts after its header) is scored as benchmark.py scores an option by default (the original benchmark's mean
  negative log-likelihood of the tokens after the prompt), the value lmms-eval's multiple_choice tasks take the
  argmin of (lmms_eval/api/task.py: its adapters return the mean loss, though the docstring says a
  log-probability), with whether greedy decoding would produce the continuation.
Visuals: a video path is decoded by frames.load_clip (--max-frames, by MVBench's segment rule); PIL images are
frames, one image replicated to 8 frames (as fVLM trains on images), more than --max-frames sampled likewise.
Requests are batched (--batch-size questions per call), on the CPU or CUDA, in one process (lmms-eval's
multi-process launch is not supported).
"""

import json
import os

import cli
import distributed  # before torch: it sets OpenMP's wait policy (README)
import torch
from lmms_eval.api.instance import GenerationResult, unwrap_generation_output
from lmms_eval.api.model import lmms
from lmms_eval.api.registry import register_model
from lmms_eval.evaluator import simple_evaluate
from lmms_eval.tasks import TaskManager
from lmms_eval.utils import make_table
from PIL import Image
from tqdm import tqdm

import eval_readers
import lmms_protocol
from benchmark import question_text, score_batch
from collate import pad_frames
from config import MODES, EvalProtocol
from frames import Media, SkipSample, load_clip, load_image_frames, segment_indices
from model import load_checkpoint

DEFAULT_MAX_NEW_TOKENS = 128  # when a task's generation_kwargs give none (lmms-eval's qwen2_vl default)
# lmms-eval 0.7.x's evaluator passes every model output through unwrap_generation_output (api/instance.py),
# which turns a (float, bool) pair into its str, so multiple_choice tasks stop with "too many values to unpack"
# whatever the model; a GenerationResult is passed through as it is. Wrap the pairs only where that happens.
WRAP_PAIRS = unwrap_generation_output((0.0, False))[0] != (0.0, False)


@register_model("fvlm")
class FVLM(lmms):
    """An fVLM checkpoint folder (a training save_dir: its newest) as an lmms-eval model."""

    def __init__(self, checkpoint, mode="autoregressive", max_frames=lmms_protocol.MAX_FRAMES, batch_size=1,
                 device=None, dtype="auto", tokenizer=None, frame_size=None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":  # benchmark.py's rule: bfloat16 on CUDA (the original benchmark's), float32 elsewhere
            dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
        self.model, self.tokenizer, saved_size = load_checkpoint(checkpoint, device, tokenizer)
        self.model.to(getattr(torch, dtype))
        self.mode = mode
        self.protocol = EvalProtocol(name="lmms-eval", modes=(mode,), max_frames=int(max_frames),
                                     frame_size=int(frame_size or saved_size), batch_size=int(batch_size),
                                     dtype=dtype, system_prompt=self.model.inputs.system_prompt)

    # ---------------------------------------------------------------- visuals
    def _frames(self, request):
        """A request's visuals -> [T, 3, H, W]."""
        _, _, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        visuals = visuals if isinstance(visuals, list) else [visuals]
        where = f"{task} doc {doc_id}"
        p = self.protocol
        try:
            if len(visuals) == 1 and isinstance(visuals[0], str):
                return load_clip(Media(path=visuals[0], rule="segments"), p).frames
        except SkipSample as e:
            raise ValueError(f"{where}: {e}") from None
        if not visuals or not all(isinstance(v, Image.Image) for v in visuals):
            raise ValueError(f"{where}: fvlm reads one video path or PIL images, got "
                             f"{[type(v).__name__ for v in visuals] or 'no visual'}")
        keep = segment_indices(len(visuals), 1, p.max_frames)
        frames = torch.stack([load_image_frames(visuals[i], p.frame_size) for i in keep])  # [T, 3, H, W]
        return frames.expand(p.replicate_image_frames, -1, -1, -1) if len(frames) == 1 else frames

    # ---------------------------------------------------------------- lmms-eval's API
    def generate_until(self, requests):
        """Greedy (or sampled) answers to the requests' contexts, cut at their `until` strings."""
        out, batches = [None] * len(requests), []
        for group in grouped(requests, lambda r: repr(sorted(r.args[1].items()))):  # alike generation_kwargs
            batches += chunks(group, self.protocol.batch_size)
        with tqdm(total=len(requests), desc="fvlm generate_until") as bar:
            for idx in batches:
                kwargs = requests[idx[0]].args[1]
                frames, frame_mask = pad_frames([{"frames": self._frames(requests[i])} for i in idx])
                texts = lmms_protocol.generate(self.model, self.tokenizer, frames, frame_mask,
                                               [requests[i].args[0] for i in idx], self.protocol, self.mode,
                                               **generation(kwargs))
                for i, text in zip(idx, texts):
                    out[i] = text
                bar.update(len(idx))
        return out

    def loglikelihood(self, requests):
        """(the continuation's score: benchmark.py's default option score, lower is likelier; whether greedy
        decoding gives it) per request. The requests of one question (same doc and context) share one pass."""
        out = [None] * len(requests)
        with tqdm(total=len(requests), desc="fvlm loglikelihood") as bar:
            for batch in chunks(grouped(requests, question_key), self.protocol.batch_size):
                for idx, scores, greedy in zip(batch, *self._score([[requests[i] for i in q] for q in batch])):
                    for i, score, g in zip(idx, scores, greedy):
                        out[i] = GenerationResult((score, g)) if WRAP_PAIRS else (score, g)
                bar.update(sum(len(q) for q in batch))
        return out

    def _score(self, questions):
        """Lists of one question's requests -> per question its options' scores, and whether greedy decoding
        gives each option's scored tokens."""
        triples = []
        p = self.protocol
        for reqs in questions:
            ctx, _, _, doc_id, task, _ = reqs[0].args
            options = [continuation(r, self.task_dict).lstrip() for r in reqs]
            q = eval_readers.MCQ(f"{task} doc {doc_id}", ctx, options, -1, None)
            triples.append((q, question_text(self.tokenizer, q, p), self._frames(reqs[0])))
        records = score_batch(self.model, triples, p)
        targets = [text.options for _, text, _ in triples]
        frames, frame_mask = pad_frames([{"frames": f} for _, _, f in triples])
        longest = max(len(t) for ts in targets for t in ts)
        prompts = [q.prompt for q, _, _ in triples]
        greedy = lmms_protocol.generate_ids(self.model, self.tokenizer, frames, frame_mask, prompts, p, self.mode,
                                            longest, eos_token_id=None).tolist()  # [Q, <= longest]
        return ([r["modes"][self.mode]["scores"] for r in records],
                [[g[:len(t)] == t for t in ts] for g, ts in zip(greedy, targets)])

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("fvlm answers single-round tasks (generate_until, loglikelihood)")


def generation(kwargs):
    """lmms-eval generation_kwargs -> lmms_protocol.generate's keywords. Only until, max_new_tokens, temperature,
    do_sample, top_p and num_beams (1) are read; a task's other keys (model-specific ones) are not used."""
    if int(kwargs.get("num_beams") or 1) != 1:
        raise ValueError(f"fvlm decodes greedily or samples; num_beams {kwargs['num_beams']} is not supported")
    until = kwargs.get("until") or ()
    temperature = float(kwargs.get("temperature") or 0.0)
    do_sample = bool(kwargs.get("do_sample", False)) or temperature > 0
    sampling = {"do_sample": True, "temperature": temperature or 1.0,
                "top_p": float(kwargs.get("top_p") or 1.0)} if do_sample else {}
    return {"max_new_tokens": int(kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
            "until": (until,) if isinstance(until, str) else tuple(until), **sampling}


def grouped(requests, key):
    """The requests' indices grouped by key(request), groups and indices in the requests' order."""
    groups = {}
    for i, r in enumerate(requests):
        groups.setdefault(key(r), []).append(i)
    return list(groups.values())


def chunks(items, n):
    """`items` in lists of at most n."""
    return [items[s:s + n] for s in range(0, len(items), n)]


def question_key(request):
    """The requests of one multiple-choice question share their task, split, doc and context."""
    ctx, _, _, doc_id, task, split = request.args
    return task, split, doc_id, ctx


def continuation(request, task_dict):
    """A loglikelihood request's continuation: a string, or (a loglikelihood task's) doc_to_target function."""
    _, target, _, doc_id, task, split = request.args
    return target if isinstance(target, str) else str(target(task_dict[task][split][doc_id]))


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (a training save_dir means its newest)")
    p.add_argument("--tasks", nargs="+", required=True, help="lmms-eval task or group names (mvbench, videomme, "
                   "pope, scienceqa_img, ...; those of --include-path too)")
    p.add_argument("--include-path", help="a folder of task yamls of your own, beside lmms-eval's")
    p.add_argument("--mode", default="autoregressive", choices=MODES)
    p.add_argument("--max-frames", type=int, default=lmms_protocol.MAX_FRAMES,
                   help=f"frames per video (default {lmms_protocol.MAX_FRAMES}, lmms-eval's video adapters' default)")
    p.add_argument("--batch-size", type=int, default=1, help="questions per forward")
    p.add_argument("--limit", type=int, help="the first N questions of each task")
    cli.add_device(p)
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="auto: bfloat16 on CUDA, float32 elsewhere (as benchmark.py)")
    p.add_argument("--tokenizer", help="the LLM's tokenizer (default: the checkpoint's)")
    p.add_argument("--frame-size", type=int, help="frame side in pixels (default: the size the model was trained at)")
    p.add_argument("--out", help="write lmms-eval's results and per-question samples as JSON here")
    cli.add_threads(p)
    args = p.parse_args(argv)
    distributed.set_threads(args.threads)
    device = str(distributed.pick_device(args.device))
    model = FVLM(args.checkpoint, args.mode, args.max_frames, args.batch_size, device, args.dtype, args.tokenizer,
                 args.frame_size)
    results = evaluate(model, args.tasks, args.include_path, args.limit, log_samples=bool(args.out))
    print(make_table(results))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2, default=str)
        print(f"results and per-question samples written to {args.out}")


def evaluate(model, tasks, include_path=None, limit=None, log_samples=True):
    """lmms-eval's simple_evaluate on an FVLM instance -> its results dict ("results", "samples", ...). A task name
    lmms-eval does not know (nor `include_path`'s yamls) is a ValueError."""
    manager = TaskManager(include_path=include_path, model_name="fvlm")
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lmms-eval task(s) {unknown}: `python -m lmms_eval tasks` lists them; "
                         "task yamls of your own go in a folder given as --include-path")
    return simple_evaluate(model=model, tasks=tasks, limit=limit, task_manager=manager, log_samples=log_samples,
                           bootstrap_iters=0)


if __name__ == "__main__":
    cli.run(main)
