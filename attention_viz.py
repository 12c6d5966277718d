r"""Where the foveated queries look: per-layer attention of the coarse (static) and fine (LLM-chosen) queries
over each frame's DINOv2 patches, drawn as heatmaps over the frames in one PNG grid, with the attention
entropy per frame (low entropy = a focused glance, log(1+P) = uniform over the CLS and P patches). Also what a
needle-in-a-haystack run found, by haystack length and needle depth (`accuracy_heatmap`, benchmark.py --heatmap).

    python attention_viz.py --checkpoint checkpoints/stage2_135M --video clip.mp4 --out maps.png [--layers 0 -1]
    python attention_viz.py --checkpoint checkpoints/stage2_135M --video clip.mp4 --animate maps.mp4 \
        [--mode autoregressive]

--checkpoint takes a checkpoint folder or a training save_dir (then its newest checkpoint). --layers counts from
0, negative numbers from the last layer (-1). --animate writes the video with one mode's queries' attention
overlaid on each frame, beside the static query's, above both queries' entropy per frame (an .mp4, or a .gif);
the layer drawn is the last of --layers (default: the last). demo.py shows the same animation in its page.

From Python: `entropy = visualize(model, frames, "maps.png")` with frames [T, 3, H, W] from
frames.load_clip. The maps come from `model.attention_maps` (CLS first, then the patches row by row).
"""

import cli
from config import MODES


def arguments(argv=None):
    p = cli.parser(__doc__)
    cli.add_clip_args(p, max_frames=8)
    p.add_argument("--out", help="PNG grid to write (default: attention.png, unless --animate is given)")
    p.add_argument("--layers", type=int, nargs="+", help="encoder layers to draw (default: all; -1 is the last; "
                   "the animation draws the last of them)")
    p.add_argument("--animate", help="also write the attention as a video: an .mp4 or a .gif file")
    p.add_argument("--mode", default="autoregressive", choices=MODES, help="whose queries the animation shows "
                   "beside the static query's (default: autoregressive)")
    cli.add_threads(p)
    return p.parse_args(argv)


if __name__ == "__main__":  # parse before torch loads: --help and a flag error answer at once
    ARGS = arguments()

import math  # noqa: E402
import os  # noqa: E402

import distributed  # noqa: E402  before torch: it sets OpenMP's wait policy, which torch reads once when it loads
import matplotlib  # noqa: E402

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from frames import denormalise  # noqa: E402
from generate import load_inputs  # noqa: E402
from synthetic import encode_mp4  # noqa: E402

KINDS = ("coarse", "fine")  # the PNG grid's rows
LABELS = {"coarse": "static query", "fine": "fine queries", "autoregressive": "autoregressive queries"}
ANIMATIONS = (".mp4", ".gif")
# The queries each mode reads its frames with (model.attention_maps' keys); coarse_fine's coarse pass reads
# them with the static query, coarse_only's tokens are that pass's.
MODE_KIND = {"coarse_only": "coarse", "coarse_fine": "fine", "autoregressive": "autoregressive"}
ANIMATION_FPS = 2  # frames a second: slow enough to follow where the queries move


@torch.no_grad()
def query_attention(model, frames):
    """frames [T, 3, H, W] -> {"coarse"|"fine"|"autoregressive": [L, T, heads, 1+P]} for one clip."""
    device = next(model.parameters()).device
    maps = model.attention_maps(frames.unsqueeze(0).to(device))
    return {kind: m[:, 0].float().cpu() for kind, m in maps.items()}


def attention_entropy(maps):
    """Entropy (nats) of each head's attention over CLS + patches, averaged over heads -> {kind: [L, T]}."""
    out = {}
    for kind in maps:
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
    layers = _check_layers(layers, L)
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


def _check_layers(layers, L):
    """Layer numbers (negative: from the last) -> 0..L-1; one that does not exist is a ValueError."""
    bad = [layer for layer in layers if not -L <= layer < L]
    if bad:
        raise ValueError(f"layers {bad} do not exist: the encoder has layers 0..{L - 1} (or -{L}..-1 from the last)")
    return [layer % L for layer in layers]


