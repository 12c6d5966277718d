r"""Answer a question about a video or an image with a trained fVLM checkpoint.

    python generate.py --checkpoint checkpoints/stage2_135M --video clip.mp4 --prompt "What happens?"
    python generate.py --checkpoint checkpoints/stage2_135M/best --image photo.jpg --prompt "Describe it." \
        [--mode autoregressive] [--max-new-tokens 64] [--threads N]
    python generate.py --checkpoint checkpoints/stage2_135M --video hour.mp4 --prompt "What happens?" \
        --max-frames 0 [--fps 1] [--chunk-frames 64]

--checkpoint takes a checkpoint folder or a training save_dir (then its `latest` checkpoint).
From Python (notebooks): `model, tokenizer, frame_size = model.load_checkpoint(dir)`, then
`answer(model, tokenizer, load_clip("clip.mp4", FrameConfig(frame_size=frame_size)).frames, "question")`.
Videos are sampled as in training (frames.load_clip): 1 frame per second up to --max-frames (64), uniform over the
video beyond; a folder of frames gives every frame up to --max-frames; an image is replicated to 8 frames (as
stages 2-3 trained). The model is rebuilt from the checkpoint's saved config (FoveatedVLM.from_pretrained).

A video is decoded and encoded --chunk-frames at a time into the LLM's KV cache (frames.stream_clip into
model.stream: constant memory, an hour at 1 fps is 3,600 tokens), with a progress bar of frames/s. --max-frames 0
takes every frame at 1 fps (or --fps); more than the LLM's context holds beside the prompt and the answer are
sampled uniformly down to what fits, and said so, unless --fps was given: then it stops before decoding, naming
the frame count, the fps and the longest video that fits.
"""

import argparse
import dataclasses
import os
import sys

import distributed  # before torch: it sets OpenMP's wait policy, which torch reads once when it loads
import torch

from config import MAX_FRAMES, MODES, FrameConfig
from distributed import autocast
from frames import SkipSample, fit, load_clip, probe, sampled, stream_clip
from model import load_checkpoint
from streaming import context_room
from tokenization import prompt_ids


@torch.no_grad()
def answer(model, tokenizer, frames, prompt, mode="autoregressive", max_new_tokens=64, **sampling):
    """The model's answer (text) to `prompt` about `frames` [T, 3, H, W]; greedy unless do_sample=True."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids(tokenizer, prompt)], device=device)
    with autocast(device):
        out = model.generate(frames.unsqueeze(0).to(device), ids, torch.ones_like(ids),
                             max_new_tokens=max_new_tokens, mode=mode,
                             eos_token_id=tokenizer.eos_token_id, **sampling)
    return tokenizer.decode(out[0], skip_special_tokens=True).strip()


@torch.no_grad()
def answer_video(model, tokenizer, media, prompt, cfg, mode="autoregressive", max_new_tokens=64, fixed_fps=False,
                 **sampling):
    """The model's answer to `prompt` about a video (a path or frames.Media) sampled by `cfg` (a FrameConfig),
    decoded and encoded a chunk at a time (cfg.chunk_frames): memory holds a chunk and the KV cache, whatever the
    video's length. Frames beyond what the LLM's context holds beside the prompt and the answer are sampled
    uniformly down to it, said on stderr, unless `fixed_fps`: then a ValueError names what fits, before any
    decoding (frames.fit)."""
    device = next(model.parameters()).device
    ids = prompt_ids(tokenizer, prompt)
    source = probe(media)
    cfg, note = fit(media, cfg, context_room(model, len(ids) + max_new_tokens), fixed_fps, source)
    if note:
        print(note, file=sys.stderr)
    stream = model.stream(mode, cfg.chunk_frames)
    with autocast(device):
        stream.read(stream_clip(media, cfg, stream.chunk), total=sampled(source, media, cfg))
        out = stream.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id, **sampling)
    return tokenizer.decode(out, skip_special_tokens=True).strip()


def add_input_args(p, max_frames):
    """The command-line flags shared with attention_viz.py: checkpoint, one video or image, frames, device."""
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, or a training save_dir (its latest)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--video", help="video file (or folder of frames)")
    src.add_argument("--image", help="image file (replicated to 8 frames)")
    p.add_argument("--max-frames", type=int, default=max_frames, help="most frames taken from a video: 1 per "
                   "second up to this many, uniform over the video beyond (as in training); 0: no cap")
    p.add_argument("--frame-size", type=int, help="frame side in pixels (default: the checkpoint's training config)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def load_inputs(p, args):
    """(model, tokenizer, frames [T, 3, H, W]) for parsed `add_input_args` flags; an unreadable input is a
    usage error naming it."""
    model, tokenizer, cfg = load_model(p, args)
    source = args.video or args.image
    try:
        clip = load_clip(source, cfg)
    except SkipSample as e:
        p.error(f"cannot read {source}: {e}")
    return model, tokenizer, clip.frames


def load_model(p, args):
    """(model, tokenizer, FrameConfig of the flags) for parsed `add_input_args` flags, the input checked."""
    source = args.video or args.image
    if not os.path.exists(source):
        p.error(f"{source} does not exist")
    if args.max_frames is not None and args.max_frames < 0:
        p.error(f"--max-frames must be 0 (no cap) or more, got {args.max_frames}")
    model, tokenizer, frame_size = load_checkpoint(args.checkpoint, args.device)
    return model, tokenizer, FrameConfig(frame_size=args.frame_size or frame_size, max_frames=args.max_frames or None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_args(p, max_frames=None)
    p.add_argument("--prompt", required=True)
    p.add_argument("--mode", default="autoregressive", choices=MODES)
    p.add_argument("--max-new-tokens", type=int, default=64)
    add_long_video_args(p)
    args = distributed.parse_cli(p, argv)
    if args.fps is not None and args.fps <= 0 or args.chunk_frames is not None and args.chunk_frames < 1:
        p.error("--fps must be above 0 and --chunk-frames at least 1")
    if args.max_frames is None:  # a rate asked for is kept: no cap unless one is given
        args.max_frames = 0 if args.fps else MAX_FRAMES
    if args.image:
        model, tokenizer, frames = load_inputs(p, args)
        print(answer(model, tokenizer, frames, args.prompt, args.mode, args.max_new_tokens))
        return
    model, tokenizer, cfg = load_model(p, args)
    cfg = dataclasses.replace(cfg, sample_fps=args.fps or cfg.sample_fps, chunk_frames=args.chunk_frames)
    try:
        print(answer_video(model, tokenizer, args.video, args.prompt, cfg, args.mode, args.max_new_tokens,
                           fixed_fps=args.fps is not None))
    except SkipSample as e:
        p.error(f"cannot read {args.video}: {e}")


def add_long_video_args(p):
    """generate.py's flags for long videos."""
    p.add_argument("--fps", type=float, help="frames taken per second of video (default 1); given, the rate is "
                   "kept: no cap unless --max-frames is given, and a video whose frames do not fit in the LLM's "
                   "context is refused")
    p.add_argument("--chunk-frames", type=int, help="frames decoded and encoded at a time (default: 64 on the CPU, "
                   "256 on CUDA)")


if __name__ == "__main__":
    distributed.run_cli(main)
