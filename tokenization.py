"""Chat-template tokenization for all three training stages and for evaluation, following the original fVLM
recipe (github spsanps/nanoSmol, fVLM/tokenization.py and data.py), so that published checkpoints see the text
they were trained on.

Every conversation starts with an explicit system turn, `SYSTEM_PROMPT` ("You are a helpful AI assistant."),
rather than the default one SmolLM2's template inserts ("... named SmolLM, trained by Hugging Face");
`system_prompt=None` keeps the template's own (for checkpoints trained that way). A conversation's own system
turn (SmolTalk's persona rules, say) is kept as it is. The sequence is rendered with the LLM's chat template
(SmolLM2: `<|im_start|>role\\ncontent<|im_end|>\\n`) and tokenized in one piece, content unstripped.

- Stage 1 (`loss="all"`): [system, user prompt, caption]; every token is a target. Caption-only samples take
  the per-source prompt of `caption_prompt` (`CAPTION_PROMPTS`, else "Describe this."); a sample's own user
  text wins.
- Stage 2 (`loss="assistant"`): the targets are everything after the prompt that precedes each assistant
  turn: the answer, its `<|im_end|>` and the newline after it (the original's mask: `[0] * len(prompt) +
  [1] * rest`; for several turns, the same rule at each assistant turn).
- Stage 3 (`tokenize_dpo`): one shared prompt followed by the chosen or the rejected answer, masked so.

Truncation to `max_tokens` keeps the prompt (everything before the first target) and cuts the answer; a
prompt that leaves no room for an answer raises `PromptTooLong`. `prompt_ids` and `option_targets` give
generation and MCQ-scoring inputs tokenized exactly as the original's benchmark does.
"""

import torch

from config import SCORING, SYSTEM_PROMPT

ROLES = ("system", "user", "assistant")
MCQ_LETTERS = "ABCDEFGHIJ"
# The original's stage-1 prompts by the sample's `source`, for samples without their own user text.
CAPTION_PROMPTS = {
    "openvid": "Write a brief caption for this video.",
    "webvid": "What would be the WebVid caption for this video?",
    "vript": "Provide a detailed narration of what happens in this video.",
    "sharegpt4video": "Describe what happens in this video in detail.",
}
DEFAULT_CAPTION_PROMPT = "Describe this."


class PromptTooLong(ValueError):
    """The prompt alone fills `max_tokens`, so no answer token would remain."""


def caption_prompt(source=None, prompts=None):
    """The stage-1 user prompt for a caption-only sample from `source`: `prompts` (default CAPTION_PROMPTS)
    by source, else DEFAULT_CAPTION_PROMPT."""
    return (CAPTION_PROMPTS if prompts is None else prompts).get(source or "", DEFAULT_CAPTION_PROMPT)


def caption_messages(caption, prompt):
    """Stage-1 conversation: the conditioning prompt as the user turn, the caption as the answer."""
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": caption}]


def format_mcq(question, candidates):
    """A multiple-choice question with one `A. option` line per candidate (the eval shards' layout)."""
    assert 2 <= len(candidates) <= len(MCQ_LETTERS), f"{len(candidates)} candidates"
    lines = [f"{MCQ_LETTERS[i]}. {c}" for i, c in enumerate(candidates)]
    return question.strip() + "\n" + "\n".join(lines) + "\nAnswer with the option's letter."


def mcq_answer(candidates, index):
    """The answer to `format_mcq`: the option's letter then its text, e.g. `B. blue`."""
    return f"{MCQ_LETTERS[index]}. {candidates[index]}"


