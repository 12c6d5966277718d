"""Frame decoding, shared by training, evaluation, data preparation and inference: encoded images and videos
-> ImageNet-normalised float32 frames [T, 3, H, W], square-resized to the frame size.

Videos are sampled as in training (`frame_indices`): `sample_fps` frames per second of video up to
`max_frames`; a longer video is sampled uniformly over its whole length (`uniform`, the middle frame of
`max_frames` equal segments, as MVBench's reader does) or keeps its first `max_frames` (`head`). They are
decoded by decord where it installs (x86_64 Linux, Windows), else by PyAV through decord's own FFmpeg filters,
at the same frame indices with the same pixels (`read_video`). Images are a plain square resize (bilinear).
A medium that does not decode raises `SkipSample` with its reason, which the readers count.
"""

import contextlib
import io
import os
import re
import sys
import tempfile
import threading

import av
import numpy as np
import torch
from PIL import Image

from inputs import normalise_pixels

try:
    from decord import DECORDError, VideoReader
except ImportError:  # decord has wheels for x86_64 Linux and Windows only; PyAV decodes elsewhere
    DECORDError, VideoReader = RuntimeError, None

VIDEO_DECODER = "decord" if VideoReader is not None else "pyav"  # tests set "pyav" to take the fallback path
VIDEO_ERRORS = (RuntimeError, OSError, av.FFmpegError, DECORDError)  # decord raises RuntimeError for bad data
VIDEO_FIELDS = ("mp4", "webm", "mkv", "avi", "mov")  # the video formats read (as shard fields and extensions)
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")  # the image formats read
FRAME_SAMPLING = ("uniform", "head")
DECORD_TRANSPOSE = {90: ["1"], 180: ["1", "1"], 270: ["2"]}  # clockwise display rotation -> transpose filters
DECORD_OPEN_ERROR = b"ERROR opening: "  # decord's log line naming a video it cannot open
DECORD_LOG_LINE = re.compile(rb"\[\d\d:\d\d:\d\d\] ")  # the start of each of decord's log lines
_STDERR_LOCK = threading.Lock()  # fd 2 is the process's: one redirect at a time


