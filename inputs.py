"""What FoveatedVLM's Python API accepts, checked in one place: frames, token ids, and text given as strings.

Frames are handled when the intent is unambiguous (one clip without the batch dimension, channels-last, uint8
pixels) and refused otherwise, with the expected shape and range in the message. Strings are chat-formatted
with the LLM's tokenizer as in training (tokenization.prompt_ids / option_targets).
"""

import warnings

import torch

from frames import IMAGENET_MEAN, IMAGENET_STD, normalise_pixels
from tokenization import option_targets, prompt_ids

NORMALISED_RANGE = (min(-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)),  # (pixel - mean) / std for pixels
                    max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)))  # in [0, 1]: [-2.12, 2.64]
RANGE_MARGIN = 0.5  # resizing normalised frames (bicubic) can overshoot the range a little
EXPECTED = ("frames must be [B, T, 3, H, W] (or one clip [T, 3, H, W]), H and W multiples of {patch} (e.g. 224), "
            "either ImageNet-normalised float ((pixel / 255 - mean) / std with mean (0.485, 0.456, 0.406) and std "
            "(0.229, 0.224, 0.225), values in about [-2.1, 2.6]) or uint8 pixels (normalised here)")
NO_TOKENIZER = ("text given as strings needs a tokenizer: pass tokenizer= (pretrained.load_tokenizer(name)) or set "
                "model.tokenizer (FoveatedVLM.from_pretrained sets it from a folder saved with one: "
                "model.save_pretrained(path, tokenizer=tokenizer)); or pass token ids")


def prepare_frames(frames, frame_mask, patch_size, replicate=None):
    """The frames a user hands the model -> (frames [B, T, 3, H, W] float, frame_mask [B, T] bool).

    Handled: one clip [T, 3, H, W] (a batch of one), channels-last [..., H, W, 3], and uint8 pixels (scaled to
    [0, 1] and ImageNet-normalised here). With `replicate` (the inference API: the frames the model was trained to
    see an image as), one image [3, H, W] or [H, W, 3] (what PIL and numpy give), and clips of a single frame,
    become `replicate` views of it. Refused with the expected shape and range (ValueError): other ranks or
    dtypes, a frame_mask of another shape, and float frames beyond the ImageNet-normalised range (0-255
    pixels as float). Frames whose values all lie within [0, 1] get a warning: ToTensor without Normalize, most
    likely, but normalised frames of a picture with no pixel darker than the ImageNet mean lie there too, so
    they are not refused (a grey frame must not stop a training run or a benchmark). Only real frames are read: padded
    ones may hold anything. Frame sizes are checked where DINO reads them (encoder.encode_patches).
    """
    expected = EXPECTED.format(patch=patch_size)
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"frames is a {type(frames).__name__}; {expected}")
    if frame_mask is not None:
        frame_mask = torch.as_tensor(frame_mask, device=frames.device)
    if frames.dim() == 3 and replicate and 3 in (frames.shape[0], frames.shape[-1]):  # one image
        frames = frames[None]
    if frames.dim() == 4:
        frames = frames[None]
        frame_mask = None if frame_mask is None else frame_mask.reshape(1, -1)
    if frames.dim() == 5 and frames.shape[-1] == 3 and frames.shape[2] != 3:
        frames = frames.movedim(-1, 2)  # channels-last -> [B, T, 3, H, W]
    if frames.dim() != 5 or frames.shape[2] != 3:
        raise ValueError(f"frames have shape {list(frames.shape)}; {expected}")
    if replicate and frames.shape[1] == 1 and frame_mask is None:  # single frames: replicated, as images
        frames = frames.expand(-1, replicate, -1, -1, -1)
    B, T = frames.shape[:2]
    if frame_mask is None:
        frame_mask = torch.ones(B, T, dtype=torch.bool, device=frames.device)
    if tuple(frame_mask.shape) != (B, T):
        raise ValueError(f"frame_mask has shape {list(frame_mask.shape)}, frames {list(frames.shape)}: it must "
                         f"be [B, T] = [{B}, {T}] (True at real frames)")
    frame_mask = frame_mask.bool()
    if frames.dtype == torch.uint8:
        return normalise_pixels(frames), frame_mask
    if not frames.is_floating_point():
        raise ValueError(f"frames have dtype {frames.dtype}; {expected}")
    _check_normalised(frames[frame_mask], expected)
    return frames, frame_mask


