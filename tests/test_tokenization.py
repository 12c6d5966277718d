"""Tokenization checked token by token against the real SmolLM2 tokenizer and chat template, and pinned to the
original fVLM recipe (spsanps/nanoSmol fVLM/tokenization.py, benchmark.py) on fixed cases."""

import pytest

from tokenization import (CAPTION_PROMPTS, DEFAULT_CAPTION_PROMPT, SYSTEM_PROMPT, PromptTooLong, caption_messages,
                          caption_prompt, format_mcq, mcq_answer, option_targets, prompt_ids, tokenize_chat,
                          tokenize_dpo)

# Expected values written down from the ORIGINAL's code, run on the same GGUF tokenizer (its
# tokenize_sft(user, assistant) and tokenize_stage1(caption, user_prompt=SOURCE_PROMPTS["webvid"])): the ids
# are [system turn "You are a helpful AI assistant.", user turn, assistant turn] rendered by SmolLM2's
# template; the SFT mask is 0 over the system + user prompt (with its "<|im_start|>assistant\n" header) and 1
# over everything after it: "B. blue", <|im_end|> (id 2) and the newline (id 198).
SYSTEM_TURN = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 30, 2, 198]
ORIGINAL_SFT_IDS = SYSTEM_TURN + [1, 4093, 198, 1780, 7302, 47, 198, 49, 30, 2382, 198, 50, 30, 4461, 2, 198,
                                  1, 520, 9531, 198, 50, 30, 4461, 2, 198]
ORIGINAL_SFT_MASK = [0] * 32 + [1] * 5
ORIGINAL_STAGE1_IDS = SYSTEM_TURN + [1, 4093, 198, 1780, 736, 325, 260, 5272, 70, 311, 29892, 327, 451, 3341, 47,
                                     2, 198, 1, 520, 9531, 198, 81, 2382, 7842, 7488, 2049, 2, 198]


def targets(tokenizer, enc, ids="input_ids", mask="loss_mask"):
    """Decoded runs of consecutive target tokens."""
    runs, cur = [], []
    for i, m in zip(enc[ids].tolist(), enc[mask].tolist()):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tokenizer.decode(cur))
            cur = []
    if cur:
        runs.append(tokenizer.decode(cur))
    return runs


def test_sft_ids_and_mask_equal_the_originals(tokenizer):
    msgs = [{"role": "user", "content": "What colour?\nA. red\nB. blue"}, {"role": "assistant", "content": "B. blue"}]
    enc = tokenize_chat(tokenizer, msgs)
    assert enc["input_ids"].tolist() == ORIGINAL_SFT_IDS
    assert enc["loss_mask"].tolist() == ORIGINAL_SFT_MASK
    assert targets(tokenizer, enc) == ["B. blue<|im_end|>\n"]


def test_stage1_caption_equals_the_original(tokenizer):
    enc = tokenize_chat(tokenizer, caption_messages("a red circle moves left", caption_prompt("webvid")), loss="all")
    assert enc["input_ids"].tolist() == ORIGINAL_STAGE1_IDS
    assert enc["loss_mask"].tolist() == [1] * len(ORIGINAL_STAGE1_IDS)


def test_caption_prompts_by_source():
    assert caption_prompt("openvid") == "Write a brief caption for this video."
    assert caption_prompt("webvid") == "What would be the WebVid caption for this video?"
    assert caption_prompt("vript") == CAPTION_PROMPTS["vript"] and caption_prompt("sharegpt4video")
    assert caption_prompt("cauldron/ai2d") == caption_prompt(None) == DEFAULT_CAPTION_PROMPT == "Describe this."
    assert caption_prompt("openvid", {"openvid": "Caption it."}) == "Caption it."


