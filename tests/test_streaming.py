"""Long videos a chunk at a time: frames.stream_clip against load_clip, streaming.VideoStream against the one-shot
path in every mode, what a stream holds, live questions, and generate.py's length limits."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import config
import frames
import generate
from checkpoint import TRAIN_CONFIG_NAME
from conftest import TINY_LLM, rand_frames, rand_ids, tiny_model_kwargs, write_video
from frames import Media, load_clip, probe, sampled, stream_clip
from model import MODES, FoveatedVLM
from streaming import chunk_size

ATOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")  # one-token LLM steps: threads only wait on a busy machine
CAMERA = dict(camera=True, width=64)  # x264 with B-frames: decode order differs from presentation order


def varied_model(**overrides):
    """A tiny model whose greedy tokens vary with the frames (a wide random init), so equal tokens mean something."""
    torch.manual_seed(0)
    llm = dict(TINY_LLM, initializer_range=0.3)
    return FoveatedVLM(**tiny_model_kwargs(visual_scale=1.0, llm_config=llm, **overrides)).eval()


# ---------------------------------------------------------------- decoding a chunk at a time
def test_stream_clip_gives_load_clips_frames(tmp_path, decoder):
    clip = write_video(tmp_path / "c.mp4", 90, 6, **CAMERA)  # 15 s
    for media in (clip, Media(fields={"mp4": open(clip, "rb").read()}), Media(path=clip, rule="segments")):
        for cfg in (config.FrameConfig(frame_size=56, max_frames=None), config.FrameConfig(frame_size=56, max_frames=6),
                    config.FrameConfig(frame_size=28, max_frames=None, sample_fps=3.0)):
            whole = load_clip(media, cfg).frames
            assert sampled(probe(media), media, cfg) == whole.shape[0]  # counted before decoding
            for chunk in (1, 4, 64):
                parts = list(stream_clip(media, cfg, chunk))
                assert all(p.shape[0] <= chunk for p in parts)
                assert torch.equal(torch.cat(parts), whole), (media, cfg, chunk)  # equal pixels


def test_stream_clip_of_folders_and_images(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    video = frames.read_video(write_video(tmp_path / "c.mp4", 9, 1), 28, lambda n, fps: list(range(n)))
    from PIL import Image
    for i, f in enumerate(frames.denormalise(video)):
        Image.fromarray((f.movedim(0, -1) * 255).round().clamp(0, 255).byte().numpy()).save(folder / f"{i + 1}.png")
    cfg = config.FrameConfig(frame_size=28, max_frames=None)
    assert torch.equal(torch.cat(list(stream_clip(str(folder), cfg, 4))), load_clip(str(folder), cfg).frames)
    assert probe(str(folder)).frames == 9
    image = tmp_path / "one.png"
    Image.new("RGB", (30, 20), (200, 30, 30)).save(image)
    parts = list(stream_clip(str(image), cfg, 4))
    assert [p.shape[0] for p in parts] == [4, 4] and all(p.stride(0) == 0 for p in parts)  # views of one frame
    assert torch.equal(torch.cat(parts), load_clip(str(image), cfg).frames)


def test_a_long_video_is_decoded_a_chunk_at_a_time(tmp_path, decoder):
    """20 minutes at 1 fps: the decoder yields chunks of at most `chunk` frames, as many as the rule takes."""
    clip = write_video(tmp_path / "long.mp4", 1200, 1, width=28)
    cfg = config.FrameConfig(frame_size=28, max_frames=None)
    sizes = [c.shape[0] for c in stream_clip(clip, cfg, 64)]
    assert sizes == [64] * 18 + [48] and probe(clip) == frames.Source(1200, 1.0)


# ---------------------------------------------------------------- chunked against one-shot
@pytest.mark.parametrize("mode", MODES)
def test_chunked_equals_one_shot(mode):
    """64-frame videos (a batch of two, one shorter, prompts padded): the loss and logits under no_grad, every
    option's NLL and greedy generation give the one-shot path's values when read 24 frames at a time."""
    torch.manual_seed(0)
    model = FoveatedVLM(**tiny_model_kwargs(lambda_coarse=0.5)).eval()
    x = rand_frames(2, 64)
    x[0, 20:30] = x[0, 20]  # a held frame across a chunk boundary (24): encoded once either way
    frame_mask = torch.ones(2, 64, dtype=torch.bool)
    frame_mask[1, 50:] = False
    ids, attention = rand_ids(2, 14), torch.ones(2, 14, dtype=torch.long)
    attention[1, 10:] = 0
    prompts = [rand_ids(1, 9, seed=1)[0].tolist(), rand_ids(1, 5, seed=2)[0].tolist()]
    options = [[rand_ids(1, n, seed=3 + n)[0].tolist() for n in (2, 4, 3)], [rand_ids(1, 3, seed=9)[0].tolist()] * 2]
    runs = {}
    for chunk in (None, 24):  # None: CPU's 64, every video in one piece
        model.chunk_frames = chunk
        with torch.no_grad():
            out = model(x, ids, attention, frame_mask=frame_mask, mode=mode)
        nll = model.option_nll(x, prompts, options, [mode], frame_mask)[mode]
        runs[chunk] = (out["loss"], out["logits"], [t for q in nll for t in q])
    (loss, logits, nll), (loss_c, logits_c, nll_c) = runs.values()
    assert abs(loss - loss_c) < ATOL and (logits - logits_c).abs().max() < ATOL
    assert max((a - b).abs().max() for a, b in zip(nll, nll_c)) < ATOL

    model = varied_model()
    tokens = {}
    for chunk in (None, 24):
        model.chunk_frames = chunk
        tokens[chunk] = model.generate(x, ids, attention, frame_mask, max_new_tokens=8, mode=mode, eos_token_id=7)
    assert torch.equal(*tokens.values()) and len(set(tokens[None][0].tolist())) > 2  # tokens that vary
    steps = list(model.generate_stream(x[:1], ids[:1], attention[:1], frame_mask[:1], max_new_tokens=8, mode=mode,
                                       eos_token_id=7))  # streamed, one sample: the answer as it is written
    assert [s.shape[1] for s in steps] == list(range(1, steps[-1].shape[1] + 1))
    assert torch.equal(steps[-1], tokens[24][:1, :steps[-1].shape[1]])


def test_training_keeps_its_path():
    """With gradients on, a long video takes the one-shot path (training), whatever chunk_frames says."""
    torch.manual_seed(0)
    model = FoveatedVLM(**tiny_model_kwargs())
    model.chunk_frames = 4
    calls = []
    model.encoder.encode_patches = lambda images, f=model.encoder.encode_patches: calls.append(len(images)) or f(images)
    model(rand_frames(1, 12), rand_ids(1, 6))["loss"].backward()
    assert calls == [12]
    with torch.no_grad():
        model(rand_frames(1, 12), rand_ids(1, 6))
    assert calls[1:] == [4, 4, 4]


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an operation makes inside the block."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_a_stream_holds_a_chunk_and_the_cache(tmp_path):
    """A 10-minute video read in every mode: DINOv2 never sees more than a chunk, each mode's cache holds one token
    a frame, and no tensor made while reading is larger than a chunk of frames or a layer's cache: nothing grows
    with the video but the cache."""
    torch.manual_seed(0)
    model = FoveatedVLM(**tiny_model_kwargs(dino_config=dict(tiny_model_kwargs()["dino_config"], image_size=28))).eval()
    clip = write_video(tmp_path / "long.mp4", 600, 1, width=28)
    cfg, chunk = config.FrameConfig(frame_size=28, max_frames=None), 16
    batches = []
    encode = model.encoder.encode_patches
    model.encoder.encode_patches = lambda images: batches.append(len(images)) or encode(images)
    stream = model.stream(MODES, chunk_frames=chunk)
    with LargestTensor() as largest:
        stream.read(stream_clip(clip, cfg, chunk), total=600)
    T, kv_width = 600, TINY_LLM["num_key_value_heads"] * TINY_LLM["hidden_size"] // TINY_LLM["num_attention_heads"]
    assert stream.length == T and max(batches) <= chunk and sum(batches) <= T
    assert {c.get_seq_length() for c in stream.caches.values()} == {T}  # coarse, fine, autoregressive: 3 caches
    per_token = 2 * TINY_LLM["num_hidden_layers"] * kv_width * 4  # keys and values of every layer, float32
    assert stream.cache_bytes() == len(stream.caches) * T * per_token
    # a chunk of frames, or a layer's cached keys for every head (transformers repeats the grouped heads)
    assert largest.numel <= max(chunk * 3 * 28 * 28, T * TINY_LLM["hidden_size"])
    assert largest.numel < T * 3 * 28 * 28 / 10  # far from the video's frames (or its patches' keys and values)


# ---------------------------------------------------------------- live questions
def test_live_stream_answers_as_generate_and_forgets_the_question(tokenizer):
    model = varied_model()
    model.tokenizer = tokenizer
    x = rand_frames(1, 20, seed=5)[0]
    live = model.stream("autoregressive", chunk_frames=8)
    for t in range(12):  # frame by frame, as a live source gives them
        live.add_frames(x[t:t + 1])
    early = live.ask("What happened?", max_new_tokens=6)
    assert live.length == 12 and live.caches["autoregressive"].get_seq_length() == 12  # the question is gone
    live.add_frames(x[12:])  # then a burst
    late = live.ask("What happened?", max_new_tokens=6)
    for n, answer in ((12, early), (20, late)):  # one-shot generate on the same frames
        ids = model.generate(x[None, :n], "What happened?", max_new_tokens=6)
        assert answer == tokenizer.decode(ids[0], skip_special_tokens=True).strip()
    assert early != late
    again = model.stream("autoregressive", chunk_frames=8).add_frames(x)  # as if no question had been asked
    assert again.ask("What happened?", max_new_tokens=6) == late


# ---------------------------------------------------------------- generate.py: limits and no cap
@pytest.fixture(scope="module")
def short_context_checkpoint(tmp_path_factory, tokenizer):
    """A tiny checkpoint whose LLM holds 96 positions."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    torch.manual_seed(0)
    FoveatedVLM(**tiny_model_kwargs(llm_config=dict(TINY_LLM, max_position_embeddings=96))).save_pretrained(
        str(path), tokenizer=tokenizer)
    config.save(config.from_dict({"data": {"frame_size": 56}}), str(path / TRAIN_CONFIG_NAME))
    return str(path)


