"""Speed of fVLM on this machine, one entry point:

    python bench.py throughput --config configs/stage1_135M.yaml --shapes 135M [--steps 5] [--batch-size 2]
    python bench.py step [--shapes 1.7B] [--repeats 5] [--threads 2]     # training step vs the irreducible work
    python bench.py scoring [--repeats 3] [--batch-size 8]                # MCQ scoring, questions/s
    python bench.py memory --config configs/stage1_1.7B.yaml [--gpu-gb 80]  # GPU memory of a step (memory.py)

- throughput: samples/s of a config's training step, seconds per step split into data, DINO, LLM and optimizer
  time, and model FLOP utilisation (MFU: FLOPs of one forward+backward counted by torch.utils.flop_counter /
  step time / this machine's best measured 4096^2 matmul rate, float32 on the CPU, bf16 on CUDA). The step is
  train.py's, built by its functions: the model from init_from or the config, its freeze_* switches, the DPO
  reference, the wrapper, the optimizer's groups, the loss type and dtype, training.threads (--threads wins);
  one micro-batch (grad_accum is not simulated). Data: the config's train_shards through train.py's loader when
  they exist, else random batches of --batch-size x --frames frames x --text-tokens tokens (DPO: a chosen and a
  rejected text of that length; data time ~0). DINO time is the patch encoder's forward (+backward where
  trained, + the DPO reference's forward) on the same frames outside the step; "LLM" is the rest.
- step: one coarse_fine forward+backward (a) of 2 images replicated to 8 frames and (b) of one 16-frame video,
  64 text tokens each, against the irreducible work measured in the same process with the same backbones
  called as plain transformers modules: DINOv2 forward+backward on the distinct frames, and the LLM's
  forward+backward over the T+S tokens (cross-entropy on the S text positions) and over the T visual tokens.
  Also the step with frame dedup defeated (every frame a slightly different copy).
- scoring: 4 options x 3 modes per question for an image replicated to 8 frames and a 16-frame video:
  `option_nll` (DINO once per question, one LLM pass per mode) at batch 1 and at --batch-size questions per
  call, against the naive way (one full forward per option and mode, every frame encoded each time).
Every command is quick by default (about a minute on a laptop CPU: smaller frames, fewer rounds, batch 1; it says
what it shrank) and prints its progress as it goes; `--full` runs the full measurement (the README's figures).
`--shapes 135M|1.7B` builds the real architecture with random weights (pretrained.SHAPES, no download; in
throughput it replaces init_from's or the config's model, and the rest of the config applies); 1.7B in float32
takes 6.8 GB of weights, ~27 GB with gradients and AdamW's states (throughput). Every comparison is timed
alternating (one round runs each variant once, after a warm-up round) and reports the median and the spread of
the per-round ratios, so a change in the machine's load hits all variants alike.
"""

import argparse

import cli
from config import CHUNK_FRAMES, FRAME_SIZE, MODES

MODEL_SHAPES = {"135M": ("smollm2-135m", "dinov2-small"), "1.7B": ("smollm2-1.7b", "dinov2-small")}
QUICK = {"frame_size": 112, "repeats": 2, "scoring_repeats": 1, "scoring_batch": 4, "steps": 2, "batch_size": 1,
         "frames": 8}
FULL = {"frame_size": 224, "repeats": 5, "scoring_batch": 8, "steps": 3}  # throughput: the config's batch and frames
LONG_LENGTHS = (64, 256, 1024, 3600)  # --full: frames at 1 fps, from a minute to an hour
LONG_QUICK = (64, 256)
EDGE_FRAMES = 256  # bench.py long compares encoding over a run's first and last this many frames
LONG_PROMPT, LONG_ANSWER, LIVE_FRAMES = 40, 16, 16  # prompt and answer tokens; frames added one at a time at the end


