"""Train fVLM, all three stages: `python train.py --config configs/stage1_135M.yaml [--set section.key=value]`.

Stage 1 trains on every text token (text_ce_all), stage 2 on the answers only (text_ce_answer_only), stage 3
with DPO (Rafailov et al., 2023) against a frozen copy of `model.init_from`. AdamW over three parameter groups
(connector, dino, llm) with the LR schedules of schedule.py (fused on CUDA); gradient accumulation and
clipping; autocast in training.dtype (bf16 on CUDA by default, float16 with a GradScaler, on the CPU too).
`torchrun --nproc_per_node=N train.py ...` runs DDP; every forward, DPO included, goes through the DDP wrapper.
Checkpoints, logs and the resolved config go to `checkpoint.save_dir`; `resume: auto` continues there, and a
finished run is left as it is.
"""

import argparse
import contextlib
import copy
import dataclasses
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import distributed  # before torch: it sets OpenMP's wait policy, which torch reads once when it loads
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import config as config_lib
import schedule
from config import PARAM_GROUPS
from data import ShardDataset, check_shards, make_loader
from logger import Logger
from model import FoveatedVLM
from pretrained import check_backbone_configs, load_tokenizer
from streaming import chunk_size
from text_interleave import interleave

DPO_KEYS = ("frames", "frame_mask", "chosen_ids", "chosen_mask", "chosen_loss_mask", "rejected_ids",
            "rejected_mask", "rejected_loss_mask")
CE_KEYS = ("frames", "input_ids", "attention_mask", "loss_mask", "frame_mask")


def check_config(cfg, source):
    """The checks of a loaded config that need files and libraries: required settings, backbone config keys,
    local shard names that match no file and an init_from that is no checkpoint stop the run before any work,
    naming the key and `source` (the config file)."""
    check_backbone_configs(cfg.model, source)
    config_lib.check_required(cfg, source)
    check_shards(cfg, source)
    init = cfg.model.init_from
    if init is not None and not (os.path.isdir(init) and (checkpoint.is_checkpoint(init) or checkpoint.newest(init))):
        raise config_lib.ConfigError(f"{source}: 'model.init_from' is not a checkpoint folder or a training save_dir "
                                     f"holding one: {init}")


def load_config(argv=None):
    """The checked Config of `train.py --config FILE [--set section.key=value ...]`."""
    parser = argparse.ArgumentParser(description="fVLM training")
    parser.add_argument("--config", required=True, help="stage YAML, e.g. configs/stage1_135M.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable), e.g. --set training.batch_size=4")
    args = parser.parse_args(argv)
    cfg = config_lib.load(args.config, args.set)
    check_config(cfg, config_lib.source_name(args.config, args.set))
    return cfg


class StepModule(nn.Module):
    """What DDP wraps: one forward for every loss type, so DDP's gradient hooks run for DPO as for CE."""

    def __init__(self, model, dpo, mode):
        super().__init__()
        self.model, self.dpo, self.mode = model, dpo, mode

    def forward(self, batch, mode=None, encoded=None):
        mode = mode or self.mode
        if self.dpo:
            return self.model.forward_dpo(**{k: batch[k] for k in DPO_KEYS}, mode=mode, encoded=encoded)
        return self.model(**{k: batch[k] for k in CE_KEYS}, mode=mode, return_logits=False, encoded=encoded)


def dpo_loss(policy, reference, beta):
    """-logsigmoid(beta * ((pc - rc) - (pr - rr))) over the batch, with reward accuracy and margin.
    policy / reference: {"chosen_logps": [B], "rejected_logps": [B]} (summed answer log-probs)."""
    chosen = policy["chosen_logps"] - reference["chosen_logps"]  # [B]
    rejected = policy["rejected_logps"] - reference["rejected_logps"]
    margin = beta * (chosen - rejected)
    loss = -F.logsigmoid(margin).mean()
    return loss, {"reward_acc": (margin > 0).float().mean(), "reward_margin": margin.mean(),
                  "reward_chosen": beta * chosen.mean(), "reward_rejected": beta * rejected.mean()}


