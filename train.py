"""Train fVLM, all three stages: `python train.py --config configs/stage1_135M.yaml [--set section.key=value]`.

Stage 1 trains on every text token (text_ce_all), stage 2 on the answers only (text_ce_answer_only), stage 3
with DPO (Rafailov et al., 2023) against a frozen copy of `model.init_from`. AdamW over three parameter groups
(connector, dino, llm) with the LR schedules of schedule.py (fused on CUDA); gradient accumulation and
clipping; autocast in training.dtype (bf16 on CUDA by default, float16 with a GradScaler, on the CPU too).
`torchrun --nproc_per_node=N train.py ...` runs DDP; every forward, DPO included, goes through the DDP wrapper.
Checkpoints, logs and the resolved config go to `checkpoint.save_dir`; `resume: auto` continues there, and a
finished run is left as it is.
"""

import cli


def arguments(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--config", required=True, help="stage YAML, e.g. configs/stage1_135M.yaml")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), e.g. --set training.batch_size=4")
    return p.parse_args(argv)


if __name__ == "__main__":  # parse before torch loads: --help and a flag error answer at once
    ARGS = arguments()

import contextlib  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Optional  # noqa: E402

import distributed  # noqa: E402  before torch: it sets OpenMP's wait policy, which torch reads once when it loads
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.fx.experimental import _config as fx_config  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

import checkpoint  # noqa: E402
import config as config_lib  # noqa: E402
import schedule  # noqa: E402
from config import PARAM_GROUPS  # noqa: E402
from data import ShardDataset, check_shards, make_loader  # noqa: E402
from layout import Plan  # noqa: E402
from logger import Logger  # noqa: E402
from model import FoveatedVLM  # noqa: E402
from pretrained import check_backbone_configs, load_tokenizer  # noqa: E402
from streaming import chunk_size  # noqa: E402
from text_interleave import interleave  # noqa: E402

# What model.forward / forward_dpo take of a batch besides its frames (those come encoded: `encode`).
CE_KEYS = ("input_ids", "attention_mask", "loss_mask", "frame_mask")
DPO_KEYS = ("frame_mask", "chosen_ids", "chosen_mask", "chosen_loss_mask", "rejected_ids", "rejected_mask",
            "rejected_loss_mask")


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


def load_config(args):
    """The checked Config of parsed `arguments`: `--config FILE [--set section.key=value ...]`."""
    cfg = config_lib.load(args.config, args.set)
    check_config(cfg, config_lib.source_name(args.config, args.set))
    return cfg


def encode(model, batch):
    """The DINO pass over a batch's frames: collate's distinct pixels and frame index (the loader's batches), or
    frames [B, T, 3, H, W] with frame_mask (a batch built by hand, through the model's API)."""
    if "pixels" in batch:
        return model.encode_pixels(batch["pixels"], batch["frame_idx"], batch["frame_mask"])
    return model.encode(batch["frames"], batch["frame_mask"])


def longest_clip(batch):
    """The most frames a sample of the batch has (the plan's, when collate made one: no host sync)."""
    return batch["plan"].T if "plan" in batch else batch["frame_mask"].shape[1]


def with_frames(batch):
    """A loader batch with its frames laid out per sample (frames [B, T, 3, H, W] uint8, instead of the distinct
    pixels): what the model's streamed path reads, a chunk at a time, for clips longer than a chunk. A batch of
    frames already (hand-made) is returned as it is."""
    if "pixels" not in batch:
        return batch
    pixels, mask = batch["pixels"], batch["frame_mask"]
    frames = pixels.new_zeros(*mask.shape, *pixels.shape[1:])
    frames[mask] = pixels[batch["frame_idx"]]
    return {**{k: v for k, v in batch.items() if k not in ("pixels", "frame_idx")}, "frames": frames}


def model_outputs(model, dpo, batch, mode, encoded=None):
    """model.forward (CE: {"loss"}) or, with `dpo`, model.forward_dpo (the answers' log-probs) of a batch, with
    its plan when collate made one (layout.Plan); `encoded`, the model's `encode` of the batch, when made. A batch
    of frames (hand-made, or `with_frames`) not encoded goes to the model as frames."""
    if encoded is None and "frames" not in batch:
        encoded = encode(model, batch)
    frames, plan = batch.get("frames") if encoded is None else None, batch.get("plan")
    if dpo:
        return model.forward_dpo(frames, **{k: batch[k] for k in DPO_KEYS}, mode=mode, encoded=encoded, plan=plan)
    return model(frames, **{k: batch[k] for k in CE_KEYS}, mode=mode, return_logits=False, encoded=encoded,
                 plan=plan)