def arguments(argv=None):
    p = cli.parser(__doc__)
    common = argparse.ArgumentParser(add_help=False)
    cli.add_threads(common)
    common.add_argument("--shapes", choices=list(MODEL_SHAPES), help="real architecture, random weights (step and "
                        "scoring: default 135M)")
    common.add_argument("--text-tokens", type=int, default=64, help="text tokens per random sample")
    common.add_argument("--full", action="store_true", help="the full measurement (default: a quick one, about a "
                        "minute on a laptop CPU)")
    timed = argparse.ArgumentParser(add_help=False, parents=[common])  # the alternating comparisons' flags
    cli.add_device(timed)
    timed.add_argument("--frame-size", type=int, help=f"quick {QUICK['frame_size']}, full {FULL['frame_size']}")
    timed.add_argument("--repeats", type=int, help=f"timed rounds after one warm-up round (quick {QUICK['repeats']}, "
                       f"scoring {QUICK['scoring_repeats']}; full {FULL['repeats']})")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("throughput", parents=[common], help="samples/s, step split and MFU of a config's step")
    t.add_argument("--config", required=True)
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    t.add_argument("--steps", type=int, help=f"timed steps after one warm-up step (quick {QUICK['steps']}, full "
                   f"{FULL['steps']})")
    t.add_argument("--batch-size", type=int, help=f"override training.batch_size (quick {QUICK['batch_size']})")
    t.add_argument("--frames", type=int, help=f"frames per random sample (quick at most {QUICK['frames']}, full "
                   "data.max_frames)")
    t.add_argument("--random-data", action="store_true", help="random batches even when the shards exist")
    sub.add_parser("step", parents=[timed], help="training step vs the irreducible work, frame dedup on/off")
    c = sub.add_parser("scoring", parents=[timed], help="MCQ scoring: batch 1 vs N vs the naive per-option forward")
    c.add_argument("--batch-size", type=int, help=f"questions per option_nll call (quick {QUICK['scoring_batch']}, "
                   f"full {FULL['scoring_batch']})")
    c.add_argument("--prompt-tokens", type=int, default=60)
    c.add_argument("--option-tokens", type=int, default=8)
    m = sub.add_parser("memory", help="peak GPU memory of a config's training step per batch kind, and whether it "
                       "fits (measured on meta tensors: no GPU needed)")
    m.add_argument("--config", required=True)
    m.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    m.add_argument("--gpu-gb", type=float, default=80.0, help="the card's memory in GiB (default 80)")
    m.add_argument("--shapes", choices=list(MODEL_SHAPES), help="the architecture, when init_from does not exist "
                   "yet (default: init_from's, else the config's llm and dino)")
    m.add_argument("--world-size", type=int, default=8, help="GPUs on a node, for the node's shared memory")
    add_long_args(sub, common)
    return p.parse_args(argv)


def add_long_args(sub, common):
    g = sub.add_parser("long", parents=[common], help="long videos: decode, encode and answer, per mode and length "
                       "(a process each): seconds, frames/s, CPU seconds, peak resident memory, machine load")
    g.add_argument("--frames", type=int, nargs="+", help=f"lengths at 1 fps (default {LONG_QUICK}; --full: "
                   f"{LONG_LENGTHS}, about an hour of CPU)")
    g.add_argument("--modes", nargs="+", choices=MODES, help="default: all three")
    g.add_argument("--chunk-frames", type=int, help="frames decoded and encoded at a time (default: "
                   + ", ".join(f"{n} on {device}" for device, n in CHUNK_FRAMES.items()) + ")")
    cli.add_device(g)
    g.add_argument("--frame-size", type=int, default=FRAME_SIZE)
    g.add_argument("--video-dir", default="/tmp/fvlm_bench", help="where the test videos are written (once)")
    g.add_argument("--child", help=argparse.SUPPRESS)  # LENGTH:PHASE, run in a process of its own


if __name__ == "__main__":  # parse before torch loads: --help and a flag error answer at once
    ARGS = arguments()

import dataclasses  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Optional  # noqa: E402

import distributed  # noqa: E402  before torch: it sets OpenMP's wait policy, which torch reads once when it loads
import av  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import checkpoint  # noqa: E402
import config as config_lib  # noqa: E402
import memory  # noqa: E402
import train  # noqa: E402
from collate import collate  # noqa: E402
from config import FrameConfig, ModelSettings  # noqa: E402
from frames import stream_clip  # noqa: E402
from model import FoveatedVLM  # noqa: E402
from pretrained import SHAPES, check_backbone_configs, load_tokenizer  # noqa: E402
from streaming import chunk_size  # noqa: E402

VOCAB = SHAPES["smollm2-135m"]["vocab_size"]


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def alternate(fns, repeats, dev, label=""):
    """{name: [seconds of each round]}: every round runs each fn once, after one warm-up round; each round's times
    are printed as it ends."""
    times = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        took = {}
        for name, fn in fns.items():
            sync(dev)
            start = time.perf_counter()
            fn()
            sync(dev)
            took[name] = time.perf_counter() - start
            if round_:
                times[name].append(took[name])
        which = f"round {round_}/{repeats}" if round_ else "warm-up"
        print(f"  {label} {which}: " + ", ".join(f"{k} {v:.2f} s" for k, v in took.items()), flush=True)
    return times


