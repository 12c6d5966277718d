"""The Python API is hard to misuse (inputs.py): frames as a user may hold them are handled or refused with the
expected shape and range, at every entry point; prompts given as strings work with a tokenizer."""

import numpy as np
import pytest
import torch

import checkpoint
from config import InputSettings
from conftest import rand_frames as frames
from conftest import rand_ids as ids
from frames import normalise
from model import MODES, FoveatedVLM, load_checkpoint
from tokenization import prompt_ids

ATOL = 1e-5
ENTRY_POINTS = {
    "forward": lambda m, x, **kw: m(x, ids(1, 5), **kw)["loss"],
    "generate": lambda m, x, **kw: m.generate(x, ids(1, 3), max_new_tokens=2, **kw),
    "score_options": lambda m, x, **kw: m.score_options(x, [5, 6], [[7], [8, 9]], MODES, **kw),
    "option_nll": lambda m, x, **kw: m.option_nll(x, [[5, 6]], [[[7], [8, 9]]], MODES, **kw),
    "attention_maps": lambda m, x, **kw: m.attention_maps(x, **kw),
}


def test_uint8_channels_last_and_unbatched_frames_are_handled(tiny_model):
    pixels = torch.randint(0, 256, (3, 56, 56, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    normalised = normalise(pixels.numpy())[None]  # [1, T, 3, H, W]: the training pipeline's own normalisation
    t = ids(1, 5)
    reference = tiny_model(normalised, t)["loss"].item()
    for given in (pixels, pixels[None], pixels.permute(0, 3, 1, 2), normalised[0], normalised.permute(0, 1, 3, 4, 2)):
        assert abs(tiny_model(given, t)["loss"].item() - reference) < ATOL, given.shape


@pytest.mark.parametrize("name", ENTRY_POINTS)
@pytest.mark.parametrize("bad, match", [
    (lambda x: x * 60, r"not ImageNet-normalised \(0-255 pixels"),
    (lambda x: torch.full_like(x, float("nan")), "not ImageNet-normalised"),
    (lambda x: x[..., :50], "not a multiple of DINO's patch size 14"),
    (lambda x: x[0, 0, 0], r"have shape \[56, 56\]"),
    (lambda x: x.long(), "dtype torch.int64"),
])
def test_bad_frames_are_refused_with_the_expected_shape_and_range(tiny_model, name, bad, match):
    with pytest.raises(ValueError, match=match) as error:
        ENTRY_POINTS[name](tiny_model, bad(frames(1, 2)))
    assert "[B, T, 3, H, W]" in str(error.value) and "ImageNet-normalised float" in str(error.value)


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_frames_within_0_1_are_warned_of_not_refused(tiny_model, name):
    """[0, 1] floats are most likely ToTensor without Normalize, but a pale, low-contrast picture normalised
    lies there too (pixels 135-150: the original scored such an image), so they run, with a warning."""
    pixels = torch.randint(135, 151, (2, 56, 56, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pale = normalise(pixels.numpy())
    assert 0 <= pale.min() and pale.max() <= 1
    for x in (pale, (frames(1, 2) + 2) / 4):
        with pytest.warns(UserWarning, match=r"all lie in \[0, 1\].*pass uint8 pixels"):
            ENTRY_POINTS[name](tiny_model, x)
    assert ENTRY_POINTS[name](tiny_model, pixels) is not None  # as uint8: no doubt, no warning


def test_only_real_frames_are_checked_and_masks_must_fit(tiny_model):
    x = frames(1, 3)
    x[0, 2] = 255.0  # a padded frame may hold anything
    fmask = torch.tensor([[True, True, False]])
    for call in ENTRY_POINTS.values():
        call(tiny_model, x, frame_mask=fmask)
    with pytest.raises(ValueError, match=r"frame_mask has shape \[1, 2\].*\[B, T\] = \[1, 3\]"):
        tiny_model(x, ids(1, 5), frame_mask=fmask[:, :2])
    with pytest.raises(ValueError, match="frames hold 1 clip"):
        tiny_model(x, ids(2, 5), frame_mask=fmask)
    with pytest.raises(TypeError, match=r"frames is a ndarray; frames must be \[B, T, 3, H, W\]"):
        tiny_model(np.zeros((1, 2, 3, 56, 56)), ids(1, 5))


def test_generate_takes_prompt_strings(tiny_model, tokenizer):
    x = frames(2, 3)
    with pytest.raises(ValueError, match="needs a tokenizer: pass tokenizer="):
        tiny_model.generate(x[:1], "What moves?")
    questions = ["What moves?", "Which colour is the ball on the left?"]
    out = tiny_model.generate(x, questions, max_new_tokens=4, tokenizer=tokenizer)
    for b, question in enumerate(questions):  # batched strings (padded) == each prompt's ids alone
        prompt = torch.tensor([prompt_ids(tokenizer, question)])
        alone = tiny_model.generate(x[b:b + 1], prompt, max_new_tokens=4, eos_token_id=tokenizer.eos_token_id)
        assert torch.equal(out[b, :alone.shape[1]], alone[0])
    tiny_model.tokenizer = tokenizer
    assert torch.equal(tiny_model.generate(x[:1], questions[0], max_new_tokens=4), out[:1, :4])


def test_a_single_image_is_replicated_as_the_model_was_trained(tiny_model):
    """What PIL and numpy give (uint8 [H, W, 3]), a [3, H, W] frame and a one-frame clip are one image, replicated
    to the frames the model was trained to see images as (model.inputs); training's forward takes clips as given."""
    tiny_model.inputs = InputSettings(frame_size=56, replicate_image_frames=4)
    pixels = torch.randint(0, 256, (56, 56, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    image = normalise(pixels.numpy())  # [3, H, W]
    clip = image.expand(4, -1, -1, -1)[None]  # [1, 4, 3, H, W]: the image as trained
    prompt = ids(1, 3)
    expected = (tiny_model.generate(clip, prompt, max_new_tokens=3),
                tiny_model.score_options(clip, [5, 6], [[7], [8, 9]], MODES),
                tiny_model.attention_maps(clip)["fine"])
    for given in (pixels, image, image[None], image[None, None]):
        tokens = tiny_model.generate(given, prompt, max_new_tokens=3)
        scores = tiny_model.score_options(given, [5, 6], [[7], [8, 9]], MODES)
        maps = tiny_model.attention_maps(given)["fine"]
        assert torch.equal(tokens, expected[0]) and maps.shape == expected[2].shape, given.shape
        assert all((scores[m] - expected[1][m]).abs().max() < ATOL for m in MODES), given.shape
        assert (maps - expected[2]).abs().max() < ATOL
    with pytest.raises(ValueError, match=r"have shape \[3, 56, 56\]"):  # training's forward: no guessing
        tiny_model(image, prompt)


def test_frames_of_another_size_than_trained_are_warned_of_once(tiny_model, recwarn):
    tiny_model.inputs = InputSettings(frame_size=56)
    tiny_model.generate(frames(1, 2), ids(1, 3), max_new_tokens=1)
    assert not recwarn.list
    with pytest.warns(UserWarning, match="trained at 56x56"):
        tiny_model.generate(frames(1, 2, size=70), ids(1, 3), max_new_tokens=1)
    tiny_model.score_options(frames(1, 2, size=70), [5, 6], [[7], [8, 9]])
    assert not [w for w in recwarn.list if "trained at" in str(w.message)]  # once per model


def test_how_a_model_is_used_travels_with_its_weights(tiny_model, tokenizer, tmp_path):
    """save_pretrained writes the frame size, image replication and system prompt into config.json; from_pretrained
    and load_checkpoint read them, with no training config beside them."""
    tiny_model.inputs = InputSettings(frame_size=56, replicate_image_frames=4, system_prompt="Be brief.")
    tiny_model.save_pretrained(str(tmp_path / "mine"), tokenizer=tokenizer)
    assert not (tmp_path / "mine" / checkpoint.TRAIN_CONFIG_NAME).exists()
    loaded = FoveatedVLM.from_pretrained(str(tmp_path / "mine"))
    assert loaded.inputs == tiny_model.inputs
    model, _, frame_size = load_checkpoint(str(tmp_path / "mine"))
    assert frame_size == 56 and model.inputs.system_prompt == "Be brief."
    out = model.generate(frames(1, 4), "What moves?", max_new_tokens=3)  # behind the saved system prompt
    asked = torch.tensor([prompt_ids(tokenizer, "What moves?", "Be brief.")])
    assert torch.equal(out, model.generate(frames(1, 4), asked, max_new_tokens=3, eos_token_id=tokenizer.eos_token_id))
    FoveatedVLM(**{"llm_config": dict(tiny_model.settings.llm_config), "dino_config": dict(
        tiny_model.settings.dino_config), "query_dim": 24}).save_pretrained(str(tmp_path / "published"))
    assert FoveatedVLM.from_pretrained(str(tmp_path / "published")).inputs == InputSettings()  # the original's
