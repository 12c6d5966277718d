r"""Answer a question about a video or an image with a trained fVLM checkpoint.

    python generate.py --checkpoint checkpoints/stage2_135M --video clip.mp4 --prompt "What happens?"
    python generate.py --checkpoint checkpoints/stage2_135M/best --image photo.jpg --prompt "Describe it." \
        [--mode autoregressive] [--max-new-tokens 64] [--threads N]

--checkpoint takes a checkpoint folder or a training save_dir (then its `latest` checkpoint).
From Python (notebooks): `model, tokenizer, frame_size = model.load_checkpoint(dir)`, then
`answer(model, tokenizer, load_clip("clip.mp4", FrameConfig(frame_size=frame_size)).frames, "question")`.
Videos are sampled as in training (frames.load_clip): 1 frame per second up to --max-frames (64), uniform over the
video beyond; a folder of frames gives every frame up to --max-frames; an image is replicated to 8 frames (as
stages 2-3 trained). The model is rebuilt from the checkpoint's saved config (FoveatedVLM.from_pretrained).
"""

import argparse
import os

import distributed  # before torch: it sets OpenMP's wait policy, which torch reads once when it loads
import torch

from config import MAX_FRAMES, MODES, FrameConfig
from distributed import autocast
from frames import SkipSample, load_clip
from model import load_checkpoint


@torch.no_grad()
def answer(model, tokenizer, frames, prompt, mode="autoregressive", max_new_tokens=64, **sampling):
    """The model's answer (text) to `prompt` about `frames` [T, 3, H, W], asked behind the model's system prompt;
    greedy unless do_sample=True."""
    device = next(model.parameters()).device
    with autocast(device):
        out = model.generate(frames.unsqueeze(0).to(device), prompt, max_new_tokens=max_new_tokens, mode=mode,
                             tokenizer=tokenizer, **sampling)
    return tokenizer.decode(out[0], skip_special_tokens=True).strip()


def add_input_args(p, max_frames):
    """The command-line flags shared with attention_viz.py: checkpoint, one video or image, frames, device."""
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, or a training save_dir (its latest)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--video", help="video file (or folder of frames)")
    src.add_argument("--image", help="image file (replicated to 8 frames)")
    p.add_argument("--max-frames", type=int, default=max_frames, help="most frames taken from a video: 1 per "
                   "second up to this many, uniform over the video beyond (as in training)")
    p.add_argument("--frame-size", type=int, help="frame side in pixels (default: the checkpoint's training config)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def load_inputs(p, args):
    """(model, tokenizer, frames [T, 3, H, W]) for parsed `add_input_args` flags; an unreadable input is a
    usage error naming it."""
    source = args.video or args.image
    if not os.path.exists(source):
        p.error(f"{source} does not exist")
    model, tokenizer, frame_size = load_checkpoint(args.checkpoint, args.device)
    cfg = FrameConfig(frame_size=args.frame_size or frame_size, max_frames=args.max_frames,
                      replicate_image_frames=model.inputs.replicate_image_frames)
    try:
        clip = load_clip(source, cfg)
    except SkipSample as e:
        p.error(f"cannot read {source}: {e}")
    return model, tokenizer, clip.frames


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_args(p, max_frames=MAX_FRAMES)
    p.add_argument("--prompt", required=True)
    p.add_argument("--mode", default="autoregressive", choices=MODES)
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = distributed.parse_cli(p, argv)
    model, tokenizer, frames = load_inputs(p, args)
    print(answer(model, tokenizer, frames, args.prompt, args.mode, args.max_new_tokens))


if __name__ == "__main__":
    distributed.run_cli(main)