def compute_loss(step_module, reference, batch, cfg, mode=None, encoded=(None, None)):
    """(loss, metrics) of one micro-batch in `mode` (default model.mode); `reference` is the frozen DPO
    reference or None for CE; `encoded`: the policy's and the reference's DINO pass over the batch's frames,
    when already made (see FoveatedVLM.forward)."""
    mode = mode or cfg.model.mode
    out = step_module(batch, mode, encoded[0])
    if reference is None:
        return out["loss"], {}
    with torch.no_grad():
        ref = reference.forward_dpo(**{k: batch[k] for k in DPO_KEYS}, mode=mode, encoded=encoded[1])
    return dpo_loss(out, ref, cfg.loss.beta)


def build_model(cfg, dev, model=None):
    """The policy (from init_from, or built from the config; `model` instead when given: bench.py's random
    weights at the real sizes) and, for DPO, a frozen reference copy, with the config's freeze_* switches and
    gradient checkpointing applied. From init_from, the architecture is the checkpoint's (config.check_init_from
    refuses those keys beside it) and the settings that may change after init (config.AFTER_INIT_KEYS:
    visual_scale, lambda_coarse) are the config's."""
    m = cfg.model
    if model is None and m.init_from:
        model = FoveatedVLM.from_pretrained(m.init_from)
        model.settings = dataclasses.replace(model.settings, **{k: getattr(m, k) for k in config_lib.AFTER_INIT_KEYS})
    elif model is None:
        model = FoveatedVLM.from_config(m)
    reference = None
    if cfg.loss.type == "dpo":  # the init_from weights, before any resume overwrites the policy's
        reference = copy.deepcopy(model).to(dev).eval().requires_grad_(False)
    model.set_trainable(frozen=[group for group in PARAM_GROUPS if m.frozen(group)])
    model.chunk_frames = cfg.data.chunk_frames  # validation reads longer videos a chunk at a time
    if m.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model.to(dev).train(), reference


def build_optimizer(model, training):
    """AdamW with the parameter groups (config.PARAM_GROUPS) at their peak LRs; weight decay on matrices only (not
    biases or norms). Fused (one kernel for all parameters) when every parameter is on CUDA."""
    groups = []
    for name, params in model.param_groups().items():
        for decay in (True, False):
            chosen = [p for p in params if (p.ndim >= 2) == decay]
            if chosen:
                groups.append({"params": chosen, "lr": training.peak_lr(name), "name": name,
                               "weight_decay": training.weight_decay if decay else 0.0})
    if not groups:
        raise ValueError("nothing to train: every part is frozen (model.freeze_*)")
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, fused=True if on_cuda else None)


def build_loader(cfg, tokenizer, dist, shards, train, start=0):
    """Validation: one ordered pass of batches. Training: an endless stream with text-retention batches mixed in
    at data.text_ratio, from micro-batch `start` (a resumed run continues the text schedule and reshuffles the
    stream with a new seed rather than replaying it). On CUDA, batches come in pinned memory, so to_device's
    non_blocking copies are asynchronous."""
    d, seed = cfg.data, cfg.training.seed + start

    def loader(paths, loss_type):
        dataset = ShardDataset(paths, tokenizer, d, loss=loss_type, train=train, seed=seed, rank=dist.rank,
                               world=dist.world_size)
        return make_loader(dataset, cfg.training.batch_size, tokenizer.pad_token_id,
                           pin_memory=dist.device.type == "cuda")

    if not train:
        return loader(shards, cfg.loss.type)
    text, ratio = None, 0.0
    if d.text_shards and d.text_ratio > 0:
        text_loss = "text_ce_all" if cfg.loss.type == "text_ce_all" else "text_ce_answer_only"
        text, ratio = loader(d.text_shards, text_loss), d.text_ratio
    mixed = interleave(loader(shards, cfg.loss.type), text, ratio, cfg.training.seed, start_step=start)
    return (batch for _, batch in mixed)


class SkipCount:
    """Passes batches through, adding up the samples the loader skipped (`batch["skipped"]`) by reason until
    `take()`."""

    def __init__(self, batches):
        self.batches, self.recent = batches, Counter()

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.batches)
        self.recent.update(batch.get("skipped") or {})
        return batch

    def take(self):
        recent, self.recent = self.recent, Counter()
        return recent


