"""A small synthetic video set in the real formats, written deterministically from a seed.

Each video shows one large, saturated shape (circle, square, triangle, cross) in one of four colours on a
plain grey background, moving from the centre of the frame out to its left, right, top or bottom edge. The
questions (colour, shape, direction of motion) are learnable by a tiny random-init model on a CPU in minutes;
the set is the quickstart's default and the tests' fixture.

Why this motion: a tiny random DINO pools each frame into one token that keeps "where the shape is" only
weakly. A shape crossing the whole frame (edge to edge, at a random height) leaves the direction in the
order of the frames alone, and a 2-layer LLM trained from scratch for a few minutes did not learn it (held-out
shape and direction stayed at chance). Moving out from the centre, the shape spends the clip on the side it
moves toward, which the tiny model can read. Layout under --out:

  stage1/train-*.tar, val-00000.tar   video2dataset: mp4 + txt (caption) + json {caption, key, status}
  stage2/video-*.tar, val-00000.tar   mp4 + json {user, assistant, source}: an MCQ with `A. ...` option lines,
                                      or {messages, source}: all three MCQs as one multi-turn chat
  stage2/frames-00000.tar             the same task as pre-extracted frames 000.jpg, 001.jpg, ... + json
  stage2/image-00000.tar              still images (jpg; colour and shape questions) + json
  stage3/dpo-00000.tar                mp4 + json {question, chosen, rejected}
  text/text-00000.tar                 json {messages, source}: arithmetic chats (text retention)
  mvbench/json/<task>.json            held-out MCQs in the MVBench layout {video, question, candidates, answer}
  mvbench/video/<task>/<name>.mp4     with tasks colour, shape, direction

Usage: python synthetic.py --out data/synthetic --seed 0

`--niah` writes instead a needle-in-a-haystack set (V-NIAH, LongVA: Zhang et al., 2024) at 1 fps: haystacks of
grey shapes on the grey background, one held for a few seconds after another, and one frame (the needle) of one
coloured shape at a given depth; the question asks the needle's colour or its shape, as a multiple choice.

  train/niah-*.tar, val/niah-*.tar     short haystacks (--niah-train-frames): mp4 + json {messages} asking
                                       the colour and the shape (training, as stage 2)
  eval/niah.json                       {video, question, candidates, answer, task, length, depth} per question,
  eval/video/<length>s_d<depth>_<i>.mp4  for every haystack length (1 minute to 1 hour) and needle depth (0-100%)

Usage: python synthetic.py --niah --out data/niah --seed 0   (benchmark.py --niah data/niah/eval scores it)
"""

