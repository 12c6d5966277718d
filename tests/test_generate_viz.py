"""generate.py and attention_viz.py end to end on a tiny checkpoint written by model.save_pretrained."""

import math
import re

import pytest
import torch
from PIL import Image

import attention_viz
import benchmark
import config
import generate
from checkpoint import TRAIN_CONFIG_NAME as TRAIN_CONFIG
from conftest import TINY_DINO, tiny_model_kwargs, write_video
from frames import load_clip
from model import FoveatedVLM, load_checkpoint
from tokenization import prompt_ids

SIZE = TINY_DINO["image_size"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    torch.manual_seed(0)
    FoveatedVLM(**tiny_model_kwargs()).save_pretrained(str(path), tokenizer=tokenizer)
    # as checkpoint.py writes it: the resolved training config beside the model
    config.save(config.from_dict({"stage": 2, "data": {"frame_size": SIZE}}), str(path / TRAIN_CONFIG))
    return str(path)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("media") / "clip.mp4"
    write_video(str(path), 12, 1)  # 12 s: more frames at 1 fps than the tests' max_frames
    return str(path)


def test_load_checkpoint_rebuilds_the_saved_model(checkpoint):
    model, tokenizer, frame_size = load_checkpoint(checkpoint)
    torch.manual_seed(0)
    reference = FoveatedVLM(**tiny_model_kwargs())
    assert frame_size == SIZE and tokenizer.eos_token == "<|im_end|>"  # frame size from train_config.yaml
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name


def test_generate_answer_matches_model_generate(checkpoint, clip, capsys):
    model, tokenizer, frame_size = load_checkpoint(checkpoint)
    frames = load_clip(clip, config.FrameConfig(frame_size=frame_size, max_frames=6)).frames
    assert frames.shape == (6, 3, SIZE, SIZE)
    text = generate.answer(model, tokenizer, frames, "What moves?", max_new_tokens=6)
    ids = torch.tensor([prompt_ids(tokenizer, "What moves?")])
    expected = model.generate(frames[None], ids, max_new_tokens=6, eos_token_id=tokenizer.eos_token_id)
    assert text == tokenizer.decode(expected[0], skip_special_tokens=True).strip()
    generate.main(["--checkpoint", checkpoint, "--video", clip, "--prompt", "What moves?",
                   "--max-new-tokens", "6", "--max-frames", "6", "--device", "cpu"])
    assert capsys.readouterr().out.strip() == text


def test_generate_cli_on_an_image(checkpoint, tmp_path, capsys):
    image = tmp_path / "photo.jpg"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(image)
    frames = load_clip(str(image), config.FrameConfig(frame_size=SIZE)).frames
    assert frames.shape == (8, 3, SIZE, SIZE)  # replicated to 8 frames
    generate.main(["--checkpoint", checkpoint, "--image", str(image), "--prompt", "Colour?",
                   "--mode", "coarse_fine", "--max-new-tokens", "3", "--device", "cpu"])
    model, tokenizer, _ = load_checkpoint(checkpoint)
    assert capsys.readouterr().out.strip() == generate.answer(model, tokenizer, frames, "Colour?", "coarse_fine", 3)


def test_attention_entropy_of_uniform_and_peaked_maps():
    uniform = torch.full((2, 3, 4, 17), 1 / 17)  # [L, T, heads, 1+P]
    peaked = torch.zeros(2, 3, 4, 17)
    peaked[..., 5] = 1
    ent = attention_viz.attention_entropy({"coarse": uniform, "fine": peaked})
    assert torch.allclose(ent["coarse"], torch.full((2, 3), math.log(17)))
    assert ent["fine"].abs().max() < 1e-6


def test_attention_viz_writes_png_and_returns_entropy(checkpoint, clip, tmp_path, capsys):
    out = tmp_path / "maps.png"
    attention_viz.main(["--checkpoint", checkpoint, "--video", clip, "--out", str(out), "--max-frames", "4"])
    assert out.exists() and out.stat().st_size > 1000
    with Image.open(out) as png:
        assert png.format == "PNG"
    printed = capsys.readouterr().out
    assert printed.count("\n") >= 5 and "maps.png" in printed  # header + 4 frames + the file line

    model, _, frame_size = load_checkpoint(checkpoint)
    frames = load_clip(clip, config.FrameConfig(frame_size=frame_size, max_frames=4)).frames
    entropy = attention_viz.visualize(model, frames, str(tmp_path / "again.png"), layers=[1], verbose=False)
    patches = (SIZE // TINY_DINO["patch_size"]) ** 2
    for kind in ("coarse", "fine"):
        assert entropy[kind].shape == (TINY_DINO["num_hidden_layers"], 4)
        assert (entropy[kind] > 0).all() and (entropy[kind] <= math.log(1 + patches) + 1e-5).all()
    with pytest.raises(ValueError, match="layers"):
        attention_viz.visualize(model, frames, str(tmp_path / "bad.png"), layers=[7], verbose=False)


@pytest.mark.parametrize("module", [generate, attention_viz, benchmark], ids=lambda m: m.__name__)
def test_help_examples_keep_their_line_breaks_and_name_a_save_dir(module):
    assert not re.search(r"\S {4,}\[", module.__doc__)  # a `\` eaten by Python joins the next line after spaces
    assert "--checkpoint checkpoints/stage2_135M" in module.__doc__  # a save_dir: its latest checkpoint