def to_device(batch, dev):
    return {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def train_step(step_module, reference, batches, optimizer, cfg, dist, scaler):
    """Forward/backward over grad_accum micro-batches, clip, and step unless anything was non-finite (decided on
    all ranks together). `scaler` (distributed.grad_scaler) scales float16 losses and backs its scale off after
    a non-finite step; for other dtypes it passes through. Returns (stepped, whether every rank's loss was
    finite, the loss, metrics as tensors)."""
    accum, total, metrics = cfg.training.grad_accum, 0.0, {}
    for i in range(accum):
        batch = to_device(next(batches), dist.device)
        sync = i == accum - 1 or not isinstance(step_module, DDP)
        with (contextlib.nullcontext() if sync else step_module.no_sync()):
            with distributed.autocast(dist.device, cfg.training.dtype):
                loss, extra = compute_loss(step_module, reference, batch, cfg)
            scaler.scale(loss / accum).backward()
        total = total + loss.detach().float() / accum
        for k, v in extra.items():
            metrics[k] = metrics.get(k, 0.0) + v.detach().float() / accum
    scaler.unscale_(optimizer)  # clip (and report) the true gradients
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.training.max_grad_norm)
    finite = distributed.all_reduce(torch.stack([torch.isfinite(total), torch.isfinite(norm)]).float(), "min")
    loss_finite, stepped = bool(finite[0]), bool(finite.min())
    if stepped:
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return stepped, loss_finite, total, {"grad_norm": norm.detach().float(), **metrics}


def eval_modes(cfg):
    """model.mode first (its loss is `val_loss`, the checkpoint metric), then eval.modes' others."""
    return [cfg.model.mode] + [m for m in dict.fromkeys(cfg.eval.modes or ()) if m != cfg.model.mode]


@torch.no_grad()
def evaluate(step_module, reference, loader, cfg, dist):
    """Mean validation loss over up to eval.max_samples samples (split across ranks), in each of eval_modes:
    {"val_loss": loss in model.mode, "val_loss_<mode>": loss in each other mode}."""
    inner = getattr(step_module, "module", step_module)  # no DDP here: ranks may hold unequal batch counts
    inner.eval()
    modes, samples, limit = eval_modes(cfg), 0, math.ceil(cfg.eval.max_samples / dist.world_size)
    total = torch.zeros(len(modes) + 1, device=dist.device)  # summed loss x samples per mode, then samples
    for batch in loader:
        batch = to_device(batch, dist.device)
        n = len(batch["frames"])
        long = batch["frames"].shape[1] > chunk_size(inner.model.chunk_frames, dist.device)  # a chunk at a time
        with distributed.autocast(dist.device, cfg.training.dtype):
            encoded = [m.encode(batch["frames"], batch["frame_mask"]) if m is not None and not long else None
                       for m in (inner.model, reference)]  # DINO once per batch, whatever the modes
            for i, mode in enumerate(modes):
                loss, _ = compute_loss(inner, reference, batch, cfg, mode, encoded)
                total[i] += loss.float() * n
        total[-1] += n
        samples += n
        if samples >= limit:
            break
    inner.train()
    means = (distributed.all_reduce(total)[:-1] / total[-1].clamp(min=1)).tolist()
    return {("val_loss" if i == 0 else f"val_loss_{mode}"): v for i, (mode, v) in enumerate(zip(modes, means))}


@dataclass
class Progress:
    """The training loop's state: what a checkpoint holds besides the weights and the optimizer's, what the log
    and the summary report, and what `fit` returns. The losses are the last logged ones."""

    step: int = 0
    samples_seen: int = 0
    wall_time_s: float = 0.0  # the whole run's, across resumes
    batches_seen: int = 0  # micro-batches drawn: the data position (text_interleave's schedule continues from it)
    skip_reasons: dict = field(default_factory=dict)  # samples the loaders skipped, by reason: all ranks, whole run
    train_loss: Optional[float] = None
    val: dict = field(default_factory=dict)  # val_loss, val_loss_<mode>: the last validation's

    @property
    def skipped(self):
        return sum(self.skip_reasons.values())

    def state(self):
        """What training_state.pt holds of it."""
        return {"step": self.step, "samples_seen": self.samples_seen, "wall_time_s": self.wall_time_s,
                "data": {"batches_seen": self.batches_seen, "skip_reasons": dict(self.skip_reasons)}}

    @classmethod
    def from_state(cls, state):
        data = state.get("data", {})
        return cls(state["step"], state["samples_seen"], state.get("wall_time_s", 0.0), data.get("batches_seen", 0),
                   dict(data.get("skip_reasons", {})))