def ratio(times, a, b):
    """'median [min-max]' of the per-round ratios times[a] / times[b]."""
    r = sorted(x / y for x, y in zip(times[a], times[b]))
    return f"{statistics.median(r):.2f}x [{r[0]:.2f}-{r[-1]:.2f}]"


def at_shapes(settings, shapes, frame_size):
    """The model of `settings` (ModelSettings or config.ModelConfig) with the real architecture `shapes` (a key of
    MODEL_SHAPES) and random weights."""
    llm, dino = MODEL_SHAPES[shapes]
    settings = dataclasses.replace(ModelSettings.of(settings), llm=None, dino=None, llm_config=dict(SHAPES[llm]),
                                   dino_config=dict(SHAPES[dino], image_size=frame_size))
    return FoveatedVLM.from_config(settings)


def random_frames(*shape, generator=None):
    """Random ImageNet-normalised-range frames [..., 3, H, W]."""
    return torch.rand(*shape, generator=generator) * 4 - 2


def distinct(frames):
    """Copies of frames [B, T, 3, H, W] that differ by 1e-3 from frame to frame: the model's dedup sees no repeat."""
    return frames + 1e-3 * torch.arange(frames.shape[1], device=frames.device).view(1, -1, 1, 1, 1)


# ---------------------------------------------------------------- step vs irreducible work
def irreducible(model, frames, n_text):
    """The work a coarse_fine step cannot avoid, as plain transformers calls on the model's own backbones: DINOv2
    forward+backward on the distinct frames, the LLM forward+backward over T+S tokens (cross-entropy on the text
    positions only) and over the T visual tokens."""
    B, T = frames.shape[:2]
    unique = torch.unique_consecutive(frames.flatten(0, 1), dim=0)
    model.encoder.dino(pixel_values=unique).last_hidden_state.sum().backward()
    D, dev = model.llm.config.hidden_size, frames.device
    embeds = torch.randn(B, T + n_text, D, device=dev, requires_grad=True)
    logits = model.llm(inputs_embeds=embeds, logits_to_keep=n_text).logits  # [B, S, V]
    targets = torch.randint(3, VOCAB, (B * (n_text - 1),), device=dev)
    F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets).backward()
    visual = torch.randn(B, T, D, device=dev, requires_grad=True)
    model.llm.base_model(inputs_embeds=visual).last_hidden_state.sum().backward()
    model.zero_grad(set_to_none=True)


def step(model, frames, input_ids):
    model(frames, input_ids, mode="coarse_fine", return_logits=False)["loss"].backward()
    model.zero_grad(set_to_none=True)


def step_report(model, args, dev):
    g = torch.Generator().manual_seed(0)
    S, size = args.text_tokens, args.frame_size
    images = random_frames(2, 1, 3, size, size, generator=g).expand(2, 8, 3, size, size).contiguous()
    cases = {"(a) 2 images x 8 frames": images,
             "(b) 1 video x 16 frames": random_frames(1, 16, 3, size, size, generator=g)}
    lines = [f"training step (coarse_fine, forward+backward), {S} text tokens, {args.repeats} alternating rounds: "
             "median [spread] of the per-round ratio"]
    for name, frames in cases.items():
        frames = frames.to(dev)
        ids = torch.randint(3, VOCAB, (frames.shape[0], S), generator=g).to(dev)
        fns = {"step": lambda: step(model, frames, ids), "irreducible": lambda: irreducible(model, frames, S),
               "no dedup": lambda: step(model, distinct(frames), ids)}
        t = alternate(fns, args.repeats, dev, name)
        med = {k: statistics.median(v) for k, v in t.items()}
        lines.append(f"{name:<26} step {med['step']:.3f} s, irreducible {med['irreducible']:.3f} s: "
                     f"{ratio(t, 'step', 'irreducible')} | dedup off {med['no dedup']:.3f} s: "
                     f"{ratio(t, 'no dedup', 'step')} slower")
    return "\n".join(lines)


# ---------------------------------------------------------------- MCQ scoring
def naive_scores(model, frames, prompt, options, reencode=True):
    """One full forward per option and mode, every frame encoded each time with `reencode` (the original's cost)
    -> {mode: mean NLL per option}."""
    frames = distinct(frames) if reencode else frames
    out = {}
    for mode in MODES:
        losses = []
        for option in options:
            ids = torch.tensor([prompt + option], device=frames.device)
            loss_mask = (torch.arange(ids.shape[1], device=frames.device) >= len(prompt)).long()[None]
            losses.append(model(frames, ids, loss_mask=loss_mask, mode=mode, return_logits=False)["loss"])
        out[mode] = torch.stack(losses)
    return out


