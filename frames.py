"""Media to frames, for training, evaluation, generation and the demo alike: `load_clip(media, cfg)` takes a shard
sample's fields, an image file, a folder of frames or a video file to ImageNet-normalised float32 frames
[T, 3, H, W], square-resized to `cfg.frame_size` (a config.FrameConfig: config.DataConfig in training,
config.EvalProtocol in evaluation), or with `pixels=True` to the uint8 pixels they come from (training's loader:
a quarter of the bytes between processes; the model normalises them on its device).

Two sampling rules, side by side:
- `frame_indices` (training's, and every video's by default): `sample_fps` frames per second of video up to
  `max_frames`; a longer video is sampled uniformly over its whole length (`uniform`, the middle frame of
  `max_frames` equal segments) or keeps its first `max_frames` (`head`).
- `segment_indices` (MVBench's, for the raw evaluation layouts): the middle frame of `max_frames` equal segments
  of the video, or of its (start, end) bound.
A clip of one frame (an image, a single numbered frame, a one-frame video) becomes `replicate_image_frames` views
of one tensor (stride 0, no copy; the model encodes consecutive identical frames once), as the original recipe
replicates every one-frame sample.

Videos are decoded by decord where it installs (x86_64 Linux, Windows), else by PyAV through decord's own FFmpeg
filters, at the same frame indices with the same pixels (`read_video`); a path is opened as a file, bytes are read
from memory. Images are a plain square resize (bilinear). A medium that does not decode raises `SkipSample`, the
project's one skip type: its reason is what readers count skips under.
"""

import contextlib
import io
import os
import re
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import NamedTuple, Optional

import av
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from config import FRAME_SAMPLING, FRAME_SIZE, FrameConfig

try:
    from decord import DECORDError, VideoReader
except ImportError:  # decord has wheels for x86_64 Linux and Windows only; PyAV decodes elsewhere
    DECORDError, VideoReader = RuntimeError, None

VIDEO_DECODER = "decord" if VideoReader is not None else "pyav"  # tests set "pyav" to take the fallback path
VIDEO_ERRORS = (RuntimeError, OSError, av.FFmpegError, DECORDError)  # decord raises RuntimeError for bad data
IMAGE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)
VIDEO_FIELDS = ("mp4", "webm", "mkv", "avi", "mov")  # the video formats read (as shard fields and extensions)
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")  # the image formats shards hold
NUMBERED_FRAME = re.compile(rf"^(\d+)\.({'|'.join(IMAGE_FIELDS)})$")  # a sample's frames: 000.jpg, 001.jpg, ...
RULES = ("fps", "segments")  # frame_indices | segment_indices
FRAME_FOLDER_FPS = 3  # MVBench's pre-extracted frame folders (tvqa/frames_fps3_hq), named 00001.jpg, ...
DECORD_TRANSPOSE = {90: ["1"], 180: ["1", "1"], 270: ["2"]}  # clockwise display rotation -> transpose filters
_STDERR_LOCK = threading.Lock()  # fd 2 is the process's: one redirect at a time

# DINOv2's input normalisation (ImageNet statistics), applied to pixels in [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SkipSample(Exception):
    """A sample (an input row of a converter, a question of a benchmark) that cannot be used; `reason` is the short
    label it is counted under, `detail` what to show (the sample's name first). Raised where the problem is found
    and counted by the reader; a converter also yields it as an event at its input position `pos`."""

    def __init__(self, reason, detail="", pos=None):
        super().__init__(reason, detail, pos)  # every field in args: it pickles back from a worker process
        self.reason, self.detail, self.pos = reason, detail, pos

    def __str__(self):
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


# ---------------------------------------------------------------- pixels

def _imagenet(like):
    """ImageNet's mean and std as [3, 1, 1] tensors on `like`'s device."""
    return (torch.tensor(IMAGENET_MEAN, device=like.device).view(3, 1, 1),
            torch.tensor(IMAGENET_STD, device=like.device).view(3, 1, 1))