def animation_frames(frames, maps, entropy, mode, patch_size, layer=None):
    """The attention of `mode`'s queries as a video -> uint8 [T, h, w, 3]: frame t, then that attention (head
    average at `layer`, default the last) over the frame in grey, beside the static query's, above both
    queries' entropy at every frame with frame t marked. One colour scale per query over the whole video."""
    T, _, H, W = frames.shape
    L = maps["coarse"].shape[0]
    layer = _check_layers([-1 if layer is None else layer], L)[0]
    kinds = list(dict.fromkeys([MODE_KIND[mode], "coarse"]))  # coarse_only's queries are the static one
    rgb = denormalise(frames.cpu()).clamp(0, 1).permute(0, 2, 3, 1).numpy()  # [T, H, W, 3]
    grey = np.repeat(rgb.mean(-1, keepdims=True) * 0.8, 3, -1)  # the frame under the attention, so colours read
    fig = plt.figure(figsize=(1.6 + 2.4 * (1 + len(kinds)), 4.8), dpi=100)  # even pixel sides, as H.264 needs
    grid = fig.add_gridspec(2, 1 + len(kinds), height_ratios=[3, 1.5])
    ax = fig.add_subplot(grid[0, 0])
    pictures = [(ax.imshow(rgb[0]), rgb)]
    ax.set_title("frame", fontsize=9)
    ax.set_axis_off()
    overlays = []
    for i, kind in enumerate(kinds, 1):
        heat = torch.stack([_patch_grid(maps[kind][layer, t].mean(0), H, W, patch_size) for t in range(T)]).numpy()
        ax = fig.add_subplot(grid[0, i])
        pictures.append((ax.imshow(grey[0], extent=(0, W, H, 0)), grey))
        overlays.append((ax.imshow(heat[0], cmap="inferno", extent=(0, W, H, 0), vmin=0.0, vmax=float(heat.max()),
                                   interpolation="nearest"), heat / max(float(heat.max()), 1e-12), heat))
        named = kind != MODE_KIND[mode] or mode.startswith(LABELS[kind].split()[0])
        ax.set_title(LABELS[kind] if named else f"{LABELS[kind]} ({mode})", fontsize=9)
        ax.set_axis_off()
    marker = _entropy_plot(fig.add_subplot(grid[1, :]), entropy, kinds, layer, math.log(maps["coarse"].shape[-1]))
    title = fig.suptitle(f"frame {T} of {T}: where the queries look (DINO layer {layer}, mean of the heads)",
                         fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.98))  # with the longest title in place
    out = []
    for t in range(T):
        for picture, video in pictures:
            picture.set_data(video[t])
        for overlay, alpha, heat in overlays:  # opaque where the query looks most, the frame seen where it does not
            overlay.set_data(heat[t])
            overlay.set_alpha(0.35 + 0.6 * alpha[t])
        marker.set_xdata([t, t])
        title.set_text(f"frame {t + 1} of {T}: where the queries look (DINO layer {layer}, mean of the heads)")
        fig.canvas.draw()
        out.append(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
    plt.close(fig)
    return np.stack(out)


def _entropy_plot(ax, entropy, kinds, layer, uniform):
    """Each query's attention entropy per frame at `layer`; returns the line marking the frame shown."""
    T = entropy["coarse"].shape[1]
    for kind in kinds:
        ax.plot(range(T), entropy[kind][layer].numpy(), marker="o", markersize=3, label=LABELS[kind])
    ax.axhline(uniform, color="grey", linestyle="--", linewidth=0.8, label="uniform")
    ax.set_xlim(-0.5, T - 0.5)
    ax.set_ylim(0, uniform * 1.1)  # entropy lies between 0 (one patch) and uniform
    ax.set_xlabel("frame", fontsize=8)
    ax.set_ylabel("entropy (nats)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    return ax.axvline(0, color="black", linewidth=1)


def check_animation_path(out):
    """An animation's file name must say its format: .mp4 (H.264) or .gif."""
    if os.path.splitext(out)[1].lower() not in ANIMATIONS:
        raise ValueError(f"cannot write the animation {out}: name an {' or a '.join(ANIMATIONS)} file")


def write_animation(video, out, fps=ANIMATION_FPS):
    """uint8 frames [T, h, w, 3] -> `out`, an .mp4 (H.264, what browsers play) or a looping .gif."""
    check_animation_path(out)
    if out.lower().endswith(".mp4"):
        with open(out, "wb") as f:
            f.write(encode_mp4(video, fps))
    else:
        first, *rest = [Image.fromarray(frame) for frame in video]
        first.save(out, save_all=True, append_images=rest, duration=round(1000 / fps), loop=0)
    return out


def animate(model, frames, out, mode="autoregressive", layer=None, verbose=True):
    """Write the attention of `mode`'s queries over `frames` [T, 3, H, W] as an animation (`out`: .mp4 or
    .gif; see animation_frames); return the entropy per layer and frame {kind: [L, T]}."""
    check_animation_path(out)
    maps = query_attention(model, frames)
    entropy = attention_entropy(maps)
    write_animation(animation_frames(frames, maps, entropy, mode, model.encoder.patch_size, layer), out)
    if verbose:
        print(f"{mode} attention animation written to {out}")
    return entropy


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


def main(argv=None, args=None):
    args = args or arguments(argv)
    distributed.set_threads(args.threads)
    if args.animate:
        check_animation_path(args.animate)
    model, _, frames = load_inputs(args)
    if args.out or not args.animate:
        visualize(model, frames, args.out or "attention.png", args.layers)
    if args.animate:
        animate(model, frames, args.animate, args.mode, args.layers[-1] if args.layers else None)


if __name__ == "__main__":
    cli.run(main, args=ARGS)