def test_system_prompt_explicit_kept_or_template_default(tokenizer):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    text = tokenizer.decode(tokenize_chat(tokenizer, msgs)["input_ids"])
    assert text.startswith(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nHi")
    own = [{"role": "system", "content": "Be brief."}] + msgs  # a conversation's own system turn wins
    assert tokenizer.decode(tokenize_chat(tokenizer, own)["input_ids"]).count("<|im_start|>system\nBe brief.") == 1
    template = tokenizer.decode(tokenize_chat(tokenizer, msgs, system_prompt=None)["input_ids"])
    assert "named SmolLM, trained by Hugging Face" in template  # the template's own default system turn


def test_content_is_not_stripped(tokenizer):
    enc = tokenize_chat(tokenizer, [{"role": "user", "content": "  Hi.\n"}, {"role": "assistant", "content": "\nYes "}])
    assert "<|im_start|>user\n  Hi.\n<|im_end|>" in tokenizer.decode(enc["input_ids"])
    assert targets(tokenizer, enc) == ["\nYes <|im_end|>\n"]


def test_multi_turn_mask_follows_the_rule_at_every_turn(tokenizer):
    msgs = [{"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "Red."},
            {"role": "user", "content": "Shape?"}, {"role": "assistant", "content": "A circle."}]
    enc = tokenize_chat(tokenizer, msgs)
    assert targets(tokenizer, enc) == ["Red.<|im_end|>\n", "A circle.<|im_end|>\n"]


def test_truncation_keeps_prompt_cuts_answer(tokenizer):
    msgs = caption_messages("one two three four five six seven eight nine ten", "Describe this video.")
    full = tokenize_chat(tokenizer, msgs)
    n_prompt = full["loss_mask"].tolist().index(1)
    cut = tokenize_chat(tokenizer, msgs, max_tokens=n_prompt + 3)
    assert cut["input_ids"].tolist() == full["input_ids"][:n_prompt + 3].tolist()
    assert cut["loss_mask"].sum().item() == 3
    with pytest.raises(PromptTooLong):
        tokenize_chat(tokenizer, msgs, max_tokens=n_prompt)


def test_no_answer_and_bad_role_raise(tokenizer):
    with pytest.raises(ValueError, match="no assistant answer"):
        tokenize_chat(tokenizer, [{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="no assistant answer"):
        tokenize_chat(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}])
    with pytest.raises(ValueError, match="bad chat message"):
        tokenize_chat(tokenizer, [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}])


def test_dpo_shared_prompt_and_answer_masks(tokenizer):
    enc = tokenize_dpo(tokenizer, "What colour is the shape?", "B. blue", "A. red")
    c, r = enc["chosen_ids"].tolist(), enc["rejected_ids"].tolist()
    n = enc["chosen_loss_mask"].tolist().index(1)
    assert c[:n] == r[:n] and enc["rejected_loss_mask"].tolist().index(1) == n
    assert c[:len(SYSTEM_TURN)] == SYSTEM_TURN
    assert targets(tokenizer, enc, "chosen_ids", "chosen_loss_mask") == ["B. blue<|im_end|>\n"]
    assert targets(tokenizer, enc, "rejected_ids", "rejected_loss_mask") == ["A. red<|im_end|>\n"]


def test_option_targets_follow_the_originals_scoring(tokenizer):
    """The original scores an option over every token after the prompt ("B. blue", <|im_end|>, "\\n") with
    cross_entropy(ignore_index=pad_id): pad is <|im_end|>, so that target adds 0 but still counts in the
    mean's denominator. `mean` scores "B. blue<|im_end|>", each token counted."""
    question = format_mcq("What colour is the shape?", ["red", "blue", "green", "yellow"])
    answer = mcq_answer(["red", "blue", "green", "yellow"], 1)
    assert answer == "B. blue" and "\nB. blue\n" in question
    p = prompt_ids(tokenizer, question)
    assert p[:len(SYSTEM_TURN)] == SYSTEM_TURN and tokenizer.decode(p).endswith("<|im_start|>assistant\n")
    ids, weights = option_targets(tokenizer, question, answer)
    assert tokenizer.decode(ids) == "B. blue<|im_end|>\n"
    assert weights == [1.0] * (len(ids) - 2) + [0.0, 1.0]
    enc = tokenize_chat(tokenizer, [{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    assert enc["input_ids"].tolist() == p + ids  # what the scores read is what SFT trained on
    mean_ids, mean_w = option_targets(tokenizer, question, answer, scoring="mean")
    assert mean_ids == ids[:-1] and mean_w == [1.0] * len(mean_ids)
    with pytest.raises(ValueError, match="scoring must be one of"):
        option_targets(tokenizer, question, answer, scoring="sum")