def test_generate_samples_down_to_the_context_or_refuses_a_fixed_fps(short_context_checkpoint, tmp_path, capsys):
    clip = write_video(tmp_path / "v.mp4", 200, 2, width=56)  # 100 s: 100 frames at 1 fps, more than fit
    args = ["--checkpoint", short_context_checkpoint, "--video", clip, "--prompt", "What?", "--max-new-tokens", "4",
            "--chunk-frames", "16"]
    generate.main(args + ["--max-frames", "0"])  # no cap: as many as the context holds, uniform over the video
    out = capsys.readouterr()
    assert out.out.strip() and "of its 100 frames, sampled uniformly" in out.err and "fps over 1:40" in out.err
    used = int(out.err.split(": ")[1].split(" of")[0])
    assert used == 96 - 4 - len(generate.prompt_ids(generate.load_checkpoint(short_context_checkpoint)[1], "What?"))
    with pytest.raises(ValueError, match=r"at 1 fps is 100 frames \(1:40\).*longest video that fits is 1:"):
        generate.main(args + ["--fps", "1"])
    assert "frames:" not in capsys.readouterr().err  # refused before decoding
    generate.main(args + ["--fps", "0.25"])  # 25 frames fit
    assert "sampled" not in capsys.readouterr().err
    assert chunk_size(None, "cpu") == config.CHUNK_FRAMES["cpu"]