class SkipSample(Exception):
    """A sample that cannot be used; `reason` is the short label it is counted under."""

    def __init__(self, reason, detail=""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def normalise(rgb):
    """uint8 numpy [..., H, W, 3] -> float32 [..., 3, H, W], ImageNet-normalised."""
    return normalise_pixels(torch.from_numpy(rgb).movedim(-1, -3).contiguous())  # contiguous: faster arithmetic


def load_image_frames(image, size=224):
    """A PIL image -> [3, size, size]: a plain square resize (torchvision's Resize((size, size))), normalised."""
    return normalise(np.array(image.convert("RGB").resize((size, size), Image.BILINEAR)))


def decode_image(data, frame_size):
    """Encoded image bytes -> [3, H, W]."""
    return load_image_frames(Image.open(io.BytesIO(data)), frame_size)


def frame_indices(num_frames, fps, max_frames, sampling="uniform", sample_fps=1.0):
    """Frame indices at `sample_fps`; beyond `max_frames`, uniform over the video (`uniform`) or the first ones.

    Uniform picks the middle frame of `max_frames` equal segments, as MVBench's reader does.
    """
    assert sampling in FRAME_SAMPLING, f"frame_sampling must be one of {FRAME_SAMPLING}, got {sampling!r}"
    if num_frames <= 0:
        return []
    step = max(1.0, fps / sample_fps) if fps and fps > 0 else 1.0  # source frames per sampled frame; each at most once
    idx = [int(i * step) for i in range(max(1, int(np.ceil(num_frames / step))))]
    if len(idx) <= max_frames:
        return idx
    if sampling == "head":
        return idx[:max_frames]
    seg = num_frames / max_frames
    return [min(num_frames - 1, int(seg / 2 + seg * i)) for i in range(max_frames)]


def read_video(source, frame_size, choose):
    """A video (encoded bytes or a file path) -> [T, 3, H, W] at the frame indices `choose(num_frames, fps)`,
    square-resized (bilinear) while decoding. The one video decoder, for training and evaluation alike: decord
    where installed, else PyAV through the same FFmpeg filters, at the same frame indices."""
    name = source if isinstance(source, str) else "video bytes"
    decode = _decord_frames if VIDEO_DECODER == "decord" else _pyav_frames
    try:
        return normalise(decode(source, frame_size, choose, name))
    except VIDEO_ERRORS as e:
        raise SkipSample("bad_video", f"{name}: {str(e).splitlines()[0][:200]}") from e


def _chosen(choose, num_frames, fps, name):
    idx = choose(num_frames, fps) if num_frames else []
    if not idx:
        raise SkipSample("empty_video", name)
    return idx


def _decord_frames(source, size, choose, name):
    """uint8 [T, size, size, 3]."""
    with _decord_dump_cut() if isinstance(source, bytes) else contextlib.nullcontext():
        vr = VideoReader(io.BytesIO(source) if isinstance(source, bytes) else source, width=size, height=size,
                         num_threads=1)
    return vr.get_batch(_chosen(choose, len(vr), vr.get_avg_fps(), name)).asnumpy()


@contextlib.contextmanager
def _decord_dump_cut(keep=300):
    """decord logs the bytes it cannot open as a video as their name ("ERROR opening: <bytes>"), a megabyte per
    corrupt sample in a training log. From C++, so sys.stderr cannot catch it: fd 2 is redirected to a file
    inside the block, then replayed with that message cut to `keep` bytes (its following lines, the rest of the
    bytes, dropped). Without a usable fd 2 the block runs as is."""
    try:
        if sys.stderr is not None:
            sys.stderr.flush()
        saved, caught = os.dup(2), tempfile.TemporaryFile()
    except OSError:
        yield
        return
    with _STDERR_LOCK, caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            try:
                _replay(caught, keep)
            except OSError:  # stderr gone: nothing to show it on
                pass


def _replay(caught, keep):
    dumping = False
    for line in caught:
        if DECORD_OPEN_ERROR in line:
            dumping = True
            line = line if len(line) <= keep else line[:keep] + b" ... (cut)\n"
        elif dumping and DECORD_LOG_LINE.match(line) is None:
            continue  # more of the dumped bytes
        else:
            dumping = False
        os.write(2, line)


def _pyav_frames(source, size, choose, name):
    """uint8 [T, size, size, 3] as decord decodes them: frames counted as the video stream's packets, fps its
    average rate, frames in presentation order through decord's filter chain (`_decord_filters`)."""
    def container():
        return av.open(io.BytesIO(source) if isinstance(source, bytes) else source)

    with container() as c:  # demux only, no decoding
        stream = _video_stream(c, name)
        if "mp4" in c.format.name.split(",") and _boxes_end(source) > _size(source):
            raise SkipSample("bad_video", f"{name}: truncated (its boxes run past the end)")  # decord raises too
        idx = _chosen(choose, sum(1 for p in c.demux(stream) if p.size), float(stream.average_rate or 0), name)
    wanted, got, graph = set(idx), {}, None
    with container() as c:
        stream = _video_stream(c, name)
        stream.codec_context.thread_count = 1  # as decord's num_threads=1: loader workers are the parallelism
        for i, frame in enumerate(c.decode(stream)):
            if i in wanted:
                graph = graph or _decord_filters(stream, frame.rotation, size)
                graph.push(frame)
                got[i] = graph.pull().to_ndarray()
                if len(got) == len(wanted):
                    break
    if len(got) < len(wanted):
        raise SkipSample("bad_video", f"{name}: decoding ended before frame {min(wanted - got.keys())}")
    return np.stack([got[i] for i in idx])


def _size(source):
    return len(source) if isinstance(source, bytes) else os.path.getsize(source)


def _boxes_end(source):
    """Where an mp4's top-level boxes end by their declared sizes: past the file's size when it was cut short (a
    cut download whose index comes first demuxes without an error in FFmpeg, only shorter)."""
    size, pos = _size(source), 0
    with contextlib.nullcontext(io.BytesIO(source)) if isinstance(source, bytes) else open(source, "rb") as f:
        while pos + 8 <= size:
            f.seek(pos)
            head = f.read(16)
            n = int.from_bytes(head[:4], "big")
            if n == 1 and len(head) == 16:  # a 64-bit size follows the type
                n = int.from_bytes(head[8:], "big")
            if n == 0 or n < 8:  # 0: the last box runs to the end; < 8: not a box, the demuxer's to judge
                return size
            pos += n
    return pos


def _decord_filters(stream, rotation, size):
    """The FFmpeg filter graph decord 0.6 decodes through: transpose for the display rotation, scale to
    size x size (bilinear: the scale filter's default in decord's FFmpeg 4.1), RGB24. On every clip tried (x264
    with B-frames, MPEG-4, 64 px to 640x360, each rotation) this gives decord's pixels exactly; PyAV's own
    frame.reformat differs by up to ~55 levels on sharp colour edges."""
    graph = av.filter.Graph()
    turns = [("transpose", t) for t in DECORD_TRANSPOSE.get(-round(rotation) % 360, [])]  # PyAV: counter-clockwise
    nodes = [graph.add_buffer(template=stream)]
    for name, args in [*turns, ("scale", f"{size}:{size}:flags=bilinear"), ("format", "rgb24")]:
        nodes.append(graph.add(name, args))
    nodes.append(graph.add("buffersink"))
    for a, b in zip(nodes, nodes[1:]):
        a.link_to(b)
    graph.configure()
    return graph


def _video_stream(container, name):
    if not container.streams.video:
        raise SkipSample("bad_video", f"{name}: no video stream")
    return container.streams.video[0]


def decode_video(data, frame_size, max_frames, sampling="uniform", sample_fps=1.0):
    """Encoded video bytes -> [T, 3, H, W], sampled as in training (see frame_indices)."""
    return read_video(data, frame_size, lambda n, fps: frame_indices(n, fps, max_frames, sampling, sample_fps))


def load_video_frames(path, max_frames=64, size=224, sampling="uniform", sample_fps=1.0):
    """A video file -> [T, 3, size, size], sampled as in training (see frame_indices). Raises SkipSample."""
    with open(path, "rb") as f:
        return decode_video(f.read(), size, max_frames, sampling, sample_fps)