def normalise_pixels(pixels):
    """uint8 pixels [..., 3, H, W] -> float32 ImageNet-normalised frames (DINOv2's input), on their device."""
    assert pixels.dtype == torch.uint8, f"expected uint8 pixels, got {pixels.dtype}"
    mean, std = _imagenet(pixels)
    return pixels.float().mul_(1 / 255).sub_(mean).div_(std)  # float() copies: the in-place ops are safe


def denormalise(frames):
    """ImageNet-normalised frames [..., 3, H, W] -> pixel values in [0, 1] (for display)."""
    mean, std = _imagenet(frames)
    return frames * std + mean


def channels_first(rgb):
    """uint8 numpy [..., H, W, 3] -> uint8 [..., 3, H, W] (contiguous: faster arithmetic)."""
    return torch.from_numpy(rgb).movedim(-1, -3).contiguous()


def normalise(rgb):
    """uint8 numpy [..., H, W, 3] -> float32 [..., 3, H, W], ImageNet-normalised."""
    return normalise_pixels(channels_first(rgb))


# ---------------------------------------------------------------- media -> frames

@dataclass
class Media:
    """Where a clip's frames come from: a file or folder `path`, or a shard sample's `fields` ({`mp4`: bytes},
    {`jpg`: bytes}, {`000.jpg`: bytes, `001.jpg`: bytes, ...}, or none for a text-only sample); `rule` picks the
    sampling rule of a video or frame folder, and `bound` is MVBench's (start, end) in seconds for `segments`."""

    path: Optional[str] = None
    fields: Optional[dict] = None
    rule: str = "fps"  # one of RULES
    bound: Optional[tuple] = None


class Clip(NamedTuple):
    """Decoded media: frames [T, 3, H, W] (T = 0 for text; float32 normalised, or uint8 pixels), kind (video |
    image | text) and the format decoded (`mp4`, `jpg frames`, `png`, ...)."""

    frames: torch.Tensor
    kind: str
    format: str


def load_clip(media, cfg=FrameConfig(), pixels=False):
    """Media (a Media, or a path) -> Clip, sampled by `cfg` (a config.FrameConfig), its frames ImageNet-normalised
    float32, or the uint8 pixels with `pixels`. Raises SkipSample."""
    media = Media(path=media) if isinstance(media, str) else media
    assert media.rule in RULES, f"rule must be one of {RULES}, got {media.rule!r}"
    if media.fields is not None:
        clip = _from_fields(media.fields, cfg)
    else:
        clip = _from_path(media, cfg)
    if not pixels:
        clip = clip._replace(frames=normalise_pixels(clip.frames))
    if clip.frames.shape[0] == 1:  # one frame, whatever it came from: replicated, as training sees images
        clip = clip._replace(frames=clip.frames.expand(cfg.replicate_image_frames, -1, -1, -1))
    return clip


def _from_fields(fields, cfg):
    """A shard sample's visual fields: a video, numbered frames or one image (or nothing: text)."""
    video = next((f for f in VIDEO_FIELDS if f in fields), None)
    if video:
        return Clip(read_video(fields[video], cfg.frame_size, _chooser(cfg), pixels=True), "video", video)
    numbered = sorted((int(m.group(1)), f) for f in fields if (m := NUMBERED_FRAME.match(f)))
    if len(numbered) > 1:  # already extracted: every frame, unless more than max_frames
        names = [f for _, f in numbered]
        keep = frame_indices(len(names), 0, cfg.max_frames, cfg.frame_sampling)
        frames = torch.stack([decode_image(fields[names[i]], cfg.frame_size, names[i]) for i in keep])
        return Clip(frames, "video", names[0].split(".")[-1] + " frames")
    image = numbered[0][1] if numbered else next((f for f in IMAGE_FIELDS if f in fields), None)
    if image:  # one image, or ONE numbered frame: an image either way
        return Clip(decode_image(fields[image], cfg.frame_size, image)[None], "image", image)
    return Clip(torch.zeros(0, 3, cfg.frame_size, cfg.frame_size, dtype=torch.uint8), "text", "none")


