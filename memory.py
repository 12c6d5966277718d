"""The GPU memory one training step needs, known before renting a GPU: `python bench.py memory --config CONFIG`.

For each kind of batch a config's loader can make at its largest (a video batch at the frame and token budgets,
a text-only batch at the token budget, DPO pairs), the step train.py runs is executed at the config's real sizes
under torch's FakeTensorMode: every tensor is a meta tensor with its true shape and dtype and no data, every op
runs for its output's shape only, so a 1.7B step at full depth and width takes seconds and no memory. `LiveBytes`
adds up the storage of every tensor alive at each op (an allocation when an op makes a storage, a free when the
last reference to it goes) and keeps the peak: the weights, gradients, AdamW states and DPO reference held across
steps, plus what the forward saves for the backward and the backward's temporaries. This works because the step
has no data-dependent shape: the loader's plan (layout.Plan) carries every size the batch's data decides.

What is counted as on the GPU: train.build_model's policy (float32 master weights, the config's freeze_* switches
and gradient checkpointing) and DPO reference (bfloat16 on CUDA: train.reference_dtype), a float32 gradient per
trained parameter (held across steps, as DDP's gradient buckets hold them), AdamW's two float32 states per trained
parameter (fused on CUDA: its step allocates nothing more), and the forward + backward under autocast in the
config's dtype for CUDA (bf16 by default). Autocast runs with the CPU's op lists, which put the same ops (matmuls,
attention) in bf16 as CUDA's; the ops CUDA's lists keep in float32 and the CPU's do not (layer_norm, softmax) take
float32 inputs here already. Attention is the CPU's flash kernel, which like CUDA's saves its output and
log-sum-exp, not the attention matrix. Not counted: the CUDA context and the cuBLAS / NCCL workspaces (`CONTEXT_GIB`)
and the caching allocator's fragmentation (`FRAGMENTATION`), which `fits` adds. A test measures the estimate
against the peak resident memory of the same step run for real on the CPU (tests/test_memory.py).
"""

import dataclasses
import math
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

import checkpoint
import distributed
import train
from collate import collate
from config import ConfigError, ModelSettings
from layout import Plan
from model import FoveatedVLM
from pretrained import SHAPES

GIB = 2 ** 30
CONTEXT_GIB = 2.0  # CUDA context, cuBLAS and NCCL workspaces: held besides the tensors (not measured here)
FRAGMENTATION = 0.10  # the caching allocator's reserved memory beyond the peak allocated (not measured here)
BACKBONE_NAMES = {"llm": ("smollm2-1.7b", "smollm2-135m"), "dino": ("dinov2-small",)}  # SHAPES named in hub ids


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage alive, and their peak, over the ops run inside it (and the tensors `track`ed)."""

    def __init__(self):
        super().__init__()
        self.now = self.peak = 0
        self._seen = WeakIdKeyDictionary()  # storage -> its bytes, while it lives

    def track(self, *tensors):
        for t in tensors:
            storage = t.untyped_storage()
            if storage not in self._seen:  # a view, or an in-place op's output, is no new storage
                self._seen[storage] = storage.nbytes()
                weakref.finalize(storage, self._free, storage.nbytes())
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)

    def _free(self, n):
        self.now -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.track(*(t for t in tree_leaves(out) if isinstance(t, torch.Tensor)))
        return out


@dataclasses.dataclass
class Estimate:
    """One batch kind's step, in bytes: what is held across steps, and the peak over the forward and backward."""

    kind: str
    batch: str  # the batch's shape, in words
    weights: int  # the policy's
    reference: int  # DPO's frozen reference
    gradients: int
    optimizer: int
    peak: int  # all of it at the step's peak: the above and the activations and temporaries

    @property
    def activations(self):
        return self.peak - self.weights - self.reference - self.gradients - self.optimizer

    def fits(self, gpu_gib):
        return self.peak / GIB * (1 + FRAGMENTATION) + CONTEXT_GIB <= gpu_gib