def resume(cfg, model, optimizer, scheduler, scaler, dist):
    """Restore weights, optimizer, schedule, loss scale and RNG from the checkpoint that checkpoint.resume names.
    Returns its Progress (step 0 for a fresh run). The state file is memory-mapped and dropped once copied."""
    path = checkpoint.find_resume(cfg.checkpoint.save_dir, cfg.checkpoint.resume)
    if path is None:
        return Progress()
    state = checkpoint.load_state(path)
    model.load_state_dict(checkpoint.read_state_dict(path))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):  # empty when saved without float16 loss scaling
        scaler.load_state_dict(state["scaler"])
    checkpoint.set_rng_state(state["rng"])
    progress = Progress.from_state(state)
    if dist.is_main:
        print(f"resumed from {path}: step {progress.step}, {progress.samples_seen} samples seen", flush=True)
    return progress


def save(run, progress, ranking):
    """Rank 0 writes the checkpoint, ranked by `ranking` (val_loss | train_loss); every rank waits for it."""
    if run.dist.is_main:
        state = {**progress.state(), "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                 "scaler": run.scaler.state_dict(), "rng": checkpoint.rng_state()}
        metric = progress.train_loss if ranking == "train_loss" else progress.val.get("val_loss")
        c = run.cfg.checkpoint
        checkpoint.save(c.save_dir, progress.step, run.model, state, run.cfg, run.tokenizer, metric, c.keep_last,
                        c.keep_best)
    distributed.barrier()


def group_lrs(optimizer):
    return {g["name"]: g["lr"] for g in optimizer.param_groups}


def metric_name(cfg, has_val, dist):
    if cfg.checkpoint.metric == "val_loss" and not has_val:
        if dist.is_main:
            print("checkpoint.metric is val_loss but validation is off: ranking by train_loss", flush=True)
        return "train_loss"
    return cfg.checkpoint.metric


@dataclass
class Run:
    """What the loop works with, built once by `main`."""
    cfg: config_lib.Config
    dist: distributed.Dist
    model: FoveatedVLM  # unwrapped: what checkpoints hold
    step_module: nn.Module  # StepModule, compiled and/or DDP-wrapped: what every training forward goes through
    reference: Optional[FoveatedVLM]
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    logger: Logger
    total_steps: int
    global_batch: int


def wrap(model, cfg, dist):
    step_module = StepModule(model, cfg.loss.type == "dpo", cfg.model.mode)
    if cfg.training.compile:
        step_module.compile()  # in place: the saved `model` keeps its plain parameter names
    if dist.world_size > 1:  # text-only batches leave DINO and the connector unused: find_unused_parameters
        step_module = DDP(step_module, device_ids=[dist.device] if dist.device.type == "cuda" else None,
                          find_unused_parameters=True, broadcast_buffers=False)
    return step_module


def count_skips(batches, progress):
    """Add the samples every rank's loader skipped since the last call to progress.skip_reasons. A collective:
    every rank calls it at the same steps (log and save steps)."""
    progress.skip_reasons = dict(Counter(progress.skip_reasons) + distributed.sum_counts(batches.take()))


def log_window(run, progress, window, batches, tick):
    """The log step: the window's mean figures over all ranks, and the skip counts brought up to date."""
    means = torch.stack([torch.stack(list(w.values())) for w in window]).mean(0)  # [steps, figures] -> [figures]
    figures = dict(zip(window[0], distributed.all_reduce(means, "mean").tolist()))
    count_skips(batches, progress)
    if progress.skipped:
        figures["skipped"] = progress.skipped
    progress.train_loss = figures["loss"]
    samples_per_s = len(window) * run.global_batch / (time.time() - tick)
    run.logger.log(progress.step, figures, group_lrs(run.optimizer), samples_per_s)


def fit(run, batches, val, progress, ranking):
    """The training loop from progress.step to run.total_steps; returns the Progress at the end."""
    cfg, t, c = run.cfg, run.cfg.training, run.cfg.checkpoint
    window, nonfinite, wall_before, start = [], 0, progress.wall_time_s, time.time()
    tick = start
    batches = SkipCount(batches)
    while progress.step < run.total_steps:
        stepped, loss_finite, loss, metrics = train_step(run.step_module, run.reference, batches, run.optimizer, cfg,
                                                         run.dist, run.scaler)
        progress.batches_seen += t.grad_accum
        if not stepped:
            nonfinite += 1
            run.logger.log(progress.step, {"nonfinite_skipped": nonfinite})
            # float16: gradients that overflow a finite loss are the scaler's to back off from (its scale halves
            # each time), as it does several times in a row from its initial 65536; only a scale below 1 gives up.
            backing_off = run.scaler.is_enabled() and run.scaler.get_scale() >= 1 and loss_finite  # on every rank
            if nonfinite >= t.max_nonfinite_steps and not backing_off:
                raise RuntimeError(f"{nonfinite} steps in a row had a non-finite loss or gradient (last at step "
                                   f"{progress.step}); stopping. The last good checkpoint in {c.save_dir} is "
                                   "intact: lower the learning rate or check the data, then resume.")
            continue
        nonfinite = 0
        run.scheduler.step()
        progress.step += 1
        progress.samples_seen += run.global_batch
        step, last = progress.step, progress.step == run.total_steps
        window.append({"loss": loss, **metrics})
        if step % t.log_every == 0 or last:
            log_window(run, progress, window, batches, tick)
            window, tick = [], time.time()
        if val is not None and (step % cfg.eval.every_steps == 0 or last):
            progress.val = evaluate(run.step_module, run.reference, val, cfg, run.dist)
            run.logger.log(step, progress.val)
            tick = time.time()
        progress.wall_time_s = round(wall_before + time.time() - start, 1)
        if step % c.save_every_steps == 0 or last:
            count_skips(batches, progress)  # a save between log steps holds the skips up to it
            save(run, progress, ranking)
            tick = time.time()
    return progress


def main(argv=None):
    """Train with the config named on the command line (or in argv); returns the trained, unwrapped model."""
    cfg = load_config(argv)
    t, c = cfg.training, cfg.checkpoint
    threads = distributed.set_threads(t.threads)
    dist = distributed.init(t.seed, t.device)
    if dist.is_main:
        checkpoint.clean_tmp(c.save_dir)
    tokenizer = load_tokenizer(checkpoint.tokenizer_source(cfg.model))
    model, reference = build_model(cfg, dist.device)
    optimizer = build_optimizer(model, t)
    global_batch = t.batch_size * t.grad_accum * dist.world_size
    total_steps = math.ceil(t.total_samples / global_batch)
    scheduler, scaler = schedule.build(optimizer, t, total_steps), distributed.grad_scaler(dist.device, t.dtype)
    progress = resume(cfg, model, optimizer, scheduler, scaler, dist)
    if progress.step >= total_steps:  # a finished run: keep its checkpoints, log and summary as they are
        if dist.is_main:
            print(f"{c.save_dir} holds the finished run (step {progress.step} of {total_steps}): nothing to "
                  "train. Delete it, or set checkpoint.save_dir, to train again.", flush=True)
        distributed.cleanup()
        return model
    logger = Logger(c.save_dir, total_steps, cfg.wandb, cfg.to_dict(), progress.step, enabled=dist.is_main)
    run = Run(cfg, dist, model, wrap(model, cfg, dist), reference, tokenizer, optimizer, scheduler, scaler, logger,
              total_steps, global_batch)

    batches = build_loader(cfg, tokenizer, dist, cfg.data.train_shards, train=True,
                           start=progress.batches_seen)
    val = None
    if cfg.data.val_shards and cfg.eval.every_steps > 0:
        val = build_loader(cfg, tokenizer, dist, cfg.data.val_shards, train=False)
    if dist.is_main:
        n = model.count_parameters()
        print(f"fVLM {n['total'] / 1e6:.1f}M params | {cfg.loss.type} | {total_steps} steps of {global_batch} "
              f"samples | {dist.world_size} x {dist.device} | {distributed.resolve_dtype(dist.device, t.dtype)} | "
              f"{threads} CPU threads", flush=True)

    progress = fit(run, batches, val, progress, metric_name(cfg, val is not None, dist))
    logger.summary(final_loss=progress.train_loss, val_loss=progress.val.get("val_loss"), steps=progress.step,
                   samples=progress.samples_seen, skipped=progress.skipped, skip_reasons=progress.skip_reasons,
                   wall_time_s=progress.wall_time_s, save_dir=c.save_dir)
    logger.close()
    del run  # the DDP wrapper first (distributed.cleanup says why)
    distributed.cleanup()
    return model


if __name__ == "__main__":
    distributed.run_cli(main)