def _from_path(media, cfg):
    """A file (an image by its extension, else a video) or a folder of frame images."""
    path = find_file(media.path)
    if os.path.isdir(path):
        return _from_folder(media, cfg)
    ext = os.path.splitext(path)[1].lower()
    if ext in Image.registered_extensions():
        with open(path, "rb") as f:
            return Clip(decode_image(f.read(), cfg.frame_size, path)[None], "image", ext[1:])
    choose = _chooser(cfg) if media.rule == "fps" else \
        lambda n, fps: segment_indices(n, fps, cfg.max_frames, media.bound)
    return Clip(read_video(path, cfg.frame_size, choose, pixels=True), "video", ext[1:] or "video")


def _from_folder(media, cfg):
    """A folder of frame images: every frame (sorted by name, numbers as numbers) up to max_frames, uniform
    beyond; with the segment rule, MVBench's frames 00001.jpg, 00002.jpg, ... at FRAME_FOLDER_FPS."""
    names = sorted((f for f in os.listdir(media.path) if os.path.splitext(f)[1].lower() in
                    Image.registered_extensions()), key=lambda f: [int(t) if t.isdigit() else t
                                                                  for t in re.split(r"(\d+)", f)])
    if not names:
        raise SkipSample("empty_frame_folder", media.path)
    if media.rule == "segments":
        names = [f"{i:05d}.jpg" for i in segment_indices(len(names), FRAME_FOLDER_FPS, cfg.max_frames, media.bound,
                                                          first_idx=1)]
    else:
        names = [names[i] for i in frame_indices(len(names), 0, cfg.max_frames, cfg.frame_sampling)]
    frames = []
    for name in names:
        file = os.path.join(media.path, name)
        if not os.path.exists(file):
            raise SkipSample("frame_missing", file)
        with open(file, "rb") as f:
            frames.append(decode_image(f.read(), cfg.frame_size, file))
    return Clip(torch.stack(frames), "video", "frame folder")


def find_file(path):
    """`path`, or a video of the same name with another extension (MVBench mixes .mp4, .webm and .avi); a
    missing one is SkipSample `video_not_found`."""
    if os.path.exists(path):
        return path
    stem = os.path.splitext(path)[0]
    for ext in VIDEO_FIELDS:
        for name in (f"{stem}.{ext}", f"{stem}.{ext.upper()}"):
            if os.path.exists(name):
                return name
    raise SkipSample("video_not_found", path)


# ---------------------------------------------------------------- sampling rules

def frame_indices(num_frames, fps, max_frames, sampling="uniform", sample_fps=1.0):
    """Frame indices at `sample_fps` (every frame when `fps` is 0: frames already sampled); beyond `max_frames`
    (None: no cap), uniform over the video (the middle frame of `max_frames` equal segments) or the first ones."""
    assert sampling in FRAME_SAMPLING, f"frame_sampling must be one of {FRAME_SAMPLING}, got {sampling!r}"
    if num_frames <= 0:
        return []
    step = max(1.0, fps / sample_fps) if fps and fps > 0 else 1.0  # source frames per sampled frame; each at most once
    idx = [int(i * step) for i in range(max(1, int(np.ceil(num_frames / step))))]
    if max_frames is None or len(idx) <= max_frames:
        return idx
    if sampling == "head":
        return idx[:max_frames]
    seg = num_frames / max_frames
    return [min(num_frames - 1, int(seg / 2 + seg * i)) for i in range(max_frames)]