def scoring_report(model, args, dev):
    g = torch.Generator().manual_seed(0)
    N, size = args.batch_size, args.frame_size
    prompt = torch.randint(3, VOCAB, (args.prompt_tokens,), generator=g).tolist()
    options = [torch.randint(3, VOCAB, (args.option_tokens,), generator=g).tolist() for _ in range(4)]
    cases = {"image x8": random_frames(N, 1, 3, size, size, generator=g).expand(N, 8, 3, size, size),
             "video x16": random_frames(N, 16, 3, size, size, generator=g)}
    lines = [f"MCQ scoring: 4 options x {len(MODES)} modes, prompt {len(prompt)} + option {len(options[0])} tokens, "
             f"{args.repeats} alternating rounds; per question, median [spread] of the per-round ratio"]
    with torch.no_grad():
        for name, frames in cases.items():
            frames = frames.to(dev)
            one = frames[:1]
            fns = {"batch 1": lambda: model.option_nll(one, [prompt], [options], MODES),
                   f"batch {N}": lambda: model.option_nll(frames, [prompt] * N, [options] * N, MODES),
                   "naive": lambda: naive_scores(model, one, prompt, options)}
            t = alternate(fns, args.repeats, dev, name)
            t[f"batch {N}"] = [s / N for s in t[f"batch {N}"]]  # per question
            shared = model.score_options(one, prompt, options, MODES)
            naive = naive_scores(model, one, prompt, options, reencode=False)
            diff = max((shared[m] - naive[m]).abs().max().item() for m in MODES)
            q_s = {k: 1 / statistics.median(v) for k, v in t.items()}
            lines.append(f"{name:<10} batch 1: {q_s['batch 1']:.3f} q/s | batch {N}: {q_s[f'batch {N}']:.3f} q/s "
                         f"({ratio(t, 'batch 1', f'batch {N}')}) | naive: {q_s['naive']:.3f} q/s, batch 1 is "
                         f"{ratio(t, 'naive', 'batch 1')} faster | max |score - naive| {diff:.1e}")
    return "\n".join(lines)


