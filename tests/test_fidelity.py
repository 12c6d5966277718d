"""benchmark.py scores the original fVLM's eval shards as the original benchmark did (spsanps/nanoSmol fVLM/
benchmark.py, HEAD bb7ea3e), pinned question by question on fixed weights.

The expected scores below were computed by running the ORIGINAL code (its model.py, encoder.py and
benchmark.py, with transformers-5 DINOv2 attention names and torchvision's transforms replaced by their PIL
equivalents; float32 on the CPU) on the same weights (`fixed_model`), the same tokenizer and the same shard
(`write_shard`): `score_options_batched(model, tokenizer, frames, user, parse_mcq_options(user), mode)` for
every question and mode. What they pin, by question:
- video8: 8 numbered frames: the system turn, the option layout "B. text", the score over the tokens after
  the prompt with the <|im_end|> target adding 0 but counted in the mean (`ignore_index=pad_id`);
- still: one `key.png` image, replicated to 8 frames;
- single: one NUMBERED frame `key.000.png`, which the original also replicates to 8 frames;
- glued: a trailing instruction line after the options, which the original's option rule keeps inside the
  last option's text ("D. grey\nAnswer with the option's letter.");
- three: 3 frames and 3 options, and an answer letter without a dot ("C").
"""

import json

import numpy as np
import pytest
import torch

import benchmark
import eval_readers as er
from config import EvalProtocol
from conftest import image_bytes, tiny_model_kwargs, write_members
from model import FoveatedVLM

MODES = ("coarse_only", "coarse_fine", "autoregressive")
QUESTIONS = {  # key: (user, assistant, number of frames; 0 = a single un-numbered image)
    "video8": ("What moves in the video?\nA. a red ball\nB. a blue cube\nC. nothing\nD. two cats", "B. a blue cube", 8),
    "still": ("Which colour dominates?\nA. red\nB. green\nC. blue\nD. grey", "A. red", 0),
    "single": ("Is it day or night?\nA. day\nB. night", "B. night", 1),
    "glued": ("Pick the shape.\nA. circle\nB. square\nC. cross\nD. grey\nAnswer with the option's letter.",
              "D. grey", 4),
    "three": ("How many objects?\nA. one\nB. two\nC. three", "C", 3),
}
# {key: {mode: per-option scores}} from the original's benchmark (see the module docstring).
EXPECTED = {
    "video8": {
        "coarse_only": [9.381555, 9.359035, 8.435868, 9.439063],
        "coarse_fine": [9.415380, 9.137889, 8.510251, 8.839930],
        "autoregressive": [9.926244, 10.139951, 9.451505, 9.737883],
    },
    "still": {
        "coarse_only": [9.278446, 9.114440, 8.575918, 9.252783],
        "coarse_fine": [9.042046, 8.896221, 8.711668, 9.067526],
        "autoregressive": [9.425758, 9.538775, 9.497203, 9.091688],
    },
    "single": {
        "coarse_only": [9.373644, 8.874071],
        "coarse_fine": [9.334608, 9.124331],
        "autoregressive": [9.057585, 9.001322],
    },
    "glued": {
        "coarse_only": [9.069293, 9.169815, 8.664003, 10.140069],
        "coarse_fine": [9.109827, 9.094795, 8.375362, 10.002809],
        "autoregressive": [9.270662, 9.735177, 9.115398, 9.986762],
    },
    "three": {
        "coarse_only": [9.212186, 8.956658, 8.345853],
        "coarse_fine": [9.193767, 9.135136, 8.509018],
        "autoregressive": [9.523341, 8.994480, 8.676217],
    },
}


def fixed_model():
    """A tiny fVLM whose weights depend only on parameter names and shapes (not on construction order)."""
    model = FoveatedVLM(**tiny_model_kwargs()).eval()
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:
                p.copy_(noise / p.shape[-1] ** 0.5)
            else:
                p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.1 * noise)
    return model