import argparse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Write the synthetic shape-video set (deterministic from --seed).")
    p.add_argument("--out", default="data/synthetic", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--captions", type=int, default=800, help="stage-1 captioned videos")
    p.add_argument("--mcq", type=int, default=1200, help="stage-2 MCQ videos (plus a quarter each as frames/images)")
    p.add_argument("--dpo", type=int, default=200, help="stage-3 preference pairs")
    p.add_argument("--text", type=int, default=400, help="text-only chats")
    p.add_argument("--val", type=int, default=100, help="validation samples for stages 1 and 2")
    p.add_argument("--eval", type=int, default=60, help="held-out MVBench-layout questions per task")
    p.add_argument("--per-shard", type=int, default=200, help="samples per training shard")
    p.add_argument("--size", type=int, default=64, help="frame side in pixels (even)")
    p.add_argument("--frames", type=int, default=6, help="frames per video")
    p.add_argument("--fps", type=int, default=1, help="video frame rate (1 = every frame at 1 fps sampling)")
    p.add_argument("--multi-turn", type=float, default=1.0,
                   help="share of stage-2 samples that ask every question as one multi-turn chat (the rest ask "
                        "one); all of them by default: three answers per video teach the tiny quickstart model more "
                        "per step (README, Quickstart)")
    p.add_argument("--niah", action="store_true", help="write the needle-in-a-haystack set instead (module docstring)")
    p.add_argument("--niah-lengths", type=int, nargs="+", default=[60, 300, 900, 1800, 3600],
                   help="evaluation haystacks, in frames at 1 fps")
    p.add_argument("--niah-depths", type=int, nargs="+", default=[0, 25, 50, 75, 100], help="needle depths, in %%")
    p.add_argument("--niah-videos", type=int, default=4, help="evaluation videos per length and depth (each asks "
                   "the colour and the shape)")
    p.add_argument("--niah-train", type=int, default=4000, help="training haystacks")
    p.add_argument("--niah-train-frames", type=int, nargs=2, default=[4, 16], metavar=("MIN", "MAX"),
                   help="training haystack lengths, in frames")
    p.add_argument("--niah-size", type=int, default=32, help="frame side of the haystacks (even)")
    p.add_argument("--shuffle-options", action="store_true",
                   help="list the MCQ options in a random order (harder: the letter must be read from the prompt)")
    args = p.parse_args(argv)
    if args.size % 2 or args.niah_size % 2:
        p.error("--size and --niah-size must be even (yuv420p)")
    return args


if __name__ == "__main__":  # parse before the heavy imports: --help and a flag error answer at once
    ARGS = parse_args()

import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import tarfile  # noqa: E402
import time  # noqa: E402

import av  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from tokenization import format_mcq, mcq_answer  # noqa: E402

COLOURS = {"red": (230, 25, 25), "green": (20, 200, 40), "blue": (30, 70, 255), "yellow": (245, 225, 20)}
SHAPES = ("circle", "square", "triangle", "cross")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BACKGROUND = 90
QUESTIONS = {"colour": "What colour is the shape?", "shape": "What shape is shown?",
             "direction": "Which way does the shape move?"}
VALUES = {"colour": list(COLOURS), "shape": list(SHAPES), "direction": list(DIRECTIONS)}


def shape_mask(shape, size, cx, cy, r):
    """Boolean [size, size] mask of a shape of half-width r centred at (cx, cy)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx ** 2 + dy ** 2 <= r ** 2
    if shape == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if shape == "triangle":  # pointing up: width grows from the apex to the base
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    if shape == "cross":
        return ((np.abs(dx) <= r / 3) & (np.abs(dy) <= r)) | ((np.abs(dy) <= r / 3) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def render(scene, size, frames):
    """A scene {colour, shape, direction} -> uint8 [T, size, size, 3]. The shape starts at the centre and moves
    out until its centre reaches the edge, so that frame by frame it is on the side it moves toward."""
    r, centre = size * 0.27, (size - 1) / 2
    ux, uy = DIRECTIONS[scene["direction"]]
    out = np.full((frames, size, size, 3), BACKGROUND, dtype=np.uint8)
    for t, step in enumerate(np.linspace(0, centre, frames)):
        mask = shape_mask(scene["shape"], size, centre + ux * step, centre + uy * step, r)
        out[t][mask] = COLOURS[scene["colour"]]
    return out


def random_scene(rng):
    return {"colour": rng.choice(list(COLOURS)), "shape": rng.choice(SHAPES), "direction": rng.choice(list(DIRECTIONS))}


def encode_mp4(video, fps):
    """uint8 [T, H, W, 3] -> mp4 bytes (libx264, single-threaded so the bytes are deterministic)."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = video.shape[2], video.shape[1], "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "12", "threads": "1"}
        for frame in video:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def encode_jpg(frame):
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def caption(scene):
    return f"A {scene['colour']} {scene['shape']} moves {scene['direction']}."


def mcq(scene, task, rng, shuffle):
    """(question text, candidates, index of the answer). The candidates are the task's four values in a fixed
    order (so the letter names the value, and a tiny model need not learn to read the option lines) or, with
    shuffle, in a random order. The answers are balanced over the letters either way."""
    candidates = rng.sample(VALUES[task], len(VALUES[task])) if shuffle else list(VALUES[task])
    return QUESTIONS[task], candidates, candidates.index(scene[task])


def write_tar(path, samples):
    """samples: list of (key, {field: bytes or str or dict}); members get fixed metadata (deterministic)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, fields in samples:
            for field, value in fields.items():
                if isinstance(value, dict):
                    value = json.dumps(value)
                data = value.encode() if isinstance(value, str) else value
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))


def write_shards(folder, prefix, samples, per_shard):
    for i in range(0, len(samples), per_shard):
        write_tar(os.path.join(folder, f"{prefix}-{i // per_shard:05d}.tar"), samples[i:i + per_shard])


def stage1_samples(rng, n, args, tag):
    out = []
    for i in range(n):
        scene, key = random_scene(rng), f"{tag}{i:06d}"
        mp4 = encode_mp4(render(scene, args.size, args.frames), args.fps)
        meta = {"key": key, "caption": caption(scene), "status": "success", "error_message": None}
        out.append((key, {"mp4": mp4, "txt": caption(scene), "json": meta}))
    return out


def mcq_meta(scene, rng, args, tasks=tuple(QUESTIONS)):
    """One MCQ as json user/assistant or, with probability args.multi_turn, every task's MCQ as `messages`."""
    turns = []
    for task in (rng.sample(tasks, len(tasks)) if rng.random() < args.multi_turn else [rng.choice(tasks)]):
        question, candidates, answer = mcq(scene, task, rng, args.shuffle_options)
        turns.append((task, format_mcq(question, candidates), mcq_answer(candidates, answer)))
    if len(turns) == 1:
        return {"user": turns[0][1], "assistant": turns[0][2], "source": turns[0][0]}
    messages = [{"role": role, "content": text} for _, q, a in turns for role, text in (("user", q), ("assistant", a))]
    return {"messages": messages, "source": "+".join(t for t, _, _ in turns)}


