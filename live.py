r"""Questions to a video as it plays: frames taken at 1 per second of stream time go into the model's KV cache as
they come (model.stream, autoregressive mode), and each question is answered from everything seen so far,
without encoding a past frame again; the question and its answer then leave the cache.

    python live.py --checkpoint checkpoints/stage2_135M --source clip.mp4 \
        --ask 10 "What is happening?" --ask 60 "What colour was the car?"
    python live.py --checkpoint checkpoints/stage2_135M --source rtsp://camera.local/stream   # type questions
    python live.py --checkpoint checkpoints/stage2_135M --source /dev/video0 --format v4l2    # a webcam

--source is a file, or any URL or device PyAV (FFmpeg) opens; a file plays at real speed (--speed 2: twice as
fast, 0: as fast as the model reads). `--ask T QUESTION` asks once the frames up to T seconds are in; a line
typed on stdin is asked after the next frame. Each answer is printed with its stream time, how long it took, and
how far the model is behind the stream. The answer is `generate`'s greedy answer on the same frames and question.
"""

import cli
from config import MODES


def arguments(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, or a training save_dir (its newest "
                   "checkpoint), or a hub repo")
    p.add_argument("--source", required=True, help="a video file, URL or device")
    p.add_argument("--format", help="FFmpeg's input format of a device (v4l2, avfoundation, dshow, ...)")
    p.add_argument("--ask", nargs=2, action="append", default=[], metavar=("SECONDS", "QUESTION"),
                   help="ask QUESTION once the frames up to SECONDS of stream time are in (repeatable)")
    p.add_argument("--speed", type=float, default=1.0, help="playback speed of a file (0: as fast as the model)")
    p.add_argument("--mode", default="autoregressive", choices=MODES)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--frame-size", type=int, help="frame side in pixels (default: the size the model was trained at)")
    cli.add_device(p)
    cli.add_threads(p)
    args = p.parse_args(argv)
    try:
        args.ask = [(float(t), q) for t, q in args.ask]
    except ValueError:
        p.error(f"--ask takes SECONDS then QUESTION, got {args.ask}")
    if args.speed < 0:
        p.error("--speed must be 0 (unpaced) or more")
    return args


if __name__ == "__main__":  # parse before torch loads: --help and a flag error answer at once
    ARGS = arguments()

import queue  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import distributed  # noqa: E402  before torch: it sets OpenMP's wait policy, which torch reads once when it loads
import av  # noqa: E402
import torch  # noqa: E402

from distributed import autocast  # noqa: E402
from frames import SkipSample, live_frames  # noqa: E402
from model import load_checkpoint  # noqa: E402


def clock(seconds):
    m, s = divmod(seconds, 60)
    return f"{int(m) // 60}:{int(m) % 60:02d}:{s:04.1f}" if m >= 60 else f"{int(m)}:{s:04.1f}"


@torch.no_grad()
def play(model, frames, asks=(), typed=None, speed=1.0, mode="autoregressive", max_new_tokens=64, out=print):
    """Read (seconds, frame [3, H, W]) pairs (frames.live_frames) into a model.stream, paced at `speed` x real
    time (0: unpaced), asking each (seconds, question) of `asks` once the frames up to its time are in and each
    question put on the queue `typed` after the next frame; those still due when the frames end are asked then.
    Prints each answer with `out`; returns [(stream seconds, question, answer)]."""
    device = next(model.parameters()).device
    stream, asks, answers = model.stream(mode), sorted(asks), []
    start, now = time.perf_counter(), 0.0  # now: the stream time of the last frame read

    def ask(question, at):
        began = time.perf_counter()
        with autocast(device):
            text = stream.ask(question, max_new_tokens=max_new_tokens)
        behind = time.perf_counter() - start - at / speed if speed else 0.0
        out(f"[{clock(at)}] {question} -> {text}   ({time.perf_counter() - began:.1f} s to answer, "
            f"{max(behind, 0.0):.1f} s behind the stream, {stream.length} frames)")
        answers.append((at, question, text))

    for seconds, frame in frames:
        while asks and asks[0][0] < seconds:  # every frame up to its time is in
            ask(*reversed(asks.pop(0)))
        if speed:
            time.sleep(max(0.0, start + seconds / speed - time.perf_counter()))
        with autocast(device):
            stream.add_frames(frame[None])
        now = seconds
        while typed is not None and not typed.empty():
            ask(typed.get(), now)
    for at, question in asks:  # due after the last frame
        ask(question, max(at, now))
    return answers


def typed_questions():
    """A queue that a daemon thread fills with the lines typed on stdin (until it closes)."""
    lines = queue.Queue()

    def read():
        try:
            for line in sys.stdin:
                if line.strip():
                    lines.put(line.strip())
        except (OSError, ValueError):  # stdin closed or not readable (a test's captured stdin): nothing typed
            return
    threading.Thread(target=read, daemon=True).start()
    return lines


def main(argv=None, args=None):
    args = args or arguments(argv)
    distributed.set_threads(args.threads)
    model, tokenizer, frame_size = load_checkpoint(args.checkpoint, distributed.pick_device(args.device))
    frames = live_frames(args.source, args.frame_size or frame_size, format=args.format)
    print(f"playing {args.source}: ask with --ask, or type a question and press Enter", file=sys.stderr)
    try:
        play(model, frames, args.ask, typed_questions(), args.speed, args.mode, args.max_new_tokens,
             out=lambda line: print(line, flush=True))
    except (av.FFmpegError, SkipSample) as e:
        raise ValueError(f"cannot play {args.source}: {e}") from None


if __name__ == "__main__":
    cli.run(main, args=ARGS)