def png(seed, size=40):
    return image_bytes(fmt="PNG", pixels=np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def write_shard(path):
    """The QUESTIONS as one eval shard in the original's layout: key.json + key.NNN.png frames (or key.png)."""
    members = []
    for k, (key, (user, assistant, n)) in enumerate(QUESTIONS.items()):
        members.append((f"{key}.json", json.dumps({"user": user, "assistant": assistant,
                                                   "source": f"fixture/{key}"}).encode()))
        members += [(f"{key}.png", png(100 * k))] if n == 0 else [
            (f"{key}.{i:03d}.png", png(100 * k + i)) for i in range(n)]
    write_members(path, members)


@pytest.fixture(scope="module")
def records(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("shards") / "eval_000.tar"
    write_shard(path)
    questions = list(er.read_eval_shards(str(path)))
    protocol = EvalProtocol(modes=MODES, frame_size=224, batch_size=2)
    _, recs = benchmark.evaluate(fixed_model(), tokenizer, questions, protocol)
    return {r["id"]: r for r in recs}


def test_options_and_answers_parsed_as_the_original(tmp_path):
    write_shard(tmp_path / "s.tar")
    qs = {q.qid: q for q in er.read_eval_shards(str(tmp_path / "s.tar"))}
    assert qs["glued"].options[-1] == "D. grey\nAnswer with the option's letter."
    assert (qs["three"].answer, qs["video8"].answer, qs["still"].categories) == (2, 1, {"source": "still"})
    assert er.original_options("The U.S. flag?\nA. red\nB. blue")[0] == ["A", "B", "U"]  # the original's rule
    assert er.original_answer_letter(" (B) x") == "(" and er.original_answer_letter("") == "?"


@pytest.mark.parametrize("key", list(QUESTIONS))
def test_scores_equal_the_originals(records, key):
    for mode in MODES:
        assert records[key]["modes"][mode]["scores"] == pytest.approx(EXPECTED[key][mode], abs=1e-4), mode
        expected_pred = min(range(len(EXPECTED[key][mode])), key=EXPECTED[key][mode].__getitem__)
        assert records[key]["modes"][mode]["prediction"] == expected_pred, mode


def test_the_command_line_scores_a_checkpoint_as_the_original(tmp_path, tokenizer):
    """What a user runs on a checkpoint folder and the original's shards: `benchmark.py --out` records every
    option's score per question and mode, equal to the original's, and the protocol used."""
    fixed_model().save_pretrained(str(tmp_path / "ckpt"), tokenizer=tokenizer)
    write_shard(tmp_path / "eval_000.tar")
    out = tmp_path / "results.json"
    benchmark.main(["--checkpoint", str(tmp_path / "ckpt"), "--shards", str(tmp_path / "eval_*.tar"),
                    "--batch-size", "3", "--threads", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["protocol"] == {"name": "original", "modes": list(benchmark.MODES), "scoring": "original",
                                 "dtype": "float32", "frame_size": 224, "max_frames": None, "batch_size": 3,
                                 "system_prompt": "You are a helpful AI assistant.", "yes_no": False,
                                 "frame_sampling": "uniform", "sample_fps": 1.0, "replicate_image_frames": 8,
                                 "fps": None, "chunk_frames": None}
    records = {r["id"]: r for r in saved["questions"]["shards"]}
    for key, expected in EXPECTED.items():
        for mode in MODES:
            assert records[key]["modes"][mode]["scores"] == pytest.approx(expected[mode], abs=1e-4), (key, mode)
    right = sum(r["modes"]["coarse_fine"]["correct"] for r in records.values())
    assert saved["benchmarks"]["shards"]["modes"]["coarse_fine"]["correct"] == right


def test_the_command_line_scores_the_originals_training_checkpoint(tmp_path, monkeypatch):
    """The original's own checkpoint file (torch.save of {"model_state_dict": ...}, transformers-4 DINOv2
    names): benchmark.py builds the published backbones its widths name and scores as the original. Here the
    'published' backbones are the tiny ones, saved as folders."""
    import checkpoint
    from conftest import SMOLLM2_GGUF

    model = fixed_model()
    model.llm.save_pretrained(str(tmp_path / "llm"))
    model.encoder.dino.save_pretrained(str(tmp_path / "dino"))
    monkeypatch.setattr(checkpoint, "KNOWN_LLMS", {model.llm.config.hidden_size: str(tmp_path / "llm")})
    monkeypatch.setattr(checkpoint, "KNOWN_DINOS", {model.encoder.dino.config.hidden_size: str(tmp_path / "dino")})
    state = {k.replace(".attention.q_proj.", ".attention.attention.query.")
              .replace(".attention.k_proj.", ".attention.attention.key.")
              .replace(".attention.v_proj.", ".attention.attention.value.")
              .replace(".attention.o_proj.", ".attention.output.dense."): v for k, v in model.state_dict().items()}
    assert any(".attention.attention.query." in k for k in state)
    torch.save({"model_state_dict": state, "step": 100, "metric_value": None}, tmp_path / "best.pt")
    write_shard(tmp_path / "eval_000.tar")
    out = tmp_path / "results.json"
    benchmark.main(["--checkpoint", str(tmp_path / "best.pt"), "--tokenizer", SMOLLM2_GGUF, "--shards",
                    str(tmp_path / "eval_*.tar"), "--modes", "coarse_fine", "--threads", "1", "--out", str(out)])
    records = {r["id"]: r for r in json.loads(out.read_text())["questions"]["shards"]}
    for key, expected in EXPECTED.items():
        assert records[key]["modes"]["coarse_fine"]["scores"] == pytest.approx(expected["coarse_fine"], abs=1e-4)