# ---------------------------------------------------------------- benchmark.py: long questions
def test_benchmark_reads_a_long_video_a_chunk_at_a_time(tmp_path, tokenizer):
    """--max-frames 0: a question's video sampled down to what the context holds beside its text, read 16 frames
    at a time in every mode, scored as the one-shot path scores the same frames; with a fixed fps that does not
    fit, skipped as too_long."""
    import dataclasses

    import benchmark
    import eval_readers as er

    torch.manual_seed(0)
    model = FoveatedVLM(**tiny_model_kwargs(llm_config=dict(TINY_LLM, max_position_embeddings=128))).eval()
    clip = write_video(tmp_path / "v.mp4", 200, 1, width=56)
    q = er.mcq("q", "What moves?", ["a ball", "a cube", "nothing"], 1, Media(path=clip, rule="segments"), {})
    protocol = config.EvalProtocol(frame_size=56, max_frames=0, chunk_frames=16)
    batches = []
    encode = model.encoder.encode_patches
    model.encoder.encode_patches = lambda images: batches.append(len(images)) or encode(images)
    result, (streamed,) = benchmark.evaluate(model, tokenizer, [q], protocol)
    text = benchmark.question_text(tokenizer, q, protocol)
    room = 128 - text.tokens
    assert result["sampled_to_fit"] == 1 and result["answered"] == 1
    assert max(batches) <= 16 and sum(batches) == room
    model.chunk_frames = 1000  # the one-shot path on the same frames
    frames = load_clip(q.media, dataclasses.replace(protocol, max_frames=room)).frames
    nll = model.option_nll(frames[None], [text.prompt], [text.options], MODES)
    expected = benchmark.record(q, text, {m: nll[m][0] for m in MODES}, protocol)
    for mode in MODES:
        assert streamed["modes"][mode]["scores"] == pytest.approx(expected["modes"][mode]["scores"], abs=ATOL)
    result, _ = benchmark.evaluate(model, tokenizer, [q], dataclasses.replace(protocol, fps=1.0))
    assert result["skip_reasons"] == {"too_long": 1}
    result, _ = benchmark.evaluate(model, tokenizer, [q], dataclasses.replace(protocol, fps=0.25))  # 50 frames fit
    assert result["answered"] == 1 and result["sampled_to_fit"] == 0


