"""FoveatedEncoder: DINOv2 patches seen through one learned query per frame.

Phase 1 (`encode_patches`) runs DINOv2 once over the frames and caches, for every layer, the keys and values
of all tokens (CLS + patches), computed from that layer's `norm1` input. Phase 2 (`query_attend`) sends a
query through the same layers: at each layer it attends to the cached keys/values (the patches never see
the query), then goes through the layer's MLP, and leaves as ONE token per frame. Phase 2 is cheap, so a
frame encoded once can be read with many queries (coarse and fine passes, every benchmark mode).

Module names follow transformers 5.x `Dinov2Model` (`attention.q_proj/k_proj/v_proj/o_proj`).
`prepare_frames` is the one check of the frames a user hands the model (FoveatedVLM.encode calls it).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


# DINOv2's input normalisation (ImageNet statistics), applied to pixels in [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALISED_RANGE = (min(-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)),  # (pixel - mean) / std, pixel in
                    max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)))  # [0, 1]: [-2.12, 2.64]
RANGE_MARGIN = 0.5  # resizing normalised frames (bicubic) can overshoot the range a little
EXPECTED = ("frames must be [B, T, 3, H, W] (or one clip [T, 3, H, W]), H and W multiples of {patch} (e.g. 224), "
            "either ImageNet-normalised float ((pixel / 255 - mean) / std with mean (0.485, 0.456, 0.406) and std "
            "(0.229, 0.224, 0.225), values in about [-2.1, 2.6]) or uint8 pixels (normalised here)")


def prepare_frames(frames, frame_mask, patch_size):
    """The frames a user hands the model -> (frames [B, T, 3, H, W] float, frame_mask [B, T] bool).

    Handled: one clip [T, 3, H, W] (a batch of one), channels-last [..., H, W, 3], and uint8 pixels (scaled to
    [0, 1] and ImageNet-normalised here). Refused with the expected shape and range (ValueError): other ranks or
    dtypes, a frame_mask of another shape, and float frames that are not ImageNet-normalised: values beyond its
    range (0-255 pixels), or all of them within [0, 1] (ToTensor without Normalize; a normalised frame has
    values below zero unless no pixel is darker than the ImageNet mean). Only real frames are read: padded
    ones may hold anything. Frame sizes are checked where DINO reads them (encode_patches).
    """
    expected = EXPECTED.format(patch=patch_size)
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"frames is a {type(frames).__name__}; {expected}")
    if frames.dim() == 4:
        frames = frames[None]
        frame_mask = None if frame_mask is None else torch.as_tensor(frame_mask).reshape(1, -1)
    if frames.dim() == 5 and frames.shape[-1] == 3 and frames.shape[2] != 3:
        frames = frames.movedim(-1, 2)  # channels-last -> [B, T, 3, H, W]
    if frames.dim() != 5 or frames.shape[2] != 3:
        raise ValueError(f"frames have shape {list(frames.shape)}; {expected}")
    B, T = frames.shape[:2]
    if frame_mask is None:
        frame_mask = torch.ones(B, T, dtype=torch.bool, device=frames.device)
    if tuple(frame_mask.shape) != (B, T):
        raise ValueError(f"frame_mask has shape {list(frame_mask.shape)}, frames {list(frames.shape)}: it must "
                         f"be [B, T] = [{B}, {T}] (True at real frames)")
    frame_mask = frame_mask.bool()
    if frames.dtype == torch.uint8:
        mean = frames.new_tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
        std = frames.new_tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
        return (frames.float() / 255 - mean) / std, frame_mask
    if not frames.is_floating_point():
        raise ValueError(f"frames have dtype {frames.dtype}; {expected}")
    _check_normalised(frames[frame_mask], expected)
    return frames, frame_mask


def _check_normalised(real, expected):
    """real [M, 3, H, W] float: refuse values an ImageNet-normalised frame cannot hold (see prepare_frames)."""
    if real.numel() == 0:
        return
    lo, hi = (v.item() for v in torch.aminmax(real.float()))
    bottom, top = NORMALISED_RANGE
    if not (bottom - RANGE_MARGIN <= lo and hi <= top + RANGE_MARGIN):  # NaN fails too
        raise ValueError(f"frame values span [{lo:.3g}, {hi:.3g}]: not ImageNet-normalised (0-255 pixels as "
                         f"float? pass them as uint8 to have them normalised); {expected}")
    if 0 <= lo and hi <= 1 and lo < hi:
        raise ValueError(f"frame values all lie in [0, 1] ([{lo:.3g}, {hi:.3g}]): pixels scaled to [0, 1] but "
                         f"not normalised (ToTensor without Normalize?); {expected}")


@dataclass
class PatchKV:
    """What a query needs of a set of encoded frames."""

    keys: list      # per layer [U, heads, 1+P, head_dim] (empty for the shallow query)
    values: list    # per layer [U, heads, 1+P, head_dim]
    features: torch.Tensor  # [U, 1+P, D] final features after DINO's layernorm (CLS first)


def _group_slots(frame_idx, num_frames):
    """Lay out M queries as [U, R] slots, R = most queries on one frame, so that attention over each
    frame's keys needs no copy of those keys. Returns (frame, slot, R) with frame/slot of shape [M]."""
    order = torch.argsort(frame_idx, stable=True)
    counts = torch.bincount(frame_idx, minlength=num_frames)
    starts = torch.cumsum(counts, 0) - counts
    slot_sorted = torch.arange(len(frame_idx), device=frame_idx.device) - starts[frame_idx[order]]
    slot = torch.empty_like(frame_idx)
    slot[order] = slot_sorted
    return frame_idx, slot, int(counts.max())