def stage2_samples(rng, n, args, tag, media="video"):
    """MCQ samples whose visual input is an mp4, numbered jpg frames, or a single jpg (no motion)."""
    out = []
    for i in range(n):
        scene, key = random_scene(rng), f"{tag}{i:06d}"
        video = render(scene, args.size, args.frames)
        if media == "video":
            fields = {"mp4": encode_mp4(video, args.fps), "json": mcq_meta(scene, rng, args)}
        elif media == "frames":
            fields = {f"{t:03d}.jpg": encode_jpg(f) for t, f in enumerate(video)}
            fields["json"] = mcq_meta(scene, rng, args)
        else:
            fields = {"jpg": encode_jpg(video[len(video) // 2]),
                      "json": mcq_meta(scene, rng, args, ("colour", "shape"))}
        out.append((key, fields))
    return out


def dpo_samples(rng, n, args):
    out = []
    for i in range(n):
        scene = random_scene(rng)
        question, candidates, answer = mcq(scene, rng.choice(list(QUESTIONS)), rng, args.shuffle_options)
        wrong = rng.choice([j for j in range(len(candidates)) if j != answer])
        meta = {"question": format_mcq(question, candidates), "chosen": mcq_answer(candidates, answer),
                "rejected": mcq_answer(candidates, wrong)}
        out.append((f"dpo{i:06d}", {"mp4": encode_mp4(render(scene, args.size, args.frames), args.fps), "json": meta}))
    return out


def text_samples(rng, n):
    out = []
    for i in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        messages = [{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": str(a + b)}]
        out.append((f"text{i:06d}", {"json": {"messages": messages, "source": "synthetic-arithmetic"}}))
    return out


def write_mvbench(root, rng, n_per_task, args):
    """Held-out MCQs in the MVBench layout: json/<task>.json + video/<task>/<name>.mp4."""
    for task in QUESTIONS:
        records = []
        os.makedirs(os.path.join(root, "video", task), exist_ok=True)
        for i in range(n_per_task):
            scene, name = random_scene(rng), f"{task}_{i:04d}.mp4"
            with open(os.path.join(root, "video", task, name), "wb") as f:
                f.write(encode_mp4(render(scene, args.size, args.frames), args.fps))
            question, candidates, answer = mcq(scene, task, rng, args.shuffle_options)
            records.append({"video": name, "question": question, "candidates": candidates,
                            "answer": candidates[answer]})
        os.makedirs(os.path.join(root, "json"), exist_ok=True)
        with open(os.path.join(root, "json", f"{task}.json"), "w") as f:
            json.dump(records, f, indent=1)


# ---------------------------------------------------------------- needle in a haystack
NIAH_QUESTIONS = {"colour": "What colour is the coloured shape in the video?",
                  "shape": "What shape is the coloured object in the video?"}
GREYS = (30, 150, 210)  # the haystack's shapes: achromatic, darker and lighter than the BACKGROUND


def haystack(rng, frames, size, needle_at, needle):
    """uint8 [frames, size, size, 3]: a grey shape of a random kind, grey and place held for 2-8 frames, then
    another, and at frame `needle_at` the needle {colour, shape} in its colour at a random place."""
    r, out, t = size * 0.27, np.full((frames, size, size, 3), BACKGROUND, dtype=np.uint8), 0
    while t < frames:
        hold, grey = rng.randint(2, 8), rng.choice(GREYS)
        cx, cy = rng.uniform(r, size - 1 - r), rng.uniform(r, size - 1 - r)
        out[t:t + hold][:, shape_mask(rng.choice(SHAPES), size, cx, cy, r)] = grey
        t += hold
    cx, cy = rng.uniform(r, size - 1 - r), rng.uniform(r, size - 1 - r)
    out[needle_at] = BACKGROUND
    out[needle_at][shape_mask(needle["shape"], size, cx, cy, r)] = COLOURS[needle["colour"]]
    return out


def niah_video(rng, frames, depth, size):
    """(mp4 bytes at 1 fps, the needle) of a haystack of `frames` frames with the needle at `depth` (0-1)."""
    needle = {"colour": rng.choice(list(COLOURS)), "shape": rng.choice(SHAPES)}
    return encode_mp4(haystack(rng, frames, size, round(depth * (frames - 1)), needle), 1), needle


def niah_samples(rng, n, args, tag):
    """Training samples: haystacks of args.niah_train_frames frames, needle anywhere, both questions asked."""
    out = []
    for i in range(n):
        mp4, needle = niah_video(rng, rng.randint(*args.niah_train_frames), rng.random(), args.niah_size)
        turns = []
        for task in rng.sample(list(NIAH_QUESTIONS), 2):
            candidates = list(VALUES[task])
            turns += [{"role": "user", "content": format_mcq(NIAH_QUESTIONS[task], candidates)},
                      {"role": "assistant", "content": mcq_answer(candidates, candidates.index(needle[task]))}]
        out.append((f"{tag}{i:06d}", {"mp4": mp4, "json": {"messages": turns, "source": "niah"}}))
    return out


def write_niah(args):
    """The needle-in-a-haystack set under args.out: training and validation shards, and the evaluation questions
    for every length and depth (see the module's docstring)."""
    rngs = {name: random.Random(f"{args.seed}-niah-{name}") for name in ("train", "val", "eval")}
    write_shards(f"{args.out}/train", "niah", niah_samples(rngs["train"], args.niah_train, args, "n"), args.per_shard)
    write_shards(f"{args.out}/val", "niah", niah_samples(rngs["val"], args.val, args, "nv"), args.val)
    records, rng = [], rngs["eval"]
    os.makedirs(f"{args.out}/eval/video", exist_ok=True)
    for length in args.niah_lengths:
        for depth in args.niah_depths:
            for i in range(args.niah_videos):
                mp4, needle = niah_video(rng, length, depth / 100, args.niah_size)
                name = f"{length}s_d{depth:03d}_{i}.mp4"
                with open(f"{args.out}/eval/video/{name}", "wb") as f:
                    f.write(mp4)
                for task, question in NIAH_QUESTIONS.items():
                    records.append({"video": name, "question": question, "candidates": list(VALUES[task]),
                                    "answer": needle[task], "task": task, "length": length, "depth": depth})
    with open(f"{args.out}/eval/niah.json", "w") as f:
        json.dump(records, f, indent=1)


def write_all(args):
    """Write every part of the set. Each part has its own random stream, so sizes don't change the others."""
    rngs = {name: random.Random(f"{args.seed}-{name}") for name in
            ("s1", "s1val", "s2", "s2val", "frames", "image", "dpo", "text", "eval")}
    per = args.per_shard
    write_shards(f"{args.out}/stage1", "train", stage1_samples(rngs["s1"], args.captions, args, "c"), per)
    write_shards(f"{args.out}/stage1", "val", stage1_samples(rngs["s1val"], args.val, args, "cv"), args.val)
    write_shards(f"{args.out}/stage2", "video", stage2_samples(rngs["s2"], args.mcq, args, "q"), per)
    write_shards(f"{args.out}/stage2", "val", stage2_samples(rngs["s2val"], args.val, args, "qv"), args.val)
    write_shards(f"{args.out}/stage2", "frames", stage2_samples(rngs["frames"], args.mcq // 4, args, "f", "frames"),
                 args.mcq)
    write_shards(f"{args.out}/stage2", "image", stage2_samples(rngs["image"], args.mcq // 4, args, "i", "image"),
                 args.mcq)
    write_shards(f"{args.out}/stage3", "dpo", dpo_samples(rngs["dpo"], args.dpo, args), args.dpo)
    write_shards(f"{args.out}/text", "text", text_samples(rngs["text"], args.text), args.text)
    write_mvbench(f"{args.out}/mvbench", rngs["eval"], args.eval, args)


def main(argv=None, args=None):
    args = args or parse_args(argv)
    start = time.time()
    write_niah(args) if args.niah else write_all(args)
    print(f"wrote the synthetic set to {args.out} in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main(args=ARGS)