# ---------------------------------------------------------------- live.py
def test_live_frames_are_the_videos_frames_at_one_per_second(tmp_path, monkeypatch):
    monkeypatch.setattr("frames.VIDEO_DECODER", "pyav")
    for n, fps in ((40, 4), (75, 30)):
        clip = write_video(tmp_path / f"{n}.mp4", n, fps, **CAMERA)
        live = list(frames.live_frames(clip, 56))
        assert [t for t, _ in live] == list(range(n // fps + (n % fps > 0)))  # seconds of stream time
        whole = load_clip(clip, config.FrameConfig(frame_size=56, max_frames=None)).frames
        assert torch.equal(torch.stack([f for _, f in live]), whole)


def test_live_script_answers_as_generate_on_the_frames_so_far(tmp_path, tokenizer, monkeypatch, capsys):
    import live

    monkeypatch.setattr("frames.VIDEO_DECODER", "pyav")
    path = tmp_path / "ckpt"
    varied_model().save_pretrained(str(path), tokenizer=tokenizer)
    config.save(config.from_dict({"data": {"frame_size": 56}}), str(path / TRAIN_CONFIG_NAME))
    clip = write_video(tmp_path / "v.mp4", 24, 2, **CAMERA)  # 12 s
    live.main(["--checkpoint", str(path), "--source", clip, "--speed", "0", "--max-new-tokens", "5",
               "--ask", "2.5", "What is it?", "--ask", "30", "And now?"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("]")[0] for line in lines] == ["[0:02.5", "[0:30.0"] and "12 frames)" in lines[1]
    model, tokenizer, _ = generate.load_checkpoint(str(path))
    whole = load_clip(clip, config.FrameConfig(frame_size=56, max_frames=None)).frames
    for line, n, question in ((lines[0], 3, "What is it?"), (lines[1], 12, "And now?")):  # frames of 0-2 s; all
        expected = generate.answer(model, tokenizer, whole[:n], question, max_new_tokens=5)
        assert line.split(" -> ")[1].split("   (")[0] == expected and expected


def test_live_play_keeps_real_time(tmp_path):
    """--speed 8 on a 16-second video: the last frame is not read before 2 s have passed."""
    import time

    import live

    torch.manual_seed(0)
    model = FoveatedVLM(**tiny_model_kwargs()).eval()
    clip = write_video(tmp_path / "v.mp4", 16, 1, width=56)
    start = time.perf_counter()
    live.play(model, frames.live_frames(clip, 56), speed=8, out=lambda line: None)
    assert time.perf_counter() - start >= 15 / 8


def test_bench_long_writes_its_test_video(tmp_path):
    import bench

    path = bench.long_video(str(tmp_path), 3, width=64, height=36, fps=5)
    assert probe(path) == frames.Source(15, 5.0) and bench.long_video(str(tmp_path), 3, 64, 36, 5) == path


def test_validation_reads_videos_longer_than_a_chunk_as_the_one_shot_path():
    """train.evaluate with data.chunk_frames below the videos' length: every mode's validation loss as with the
    whole video at once (within 1e-5), DINOv2 never given more than a chunk, for a hand-made batch of frames and
    for a loader's batch (collate: uint8 distinct pixels, clips of unequal lengths)."""
    import collate
    import train

    torch.manual_seed(0)
    model = FoveatedVLM(**tiny_model_kwargs(lambda_coarse=0.5))
    ids = rand_ids(2, 10)
    made = {"frames": rand_frames(2, 40), "frame_mask": torch.ones(2, 40, dtype=torch.bool), "input_ids": ids,
            "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}
    pixels = torch.randint(0, 256, (2, 40, 3, 56, 56), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    loaded = collate.collate_ce([{"frames": pixels[0], "input_ids": ids[0], "loss_mask": torch.ones(10)},
                                 {"frames": pixels[1, :33], "input_ids": ids[1, :7], "loss_mask": torch.ones(7)}], 2)
    dist = train.distributed.Dist(0, 0, 1, torch.device("cpu"))
    encode = model.encoder.encode_patches
    for batch, first in ((made, 80), (loaded, 73)):
        losses, batches = {}, []
        model.encoder.encode_patches = lambda images: batches.append(len(images)) or encode(images)
        for chunk in (None, 16):
            cfg = config.from_dict({"data": {"chunk_frames": chunk}, "eval": {"modes": list(MODES)}})
            model = train.build_model(cfg, dist.device, model)[0]  # data.chunk_frames -> model.chunk_frames
            losses[chunk] = train.evaluate(train.wrap(model, cfg, dist), None, [batch], cfg, dist)
        assert max(batches[1:]) == 16 and batches[0] == first  # one-shot: both videos at once
        for key, value in losses[None].items():
            assert abs(value - losses[16][key]) < ATOL, key
