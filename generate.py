r"""Answer a question about a video or an image with a trained fVLM checkpoint.

    python generate.py --checkpoint checkpoints/stage2_135M --video clip.mp4 --prompt "What happens?"
    python generate.py --checkpoint checkpoints/stage2_135M/best --image photo.jpg --prompt "Describe it." \
        [--mode autoregressive] [--max-new-tokens 64] [--threads N]
    python generate.py --checkpoint checkpoints/stage2_135M --video hour.mp4 --prompt "What happens?" \
        --max-frames 0 [--fps 1] [--chunk-frames 64]

--checkpoint takes a checkpoint folder or a training save_dir (then its newest checkpoint).
From Python (notebooks): `model, tokenizer, frame_size = model.load_checkpoint(dir)`, then
`answer(model, tokenizer, load_clip("clip.mp4", FrameConfig(frame_size=frame_size)).frames, "question")`, or
`answer_video(model, tokenizer, "hour.mp4", "question", FrameConfig(frame_size=frame_size, max_frames=None))`.
Videos are sampled as in training (frames.load_clip): 1 frame per second up to --max-frames (64), uniform over the
video beyond; a folder of frames gives every frame up to --max-frames; an image is replicated as the model was
trained to see images (8 frames in stages 2-3), at the frame size it was trained at (model.inputs).

A video is decoded and encoded --chunk-frames at a time into the LLM's KV cache (frames.stream_clip into
model.stream: constant memory, an hour at 1 fps is 3,600 tokens), with a progress bar of frames/s. --max-frames 0
takes every frame at 1 fps (or --fps); more than the LLM's context holds beside the prompt and the answer are
sampled uniformly down to what fits, and said so, unless --fps was given: then it stops before decoding, naming
the frame count, the fps and the longest video that fits.
"""

import cli
from config import MODES


def arguments(argv=None):
    p = cli.parser(__doc__)
    cli.add_clip_args(p, max_frames=None)
    p.add_argument("--prompt", required=True)
    p.add_argument("--mode", default="autoregressive", choices=MODES)
    p.add_argument("--max-new-tokens", type=int, default=64)
    cli.add_long_video_args(p)
    cli.add_threads(p)
    return cli.check_long_video_args(p, p.parse_args(argv))


if __name__ == "__main__":  # parse before torch loads: --help and a flag error answer at once
    ARGS = arguments()

import dataclasses  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import distributed  # noqa: E402  before torch: it sets OpenMP's wait policy, which torch reads once when it loads
import torch  # noqa: E402

import checkpoint  # noqa: E402
from config import FrameConfig  # noqa: E402
from distributed import autocast  # noqa: E402
from frames import SkipSample, fit, load_clip, probe, sampled, stream_clip  # noqa: E402
from model import load_checkpoint  # noqa: E402
from streaming import context_room  # noqa: E402
from tokenization import prompt_ids  # noqa: E402


@torch.no_grad()
def answer(model, tokenizer, frames, prompt, mode="autoregressive", max_new_tokens=64, **sampling):
    """The model's answer (text) to `prompt` about `frames` [T, 3, H, W], asked behind the model's system prompt;
    greedy unless do_sample=True."""
    device = next(model.parameters()).device
    with autocast(device):
        out = model.generate(frames.unsqueeze(0).to(device), prompt, max_new_tokens=max_new_tokens, mode=mode,
                             tokenizer=tokenizer, **sampling)
    return tokenizer.decode(out[0], skip_special_tokens=True).strip()


@torch.no_grad()
def answer_video(model, tokenizer, media, prompt, cfg, mode="autoregressive", max_new_tokens=64, fixed_fps=False,
                 source=None, **sampling):
    """The model's answer to `prompt` about a video (a path or frames.Media) sampled by `cfg` (a FrameConfig),
    decoded and encoded a chunk at a time (cfg.chunk_frames): memory holds a chunk and the KV cache, whatever the
    video's length. Frames beyond what the LLM's context holds beside the prompt and the answer are sampled
    uniformly down to it, said on stderr, unless `fixed_fps`: then a ValueError names what fits, before any
    decoding (frames.fit). `source`: the video's frames.probe, when already read."""
    device = next(model.parameters()).device
    ids = prompt_ids(tokenizer, prompt, model._use().system_prompt)
    source = source or probe(media)
    cfg, note = fit(media, cfg, context_room(model, len(ids) + max_new_tokens), fixed_fps, source)
    if note:
        print(note, file=sys.stderr)
    stream = model.stream(mode, cfg.chunk_frames)
    with autocast(device):
        stream.read(stream_clip(media, cfg, stream.chunk), total=sampled(source, media, cfg))
        out = stream.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id, **sampling)
    return tokenizer.decode(out, skip_special_tokens=True).strip()


def clip_config(args, folder, max_frames):
    """The FrameConfig of parsed `cli.add_clip_args` flags for checkpoint `folder`: the frames read as the model
    was trained to see them (checkpoint.read_inputs); `max_frames` 0 is no cap."""
    source = args.video or args.image
    if not os.path.exists(source):
        raise FileNotFoundError(f"{source} does not exist")
    used = checkpoint.read_inputs(folder)
    return FrameConfig(frame_size=args.frame_size or used.frame_size, max_frames=max_frames or None,
                       replicate_image_frames=used.replicate_image_frames)


def load_inputs(args, max_frames=None):
    """(model, tokenizer, frames [T, 3, H, W]) for parsed `cli.add_clip_args` flags, the frames read before the
    model is loaded: a missing checkpoint or input, or one that does not decode, is a user error naming it
    (FileNotFoundError / ValueError). `max_frames`: default --max-frames."""
    folder = checkpoint.resolve(args.checkpoint)
    source = args.video or args.image
    cfg = clip_config(args, folder, args.max_frames if max_frames is None else max_frames)
    try:
        clip = load_clip(source, cfg)
    except SkipSample as e:
        raise ValueError(f"cannot read {source}: {e}") from None
    model, tokenizer, _ = load_checkpoint(folder, distributed.pick_device(args.device))
    return model, tokenizer, clip.frames


def main(argv=None, args=None):
    args = args or arguments(argv)
    distributed.set_threads(args.threads)
    if args.image:
        model, tokenizer, frames = load_inputs(args)
        print(answer(model, tokenizer, frames, args.prompt, args.mode, args.max_new_tokens))
        return
    folder = checkpoint.resolve(args.checkpoint)
    cfg = dataclasses.replace(clip_config(args, folder, args.max_frames), sample_fps=args.fps or 1.0,
                              chunk_frames=args.chunk_frames)
    try:
        source = probe(args.video)  # an unreadable video is said before the model loads
        model, tokenizer, _ = load_checkpoint(folder, distributed.pick_device(args.device))
        print(answer_video(model, tokenizer, args.video, args.prompt, cfg, args.mode, args.max_new_tokens,
                           fixed_fps=args.fps is not None, source=source))
    except SkipSample as e:
        raise ValueError(f"cannot read {args.video}: {e}") from None


if __name__ == "__main__":
    cli.run(main, args=ARGS)