class StepModule(nn.Module):
    """What DDP wraps: one forward for every loss type, so DDP's gradient hooks run for DPO as for CE."""

    def __init__(self, model, dpo, mode):
        super().__init__()
        self.model, self.dpo, self.mode = model, dpo, mode

    def forward(self, batch, mode=None, encoded=None):
        return model_outputs(self.model, self.dpo, batch, mode or self.mode, encoded)


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
        ref = model_outputs(reference, True, batch, mode, encoded[1])
    return dpo_loss(out, ref, cfg.loss.beta)


def reference_dtype(dev, dtype):
    """The DPO reference's weights: bfloat16 on CUDA when training in bfloat16 (a frozen model needs no float32
    master copy: half its memory; its log-probs are summed in float32 all the same), else float32."""
    return torch.bfloat16 if dev.type == "cuda" and distributed.resolve_dtype(dev, dtype) == "bfloat16" \
        else torch.float32


def build_model(cfg, dev, model=None):
    """The policy (from init_from, or built from the config; `model` instead when given: bench.py's random
    weights at the real sizes) and, for DPO, a frozen reference copy (in reference_dtype), with the config's
    freeze_* switches and gradient checkpointing applied. From init_from, the architecture is the checkpoint's
    (config.check_init_from refuses those keys beside it) and the settings that may change after init
    (config.AFTER_INIT_KEYS: visual_scale, lambda_coarse) are the config's. The model is used as the data config
    trains it (model.inputs: frame size, image replication, system prompt), which its checkpoints save."""
    m = cfg.model
    if model is None and m.init_from:
        model = FoveatedVLM.from_pretrained(m.init_from)
        model.settings = dataclasses.replace(model.settings, **{k: getattr(m, k) for k in config_lib.AFTER_INIT_KEYS})
    elif model is None:
        model = FoveatedVLM.from_config(m)
    model.inputs = config_lib.InputSettings.of(cfg.data)
    reference = None
    if cfg.loss.type == "dpo":  # the init_from weights, before any resume overwrites the policy's
        reference = copy.deepcopy(model).to(dev, reference_dtype(dev, cfg.training.dtype))
        reference.eval().requires_grad_(False)
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
    """The batch's tensors and plan on `dev` (asynchronous copies from pinned memory)."""
    return {k: v.to(dev, non_blocking=True) if isinstance(v, (torch.Tensor, Plan)) else v for k, v in batch.items()}


def train_step(step_module, reference, batches, optimizer, cfg, dist, scaler, stop=False):
    """Forward/backward over grad_accum micro-batches, clip, and step unless anything was non-finite (decided on
    all ranks together). `scaler` (distributed.grad_scaler) scales float16 losses and backs its scale off after
    a non-finite step; for other dtypes it passes through. `stop`: this rank was asked to stop (Stop), shared in
    the same all-reduce. Returns (stepped, whether every rank's loss was finite, the loss, metrics as tensors,
    whether any rank asked to stop)."""
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
    go_on = torch.tensor(0.0 if stop else 1.0, device=norm.device)
    ok = distributed.all_reduce(torch.stack([torch.isfinite(total), torch.isfinite(norm), go_on]).float(), "min")
    loss_finite, norm_finite, go = (v > 0 for v in ok.tolist())  # the step's one host sync: the host decides
    stepped = loss_finite and norm_finite
    if stepped:
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return stepped, loss_finite, total, {"grad_norm": norm.detach().float(), **metrics}, not go


def eval_modes(cfg):
    """model.mode first (its loss is `val_loss`, the checkpoint metric), then eval.modes' others."""
    return [cfg.model.mode] + [m for m in dict.fromkeys(cfg.eval.modes or ()) if m != cfg.model.mode]