def chat(messages, system_prompt=SYSTEM_PROMPT):
    """Checked messages (a user string or {role, content} dicts) behind the system turn: the conversation's
    own, else `system_prompt`, else (None) none, so that the template inserts its default."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"bad chat message {m!r}: need role in {ROLES} and string content")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if system_prompt is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}] + messages


def _ids(tokenizer, messages, generation_prompt=False):
    """Token ids of rendered messages (the original's `tokenizer(apply_chat_template(...))`, no extra specials)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_chat(tokenizer, messages, loss="assistant", max_tokens=None, system_prompt=SYSTEM_PROMPT):
    """Tokenize a conversation with its loss mask.

    loss="assistant": each assistant turn's tokens after its prompt are targets (stage 2; see the module doc).
    loss="all": every token is a target (stage 1); the answer still starts at the first assistant turn.
    Returns {"input_ids": LongTensor [S], "loss_mask": LongTensor [S]} with S <= max_tokens.
    """
    assert loss in ("assistant", "all"), loss
    messages = chat(messages, system_prompt)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not any(messages[i]["content"].strip() for i in turns):
        raise ValueError("conversation has no assistant answer")
    ids = _ids(tokenizer, messages)
    mask = [0] * len(ids)
    for i in turns:  # the original's rule at every assistant turn: targets from the end of its prompt
        start = len(_ids(tokenizer, messages[:i], generation_prompt=True))
        end = len(_ids(tokenizer, messages[:i + 1]))
        mask[start:end] = [1] * (end - start)
    answer_start = mask.index(1)
    if loss == "all":
        mask = [1] * len(ids)
    if max_tokens is not None:
        if answer_start >= max_tokens:
            raise PromptTooLong(f"prompt is {answer_start} tokens, max_text_tokens is {max_tokens}")
        ids, mask = ids[:max_tokens], mask[:max_tokens]
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "loss_mask": torch.tensor(mask, dtype=torch.long)}


def tokenize_dpo(tokenizer, prompt, chosen, rejected, max_tokens=None, system_prompt=SYSTEM_PROMPT):
    """Stage 3: the shared prompt (str or messages) followed by the chosen or the rejected answer.

    Returns chosen_ids, chosen_loss_mask, rejected_ids, rejected_loss_mask (LongTensor [S_c] / [S_r]);
    the masks cover what follows the prompt (answer, <|im_end|>, newline), as in the original.
    """
    messages = chat(prompt, system_prompt)
    out = {}
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        conv = messages + [{"role": "assistant", "content": answer}]
        enc = tokenize_chat(tokenizer, conv, loss="assistant", max_tokens=max_tokens, system_prompt=None)
        out[f"{name}_ids"], out[f"{name}_loss_mask"] = enc["input_ids"], enc["loss_mask"]
    return out


def prompt_ids(tokenizer, messages, system_prompt=SYSTEM_PROMPT):
    """Chat-formatted prompt ids ending with the assistant generation header (for generate and benchmarks).

    `messages` is a user message string or a list of {role, content} ending with a user turn.
    """
    return _ids(tokenizer, chat(messages, system_prompt), generation_prompt=True)


def option_targets(tokenizer, messages, answer, scoring="original", system_prompt=SYSTEM_PROMPT):
    """The target ids of an MCQ option after `prompt_ids(tokenizer, messages)` and their weights.

    The option's score is sum(weights * token cross-entropies) / len(ids), the mean per-token cross-entropy of
    its targets, by `scoring` (config.SCORING):
    - original: the tokens after the prompt ("B. text", <|im_end|>, "\n"), with the <|im_end|> target counted in
      the mean but contributing 0 (the original benchmark's `ignore_index=pad_id`, pad = eos = <|im_end|>);
    - mean: "B. text" and its <|im_end|>, each counted (what checkpoints trained on "answer<|im_end|>" targets
      are scored with).
    Raises ValueError when the option changes how the prompt before it tokenizes (it could not share the
    prompt's prefix).
    """
    if scoring not in SCORING:
        raise ValueError(f"scoring must be one of {SCORING}, got {scoring!r}")
    prompt = prompt_ids(tokenizer, messages, system_prompt)
    full = _ids(tokenizer, chat(messages, system_prompt) + [{"role": "assistant", "content": answer}])
    if full[:len(prompt)] != prompt:
        raise ValueError(f"answer {answer!r} changes the tokenization of the prompt before it")
    ids = full[len(prompt):]
    eos = tokenizer.eos_token_id
    if scoring == "mean":  # the answer and its closing <|im_end|>
        ids = ids[:ids.index(eos) + 1] if eos in ids else ids
        return ids, [1.0] * len(ids)
    return ids, [float(t != tokenizer.pad_token_id) for t in ids]
