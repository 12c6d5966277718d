"""What every command shares: its arguments are parsed before torch loads, so `--help` and a mistyped flag answer at
once; the `--threads` flag; the flags that name one clip to read (generate.py, attention_viz.py); and how a user
error ends a command: `error: <message>` on stderr and exit status 2, as argparse's own, without a traceback.

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

from config import DEVICES

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
    parser.add_argument("--max-frames", type=int, default=max_frames, help="most frames taken from a video: 1 per "
                        "second up to this many, uniform over the video beyond (as in training)")
    parser.add_argument("--frame-size", type=int, help="frame side in pixels (default: the size the model was "
                        "trained at)")
    add_device(parser)


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
