"""Loss masks checked token by token against the real SmolLM2 tokenizer and chat template."""

import pytest

from tokenization import (PromptTooLong, answer_ids, caption_messages, format_mcq, mcq_answer, prompt_ids,
                          tokenize_chat, tokenize_dpo)


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


def test_ids_equal_chat_template(tokenizer):
    msgs = [{"role": "user", "content": "What colour?"}, {"role": "assistant", "content": "B. blue"}]
    enc = tokenize_chat(tokenizer, msgs)
    assert enc["input_ids"].tolist() == tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=False)


def test_stage2_single_turn_mask(tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What colour?"},
            {"role": "assistant", "content": "B. blue"}]
    enc = tokenize_chat(tokenizer, msgs)
    ids, mask = enc["input_ids"].tolist(), enc["loss_mask"].tolist()
    toks = [tokenizer.decode([i]) for i in ids]
    first = mask.index(1)
    # The role header and its newline are context, the answer and the closing <|im_end|> are targets.
    assert toks[first - 4:first] == ["<|im_start|>", "ass", "istant", "\n"]
    assert mask[:first] == [0] * first
    assert targets(tokenizer, enc) == ["B. blue<|im_end|>"]
    assert toks[-1] == "\n" and mask[-1] == 0 and mask[-2] == 1 and toks[-2] == "<|im_end|>"


def test_stage2_multi_turn_mask(tokenizer):
    msgs = [{"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "Red."},
            {"role": "user", "content": "Shape?"}, {"role": "assistant", "content": "A circle."}]
    enc = tokenize_chat(tokenizer, msgs)
    assert targets(tokenizer, enc) == ["Red.<|im_end|>", "A circle.<|im_end|>"]
    text = tokenizer.decode(enc["input_ids"])
    assert "You are a helpful AI assistant" in text  # the template's default system turn, never a target


def test_stage1_loss_on_all_tokens(tokenizer):
    enc = tokenize_chat(tokenizer, caption_messages("a red circle moves left", "Describe this video."), loss="all")
    assert enc["loss_mask"].tolist() == [1] * len(enc["input_ids"])
    assert "<|im_start|>user\nDescribe this video.<|im_end|>" in tokenizer.decode(enc["input_ids"])


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
    with pytest.raises(ValueError, match="bad chat message"):
        tokenize_chat(tokenizer, [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}])


def test_dpo_shared_prompt_and_answer_masks(tokenizer):
    enc = tokenize_dpo(tokenizer, "What colour is the shape?", "B. blue", "A. red")
    c, r = enc["chosen_ids"].tolist(), enc["rejected_ids"].tolist()
    n = enc["chosen_loss_mask"].tolist().index(1)
    assert c[:n] == r[:n] and enc["rejected_loss_mask"].tolist().index(1) == n
    assert targets(tokenizer, enc, "chosen_ids", "chosen_loss_mask") == ["B. blue<|im_end|>"]
    assert targets(tokenizer, enc, "rejected_ids", "rejected_loss_mask") == ["A. red<|im_end|>"]


def test_prompt_and_answer_ids_match_training(tokenizer):
    question = format_mcq("What colour is the shape?", ["red", "blue", "green", "yellow"])
    answer = mcq_answer(["red", "blue", "green", "yellow"], 1)
    assert answer == "B. blue" and "\nB. blue\n" in question
    p = prompt_ids(tokenizer, question)
    a = answer_ids(tokenizer, question, answer)
    enc = tokenize_chat(tokenizer, [{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    ids, mask = enc["input_ids"].tolist(), enc["loss_mask"].tolist()
    assert ids[:len(p) + len(a)] == p + a
    assert mask[len(p):len(p) + len(a)] == [1] * len(a) and sum(mask) == len(a)
    assert tokenizer.decode(p).endswith("<|im_start|>assistant\n")
    assert answer_ids(tokenizer, question, answer, close=False) == a[:-1]