# ---------------------------------------------------------------- training throughput
def matmul_peak(dev, n=4096, repeats=5):
    """Best measured FLOP/s of an n x n matmul (float32 on the CPU, bf16 on CUDA)."""
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(dev)
        start = time.perf_counter()
        a @ b
        sync(dev)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def random_samples(batch_size, frames, text_tokens, frame_size, vocab, dpo=False, generator=None):
    """One batch's samples of random video (uint8 pixels, as the loader gives) and text. CE: the loss on every
    token. DPO: a chosen and a rejected text of `text_tokens` each, one prompt (the first half) and two answers
    (the second half, where the loss mask is)."""
    samples = []
    for _ in range(batch_size):
        pixels = torch.randint(0, 256, (frames, 3, frame_size, frame_size), dtype=torch.uint8, generator=generator)
        ids = torch.randint(3, vocab, (text_tokens,), generator=generator)  # [S]
        if not dpo:
            samples.append({"frames": pixels, "input_ids": ids, "loss_mask": torch.ones_like(ids)})
            continue
        answer = (torch.arange(text_tokens) >= text_tokens // 2).long()  # [S]
        rejected = torch.where(answer.bool(), torch.randint(3, vocab, ids.shape, generator=generator), ids)
        samples.append({"frames": pixels, "chosen_ids": ids, "chosen_loss_mask": answer, "rejected_ids": rejected,
                        "rejected_loss_mask": answer})
    return samples


def random_batches(batch_size, frames, text_tokens, frame_size, vocab, dpo=False):
    """Endless identical-shape batches of random_samples, collated as the loader collates: measures the model, not
    the loader."""
    g = torch.Generator().manual_seed(0)
    while True:
        yield collate(random_samples(batch_size, frames, text_tokens, frame_size, vocab, dpo, g), pad_id=0)


@dataclasses.dataclass
class Setup:
    """What a timed step works with, built as train.main builds it."""
    cfg: config_lib.Config
    dev: torch.device
    model: FoveatedVLM  # unwrapped
    reference: Optional[FoveatedVLM]  # DPO's frozen reference, else None
    step_module: torch.nn.Module  # train.wrap's: what the forward goes through
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler


def dino_seconds(s, batch):
    """Time of the DINO patch encoder alone on this batch's (deduplicated) frames: the policy's forward, and its
    backward where anything it outputs is trained; for DPO also the reference's forward."""
    sync(s.dev)
    start = time.perf_counter()
    kv, _, _ = train.encode(s.model, batch)
    if kv is not None:
        outs = [t for t in (kv.features, *kv.keys, *kv.values) if t is not None and t.requires_grad]
        if outs:
            torch.autograd.backward([o.float().sum() for o in outs])
    if s.reference is not None:
        with torch.no_grad():
            train.encode(s.reference, batch)
    sync(s.dev)
    s.model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def timed_step(s, batches):
    """One training step as train.train_step runs it (one micro-batch) -> ({data, fwd_bwd, dino, optimizer}
    seconds, the batch)."""
    times = {}
    start = time.perf_counter()
    batch = train.to_device(next(batches), s.dev)
    times["data"] = time.perf_counter() - start
    sync(s.dev)
    start = time.perf_counter()
    with distributed.autocast(s.dev, s.cfg.training.dtype):
        loss, _ = train.compute_loss(s.step_module, s.reference, batch, s.cfg)
    s.scaler.scale(loss).backward()
    sync(s.dev)
    times["fwd_bwd"] = time.perf_counter() - start
    start = time.perf_counter()
    s.scaler.unscale_(s.optimizer)
    torch.nn.utils.clip_grad_norm_(trained(s.optimizer), s.cfg.training.max_grad_norm)
    s.scaler.step(s.optimizer)
    s.scaler.update()
    s.optimizer.zero_grad(set_to_none=True)
    sync(s.dev)
    times["optimizer"] = time.perf_counter() - start
    with distributed.autocast(s.dev, s.cfg.training.dtype):
        times["dino"] = dino_seconds(s, batch)
    return times, batch


def trained(optimizer):
    return [p for g in optimizer.param_groups for p in g["params"]]


def step_flops(s, batch):
    with FlopCounterMode(display=False) as counter:
        with distributed.autocast(s.dev, s.cfg.training.dtype):
            loss, _ = train.compute_loss(s.step_module, s.reference, batch, s.cfg)
        loss.backward()
    s.model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def batches_for(cfg, args, dev, vocab):
    shards = config_lib.globs(cfg.data.train_shards)
    if shards and all(glob.glob(p) for p in shards) and not args.random_data:
        tok = load_tokenizer(checkpoint.tokenizer_source(cfg.model))
        dist = distributed.Dist(0, 0, 1, dev)
        return train.build_loader(cfg, tok, dist, cfg.data.train_shards, train=True), "config's train_shards"
    frames = args.frames or cfg.data.max_frames
    dpo = cfg.loss.type == "dpo"
    return (random_batches(cfg.training.batch_size, frames, args.text_tokens, cfg.data.frame_size, vocab, dpo),
            f"random batches: {frames} frames x {args.text_tokens} tokens{' (chosen and rejected)' if dpo else ''}")


def peak_gb(dev):
    """The process's peak resident memory so far (and CUDA's peak allocation on a GPU), as text."""
    text = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB resident"
    return text + (f", {torch.cuda.max_memory_allocated() / 2**30:.2f} GB CUDA" if dev.type == "cuda" else "")


def report(s, times, flops, peak, source, memory):
    cfg, n = s.cfg, len(times)
    mean = {k: sum(t[k] for t in times) / n for k in times[0]}
    step = mean["data"] + mean["fwd_bwd"] + mean["optimizer"]
    llm = max(0.0, mean["fwd_bwd"] - mean["dino"])
    params = s.model.count_parameters()
    parts = [name for name, group in s.model.param_groups().items() if group]
    lines = [
        f"bench: {params['total'] / 1e6:.1f}M params (dino {params['dino'] / 1e6:.1f}M, llm {params['llm'] / 1e6:.1f}M)"
        f", {sum(p.numel() for p in trained(s.optimizer)):,} trained ({', '.join(parts)}) | loss {cfg.loss.type} | "
        f"batch {cfg.training.batch_size} | {source} | {s.dev} ({torch.get_num_threads()} threads) | {n} steps",
        f"samples/s      {cfg.training.batch_size / step:.3f}",
        f"s/step         {step:.3f}  = data {mean['data']:.3f} + DINO {mean['dino']:.3f} + LLM {llm:.3f}"
        f" + optimizer {mean['optimizer']:.3f}",
        f"model FLOPs    {flops / 1e9:.1f} GFLOP per step (forward+backward)",
        f"matmul peak    {peak / 1e9:.1f} GFLOP/s measured",
        f"MFU            {100 * flops / (mean['fwd_bwd'] + mean['optimizer'] + mean['data']) / peak:.1f}%",
        f"peak memory    {memory} (the training steps, before the FLOP count)",
    ]
    return "\n".join(lines)


def setup(cfg, shapes):
    """The model, DPO reference, wrapped step module, optimizer and loss scaler train.main would build for `cfg`;
    with `shapes`, the policy has random weights at those sizes instead of init_from's or the config's."""
    init = cfg.model.init_from
    if not shapes and init is not None and not os.path.isdir(init):
        raise config_lib.ConfigError(f"'model.init_from' does not exist: {init} (--shapes times random weights)")
    dist = distributed.init(cfg.training.seed, cfg.training.device)
    policy = at_shapes(cfg.model, shapes, cfg.data.frame_size) if shapes else None
    model, reference = train.build_model(cfg, dist.device, policy)
    return Setup(cfg, dist.device, model, reference, train.wrap(model, cfg, dist),
                 train.build_optimizer(model, cfg.training), distributed.grad_scaler(dist.device, cfg.training.dtype))


def quick_throughput(cfg, args):
    """The --set overrides and flags of a quick throughput run (batch 1, at most 8 frames of random data, 2 steps),
    each only where not given, and the line saying so; none with --full."""
    if args.full:
        return [], ""
    sets, shrunk = [], []
    if args.batch_size is None and cfg.training.batch_size > QUICK["batch_size"]:
        sets.append(f"training.batch_size={QUICK['batch_size']}")
        shrunk.append(f"batch {QUICK['batch_size']} (config {cfg.training.batch_size})")
    if args.frames is None and (cfg.data.max_frames or QUICK["frames"] + 1) > QUICK["frames"]:
        args.frames, args.random_data = QUICK["frames"], True
        shrunk.append(f"random batches of {QUICK['frames']} frames (config up to {cfg.data.max_frames})")
    args.steps = args.steps or QUICK["steps"]
    note = f"quick run: {', '.join(shrunk + [f'{args.steps} timed steps'])}; --full for the config's own"
    return sets, note


def throughput(args):
    sets = args.set + ([f"training.batch_size={args.batch_size}"] if args.batch_size else [])
    cfg = config_lib.load(args.config, sets)
    quick, note = quick_throughput(cfg, args)
    if quick:
        cfg = config_lib.load(args.config, sets + quick)
    args.steps = args.steps or FULL["steps"]
    if note:
        print(note, flush=True)
    check_backbone_configs(cfg.model, config_lib.source_name(args.config, sets))
    distributed.set_threads(args.threads if args.threads is not None else cfg.training.threads)
    start = time.perf_counter()
    s = setup(cfg, args.shapes)
    batches, source = batches_for(cfg, args, s.dev, s.model.llm.config.vocab_size)
    print(f"  built the model, optimizer and data in {time.perf_counter() - start:.1f} s; measuring the matmul "
          "peak", flush=True)
    peak = matmul_peak(s.dev)
    times, batch = [], None
    for i in range(args.steps + 1):  # the first is a warm-up
        took, batch = timed_step(s, batches)
        print(f"  {'warm-up' if not i else f'step {i}/{args.steps}'}: "
              f"{took['data'] + took['fwd_bwd'] + took['optimizer']:.2f} s, peak memory so far {peak_gb(s.dev)}",
              flush=True)
        times += [took] if i else []
    memory = peak_gb(s.dev)
    print("  counting the step's FLOPs", flush=True)
    return report(s, times, step_flops(s, batch), peak, source, memory)


# ---------------------------------------------------------------- GPU memory of a config's step (memory.py)
def memory_command(args):
    cfg = config_lib.load(args.config, args.set)
    settings = memory.model_settings(cfg, MODEL_SHAPES.get(args.shapes))
    return memory.report(cfg, settings, args.gpu_gb, args.world_size)


# ---------------------------------------------------------------- long videos


def long_video(folder, seconds, width=640, height=360, fps=30):
    """The mp4 of `seconds` seconds that `bench.py long` decodes: H.264 at width x height and `fps` (FFmpeg's
    testsrc pattern: a moving colour chart and a counter, ~1 Mbit/s, as web video at 360p), written once."""
    path = os.path.join(folder, f"testsrc_{seconds}s_{height}p{fps}.mp4")
    if os.path.exists(path):
        return path
    os.makedirs(folder, exist_ok=True)
    graph = av.filter.Graph()
    nodes = [graph.add("testsrc", f"size={width}x{height}:rate={fps}:duration={seconds}"),
             graph.add("format", "yuv420p"), graph.add("buffersink")]
    for a, b in zip(nodes, nodes[1:]):
        a.link_to(b)
    graph.configure()
    with av.open(path + ".part", "w", format="mp4") as c:
        stream = c.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "32"}
        for _ in range(seconds * fps):
            frame = graph.pull()
            frame.pts = None
            c.mux(stream.encode(frame))
        c.mux(stream.encode())
    os.replace(path + ".part", path)
    return path


