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
import dataclasses
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
    return Clip(read_video(path, cfg.frame_size, _rule(media, cfg), pixels=True), "video", ext[1:] or "video")


def _from_folder(media, cfg):
    """A folder of frame images: every frame (sorted by name, numbers as numbers) up to max_frames, uniform
    beyond; with the segment rule, MVBench's frames 00001.jpg, 00002.jpg, ... at FRAME_FOLDER_FPS."""
    return Clip(torch.cat(list(_folder_chunks(media, cfg, None))), "video", "frame folder")


def _folder_images(path):
    """A folder's image files, sorted by name with numbers as numbers; none is SkipSample `empty_frame_folder`."""
    names = sorted((f for f in os.listdir(path) if os.path.splitext(f)[1].lower() in Image.registered_extensions()),
                   key=lambda f: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", f)])
    if not names:
        raise SkipSample("empty_frame_folder", path)
    return names


def _folder_chunks(media, cfg, chunk):
    """The frames of a folder of images (see _from_folder), `chunk` at a time (None: all at once)."""
    names = _folder_images(media.path)
    if media.rule == "segments":
        names = [f"{i:05d}.jpg" for i in segment_indices(len(names), FRAME_FOLDER_FPS, cfg.max_frames, media.bound,
                                                          first_idx=1)]
    else:
        names = [names[i] for i in frame_indices(len(names), 0, cfg.max_frames, cfg.frame_sampling)]
    for start in range(0, len(names), chunk or len(names)):
        frames = []
        for name in names[start:start + (chunk or len(names))]:
            file = os.path.join(media.path, name)
            if not os.path.exists(file):
                raise SkipSample("frame_missing", file)
            with open(file, "rb") as f:
                frames.append(decode_image(f.read(), cfg.frame_size, file))
        yield torch.stack(frames)


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


# ---------------------------------------------------------------- streams: long videos chunk by chunk

class Source(NamedTuple):
    """What a medium holds before sampling: `frames` (a video's frames as decord counts them, a folder's images, 1
    for an image) at `fps` (0 when unknown: an image, a folder read by the fps rule)."""

    frames: int
    fps: float

    @property
    def seconds(self):
        return self.frames / self.fps if self.fps > 0 else None


def stream_clip(media, cfg=FrameConfig(), chunk=64, pixels=False):
    """load_clip's frames, `chunk` at a time: [n <= chunk, 3, H, W] tensors whose concatenation equals
    load_clip(media, cfg, pixels).frames (the same indices, the same pixels; uint8 with `pixels`). A video is
    decoded chunk by chunk as the chunks are asked for (memory holds one, however long the video), from its file (a
    path is opened, not read) or from a shard sample's bytes as they are; a folder's images are read chunk by
    chunk; other media (an image, a sample's numbered frames, already in memory) come from load_clip. Raises
    SkipSample."""
    media = Media(path=media) if isinstance(media, str) else media
    video, folder = _video_of(media), _folder_of(media)
    if video is None and folder is None:
        yield from load_clip(media, cfg, pixels).frames.split(chunk)
        return
    total, rule = [], _rule(media, cfg)  # total: the frames chosen, known before the first chunk is decoded

    def choose(n, fps):
        idx = rule(n, fps)
        total.append(len(idx))
        return idx
    if folder:
        total.append(sampled(probe(media), media, cfg))
        chunks = (c if pixels else normalise_pixels(c) for c in _folder_chunks(media, cfg, chunk))
    else:
        chunks = video_chunks(video, cfg.frame_size, choose, chunk, pixels)
    for frames in chunks:  # one frame in all is replicated, as load_clip replicates it
        yield frames.expand(cfg.replicate_image_frames, -1, -1, -1) if total[0] == 1 else frames


def _video_of(media):
    """The video a medium is (a file path, or a shard sample's video bytes), else None."""
    if media.fields is not None:
        return next((media.fields[f] for f in VIDEO_FIELDS if f in media.fields), None)
    path = find_file(media.path)
    if os.path.isdir(path) or os.path.splitext(path)[1].lower() in Image.registered_extensions():
        return None
    return path


def _folder_of(media):
    """The folder of frame images a medium is, else None."""
    return media.path if media.fields is None and os.path.isdir(find_file(media.path)) else None


def probe(media):
    """The medium's Source (its frame count and rate), read without decoding a frame (PyAV counts the video's
    packets: one pass over the file). Raises SkipSample."""
    media = Media(path=media) if isinstance(media, str) else media
    video, folder = _video_of(media), _folder_of(media)
    if folder is not None:
        return Source(len(_folder_images(folder)), FRAME_FOLDER_FPS if media.rule == "segments" else 0.0)
    if video is None:  # an image, or a sample's numbered frames (or none)
        fields = media.fields or {}
        numbered = sum(1 for f in fields if NUMBERED_FRAME.match(f))
        return Source(numbered or int(media.path is not None or any(f in fields for f in IMAGE_FIELDS)), 0.0)
    name = video if isinstance(video, str) else "video bytes"
    try:
        if VIDEO_DECODER == "decord":
            vr = _decord_reader(video, 32)
            return Source(len(vr), float(vr.get_avg_fps()))
        return Source(*_pyav_count(video, name))
    except VIDEO_ERRORS as e:
        raise SkipSample("bad_video", f"{name}: {str(e).splitlines()[0][:200]}") from e


def sampled(source, media, cfg):
    """How many frames `cfg` takes from `media`, whose Source is `source` (what load_clip and stream_clip give,
    before an image's replication)."""
    media = Media(path=media) if isinstance(media, str) else media
    if media.rule == "segments" and source.fps:
        first_idx = 1 if media.fields is None and _folder_of(media) else 0  # MVBench's frame folders: from 1
        return len(segment_indices(source.frames, source.fps, cfg.max_frames, media.bound, first_idx))
    return len(frame_indices(source.frames, source.fps, cfg.max_frames, cfg.frame_sampling, cfg.sample_fps))


def fit(media, cfg, room, fixed_fps=False, source=None):
    """The FrameConfig that reads `media` in at most `room` frames (what the LLM's context leaves beside the
    text), and a note saying what was done (None when nothing was): more frames than fit are sampled uniformly
    down to `room` over the whole video (frames used, the fps that gives). With `fixed_fps` (the user asked for
    cfg.sample_fps) it is instead a ValueError naming the frame count, the fps and the longest video that fits,
    raised before any frame is decoded."""
    media = Media(path=media) if isinstance(media, str) else media
    source = source or probe(media)
    n = sampled(source, media, cfg)
    if n <= room:
        return cfg, None
    name = media.path or "the video"
    if room < 1:
        raise ValueError(f"the text alone fills the LLM's context: no room for a frame of {name}")
    seconds = source.seconds
    if fixed_fps:
        longest = f"; at {cfg.sample_fps:g} fps the longest video that fits is {_clock(room / cfg.sample_fps)}"
        raise ValueError(f"{name} at {cfg.sample_fps:g} fps is {n:,} frames"
                         f"{f' ({_clock(seconds)})' if seconds else ''}, more than the {room:,} the LLM's context "
                         f"holds beside the text{longest}. Leave out --fps to sample it uniformly down to "
                         f"{room:,} frames, or ask for a lower fps")
    rate = f" ({room / seconds:.3g} fps over {_clock(seconds)})" if seconds else ""
    note = f"{name}: {room:,} of its {n:,} frames, sampled uniformly{rate}: what the LLM's context holds"
    return dataclasses.replace(cfg, max_frames=room, frame_sampling="uniform"), note


def _clock(seconds):
    """Seconds as h:mm:ss (or m:ss)."""
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def live_frames(source, frame_size=FRAME_SIZE, sample_fps=1.0, format=None):
    """A video as it plays -> (seconds of stream time, frame [3, H, W]) pairs, `sample_fps` frames per second of
    stream time, as they are decoded: a file, or any URL or device PyAV opens (`format`, e.g. "v4l2" for a
    camera). With a known frame rate these are frame_indices' frames (a file gives load_clip's with no frame cap,
    pixel for pixel as the PyAV path decodes them); without one, the first frame at or after each 1/sample_fps."""
    with av.open(source, format=format) as c:
        stream = _video_stream(c, source)
        rate, graph, start, taken = float(stream.average_rate or 0), None, None, 0
        for i, frame in enumerate(c.decode(stream)):
            start = frame.time if start is None and frame.time is not None else start
            seconds = i / rate if rate else (frame.time or 0.0) - (start or 0.0)
            due = int(taken * max(1.0, rate / sample_fps)) if rate else taken / sample_fps  # the rule's next frame
            if (i if rate else seconds + 1e-6) < due:
                continue
            graph = graph or _decord_filters(stream, frame.rotation, frame_size)
            graph.push(frame)
            yield seconds, normalise(graph.pull().to_ndarray())
            taken += 1


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


def _rule(media, cfg):
    """The sampling rule of a video file, as read_video's `choose(num_frames, fps)`."""
    if media.rule == "fps":
        return _chooser(cfg)
    return lambda n, fps: segment_indices(n, fps, cfg.max_frames, media.bound)


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
    chunks = list(video_chunks(source, frame_size, choose, pixels=pixels))
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


def video_chunks(source, frame_size, choose, chunk=None, pixels=False):
    """read_video's frames `chunk` at a time ([n <= chunk, 3, H, W] each; None: all in one), decoded as they are
    asked for: memory holds one chunk, whatever the video's length. A path is opened as a file; bytes are read
    where they are (io.BytesIO shares them)."""
    name = source if isinstance(source, str) else "video bytes"
    decode = _decord_chunks if VIDEO_DECODER == "decord" else _pyav_chunks
    try:
        for rgb in decode(source, frame_size, choose, name, chunk):
            yield channels_first(rgb) if pixels else normalise(rgb)
    except VIDEO_ERRORS as e:
        raise SkipSample("bad_video", f"{name}: {str(e).splitlines()[0][:200]}") from e


def _chosen(choose, num_frames, fps, name):
    idx = choose(num_frames, fps) if num_frames else []
    if not idx:
        raise SkipSample("empty_video", name)
    return idx


def _decord_chunks(source, size, choose, name, chunk):
    """uint8 [n, size, size, 3] chunks."""
    vr = _decord_reader(source, size)
    idx = _chosen(choose, len(vr), vr.get_avg_fps(), name)
    for start in range(0, len(idx), chunk or len(idx)):
        yield vr.get_batch(idx[start:start + (chunk or len(idx))]).asnumpy()


def _decord_reader(source, size):
    with _decord_log():
        return VideoReader(io.BytesIO(source) if isinstance(source, bytes) else source, width=size, height=size,
                           num_threads=1)


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


def _pyav_chunks(source, size, choose, name, chunk):
    """uint8 [n, size, size, 3] chunks as decord decodes them: frames counted as the video stream's packets, fps
    its average rate, frames in presentation order through decord's filter chain (`_decord_filters`)."""
    num_frames, fps = _pyav_count(source, name)
    idx = _chosen(choose, num_frames, fps, name)
    assert idx == sorted(idx), "frame indices must be in order"
    wanted, pos, out, graph = set(idx), 0, [], None
    with _pyav_open(source) as c:
        stream = _video_stream(c, name)
        stream.codec_context.thread_count = 1  # as decord's num_threads=1: loader workers are the parallelism
        for i, frame in enumerate(c.decode(stream)):
            if i not in wanted:
                continue
            graph = graph or _decord_filters(stream, frame.rotation, size)
            graph.push(frame)
            rgb = graph.pull().to_ndarray()
            while pos < len(idx) and idx[pos] == i:  # an index asked for twice gives the frame twice
                out.append(rgb)
                pos += 1
            if len(out) == (chunk or len(idx)):
                yield np.stack(out)
                out = []
            if pos == len(idx):
                break
    if pos < len(idx):
        raise SkipSample("bad_video", f"{name}: decoding ended before frame {idx[pos]}")
    if out:
        yield np.stack(out)


def _pyav_open(source):
    return av.open(io.BytesIO(source) if isinstance(source, bytes) else source)


def _pyav_count(source, name):
    """(frames, fps) as decord counts them: the video stream's packets and its average rate (demuxed, not
    decoded). A cut mp4 is SkipSample `bad_video`, as decord refuses it."""
    with _pyav_open(source) as c:
        stream = _video_stream(c, name)
        if "mp4" in c.format.name.split(",") and _boxes_end(source) > _size(source):
            raise SkipSample("bad_video", f"{name}: truncated (its boxes run past the end)")  # decord raises too
        return sum(1 for p in c.demux(stream) if p.size), float(stream.average_rate or 0)


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