@torch.no_grad()
def evaluate(step_module, reference, loader, cfg, dist):
    """Mean validation loss over up to eval.max_samples samples (split across ranks), in each of eval_modes:
    {"val_loss": loss in model.mode, "val_loss_<mode>": loss in each other mode}."""
    inner = getattr(step_module, "module", step_module)  # no DDP here: ranks may hold unequal batch counts
    inner = StepModule(inner.model, inner.dpo, inner.mode)  # eager: no_grad and each mode would compile anew
    inner.eval()
    modes, samples, limit = eval_modes(cfg), 0, math.ceil(cfg.eval.max_samples / dist.world_size)
    total = torch.zeros(len(modes) + 1, device=dist.device)  # summed loss x samples per mode, then samples
    for batch in loader:
        batch = to_device(batch, dist.device)
        n = batch["frame_mask"].shape[0]
        long = longest_clip(batch) > chunk_size(inner.model.chunk_frames, dist.device)
        if long:  # through the model's streamed path, a chunk at a time (FoveatedVLM._streamed)
            batch = with_frames(batch)
        with distributed.autocast(dist.device, cfg.training.dtype):
            encoded = [encode(m, batch) if m is not None and not long else None
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
    save_dir = cfg.checkpoint.save_dir
    path = checkpoint.find_resume(save_dir, cfg.checkpoint.resume)
    if path is None:
        if dist.is_main and cfg.checkpoint.resume == "auto" and os.path.isfile(os.path.join(save_dir, "log.csv")):
            print(f"{save_dir} holds no checkpoint to resume from (the run there stopped before its first save, at "
                  f"checkpoint.save_every_steps {cfg.checkpoint.save_every_steps}): starting at step 0", flush=True)
        return Progress()
    state = checkpoint.load_state(path)
    model.load_state_dict(checkpoint.read_state_dict(path))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):  # empty when saved without float16 loss scaling
        scaler.load_state_dict(state["scaler"])
    checkpoint.set_rng_state(state["rng"], dist.rank, dist.local_rank)
    progress = Progress.from_state(state)
    if dist.is_main:
        print(f"resumed from {path}: step {progress.step}, {progress.samples_seen} samples seen", flush=True)
    return progress


def save(run, progress, ranking):
    """Rank 0 writes the checkpoint, ranked by `ranking` (val_loss | train_loss); every rank waits for it. Every
    rank's own CUDA RNG state goes in (checkpoint.set_rng_state restores each rank's)."""
    cuda_by_rank = distributed.gather_objects(checkpoint.cuda_rng_state())
    if run.dist.is_main:
        state = {**progress.state(), "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                 "scaler": run.scaler.state_dict(), "rng": checkpoint.rng_state(cuda_by_rank)}
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


COMPILE = {"dynamic": True}  # torch.compile's arguments for training.compile


def wrap(model, cfg, dist):
    """The step module every training forward goes through: compiled with training.compile, DDP-wrapped on more
    than one process. Compiled, the step has no graph break (the batch's plan carries its data-dependent sizes)
    and its sizes are dynamic from the first batch and never assumed equal because they happen to be (duck
    shaping), so batches of any frame count and text length share a graph; text-only batches, and batches of one
    sample or one image (sizes 0 and 1 are specialised), take one more each: 5 or so in all, within the raised
    recompile limit (tests/test_step.py counts them)."""
    step_module = StepModule(model, cfg.loss.type == "dpo", cfg.model.mode)
    if cfg.training.compile:
        fx_config.use_duck_shape = False
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
        step_module.compile(**COMPILE)  # in place: the saved `model` keeps its plain parameter names
    if dist.world_size > 1:  # text-only batches leave DINO and the connector unused: find_unused_parameters
        step_module = DDP(step_module, device_ids=[dist.device] if dist.device.type == "cuda" else None,
                          find_unused_parameters=True, broadcast_buffers=False,
                          gradient_as_bucket_view=True)  # the gradients live in the buckets: no second copy
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


class Stop:
    """Ctrl-C and SIGTERM as requests, inside the block: the first lets the step in progress end, then the run saves
    its last completed step and stops, every rank at the same step (train_step shares the request in its
    all-reduce); a second Ctrl-C stops at once. Later SIGTERMs are ignored: torchrun passes a Ctrl-C on to every
    rank's process group and kills them 30 s later; a cluster's scheduler sends its own SIGTERM. A SIGTERM to the
    process group ends the loader's workers (only Ctrl-C is theirs to ignore: data.make_loader): from the first
    request on, a worker's end is not an error here (torch's SIGCHLD check is off), so the step in progress
    completes on the batch it holds."""

    def __init__(self, verbose=True):
        self.requested, self.verbose = False, verbose

    def __enter__(self):
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.requested = True
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        if self.verbose:
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint of the last completed step, then stopping "
                  "(Ctrl-C again stops at once, without it)", file=sys.stderr, flush=True)


class Stopped(Exception):
    """The run stopped on request (Stop) at progress.step, saved unless no step had completed."""

    def __init__(self, progress, saved):
        super().__init__(progress.step)
        self.progress, self.saved = progress, saved


