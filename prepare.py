"""Convert the recipe's training sets, as published, into the WebDataset shards the stage configs read:

    python prepare.py openvid     --src DIR          [--out data/openvid]      (CSV + zip parts)
    python prepare.py webvid      --src V2D_OUTPUT   [--out data/webvid]       (video2dataset tars)
    python prepare.py cauldron    --src DIR [--subsets ai2d chartqa ...] [--out data/cauldron]
    python prepare.py smoltalk    --src DIR          [--out data/smoltalk]     (data/all/train-* only)
    python prepare.py rlaif-v     --src DIR          [--out data/rlaif_v]
    python prepare.py llava-video --src DIR [--subsets 0_30_s_academic_v0_1 ...] [--out data/llava_video]
    common: [--limit N] [--shard-size N] [--shard-mb M] [--workers N] [--max-frames N] [--overwrite]

The converters live in converters/ (convert.py says what is written, how bad rows are counted and how an
interrupted run resumes); this is their command.
"""

import os
import sys

import cli
from config import MAX_FRAMES
from converters import DATASETS


def arguments(argv=None):
    p = cli.parser(__doc__)
    sub = p.add_subparsers(dest="dataset", required=True)
    for command, (name, what) in DATASETS.items():
        s = sub.add_parser(command, help=what)
        s.add_argument("--src", required=True, help="the download folder, as published")
        s.add_argument("--out", default=f"data/{name}", help="output folder (default: %(default)s)")
        if command in ("cauldron", "llava-video"):
            s.add_argument("--subsets", nargs="+", help="subset folders to convert (default: all)")
        s.add_argument("--limit", type=int, help="stop after this many samples in all (a smoke run; re-run "
                       "without it to go on)")
        s.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: %(default)s)")
        s.add_argument("--shard-mb", type=float, default=2000, help="MB per shard at most, give or take one "
                       "sample (default: %(default)s)")
        s.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                       help="processes for the decode checks, the bottleneck (default: all CPUs, %(default)s here)")
        s.add_argument("--max-frames", type=int, default=MAX_FRAMES, help="the decode check reads a video's frames "
                       "as training does: 1 fps, at most this many (data.max_frames; default: %(default)s)")
        s.add_argument("--overwrite", action="store_true", help="delete this converter's shards and state "
                       "under --out and start again")
    args = p.parse_args(argv)
    args.subsets = getattr(args, "subsets", None)
    return args


if __name__ == "__main__":  # parse before torch loads: --help and a flag error answer at once
    ARGS = arguments()

from converters.convert import convert  # noqa: E402
from converters.published import InputError  # noqa: E402


def main(argv=None, args=None):
    """Run one converter to the end of its input or --limit; returns its report."""
    args = args or arguments(argv)
    try:
        return convert(args)
    except InputError as e:  # a user error: the message alone and exit status 2, as the other scripts
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"\ninterrupted: run the same command again to resume from {args.out}/state.json", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main(args=ARGS)
