"""Chat-template tokenization for all three training stages, and the matching prompts for evaluation.

Every sequence is rendered with the LLM's own chat template (SmolLM2: `<|im_start|>role\\ncontent<|im_end|>\\n`,
with a default system turn inserted when none is given) and tokenized in one piece; the loss mask is then
derived from character offsets, so the ids are exactly what `apply_chat_template(..., tokenize=True)` gives.

- Stage 1 (`loss="all"`): a user turn with a configurable prompt, the caption as the assistant turn, loss on
  every token.
- Stage 2 (`loss="assistant"`): system/user/assistant turns, loss on each assistant turn's content and its
  closing `<|im_end|>`; role headers and the newline after `<|im_end|>` are not targets.
- Stage 3 (`tokenize_dpo`): one shared prompt followed by the chosen or the rejected answer.

Truncation to `max_tokens` keeps the prompt (everything before the first answer token) and cuts the answer;
a prompt that leaves no room for an answer raises `PromptTooLong`. `prompt_ids` and `answer_ids` give
generation and MCQ-scoring inputs tokenized exactly as in training.
"""

import torch
from transformers import AutoTokenizer

from pretrained import resolve_source

ROLES = ("system", "user", "assistant")
MCQ_LETTERS = "ABCDEFGHIJ"


class PromptTooLong(ValueError):
    """The prompt alone fills `max_tokens`, so no answer token would remain."""


def load_tokenizer(name):
    """Load the LLM's tokenizer from `pkg://package/file.gguf`, a .gguf path, a folder or a hub id
    (names resolved by `pretrained.resolve_source`, which locates a package without importing it)."""
    source, gguf_file = resolve_source(name)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise ValueError(f"tokenizer {name!r} has no chat template")
    return tokenizer


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


def _clean(messages):
    """Validate roles and strip surrounding whitespace, so a header's newline never merges with content."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    out = []
    for m in messages:
        if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"bad chat message {m!r}: need role in {ROLES} and string content")
        out.append({"role": m["role"], "content": m["content"].strip()})
    return out


def _render(tokenizer, messages, generation_prompt=False):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _answer_spans(tokenizer, messages, text):
    """Character spans [start, end) of each assistant turn's content plus its closing token."""
    close = tokenizer.eos_token
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], generation_prompt=True)
        end = len(prefix) + len(m["content"])
        if not text.startswith(prefix + m["content"] + close):
            raise ValueError(f"chat template does not render assistant turn {i} as prompt + content + {close}")
        spans.append((len(prefix), end + len(close)))
    return spans


def tokenize_chat(tokenizer, messages, loss="assistant", max_tokens=None):
    """Tokenize a conversation with its loss mask.

    loss="assistant": targets are each assistant turn's content and closing token (stage 2).
    loss="all": every token is a target (stage 1); the answer still starts at the first assistant turn.
    Returns {"input_ids": LongTensor [S], "loss_mask": LongTensor [S]} with S <= max_tokens.
    """
    assert loss in ("assistant", "all"), loss
    messages = _clean(messages)
    text = _render(tokenizer, messages)
    spans = _answer_spans(tokenizer, messages, text)
    if not spans or all(s == e - len(tokenizer.eos_token) for s, e in spans):
        raise ValueError("conversation has no assistant answer")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    target = [any(s <= start < e for s, e in spans) for start, _ in offsets]
    answer_start = target.index(True)
    mask = [1] * len(ids) if loss == "all" else [int(t) for t in target]
    if max_tokens is not None:
        if answer_start >= max_tokens:
            raise PromptTooLong(f"prompt is {answer_start} tokens, max_text_tokens is {max_tokens}")
        ids, mask = ids[:max_tokens], mask[:max_tokens]
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "loss_mask": torch.tensor(mask, dtype=torch.long)}


def tokenize_dpo(tokenizer, prompt, chosen, rejected, max_tokens=None):
    """Stage 3: the shared prompt (str or messages) followed by the chosen or the rejected answer.

    Returns chosen_ids, chosen_loss_mask, rejected_ids, rejected_loss_mask (LongTensor [S_c] / [S_r]);
    the masks cover the answer content and its closing token.
    """
    messages = _clean(prompt)
    out = {}
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        conv = messages + [{"role": "assistant", "content": answer}]
        enc = tokenize_chat(tokenizer, conv, loss="assistant", max_tokens=max_tokens)
        out[f"{name}_ids"], out[f"{name}_loss_mask"] = enc["input_ids"], enc["loss_mask"]
    return out


def prompt_ids(tokenizer, messages):
    """Chat-formatted prompt ids ending with the assistant generation header (for generate and benchmarks).

    `messages` is a user message string or a list of {role, content} ending with a user turn.
    """
    messages = _clean(messages)
    text = _render(tokenizer, messages, generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def answer_ids(tokenizer, messages, answer, close=True):
    """The ids of `answer` exactly as they follow `prompt_ids(tokenizer, messages)` in a training sequence.

    With close=True the closing `<|im_end|>` is included (it is a training target too).
    """
    prompt = prompt_ids(tokenizer, messages)
    conv = _clean(messages) + [{"role": "assistant", "content": answer}]
    full = tokenize_chat(tokenizer, conv)
    ids, mask = full["input_ids"].tolist(), full["loss_mask"].tolist()
    if ids[:len(prompt)] != prompt:
        raise ValueError(f"answer {answer!r} changes the tokenization of the prompt before it")
    n = sum(mask[len(prompt):])
    return ids[len(prompt):len(prompt) + n - (0 if close else 1)]
