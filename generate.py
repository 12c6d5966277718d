r"""Answer a question about a video or an image with a trained fVLM checkpoint.

    python generate.py --checkpoint checkpoints/stage2_135M --video clip.mp4 --prompt "What happens?"
    python generate.py --checkpoint checkpoints/stage2_135M/best --image photo.jpg --prompt "Describe it." \
        [--mode autoregressive] [--max-new-tokens 64] [--threads N]

--checkpoint takes a checkpoint folder or a training save_dir (then its newest checkpoint).
From Python (notebooks): `model, tokenizer, frame_size = model.load_checkpoint(dir)`, then
`answer(model, tokenizer, load_clip("clip.mp4", FrameConfig(frame_size=frame_size)).frames, "question")`.
Videos are sampled as in training (frames.load_clip): 1 frame per second up to --max-frames (64), uniform over the
video beyond; a folder of frames gives every frame up to --max-frames; an image is replicated as the model was
trained to see images (8 frames in stages 2-3), at the frame size it was trained at (model.inputs).
"""

import cli
from config import MAX_FRAMES, MODES


def arguments(argv=None):
    p = cli.parser(__doc__)
    cli.add_clip_args(p, max_frames=MAX_FRAMES)
    p.add_argument("--prompt", required=True)
    p.add_argument("--mode", default="autoregressive", choices=MODES)
    p.add_argument("--max-new-tokens", type=int, default=64)
    cli.add_threads(p)
    return p.parse_args(argv)


if __name__ == "__main__":  # parse before torch loads: --help and a flag error answer at once
    ARGS = arguments()

import os  # noqa: E402

import distributed  # noqa: E402  before torch: it sets OpenMP's wait policy, which torch reads once when it loads
import torch  # noqa: E402

import checkpoint  # noqa: E402
from config import FrameConfig  # noqa: E402
from distributed import autocast  # noqa: E402
from frames import SkipSample, load_clip  # noqa: E402
from model import load_checkpoint  # noqa: E402


@torch.no_grad()
def answer(model, tokenizer, frames, prompt, mode="autoregressive", max_new_tokens=64, **sampling):
    """The model's answer (text) to `prompt` about `frames` [T, 3, H, W], asked behind the model's system prompt;
    greedy unless do_sample=True."""
    device = next(model.parameters()).device
    with autocast(device):
        out = model.generate(frames.unsqueeze(0).to(device), prompt, max_new_tokens=max_new_tokens, mode=mode,
                             tokenizer=tokenizer, **sampling)
    return tokenizer.decode(out[0], skip_special_tokens=True).strip()


def load_inputs(args):
    """(model, tokenizer, frames [T, 3, H, W]) for parsed `cli.add_clip_args` flags, the frames read as the model
    was trained to see them (checkpoint.read_inputs) before the model is loaded: a missing checkpoint or input, or
    one that does not decode, is a user error naming it (FileNotFoundError / ValueError)."""
    source = args.video or args.image
    folder = checkpoint.resolve(args.checkpoint)
    if not os.path.exists(source):
        raise FileNotFoundError(f"{source} does not exist")
    used = checkpoint.read_inputs(folder)
    cfg = FrameConfig(frame_size=args.frame_size or used.frame_size, max_frames=args.max_frames,
                      replicate_image_frames=used.replicate_image_frames)
    try:
        clip = load_clip(source, cfg)
    except SkipSample as e:
        raise ValueError(f"cannot read {source}: {e}") from None
    model, tokenizer, _ = load_checkpoint(folder, distributed.pick_device(args.device))
    return model, tokenizer, clip.frames


def main(argv=None, args=None):
    args = args or arguments(argv)
    distributed.set_threads(args.threads)
    model, tokenizer, frames = load_inputs(args)
    print(answer(model, tokenizer, frames, args.prompt, args.mode, args.max_new_tokens))


if __name__ == "__main__":
    cli.run(main, args=ARGS)