class FoveatedEncoder(nn.Module):
    """DINOv2 with a query path: `encode_patches` once per frame, `query_attend` once per query."""

    def __init__(self, dino, query_dim, deep_query=True):
        super().__init__()
        self.dino = dino
        dim = dino.config.hidden_size
        self.dim = dim
        self.num_heads = dino.config.num_attention_heads
        assert dim % self.num_heads == 0, f"DINO width {dim} is not divisible by {self.num_heads} heads"
        self.head_dim = dim // self.num_heads
        self.patch_size = dino.config.patch_size
        self.deep_query = deep_query
        self.query_input_proj = nn.Linear(query_dim, dim, bias=False)
        self.output_proj = nn.Linear(dim, dim)
        self.gradient_checkpointing = False

    def _heads(self, x):  # [N, L, D] -> [N, heads, L, head_dim]
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def _patch_layer(self, layer, x):
        """One DINOv2 block over the patch tokens, returning its output and the block's keys/values."""
        attn = layer.attention
        h = layer.norm1(x)
        q, k, v = self._heads(attn.q_proj(h)), self._heads(attn.k_proj(h)), self._heads(attn.v_proj(h))
        a = F.scaled_dot_product_attention(q, k, v)  # [N, heads, L, head_dim]
        a = attn.o_proj(a.transpose(1, 2).flatten(2))
        x = x + layer.drop_path(layer.layer_scale1(a))
        x = x + layer.drop_path(layer.layer_scale2(layer.mlp(layer.norm2(x))))
        return x, k, v

    def encode_patches(self, images):
        """images [N, 3, H, W] (H, W multiples of the patch size) -> PatchKV for the N frames."""
        assert images.dim() == 4, f"expected images [N, 3, H, W], got {tuple(images.shape)}"
        H, W = images.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"frame size {H}x{W} is not a multiple of DINO's patch size {self.patch_size}: "
                             f"{EXPECTED.format(patch=self.patch_size)}")
        x = self.dino.embeddings(images)  # [N, 1+P, D]; position embeddings interpolate to H, W
        keys, values = [], []
        for layer in self.dino.encoder.layer:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x, k, v = checkpoint(self._patch_layer, layer, x, use_reentrant=False)
            else:
                x, k, v = self._patch_layer(layer, x)
            if self.deep_query:
                keys.append(k)
                values.append(v)
        return PatchKV(keys, values, self.dino.layernorm(x))

    def _attend(self, q, k, v, frame, slot, R, need_weights):
        """Query rows q [M, D] attend to per-frame keys/values [U, heads, 1+P, hd]; row m reads frame[m]."""
        grid = q.new_zeros(k.shape[0], R, q.shape[-1]).index_put((frame, slot), q)  # [U, R, D]
        qh = self._heads(grid)  # [U, heads, R, hd]
        if need_weights:
            w = torch.softmax(qh @ k.transpose(-1, -2) * self.head_dim**-0.5, dim=-1)  # [U, heads, R, 1+P]
            out = w @ v
            w = w[frame, :, slot]  # [M, heads, 1+P]
        else:
            out, w = F.scaled_dot_product_attention(qh, k, v), None
        return out.transpose(1, 2).flatten(2)[frame, slot], w  # [M, D]

    def query_attend(self, query, kv, frame_idx=None, return_attention=False):
        """query [M, query_dim]; frame_idx [M] picks each query's frame in kv (default: query m reads frame m).

        Returns tokens [M, D] (and, with return_attention, a list over layers of [M, heads, 1+P]).
        """
        U = kv.features.shape[0]
        if frame_idx is None:
            assert query.shape[0] == U, f"{query.shape[0]} queries for {U} frames need a frame_idx"
            frame_idx = torch.arange(U, device=query.device)
        frame, slot, R = _group_slots(frame_idx, U)
        x = self.query_input_proj(query)  # [M, D]
        maps = []
        if self.deep_query:
            for layer, k, v in zip(self.dino.encoder.layer, kv.keys, kv.values):
                attn = layer.attention
                a, w = self._attend(attn.q_proj(layer.norm1(x)), k, v, frame, slot, R, return_attention)
                x = x + layer.drop_path(layer.layer_scale1(attn.o_proj(a)))
                x = x + layer.drop_path(layer.layer_scale2(layer.mlp(layer.norm2(x))))
                maps.append(w)
            x = self.dino.layernorm(x)
        else:
            # Ablation: a single cross-attention on the final features with the last layer's projections.
            attn = self.dino.encoder.layer[-1].attention
            k, v = self._heads(attn.k_proj(kv.features)), self._heads(attn.v_proj(kv.features))
            a, w = self._attend(attn.q_proj(x), k, v, frame, slot, R, return_attention)
            x = attn.o_proj(a)
            maps.append(w)
        z = self.output_proj(x)  # [M, D]
        return (z, maps) if return_attention else z
