"""Training throughput of a config: samples/s, seconds per step split into data, DINO, LLM and optimizer time,
and model FLOP utilisation (MFU) against this machine's measured matmul peak.

    python bench.py --config configs/stage1_135M.yaml --shapes 135M [--steps 5] [--batch-size 2 --frames 8]

- Data: the config's train_shards through train.py's loader when they exist, else random batches of
  --batch-size x --frames frames x --text-tokens tokens (data time ~0; say so in the output).
- Model: `--shapes 135M|1.7B` builds the real architecture with random weights from pretrained.SHAPES (no
  download); without it, the config's model section (llm_config/dino_config or names).
- DINO time is the patch encoder's forward+backward, timed on the same frames outside the step; "LLM" is the
  rest of the forward+backward (query attention, connector, LLM, loss). Optimizer = clipping + AdamW + zeroing.
- MFU = FLOPs of one forward+backward (torch.utils.flop_counter, matmul/attention FLOPs) / step time / peak,
  peak being the best float32 (CPU) or bf16 (CUDA) 4096^2 matmul rate measured here.
"""

import argparse
import glob
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import config as config_lib
import distributed
import train
from model import FoveatedVLM
from pretrained import SHAPES

MODEL_SHAPES = {"135M": ("smollm2-135m", "dinov2-small")}


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


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


def random_batches(batch_size, frames, text_tokens, frame_size, vocab=49152):
    """Endless identical-shape batches of random video and text: measures the model, not the loader."""
    g = torch.Generator().manual_seed(0)
    while True:
        ids = torch.randint(3, vocab, (batch_size, text_tokens), generator=g)
        yield {"frames": torch.randn(batch_size, frames, 3, frame_size, frame_size, generator=g),
               "frame_mask": torch.ones(batch_size, frames, dtype=torch.bool),
               "input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}


def build(cfg, shapes, dev):
    if shapes:
        llm, dino = MODEL_SHAPES[shapes]
        dino_config = dict(SHAPES[dino], image_size=cfg.data.frame_size)
        model = FoveatedVLM(llm_config=dict(SHAPES[llm]), dino_config=dino_config, query_dim=cfg.model.query_dim,
                            visual_scale=cfg.model.visual_scale, deep_query=cfg.model.deep_query)
    else:
        model = FoveatedVLM.from_config(cfg.model)
    if cfg.model.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model.to(dev).train()


def dino_seconds(model, batch, dev):
    """Forward+backward time of the DINO patch encoder alone on this batch's (deduplicated) frames."""
    sync(dev)
    start = time.perf_counter()
    kv, _, _ = model.encode(batch["frames"], batch["frame_mask"])
    if kv is not None:
        outs = [kv.features, *kv.keys, *kv.values]
        torch.autograd.backward([o.float().sum() for o in outs])
    sync(dev)
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def timed_step(step_module, model, optimizer, batches, cfg, dev):
    """One training step -> {data, fwd_bwd, dino, optimizer} seconds."""
    times = {}
    start = time.perf_counter()
    batch = train.to_device(next(batches), dev)
    times["data"] = time.perf_counter() - start
    sync(dev)
    start = time.perf_counter()
    with distributed.autocast(dev, cfg.training.dtype):
        loss, _ = train.compute_loss(step_module, None, batch, cfg)
    loss.backward()
    sync(dev)
    times["fwd_bwd"] = time.perf_counter() - start
    start = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.training.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(dev)
    times["optimizer"] = time.perf_counter() - start
    with distributed.autocast(dev, cfg.training.dtype):
        times["dino"] = dino_seconds(model, batch, dev)
    return times, batch


def step_flops(step_module, batch, cfg, dev):
    with FlopCounterMode(display=False) as counter:
        with distributed.autocast(dev, cfg.training.dtype):
            loss, _ = train.compute_loss(step_module, None, batch, cfg)
        loss.backward()
    step_module.model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def batches_for(cfg, args, dev):
    shards = config_lib.globs(cfg.data.train_shards)
    if shards and all(glob.glob(p) for p in shards) and not args.random_data:
        from tokenization import load_tokenizer

        tok = load_tokenizer(config_lib.tokenizer_name(cfg))
        dist = distributed.Dist(0, 0, 1, dev)
        return train.build_loader(cfg, tok, dist, cfg.data.train_shards, train=True), "config's train_shards"
    frames = args.frames or cfg.data.max_frames
    return (random_batches(cfg.training.batch_size, frames, args.text_tokens, cfg.data.frame_size),
            f"random batches: {frames} frames x {args.text_tokens} tokens")


def report(cfg, times, flops, peak, source, model, dev):
    n = len(times)
    mean = {k: sum(t[k] for t in times) / n for k in times[0]}
    step = mean["data"] + mean["fwd_bwd"] + mean["optimizer"]
    llm = max(0.0, mean["fwd_bwd"] - mean["dino"])
    params = model.count_parameters()
    lines = [
        f"bench: {params['total'] / 1e6:.1f}M params (dino {params['dino'] / 1e6:.1f}M, llm {params['llm'] / 1e6:.1f}M)"
        f" | batch {cfg.training.batch_size} | {source} | {dev} ({torch.get_num_threads()} threads) | {n} steps",
        f"samples/s      {cfg.training.batch_size / step:.3f}",
        f"s/step         {step:.3f}  = data {mean['data']:.3f} + DINO {mean['dino']:.3f} + LLM {llm:.3f}"
        f" + optimizer {mean['optimizer']:.3f}",
        f"model FLOPs    {flops / 1e9:.1f} GFLOP per step (forward+backward)",
        f"matmul peak    {peak / 1e9:.1f} GFLOP/s measured",
        f"MFU            {100 * flops / (mean['fwd_bwd'] + mean['optimizer'] + mean['data']) / peak:.1f}%",
    ]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--shapes", choices=list(MODEL_SHAPES), help="real architecture, random weights")
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    p.add_argument("--batch-size", type=int, help="override training.batch_size")
    p.add_argument("--frames", type=int, help="frames per random sample (default data.max_frames)")
    p.add_argument("--text-tokens", type=int, default=64, help="text tokens per random sample")
    p.add_argument("--random-data", action="store_true", help="random batches even when the shards exist")
    args = distributed.parse_cli(p, argv)
    sets = args.set + ([f"training.batch_size={args.batch_size}"] if args.batch_size else [])
    cfg = config_lib.load(args.config, sets, check=False)
    dev = distributed.init(cfg.training.seed, cfg.training.device).device
    model = build(cfg, args.shapes, dev)
    step_module = train.StepModule(model, False, cfg.model.mode)
    if cfg.training.compile:
        step_module.compile()
    optimizer = train.build_optimizer(model, cfg.training)
    batches, source = batches_for(cfg, args, dev)
    peak = matmul_peak(dev)
    _, batch = timed_step(step_module, model, optimizer, batches, cfg, dev)  # warm-up
    times = [timed_step(step_module, model, optimizer, batches, cfg, dev)[0] for _ in range(args.steps)]
    print(report(cfg, times, step_flops(step_module, batch, cfg, dev), peak, source, model, dev))


if __name__ == "__main__":
    main()