def usage(clock):
    """Wall and CPU seconds since `clock` ((perf_counter, process_time)), the process's peak resident memory (GB)
    and the machine's load (1-minute average)."""
    return {"seconds": time.perf_counter() - clock[0], "cpu": time.process_time() - clock[1],
            "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "load": os.getloadavg()[0]}


def long_child(args):
    """One length and one phase (`decode`, or a mode: decode + encode + answer + live frames) in this process ->
    a dict of figures."""
    frames, phase = args.child.split(":")
    frames, dev, clock = int(frames), distributed.pick_device(args.device), (time.perf_counter(), time.process_time())
    video = long_video(args.video_dir, frames)
    cfg = FrameConfig(frame_size=args.frame_size, max_frames=None, chunk_frames=args.chunk_frames)
    chunk = chunk_size(args.chunk_frames, dev)
    if phase == "decode":
        n = sum(c.shape[0] for c in stream_clip(video, cfg, chunk))
        return {"frames": n, "decode": usage(clock)}
    torch.manual_seed(0)
    model = at_shapes(ModelSettings(), args.shapes or "135M", args.frame_size).to(dev).eval()
    if dev.type == "cuda":
        model.to(torch.bfloat16)
    stream = model.stream(phase, args.chunk_frames)
    with distributed.autocast(dev):
        read = stream.read(stream_clip(video, cfg, chunk), total=frames, desc=f"{frames} frames, {phase}")
        out = {"frames": stream.length, "read": usage(clock), **read}
        clock = (time.perf_counter(), time.process_time())
        stream.generate(torch.randint(3, VOCAB, (LONG_PROMPT,)), max_new_tokens=LONG_ANSWER)
        out["answer"] = usage(clock)
        clock = (time.perf_counter(), time.process_time())
        for frame in random_frames(LIVE_FRAMES, 3, args.frame_size, args.frame_size).to(dev):
            stream.add_frames(frame[None])
        out["live"] = usage(clock)
    if dev.type == "cuda":
        out["cuda_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    out["cache_gb"] = stream.cache_bytes() / 2**30
    return out


def long_report(args):
    """Every length and phase in a process of its own (peak memory only grows within one): a table, then the
    figures the README's goals name."""
    lengths, modes = args.frames or (LONG_LENGTHS if args.full else LONG_QUICK), args.modes or MODES
    for n in lengths:
        print(f"video of {n} s at 360p, 30 fps: {long_video(args.video_dir, n)}", flush=True)
    head = (f"{'frames':>6} {'mode':<15} {'phase':<10} {'seconds':>8} {'frames/s':>9} {'CPU s':>7} "
            f"{'peak RSS GB':>11} {'load':>5}")
    dev = distributed.pick_device(args.device)
    print(f"{args.shapes or '135M'} shapes, random weights, {dev}, {args.frame_size} px, chunks of "
          f"{chunk_size(args.chunk_frames, dev)} frames, {args.threads or 'default'} threads\n{head}", flush=True)
    rows = {}
    for n in lengths:
        for phase in ("decode", *modes):
            cmd = [sys.executable, os.path.abspath(__file__), "long", "--child", f"{n}:{phase}", "--device",
                   args.device, "--frame-size", str(args.frame_size), "--video-dir", args.video_dir]
            cmd += [f for flag, v in (("--threads", args.threads), ("--chunk-frames", args.chunk_frames),
                                      ("--shapes", args.shapes)) if v for f in (flag, str(v))]
            done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            if done.returncode:
                raise RuntimeError(f"bench.py long: {n} frames, {phase} failed (exit {done.returncode})")
            rows[n, phase] = r = json.loads(done.stdout.strip().splitlines()[-1])
            for part, u, count in _long_parts(r, phase):
                print(f"{n:>6} {'' if phase == 'decode' else phase:<15} {part:<10} {u['seconds']:>8.1f} "
                      f"{count / u['seconds']:>9.2f} {u['cpu']:>7.1f} {u['peak_gb']:>11.2f} {u['load']:>5.1f}",
                      flush=True)
    return _long_goals(rows, lengths, modes)


def _long_parts(r, phase):
    """(label, usage, frames or tokens counted) rows of one child's figures."""
    if phase == "decode":
        return [("decode", r["decode"], r["frames"])]
    read = r["read"]
    encode = dict(read, seconds=r["encode"], cpu=r["encode_cpu"])
    return [("encode", encode, r["frames"]), ("answer", r["answer"], LONG_ANSWER), ("live", r["live"], LIVE_FRAMES),
            ("end to end", dict(read, seconds=read["seconds"] + r["answer"]["seconds"],
                                cpu=read["cpu"] + r["answer"]["cpu"]), r["frames"])]


def _edge_rates(chunks):
    """Encoding frames/s over the first and the last EDGE_FRAMES frames of a read's (frames, seconds) chunks."""
    def rate(part):
        frames, seconds = 0, 0.0
        for n, s in part:
            if frames >= EDGE_FRAMES:
                break
            frames, seconds = frames + n, seconds + s
        return frames / seconds
    return rate(chunks), rate(chunks[::-1])


def _long_goals(rows, lengths, modes):
    lines = [f"(frames/s of answer: its tokens/s, {LONG_ANSWER} tokens after a {LONG_PROMPT}-token prompt; live: "
             f"{LIVE_FRAMES} single frames added after the video; end to end: decode + encode + answer; peak RSS: "
             "the process's so far; load: the machine's 1-minute load average at the end of the phase)"]
    first, last = lengths[0], lengths[-1]
    peak = {n: max(rows[n, p]["answer"]["peak_gb"] for p in modes) for n in lengths}
    if 256 in lengths and last != 256:
        lines.append(f"peak RSS at {last} frames: {peak[last]:.2f} GB = {peak[last] / peak[256]:.2f}x that at 256 "
                     "frames (goal: <= 1.2x and < 3 GB)")
    for mode in modes:
        fps = {n: rows[n, mode]["frames"] / rows[n, mode]["encode"] for n in (first, last)}
        live = LIVE_FRAMES / rows[last, mode]["live"]["seconds"]
        lines.append(f"{mode}: encoding {fps[last]:.2f} frames/s at {last} frames = {fps[last] / fps[first]:.0%} of "
                     f"{fps[first]:.2f} at {first} (goal >= 90%); live {live:.2f} frames/s after {last} frames "
                     "(goal >= 4)")
    lines.append(f"in one process ({last} frames): encoding frames/s over the last {EDGE_FRAMES} frames against the "
                 f"first {EDGE_FRAMES} (the cache full against empty; free of the run-to-run noise of the above)")
    for mode in modes:
        first_rate, last_rate = _edge_rates(rows[last, mode]["chunks"])
        lines.append(f"  {mode}: {last_rate:.2f} against {first_rate:.2f} = {last_rate / first_rate:.0%}")
    if "autoregressive" in modes:
        r = rows[last, "autoregressive"]
        total = r["read"]["seconds"] + r["answer"]["seconds"]
        lines.append(f"autoregressive, {last} frames of a {last} s 360p mp4 end to end: {total / 60:.1f} min "
                     f"(goal for an hour: 15 min), at load {r['answer']['load']:.1f}")
    return "\n".join(lines)


def main(argv=None, args=None):
    args = args or arguments(argv)
    if args.command == "memory":
        print(memory_command(args))
        return
    if args.command == "long":
        distributed.set_threads(args.threads)
        print(json.dumps(long_child(args)) if args.child else long_report(args))
        return
    if args.command == "throughput":
        print(throughput(args))
        return
    preset = FULL if args.full else QUICK
    rounds = preset.get("scoring_repeats", preset["repeats"]) if args.command == "scoring" else preset["repeats"]
    args.frame_size, args.repeats = args.frame_size or preset["frame_size"], args.repeats or rounds
    if args.command == "scoring":
        args.batch_size = args.batch_size or preset["scoring_batch"]
    distributed.set_threads(args.threads)
    dev, shapes = distributed.pick_device(args.device), args.shapes or "135M"
    torch.manual_seed(0)
    print(f"{shapes} shapes, random weights, float32, {dev} ({torch.get_num_threads()} threads), "
          f"{args.frame_size} px frames, {args.repeats} rounds" + ("" if args.full else " (quick; --full: 224 px, "
                                                                    f"{FULL['repeats']} rounds)"), flush=True)
    model = at_shapes(ModelSettings(), shapes, args.frame_size).to(dev)
    print(step_report(model.train(), args, dev) if args.command == "step" else scoring_report(model.eval(), args, dev))


if __name__ == "__main__":
    cli.run(main, args=ARGS)