def model_settings(cfg, shapes=None):
    """The config's architecture as ModelSettings holding full backbone configs (nothing downloaded): `shapes`, a
    (LLM, DINO) pair of pretrained.SHAPES keys, when given; else init_from's saved settings; else the config's
    llm_config / dino_config, or the SHAPES its llm / dino hub ids name."""
    m = cfg.model
    if shapes is None and m.init_from is not None:
        try:
            saved = checkpoint.read_settings(checkpoint.resolve(m.init_from))
        except FileNotFoundError:
            saved = None
        if saved is None:
            raise ConfigError(f"model.init_from {m.init_from} does not exist yet: pass --shapes (135M or 1.7B) "
                              "for the architecture it will have")
        settings = ModelSettings.of(saved)
    elif shapes is not None:
        settings = dataclasses.replace(ModelSettings.of(m), llm_config=dict(SHAPES[shapes[0]]),
                                       dino_config=dict(SHAPES[shapes[1]]))
    else:
        settings = dataclasses.replace(ModelSettings.of(m), llm_config=m.llm_config or _named_shape(m.llm, "llm"),
                                       dino_config=m.dino_config or _named_shape(m.dino, "dino"))
    dino = dict(settings.dino_config, image_size=cfg.data.frame_size)
    return dataclasses.replace(settings, llm=None, dino=None, dino_config=dino)


def _named_shape(name, part):
    known = [key for key in BACKBONE_NAMES[part] if key in (name or "").lower()]
    if not known:
        raise ConfigError(f"model.{part} {name!r} is not a backbone whose shape is known here "
                          f"({', '.join(BACKBONE_NAMES[part])}): pass --shapes")
    return dict(SHAPES[known[0]])


