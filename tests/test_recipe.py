"""The original recipe's text and frames reach training unchanged: the explicit system turn, caption prompts
chosen by the sample's `source` (its own user text wins), the original's DPO keys and pre-tokenized shards, and
any single frame replicated like an image."""

import numpy as np
import torch

from conftest import shard_dataset
from synthetic import encode_jpg, encode_mp4, render, write_tar

SIZE = 32


def clip():
    return encode_mp4(render({"colour": "red", "shape": "square", "direction": "right"}, 64, 3), 1)


def read(path, tokenizer, **kwargs):
    return list(shard_dataset(str(path), tokenizer, train=False, frame_size=SIZE, max_frames=8, **kwargs))


def text(tokenizer, sample, ids="input_ids"):
    return tokenizer.decode(sample[ids])


def test_caption_prompt_by_source_and_own_user_text_wins(tmp_path, tokenizer):
    rows = [("o", {"mp4": clip(), "json": {"caption": "a red square", "source": "openvid"}}),
            ("w", {"mp4": clip(), "txt": "a red square", "json": {"source": "webvid"}}),
            ("x", {"mp4": clip(), "txt": "a red square"}),
            ("u", {"mp4": clip(),
                   "json": {"user": "Say what moves.", "assistant": "a red square", "source": "webvid"}}),
            ("e", {"mp4": clip(), "json": {"user": "", "assistant": "a red square", "source": "openvid"}})]
    write_tar(tmp_path / "s.tar", rows)
    got = {s["key"]: text(tokenizer, s) for s in read(tmp_path / "s.tar", tokenizer)}
    system = "<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n"
    assert got["o"] == (system + "<|im_start|>user\nWrite a brief caption for this video.<|im_end|>\n"
                        "<|im_start|>assistant\na red square<|im_end|>\n")
    assert "<|im_start|>user\nWhat would be the WebVid caption for this video?<|im_end|>" in got["w"]
    assert "<|im_start|>user\nDescribe this.<|im_end|>" in got["x"]
    assert "<|im_start|>user\nSay what moves.<|im_end|>" in got["u"]
    assert "<|im_start|>user\nWrite a brief caption for this video.<|im_end|>" in got["e"]  # empty user: by source
    override = {s["key"]: text(tokenizer, s) for s in read(tmp_path / "s.tar", tokenizer, prompt="Caption:")}
    assert "<|im_start|>user\nCaption:<|im_end|>" in override["o"] and "Say what moves." in override["u"]
    template = read(tmp_path / "s.tar", tokenizer, system_prompt=None)[0]
    assert "named SmolLM, trained by Hugging Face" in text(tokenizer, template)


def test_originals_dpo_keys_and_pretokenized_samples(tmp_path, tokenizer):
    pair = {"user": "", "chosen_assistant": "A red square.", "rejected_assistant": "A blue circle.",
            "source": "rlaif_v"}
    write_tar(tmp_path / "d.tar", [("p", {"jpg": encode_jpg(np.full((40, 40, 3), 9, np.uint8)), "json": pair})])
    (s,) = read(tmp_path / "d.tar", tokenizer, loss="dpo", replicate_image_frames=8)
    assert "<|im_start|>user\nDescribe this.<|im_end|>" in text(tokenizer, s, "chosen_ids")
    assert tokenizer.decode(s["rejected_ids"][s["rejected_loss_mask"].bool()]) == "A blue circle.<|im_end|>\n"
    assert s["frames"].shape[0] == 8
    ids, mask = list(range(100, 140)), [0] * 10 + [1] * 30
    write_tar(tmp_path / "t.tar", [("t", {"json": {"token_ids": ids, "loss_mask": mask, "source": "smoltalk"}}),
                                   ("b", {"json": {"token_ids": ids, "loss_mask": mask[:-1]}})])
    samples = read(tmp_path / "t.tar", tokenizer, loss="text_ce_all", max_text_tokens=32)
    assert len(samples) == 1 and samples[0]["skipped"] == {"bad_json": 1}
    assert samples[0]["input_ids"].tolist() == ids[:32] and samples[0]["loss_mask"].tolist() == mask[:32]


def test_single_numbered_frame_is_replicated_like_an_image(tmp_path, tokenizer):
    meta = {"user": "What colour?", "assistant": "A. red"}
    frame = encode_jpg(np.full((40, 40, 3), 200, np.uint8))
    write_tar(tmp_path / "f.tar", [("one", {"000.jpg": frame, "json": meta}),
                                   ("two", {"000.jpg": frame, "001.jpg": frame, "json": meta})])
    one, two = read(tmp_path / "f.tar", tokenizer, loss="text_ce_answer_only", replicate_image_frames=8)
    assert one["kind"] == "image" and one["frames"].shape == (8, 3, SIZE, SIZE) and one["frames"].stride(0) == 0
    assert two["kind"] == "video" and two["frames"].shape[0] == 2
    assert torch.equal(one["frames"][0], two["frames"][0])
