"""Where the foveated queries look: per-layer attention of the coarse (static) and fine (LLM-chosen) queries
over each frame's DINOv2 patches, drawn as heatmaps over the frames in one PNG grid, with the attention
entropy per frame (low entropy = a focused glance, log(1+P) = uniform over the CLS and P patches).

    python attention_viz.py --checkpoint checkpoints/stage2_135M --video clip.mp4 --out maps.png [--layers 0 -1]

--checkpoint takes a checkpoint folder or a training save_dir (then its newest checkpoint). --layers counts from
0, negative numbers from the last layer (-1).

From Python: `entropy = visualize(model, frames, "maps.png")` with frames [T, 3, H, W] from
frames.load_clip. The maps come from `model.attention_maps` (CLS first, then the patches row by row).
"""

import cli


def arguments(argv=None):
    p = cli.parser(__doc__)
    cli.add_clip_args(p, max_frames=8)
    p.add_argument("--out", default="attention.png", help="PNG to write")
    p.add_argument("--layers", type=int, nargs="+", help="encoder layers to draw (default: all; -1 is the last)")
    cli.add_threads(p)
    return p.parse_args(argv)


if __name__ == "__main__":  # parse before torch loads: --help and a flag error answer at once
    ARGS = arguments()

import math  # noqa: E402

import distributed  # noqa: E402  before torch: it sets OpenMP's wait policy, which torch reads once when it loads
import matplotlib  # noqa: E402

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from frames import denormalise  # noqa: E402
from generate import load_inputs  # noqa: E402

KINDS = ("coarse", "fine")


@torch.no_grad()
def query_attention(model, frames):
    """frames [T, 3, H, W] -> {"coarse"|"fine": [L, T, heads, 1+P]} for one clip."""
    device = next(model.parameters()).device
    maps = model.attention_maps(frames.unsqueeze(0).to(device))
    return {kind: maps[kind][:, 0].float().cpu() for kind in KINDS}


def attention_entropy(maps):
    """Entropy (nats) of each head's attention over CLS + patches, averaged over heads -> {kind: [L, T]}."""
    out = {}
    for kind in KINDS:
        p = maps[kind].clamp_min(1e-12)
        out[kind] = -(p * p.log()).sum(-1).mean(-1)
    return out


def _patch_grid(attn, height, width, patch):
    """Head-averaged attention over the patches [1+P] (CLS dropped) -> [H/patch, W/patch]."""
    h, w = height // patch, width // patch
    assert attn.shape[-1] == 1 + h * w, f"{attn.shape[-1] - 1} patches for a {h}x{w} grid"
    return attn[1:].reshape(h, w)


def plot_attention(frames, maps, entropy, out, patch_size, layers=None):
    """One PNG: the frames on the top row, then a row per (query kind, layer) with its head-averaged heatmap
    over each frame (one colour scale per row, from 0), titled with that frame's entropy."""
    T, _, H, W = frames.shape
    L = maps["coarse"].shape[0]
    layers = list(range(L)) if layers is None else layers
    bad = [layer for layer in layers if not -L <= layer < L]
    if bad:
        raise ValueError(f"layers {bad} do not exist: the encoder has layers 0..{L - 1} (or -{L}..-1 from the last)")
    layers = [layer % L for layer in layers]
    rgb = denormalise(frames).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    rows = [(None, None)] + [(kind, layer) for kind in KINDS for layer in layers]
    fig, axes = plt.subplots(len(rows), T, figsize=(1.6 * T + 0.8, 1.7 * len(rows)), squeeze=False)
    for r, (kind, layer) in enumerate(rows):
        heats = None if kind is None else [_patch_grid(maps[kind][layer, t].mean(0), H, W, patch_size)
                                           for t in range(T)]
        vmax = None if kind is None else max(h.max().item() for h in heats)  # one colour scale per row
        for t in range(T):
            ax = axes[r, t]
            ax.imshow(rgb[t])
            ax.set_xticks([])
            ax.set_yticks([])
            if kind is None:
                ax.set_title(f"frame {t}", fontsize=8)
                continue
            ax.imshow(heats[t].numpy(), cmap="inferno", alpha=0.6, extent=(0, W, H, 0), interpolation="nearest",
                      vmin=0.0, vmax=vmax)
            ax.set_title(f"H={entropy[kind][layer, t]:.2f}", fontsize=7)
            if t == 0:
                ax.set_ylabel(f"{kind} L{layer}", fontsize=8)
    fig.suptitle(f"query attention over patches (entropy in nats, uniform = {math.log(maps['coarse'].shape[-1]):.2f})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def format_entropy(entropy):
    """Per frame: last-layer and layer-mean entropy of the coarse and fine queries."""
    lines = [f"{'frame':>5} {'coarse last':>12} {'coarse mean':>12} {'fine last':>10} {'fine mean':>10}"]
    for t in range(entropy["coarse"].shape[1]):
        c, f = entropy["coarse"][:, t], entropy["fine"][:, t]
        lines.append(f"{t:>5} {c[-1]:>12.3f} {c.mean():>12.3f} {f[-1]:>10.3f} {f.mean():>10.3f}")
    return "\n".join(lines)


def visualize(model, frames, out, layers=None, verbose=True):
    """Draw the attention grid of `frames` [T, 3, H, W] into `out` (PNG); print and return the entropy
    per layer and frame {"coarse"|"fine": [L, T]}."""
    maps = query_attention(model, frames)
    entropy = attention_entropy(maps)
    plot_attention(frames.cpu(), maps, entropy, out, model.encoder.patch_size, layers)
    if verbose:
        print(format_entropy(entropy))
        print(f"attention maps written to {out}")
    return entropy


def main(argv=None, args=None):
    args = args or arguments(argv)
    distributed.set_threads(args.threads)
    model, _, frames = load_inputs(args)
    visualize(model, frames, args.out, args.layers)


if __name__ == "__main__":
    cli.run(main, args=ARGS)
