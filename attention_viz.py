"""Where the foveated queries look: per-layer attention of the coarse (static) and fine (LLM-chosen) queries
over each frame's DINOv2 patches, drawn as heatmaps over the frames in one PNG grid, with the attention
entropy per frame (low entropy = a focused glance, log(1+P) = uniform over the CLS and P patches). Also what a
needle-in-a-haystack run found, by haystack length and needle depth (`accuracy_heatmap`, benchmark.py --heatmap).

    python attention_viz.py --checkpoint checkpoints/stage2_135M --video clip.mp4 --out maps.png [--layers 0 11]

--checkpoint takes a checkpoint folder or a training save_dir (then its `latest` checkpoint).

From Python: `entropy = visualize(model, frames, "maps.png")` with frames [T, 3, H, W] from
frames.load_clip. The maps come from `model.attention_maps` (CLS first, then the patches row by row).
"""

import argparse
import math

import distributed  # before torch: it sets OpenMP's wait policy, which torch reads once when it loads
import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from generate import add_input_args, load_inputs  # noqa: E402
from frames import denormalise  # noqa: E402

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
    bad = [layer for layer in layers if not 0 <= layer < L]
    if bad:
        raise ValueError(f"layers {bad} do not exist: the encoder has layers 0..{L - 1}")
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


def accuracy_heatmap(records, modes, out, chance=25.0):
    """Needle in a haystack: accuracy (%) by haystack length (columns) and needle depth (rows), one panel per task
    (colour, shape) and mode, from benchmark.py's per-question records (categories `task`, `length` and `depth`),
    drawn into `out` (PNG)."""
    lengths = sorted({r["categories"]["length"] for r in records})
    depths = sorted({r["categories"]["depth"] for r in records})
    tasks = sorted({r["categories"].get("task", "all") for r in records})
    fig, axes = plt.subplots(len(tasks), len(modes), squeeze=False,
                             figsize=(1.0 * len(lengths) * len(modes) + 1.5, (0.45 * len(depths) + 1.2) * len(tasks)))
    for row, task in zip(axes, tasks):
        for ax, mode in zip(row, modes):
            right, total = torch.zeros(len(depths), len(lengths)), torch.zeros(len(depths), len(lengths))
            for r in records:
                if r["categories"].get("task", "all") == task:
                    cell = depths.index(r["categories"]["depth"]), lengths.index(r["categories"]["length"])
                    right[cell] += r["modes"][mode]["correct"]
                    total[cell] += 1
            _heatmap(ax, 100 * right / total.clamp(min=1), lengths, depths)
            ax.set_title(f"{task}, {mode}: {100 * right.sum() / total.sum():.0f}% (chance {chance:.0f}%)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _heatmap(ax, accuracy, lengths, depths):
    """accuracy [depths, lengths] in % as a red-to-green grid with its values written in."""
    ax.imshow(accuracy.numpy(), cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            ax.text(j, i, f"{accuracy[i, j]:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [_duration(n) for n in lengths], fontsize=8)
    ax.set_yticks(range(len(depths)), [f"{d}%" for d in depths], fontsize=8)
    ax.set_xlabel("haystack (frames at 1 fps)", fontsize=8)
    ax.set_ylabel("needle depth", fontsize=8)


def _duration(seconds):
    return f"{seconds // 3600}h" if seconds % 3600 == 0 else f"{seconds // 60}m" if seconds % 60 == 0 else f"{seconds}s"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_args(p, max_frames=8)
    p.add_argument("--out", default="attention.png", help="PNG to write")
    p.add_argument("--layers", type=int, nargs="+", help="encoder layers to draw (default: all)")
    args = distributed.parse_cli(p, argv)
    model, _, frames = load_inputs(p, args)
    visualize(model, frames, args.out, args.layers)


if __name__ == "__main__":
    distributed.run_cli(main)
