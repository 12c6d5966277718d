"""Text retention: a `text_ratio` share of training batches are text-only (SmolTalk), as in the fVLM recipe (14%).

Which steps are text-only is a pure function of (step, text_ratio, seed): step i is text-only when
floor(r * (i + 1) + phase) > floor(r * i + phase), with the phase drawn from the seed. So the share is exact
over any 1/r steps, every DDP rank (same seed) makes the same choice at the same step, and a resumed run
continues the same schedule from its step. Text-only batches have T = 0 frames.
"""

import math
import random


def phase(seed):
    return random.Random(seed).random()


def is_text_step(step, text_ratio, seed):
    """True when batch `step` (0-based) should be text-only."""
    assert 0.0 <= text_ratio <= 1.0, f"text_ratio must be in [0, 1], got {text_ratio}"
    p = phase(seed)
    return math.floor(text_ratio * (step + 1) + p) > math.floor(text_ratio * step + p)


def interleave(visual_batches, text_batches, text_ratio, seed, start_step=0):
    """Yield (step, batch): text-only batches at the steps `is_text_step` picks, visual batches otherwise.

    `visual_batches` and `text_batches` are iterables of batches (e.g. DataLoaders over endless streams);
    `text_batches` may be None when text_ratio is 0.
    """
    if text_ratio > 0 and text_batches is None:
        raise ValueError(f"text_ratio is {text_ratio} but no text batches were given (data.text_shards)")
    visual = iter(visual_batches)
    text = iter(text_batches) if text_ratio > 0 else None
    step = start_step
    while True:
        source = text if text_ratio > 0 and is_text_step(step, text_ratio, seed) else visual
        try:
            batch = next(source)
        except StopIteration:
            return
        yield step, batch
        step += 1
