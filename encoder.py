"""FoveatedEncoder: DINOv2 patches seen through one learned query per frame.

Phase 1 (`encode_patches`) runs DINOv2 once over the frames and caches, for every layer, the keys and values
of all tokens (CLS + patches), computed from that layer's `norm1` input (the last layer's attention and MLP
over the patches feed nothing the query reads, so they are not run). Phase 2 (`query_attend`) sends a
query through the same layers: at each layer it attends to the cached keys/values (the patches never see
the query), then goes through the layer's MLP, and leaves as ONE token per frame. Phase 2 is cheap, so a
frame encoded once can be read with many queries (coarse and fine passes, every benchmark mode).

Module names follow transformers 5.x `Dinov2Model` (`attention.q_proj/k_proj/v_proj/o_proj`).
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from inputs import EXPECTED
from layout import group_slots


@dataclass
class PatchKV:
    """What a query needs of a set of encoded frames."""

    keys: list      # per layer [U, heads, 1+P, head_dim] (empty for the shallow query)
    values: list    # per layer [U, heads, 1+P, head_dim]
    features: Optional[torch.Tensor]  # shallow query only: [U, 1+P, D] DINO's final features (CLS first)

    def __len__(self):  # U, the number of frames
        return len(self.keys[0]) if self.keys else len(self.features)

    def select(self, frames):
        """The PatchKV of some of the frames (an index tensor)."""
        pick = lambda t: None if t is None else t[frames]
        return PatchKV([k[frames] for k in self.keys], [v[frames] for v in self.values], pick(self.features))


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

    def _patch_kv(self, layer, h):
        """A block's keys and values [N, heads, L, head_dim] from its norm1 output h [N, L, D]."""
        return self._heads(layer.attention.k_proj(h)), self._heads(layer.attention.v_proj(h))

    def _patch_layer(self, layer, x):
        """One DINOv2 block over the patch tokens, returning its output and the block's keys/values."""
        attn = layer.attention
        h = layer.norm1(x)
        q, (k, v) = self._heads(attn.q_proj(h)), self._patch_kv(layer, h)
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
        *layers, last = self.dino.encoder.layer
        for layer in layers if self.deep_query else self.dino.encoder.layer:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x, k, v = checkpoint(self._patch_layer, layer, x, use_reentrant=False)
            else:
                x, k, v = self._patch_layer(layer, x)
            keys.append(k)
            values.append(v)
        if not self.deep_query:
            return PatchKV([], [], self.dino.layernorm(x))
        k, v = self._patch_kv(last, last.norm1(x))
        return PatchKV(keys + [k], values + [v], None)

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

    def query_attend(self, query, kv, frame_idx=None, return_attention=False, slots=None):
        """query [M, query_dim]; frame_idx [M] picks each query's frame in kv (default: query m reads frame m).
        `slots`, (slot [M], R) of layout.group_slots, is a training batch's Plan: every frame read, no host sync.

        Returns tokens [M, D] (and, with return_attention, a list over layers of [M, heads, 1+P]).
        """
        U = len(kv)
        if frame_idx is None:
            assert query.shape[0] == U, f"{query.shape[0]} queries for {U} frames need a frame_idx"
            frame_idx = torch.arange(U, device=query.device)
        if slots is not None:
            frame, (slot, R) = frame_idx, slots
        else:
            used, frame_idx = torch.unique(frame_idx, return_inverse=True)
            if len(used) < U:  # attend over the frames read only (autoregressive steps read one frame each)
                kv = kv.select(used)
            frame, slot, R = group_slots(frame_idx, len(used))
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