def fit(run, batches, val, progress, ranking):
    """The training loop from progress.step to run.total_steps; returns the Progress at the end. Raises Stopped
    when asked to stop (Ctrl-C, SIGTERM), after saving the last completed step."""
    t, nonfinite, saved = run.cfg.training, 0, False
    start = time.time()
    batches, clock = SkipCount(batches), {"window": [], "tick": start, "start": start, "before": progress.wall_time_s}
    with Stop(run.dist.is_main) as stop:
        while progress.step < run.total_steps:
            stepped, loss_finite, loss, metrics, stopping = train_step(
                run.step_module, run.reference, batches, run.optimizer, run.cfg, run.dist, run.scaler, stop.requested)
            progress.batches_seen += t.grad_accum
            if stepped:
                nonfinite = 0
                saved = after_step(run, batches, val, progress, ranking, clock, {"loss": loss, **metrics})
            else:
                nonfinite += 1
                check_nonfinite(run, progress, nonfinite, loss_finite)
            if stopping:
                if progress.step and not saved:
                    count_skips(batches, progress)
                    save(run, progress, ranking)
                raise Stopped(progress, saved=progress.step > 0)
    return progress


def after_step(run, batches, val, progress, ranking, clock, figures):
    """A completed step's bookkeeping: count it, log, validate and save at their steps (clock: the figures since the
    last log and when that was, when this process started and the run's wall time before it). Returns whether it
    saved."""
    cfg, c = run.cfg, run.cfg.checkpoint
    run.scheduler.step()
    progress.step += 1
    progress.samples_seen += run.global_batch
    step, last = progress.step, progress.step == run.total_steps
    clock["window"].append(figures)
    if step % cfg.training.log_every == 0 or last:
        log_window(run, progress, clock["window"], batches, clock["tick"])
        clock["window"], clock["tick"] = [], time.time()
    if val is not None and (step % cfg.eval.every_steps == 0 or last):
        progress.val = evaluate(run.step_module, run.reference, val, cfg, run.dist)
        run.logger.log(step, progress.val)
        clock["tick"] = time.time()
    progress.wall_time_s = round(clock["before"] + time.time() - clock["start"], 1)
    if step % c.save_every_steps == 0 or last:
        count_skips(batches, progress)  # a save between log steps holds the skips up to it
        save(run, progress, ranking)
        clock["tick"] = time.time()
        return True
    return False


def check_nonfinite(run, progress, nonfinite, loss_finite):
    """After `nonfinite` skipped steps in a row: log it, and stop at training.max_nonfinite_steps. float16: gradients
    that overflow a finite loss are the scaler's to back off from (its scale halves each time), as it does several
    times in a row from its initial 65536; only a scale below 1 gives up."""
    run.logger.log(progress.step, {"nonfinite_skipped": nonfinite})
    backing_off = run.scaler.is_enabled() and run.scaler.get_scale() >= 1 and loss_finite  # on every rank
    if nonfinite >= run.cfg.training.max_nonfinite_steps and not backing_off:
        raise RuntimeError(f"{nonfinite} steps in a row had a non-finite loss or gradient (last at step "
                           f"{progress.step}); stopping. The last good checkpoint in {run.cfg.checkpoint.save_dir} "
                           "is intact: lower the learning rate or check the data, then resume.")


def main(argv=None, args=None):
    """Train with the config named on the command line (or in argv); returns the trained, unwrapped model."""
    cfg = load_config(args or arguments(argv))
    t, c = cfg.training, cfg.checkpoint
    threads = distributed.set_threads(t.threads)
    dist = distributed.init(t.seed, t.device, t.dist_timeout_min)
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

    stopped = None
    try:
        progress = fit(run, batches, val, progress, metric_name(cfg, val is not None, dist))
    except Stopped as e:
        progress, stopped = e.progress, e
    if stopped is None:
        logger.summary(final_loss=progress.train_loss, val_loss=progress.val.get("val_loss"), steps=progress.step,
                       samples=progress.samples_seen, skipped=progress.skipped, skip_reasons=progress.skip_reasons,
                       wall_time_s=progress.wall_time_s, save_dir=c.save_dir)
    elif dist.is_main:
        where = (f"saved step {progress.step} in {c.save_dir}; the same command resumes there" if stopped.saved
                 else "no step had completed: nothing to save")
        print(f"stopped on request at step {progress.step} of {total_steps}: {where}", file=sys.stderr, flush=True)
    logger.close()
    del run  # the DDP wrapper first (distributed.cleanup says why)
    distributed.cleanup()
    if stopped is not None:
        raise KeyboardInterrupt  # cli.run: "interrupted", exit status 130
    return model


if __name__ == "__main__":
    cli.run(main, args=ARGS)
