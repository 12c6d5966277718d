"""MCQ scoring (FoveatedVLM.option_nll / score_options) on a tiny random-weight model: per-token NLLs equal a
full forward per option, a batch of questions equals one question at a time, modes asked together equal modes
asked alone, and DINO runs once per batch."""

import pytest
import torch
import torch.nn.functional as F

from conftest import DinoCounter
from conftest import rand_frames as frames
from model import MODES
from tokenization import option_targets, prompt_ids

ATOL = 1e-5
# (real frames, prompt, options): different frame counts, prompt lengths, option counts and option lengths
QUESTIONS = [
    (3, [5, 6, 7, 8], [[11, 12], [13], [14, 15, 16], [17, 18]]),
    (1, [9, 10], [[21, 22, 23], [24]]),
    (4, [30, 31, 32, 33, 34, 35], [[40], [41, 42], [43, 44, 45, 46], [47, 48], [49]]),
]


def batch(questions, seed=3):
    """Frames [Q, T, 3, H, W] with garbage in the padding, frame_mask [Q, T], prompts, options."""
    T = max(n for n, _, _ in questions)
    x = frames(len(questions), T, seed=seed)
    fmask = torch.tensor([[t < n for t in range(T)] for n, _, _ in questions])
    x[~fmask] = 1e3  # padded frames hold garbage: nothing may read them
    return x, fmask, [p for _, p, _ in questions], [o for _, _, o in questions]


def max_diff(a, b):
    """Largest difference between two option_nll results (same questions and modes)."""
    return max((x - y).abs().max().item() for m in a for qa, qb in zip(a[m], b[m]) for x, y in zip(qa, qb))


@pytest.mark.parametrize("mode", MODES)
def test_option_nll_is_the_per_token_nll_of_a_full_forward(tiny_model, mode):
    n, prompt, options = QUESTIONS[0]
    x = frames(1, n)
    nll = tiny_model.option_nll(x, [prompt], [options], (mode,))[mode][0]
    for k, option in enumerate(options):
        logits = tiny_model(x, torch.tensor([prompt + option]), mode=mode)["logits"][0, len(prompt) - 1:-1]
        reference = F.cross_entropy(logits, torch.tensor(option), reduction="none")
        assert nll[k].dtype == torch.float32 and nll[k].shape == (len(option),)
        assert (nll[k] - reference).abs().max() < ATOL, (mode, k)


def test_a_batch_of_questions_equals_one_question_at_a_time(tiny_model):
    x, fmask, prompts, options = batch(QUESTIONS)
    batched = tiny_model.option_nll(x, prompts, options, MODES, fmask)
    for q, (n, prompt, opts) in enumerate(QUESTIONS):
        alone = tiny_model.option_nll(x[q:q + 1, :n], [prompt], [opts], MODES)
        assert max_diff({m: [batched[m][q]] for m in MODES}, alone) < ATOL, q


def test_modes_asked_together_equal_modes_asked_alone(tiny_model):
    # coarse_only's pass is coarse_fine's coarse pass when both are asked: the sharing must not change a score
    x, fmask, prompts, options = batch(QUESTIONS)
    together = tiny_model.option_nll(x, prompts, options, MODES, fmask)
    for mode in MODES:
        alone = tiny_model.option_nll(x, prompts, options, (mode,), fmask)
        assert max_diff({mode: together[mode]}, alone) < ATOL, mode
    pair = tiny_model.option_nll(x, prompts, options, ("coarse_only", "coarse_fine"), fmask)
    assert max_diff(pair, {m: together[m] for m in pair}) < ATOL


def test_dino_runs_once_for_a_batch_in_every_mode(tiny_model):
    x, fmask, prompts, options = batch(QUESTIONS)
    x[0, 1] = x[0, 0]  # a repeated frame is encoded once
    with DinoCounter(tiny_model) as dino:
        tiny_model.option_nll(x, prompts, options, MODES, fmask)
    assert (dino.calls, dino.frames) == (1, 3 + 1 + 4 - 1)


def test_score_options_is_the_mean_nll_and_takes_strings(tiny_model, tokenizer):
    """Ids: the mean NLL of the given tokens. Strings: the benchmark's default rule (option_targets' tokens after
    the prompt, weighted: the original's <|im_end|> target counted as 0)."""
    x = frames(1, 2)
    question, options = "Which colour is the ball?\nA. red\nB. blue", ["A. red", "B. blue"]
    targets = [option_targets(tokenizer, question, o) for o in options]
    ids = prompt_ids(tokenizer, question), [t[0] for t in targets]
    by_ids = tiny_model.score_options(x, *ids, modes=MODES)
    nll = tiny_model.option_nll(x, [ids[0]], [ids[1]], MODES)
    for mode in MODES:
        assert torch.allclose(by_ids[mode], torch.stack([t.mean() for t in nll[mode][0]]), atol=1e-6)
    with pytest.raises(ValueError, match="tokenizer="):
        tiny_model.score_options(x, question, options)
    by_text = tiny_model.score_options(x[0], question, options, MODES, tokenizer=tokenizer)  # one clip [T, 3, H, W]
    tiny_model.tokenizer = tokenizer
    by_model_tokenizer = tiny_model.score_options(x, question, options, "coarse_fine")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all([i for i, wi in zip(o, w) if wi == 0] == [im_end] for o, w in targets)  # its weight alone is 0
    for mode in MODES:
        rule = [(t * torch.tensor(w)).sum() / len(w) for t, (_, w) in zip(nll[mode][0], targets)]
        assert torch.allclose(by_text[mode], torch.stack(rule), atol=1e-6)
        # by text = by ids less the <|im_end|> target's cross-entropy (> 0) over the option's length
        dropped = torch.stack([t[o.index(im_end)] / len(o) for t, (o, _) in zip(nll[mode][0], targets)])
        assert (dropped > 1e-3).all() and torch.allclose(by_ids[mode] - by_text[mode], dropped, atol=1e-6)
    assert torch.equal(by_model_tokenizer["coarse_fine"], by_text["coarse_fine"])
    with pytest.raises(ValueError, match="prompt as a string"):
        tiny_model.score_options(x, ids[0], options)


@pytest.mark.parametrize("call, match", [
    (lambda m, x: m.score_options(x, [5, 6], []), "non-empty list of options"),
    (lambda m, x: m.score_options(x, [5, 6], [[7], []]), "option 1 must be a non-empty list"),
    (lambda m, x: m.score_options(x, [5, 6], [[7]], modes=("fine",)), "mode must be one of"),
    (lambda m, x: m.option_nll(x, [[5], [6]], [[[7]], [[8]]]), "1 clip"),
    (lambda m, x: m.option_nll(x, [[5]], [[[7]], [[8]]]), "1 prompts but 2 option lists"),
])
def test_scoring_input_errors(tiny_model, call, match):
    with pytest.raises(ValueError, match=match):
        call(tiny_model, frames(1, 2))