def _check_normalised(real, expected):
    """real [M, 3, H, W] float: refuse values an ImageNet-normalised frame cannot hold (see prepare_frames)."""
    if real.numel() == 0:
        return
    lo, hi = (v.item() for v in torch.aminmax(real))
    bottom, top = NORMALISED_RANGE
    if not (bottom - RANGE_MARGIN <= lo and hi <= top + RANGE_MARGIN):  # NaN fails too
        raise ValueError(f"frame values span [{lo:.3g}, {hi:.3g}]: not ImageNet-normalised (0-255 pixels as "
                         f"float? pass them as uint8 to have them normalised); {expected}")
    if 0 <= lo and hi <= 1 and lo < hi:  # a warning: a low-contrast normalised frame can lie there too
        warnings.warn(f"frame values all lie in [0, 1] ([{lo:.3g}, {hi:.3g}]): pixels scaled to [0, 1] but not "
                      f"normalised (ToTensor without Normalize)? Then the model sees the wrong input; {expected}. "
                      f"(Normalised frames of a pale, low-contrast picture lie there too: pass uint8 pixels to "
                      f"leave no doubt.)", stacklevel=4)


def id_list(ids, what):
    """Token ids as a list of ints (from a list or a 1-D tensor); anything else is a ValueError naming `what`."""
    if isinstance(ids, torch.Tensor) and ids.dim() == 1:
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)) or not ids or not all(isinstance(i, int) for i in ids):
        raise ValueError(f"{what} must be a non-empty list of token ids, got {ids!r}")
    return list(ids)


def question_ids(prompts, options):
    """option_nll's text: Q prompts and Q non-empty lists of options, each a non-empty list of token ids (or a
    1-D tensor) -> (prompts, options) as lists of ints."""
    if len(prompts) != len(options):
        raise ValueError(f"{len(prompts)} prompts but {len(options)} option lists: one per question")
    for q, opts in enumerate(options):
        if not isinstance(opts, (list, tuple)) or not opts:
            raise ValueError(f"question {q}'s options must be a non-empty list of token-id lists, got {opts!r}")
    return ([id_list(p, f"question {q}'s prompt") for q, p in enumerate(prompts)],
            [[id_list(o, f"question {q}'s option {k}") for k, o in enumerate(opts)] for q, opts in enumerate(options)])


def mcq_ids(prompt, options, tokenizer, system_prompt):
    """One question's (prompt ids, [option ids], [option target weights]) from ids (weights 1) or strings:
    option strings are tokenized as they follow the prompt string (behind `system_prompt`) in training, so they
    need it as a string, and weighted as benchmark.py scores them by default (tokenization.option_targets).
    `tokenizer` may be None when nothing is a string."""
    if isinstance(options, (str, torch.Tensor)) or not options:
        raise ValueError(f"options must be a non-empty list of options (strings or token-id lists), got {options!r}")
    if isinstance(prompt, str) or any(isinstance(o, str) for o in options):
        if tokenizer is None:
            raise ValueError(NO_TOKENIZER)
        if not isinstance(prompt, str):
            raise ValueError("options given as strings need the prompt as a string too: an option's tokens are "
                             "those that follow the chat-formatted prompt")
        targets = [option_targets(tokenizer, prompt, o, system_prompt=system_prompt) if isinstance(o, str)
                   else (o, [1.0] * len(o)) for o in options]
        return (prompt_ids(tokenizer, prompt, system_prompt), [t[0] for t in targets],
                [torch.tensor(t[1]) for t in targets])
    return prompt, options, [torch.ones(len(o)) for o in options]


def prompt_batch(prompts, tokenizer, device, system_prompt):
    """A user message (or a list of them) -> chat-formatted prompt ids [B, S] behind `system_prompt` and the
    attention mask (right-padded)."""
    if tokenizer is None:
        raise ValueError(NO_TOKENIZER)
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"a prompt given as text must be a string or a list of strings, got {prompts!r}")
    rows = [prompt_ids(tokenizer, p, system_prompt) for p in prompts]
    lengths = torch.tensor([len(r) for r in rows], device=device)
    ids = torch.tensor([r + [0] * (int(lengths.max()) - len(r)) for r in rows], device=device)
    return ids, (torch.arange(ids.shape[1], device=device) < lengths[:, None]).long()