def largest_batches(cfg, vocab):
    """{kind: samples}: the largest batch of each kind the config's loader can make (collate.BudgetBatches):
    every frame distinct, every text token a target, as many samples as batch_size and the budgets allow, with
    texts as long as max_text_tokens and the token budget allow. Kinds: video (the train shards), text (text
    retention, when on), dpo (instead of video for DPO)."""
    d, B = cfg.data, cfg.training.batch_size
    T = min(d.max_frames or 64, d.max_total_frames or math.inf)
    B_video = min(B, d.max_total_frames // T) if d.max_total_frames else B
    kinds = {"dpo" if cfg.loss.type == "dpo" else "video": (B_video, T)}
    if d.text_shards and d.text_ratio > 0:
        kinds["text"] = (B, 0)
    out = {}
    for kind, (n, frames) in kinds.items():
        rows = 2 if kind == "dpo" else 1
        S = d.max_text_tokens
        if d.max_batch_tokens:  # the token budget: as many samples as fit, with texts as long as it allows
            n = max(1, min(n, d.max_batch_tokens // (rows * (frames + 1))))
            S = max(1, min(S, d.max_batch_tokens // (rows * n) - frames))
        out[kind] = _samples(n, frames, S, d.frame_size, vocab, kind == "dpo")
    return out


def _samples(n, frames, S, size, vocab, dpo):
    g = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(n):
        pixels = torch.randint(0, 256, (frames, 3, size, size), dtype=torch.uint8, generator=g)
        ids, targets = torch.randint(3, vocab, (S,), generator=g), torch.ones(S, dtype=torch.long)
        text = ({"chosen_ids": ids, "chosen_loss_mask": targets, "rejected_ids": ids.flip(0),
                 "rejected_loss_mask": targets} if dpo else {"input_ids": ids, "loss_mask": targets})
        samples.append({"frames": pixels, **text})
    return samples


def describe(batch):
    B, T = batch["frame_mask"].shape
    texts = [batch[k].shape[1] for k in ("input_ids", "chosen_ids") if k in batch]
    rows = 2 * B if "chosen_ids" in batch else B
    return (f"{B} x ({T} frames + {texts[0]} tokens){' x 2 rows' if rows > B else ''} = {rows * batch['plan'].L} "
            f"LLM tokens, {len(batch['pixels'])} distinct frames")


def estimate(cfg, settings, kind, samples, device_type="cuda"):
    """The Estimate of one training step of `cfg` on the collated `samples`, for a GPU (`device_type` "cuda": its
    autocast dtype and DPO reference dtype) or for the CPU (what tests measure)."""
    dev, cpu = torch.device(device_type), torch.device("cpu")
    dtype = distributed.resolve_dtype(dev, cfg.training.dtype)
    batch = collate(samples, pad_id=0)
    meta = torch.device("meta")
    with meta:
        model, reference = train.build_model(cfg, meta, FoveatedVLM.from_config(settings))
    if reference is not None:
        reference.to(train.reference_dtype(dev, cfg.training.dtype))
    with FakeTensorMode(allow_non_fake_inputs=True) as fake:
        for m in filter(None, (model, reference)):
            m.to_empty(device=cpu)
            m.llm.tie_weights()  # to_empty makes each parameter anew: the tied embeddings too
        trained = [p for p in model.parameters() if p.requires_grad]
        for p in trained:
            p.grad = torch.zeros_like(p)
        states = [torch.zeros_like(p) for p in trained for _ in range(2)]  # AdamW's exp_avg and exp_avg_sq
        live = LiveBytes()
        held = {"weights": [*model.parameters(), *model.buffers()], "gradients": [p.grad for p in trained],
                "optimizer": states, "reference": [*reference.parameters(), *reference.buffers()] if reference else []}
        sizes = {}
        for name, tensors in held.items():
            before = live.now
            live.track(*tensors)
            sizes[name] = live.now - before
        fake_batch = {k: fake.from_tensor(v) if torch.is_tensor(v) else v for k, v in batch.items()}
        fake_batch["plan"] = Plan(*(fake.from_tensor(x) if torch.is_tensor(x) else x for x in batch["plan"]))
        step_module = train.StepModule(model, cfg.loss.type == "dpo", cfg.model.mode)
        with live:
            with torch.autocast("cpu", dtype=getattr(torch, dtype), enabled=dtype != "float32"):
                loss, _ = train.compute_loss(step_module, reference, fake_batch, cfg)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, cfg.training.max_grad_norm)
    return Estimate(kind, describe(batch), peak=live.peak, **sizes)


def shared_memory(cfg):
    """Bytes of shared memory (/dev/shm) the train loader's batches can hold at once on one rank: each worker has
    prefetch_factor uint8 batches in flight, each of up to max_total_frames (else batch_size x max_frames) frames."""
    d = cfg.data
    frames = d.max_total_frames or cfg.training.batch_size * (d.max_frames or 64)
    return d.num_workers * d.prefetch_factor * frames * 3 * d.frame_size ** 2


def report(cfg, settings, gpu_gib, world_size=8, device_type="cuda"):
    """The report's lines: per batch kind, the step's peak GiB split into its parts, and whether it fits."""
    t, dtype = cfg.training, distributed.resolve_dtype(torch.device(device_type), cfg.training.dtype)
    lines = [f"one training step on {device_type}: {dtype} autocast, gradient checkpointing "
             f"{'on' if cfg.model.gradient_checkpointing else 'off'}, batch_size {t.batch_size}, max_total_frames "
             f"{cfg.data.max_total_frames}, max_batch_tokens {cfg.data.max_batch_tokens}, max_text_tokens "
             f"{cfg.data.max_text_tokens}; GiB, measured on meta tensors (FakeTensorMode)",
             f"{'batch':<6} {'peak':>6} = {'weights':>7} + {'grads':>5} + {'AdamW':>5} + {'ref':>4} + "
             f"{'activations':>11}  fits {gpu_gib:g} GiB?  largest batch"]
    vocab = settings.llm_config["vocab_size"]
    for kind, samples in largest_batches(cfg, vocab).items():
        e = estimate(cfg, settings, kind, samples, device_type)
        g = lambda x: f"{x / GIB:.1f}"  # noqa: E731
        lines.append(f"{kind:<6} {g(e.peak):>6} = {g(e.weights):>7} + {g(e.gradients):>5} + {g(e.optimizer):>5} + "
                     f"{g(e.reference):>4} + {g(e.activations):>11}  {'yes' if e.fits(gpu_gib) else 'NO':>15}  "
                     f"{e.batch}")
    d, shm = cfg.data, shared_memory(cfg)
    lines.append(f"fits: peak + {FRAGMENTATION:.0%} (allocator) + {CONTEXT_GIB:g} GiB (CUDA context, workspaces) "
                 f"within {gpu_gib:g} GiB")
    lines.append(f"loader shared memory (/dev/shm): {d.num_workers} workers x prefetch {d.prefetch_factor} x up to "
                 f"{shm // max(1, d.num_workers * d.prefetch_factor):,} B of uint8 frames = {shm / GIB:.2f} GiB per "
                 f"rank, {world_size * shm / GIB:.1f} GiB for {world_size} ranks")
    return "\n".join(lines)