def segment_indices(num_frames, fps, max_frames, bound=None, first_idx=0):
    """MVBench's frame-index rule: the middle of `max_frames` equal segments of [start_idx, end_idx].

    Without a bound this is uniform sampling of the whole video. A range of at most `max_frames` frames (None: no
    cap) is read whole (the rule would repeat some frames and drop others). Frame folders index from `first_idx` 1.
    """
    last = num_frames - 1 + first_idx
    start, end = bound if bound is not None else (-1e5, 1e5)
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), last)
    if end_idx < start_idx:  # a bound past the end of the video: keep its last frame
        start_idx = end_idx
    if max_frames is None or end_idx - start_idx + 1 <= max_frames:
        return list(range(start_idx, end_idx + 1))
    seg = (end_idx - start_idx) / max_frames
    return [int(start_idx + seg / 2 + round(seg * i)) for i in range(max_frames)]


def _chooser(cfg):
    """frame_indices with cfg's settings, as read_video's `choose(num_frames, fps)`."""
    return lambda n, fps: frame_indices(n, fps, cfg.max_frames, cfg.frame_sampling, cfg.sample_fps)


# ---------------------------------------------------------------- images

def image_pixels(image, size=FRAME_SIZE):
    """A PIL image -> uint8 [3, size, size]: a plain square resize (torchvision's Resize((size, size)))."""
    return channels_first(np.array(image.convert("RGB").resize((size, size), Image.BILINEAR)))


def load_image_frames(image, size=FRAME_SIZE):
    """A PIL image -> [3, size, size], square-resized as image_pixels, normalised."""
    return normalise_pixels(image_pixels(image, size))


def decode_image(data, frame_size, name="image"):
    """Encoded image bytes -> uint8 [3, H, W]; one that does not decode is SkipSample `bad_image` naming `name`."""
    try:
        return image_pixels(Image.open(io.BytesIO(data)), frame_size)
    except IMAGE_ERRORS as e:
        raise SkipSample("bad_image", f"{name}: {e}") from e


# ---------------------------------------------------------------- videos

def read_video(source, frame_size, choose, pixels=False):
    """A video (encoded bytes or a file path) -> [T, 3, H, W] at the frame indices `choose(num_frames, fps)`,
    square-resized (bilinear) while decoding, normalised (uint8 with `pixels`). The one video decoder, for
    training and evaluation alike: decord where installed, else PyAV through the same FFmpeg filters, at the same
    frame indices."""
    name = source if isinstance(source, str) else "video bytes"
    decode = _decord_frames if VIDEO_DECODER == "decord" else _pyav_frames
    try:
        rgb = decode(source, frame_size, choose, name)
        return channels_first(rgb) if pixels else normalise(rgb)
    except VIDEO_ERRORS as e:
        raise SkipSample("bad_video", f"{name}: {str(e).splitlines()[0][:200]}") from e


def _chosen(choose, num_frames, fps, name):
    idx = choose(num_frames, fps) if num_frames else []
    if not idx:
        raise SkipSample("empty_video", name)
    return idx


def _decord_frames(source, size, choose, name):
    """uint8 [T, size, size, 3]."""
    with _decord_log():
        vr = VideoReader(io.BytesIO(source) if isinstance(source, bytes) else source, width=size, height=size,
                         num_threads=1)
    return vr.get_batch(_chosen(choose, len(vr), vr.get_avg_fps(), name)).asnumpy()


@contextlib.contextmanager
def _decord_log():
    """What decord and its FFmpeg log while opening a video, shown only when the open succeeds. On a failure the
    SkipSample raised says why, and the log would say it again, worse: decord names a video read from memory by
    its bytes ("ERROR opening: <bytes>", a megabyte per corrupt sample in a training log, binary on a terminal).
    From C++, so sys.stderr cannot catch it: fd 2 is redirected to a file inside the block. Without a usable fd 2
    the block runs as is."""
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
        except BaseException:
            caught.truncate(0)  # the open failed: the exception speaks for it
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            try:
                os.write(2, caught.read())
            except OSError:  # stderr gone: nothing to show it on
                pass


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


