"""What every command shares: its arguments are parsed before torch loads, so `--help` and a mistyped flag answer at
once; the `--threads` flag; the flags that name one clip to read (generate.py, attention_viz.py) and those of long
videos (generate.py, benchmark.py); and how a user error ends a command: `error: <message>` on stderr and exit
status 2, as argparse's own, without a traceback.

A command parses first and imports the heavy modules after:

    if __name__ == "__main__":  # parse before torch loads
        ARGS = arguments()

    import distributed  # noqa: E402
    ...

    if __name__ == "__main__":
        cli.run(main, args=ARGS)
"""

import argparse
import sys

from config import CHUNK_FRAMES, DEVICES, MAX_FRAMES

THREADS_HELP = ("CPU threads for torch (default: {default}; README, CPU threads)")
ALL_CORES = "all of this process's cores when OMP_WAIT_POLICY=PASSIVE is in effect, else 1"


def add_threads(parser, default=None):
    """The shared `--threads N` flag (`default`: this command's, None = distributed.default_threads())."""
    shown = f"{default}" if default is not None else ALL_CORES
    parser.add_argument("--threads", type=int, default=default, help=THREADS_HELP.format(default=shown))


def add_device(parser):
    parser.add_argument("--device", default="auto", choices=DEVICES, help="auto: cuda when available, else cpu")


def add_clip_args(parser, max_frames):
    """The flags naming a checkpoint and one clip to read: --checkpoint, --video or --image, --max-frames,
    --frame-size, --device."""
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, or a training save_dir (its newest "
                        "checkpoint), or a hub repo")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--video", help="video file (or folder of frames)")
    src.add_argument("--image", help="image file (replicated as the model was trained to see images)")
    default = f" (default {max_frames})" if max_frames is not None else ""
    parser.add_argument("--max-frames", type=int, default=max_frames, help="most frames taken from a video: 1 per "
                        f"second up to this many, uniform over the video beyond (as in training){default}")
    parser.add_argument("--frame-size", type=int, help="frame side in pixels (default: the size the model was "
                        "trained at)")
    add_device(parser)


def add_long_video_args(parser, fps_help=None):
    """--fps and --chunk-frames (check them, and --max-frames, with check_long_video_args)."""
    parser.add_argument("--fps", type=float, help=fps_help or "frames taken per second of video (default 1); given, "
                        "the rate is kept: no cap unless --max-frames is given, and a video whose frames do not fit "
                        "in the LLM's context is refused")
    parser.add_argument("--chunk-frames", type=int, help="frames decoded and encoded at a time (default: "
                        + ", ".join(f"{n} on {device}" for device, n in CHUNK_FRAMES.items()) + ")")


def check_long_video_args(parser, args, default_max_frames=MAX_FRAMES):
    """Parsed --max-frames (0: no cap), --fps and --chunk-frames checked, a bad value a usage error naming its flag.
    --max-frames not given is `default_max_frames`, or with --fps 0: a rate asked for is kept. Returns args."""
    for flag, low in (("max_frames", 0), ("fps", 1e-3), ("chunk_frames", 1)):
        if getattr(args, flag) is not None and getattr(args, flag) < low:
            parser.error(f"--{flag.replace('_', '-')} must be at least {low:g}, got {getattr(args, flag):g}")
    if args.max_frames is None:
        args.max_frames = 0 if args.fps else default_max_frames
    return args


def run(main, *args, **kwargs):
    """Run a command's `main`: a user error (a bad config or flag combination, a missing or refused file:
    ValueError, config.ConfigError, FileNotFoundError) prints its message alone on stderr and exits with status 2;
    Ctrl-C ends with `interrupted` and status 130 (what was saved stays); anything else keeps its traceback."""
    try:
        return main(*args, **kwargs)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def parser(doc):
    """An ArgumentParser whose description is a command's docstring, as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
