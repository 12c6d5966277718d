"""bench.py on a tiny model: the irreducible-work reference runs the same backbones, the naive scorer gives the
scores option_nll gives, every report prints its ratios, and the throughput report runs on a config, timing the
step train.py would run (init_from, freeze_*, the loss type, training.threads)."""

import argparse
import re

import pytest
import torch
import yaml

import bench
import train
from conftest import DinoCounter, rand_frames, tiny_model_kwargs
from model import MODES, FoveatedVLM


def tiny():
    torch.manual_seed(0)
    return FoveatedVLM(**tiny_model_kwargs())


def test_defeated_dedup_encodes_every_frame_and_naive_scores_match():
    model = tiny().eval()
    image = rand_frames(1, 1).expand(1, 8, 3, 56, 56)
    with DinoCounter(model) as dino:
        model.encode(bench.distinct(image))
    assert dino.frames == 8
    prompt, options = [5, 6, 7], [[8, 9], [10], [11, 12, 13]]
    with DinoCounter(model) as dino:
        naive = bench.naive_scores(model, image, prompt, options)
    assert dino.frames == 8 * len(options) * len(MODES)  # the original's cost: every frame, every forward
    shared = model.score_options(image, prompt, options, MODES)
    same_frames = bench.naive_scores(model, image, prompt, options, reencode=False)
    for mode in MODES:
        assert torch.allclose(same_frames[mode], shared[mode], atol=1e-5)
        assert torch.allclose(naive[mode], shared[mode], atol=1e-2)  # frames differing by 1e-3


def test_irreducible_work_runs_dino_on_the_distinct_frames_only():
    model = tiny().train()
    frames = rand_frames(2, 1).expand(2, 4, 3, 56, 56).contiguous()
    with DinoCounter(model) as dino:
        bench.irreducible(model, frames, n_text=6)
    assert dino.frames == 2 and all(p.grad is None for p in model.parameters())


def test_step_and_scoring_reports_print_ratios():
    args = argparse.Namespace(text_tokens=6, frame_size=56, repeats=1, batch_size=2, prompt_tokens=5,
                              option_tokens=3)
    step = bench.step_report(tiny().train(), args, torch.device("cpu"))
    assert len(re.findall(r"step .* s, irreducible .* s: \d+\.\d\dx \[", step)) == 2
    scoring = bench.scoring_report(tiny().eval(), args, torch.device("cpu"))
    lines = [line for line in scoring.splitlines() if "q/s" in line]
    assert len(lines) == 2 and all("batch 2:" in line and "faster" in line for line in lines)
    assert all(float(line.rsplit(" ", 1)[1]) < 1e-4 for line in lines)  # max |score - naive|


def test_throughput_report_on_the_quickstart_config(capsys, monkeypatch):
    monkeypatch.setattr(bench, "matmul_peak", lambda dev: 1e11)  # a 4096^2 matmul takes seconds on a CPU
    bench.main(["throughput", "--config", "configs/quickstart.yaml", "--random-data", "--steps", "1",
                "--batch-size", "2", "--frames", "2"])
    out = capsys.readouterr().out
    assert "samples/s" in out and "random batches: 2 frames x 64 tokens" in out
    assert re.search(r"matmul peak    100\.0 GFLOP/s measured\nMFU            \d+\.\d%", out)


def test_throughput_times_the_configured_step_from_init_from(tmp_path, tiny_model, one_thread, capsys,
                                                             monkeypatch):
    tiny_model.save_pretrained(str(tmp_path / "stage2"))
    path = tmp_path / "stage3.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"init_from": str(tmp_path / "stage2"), "freeze_llm": True},
        "data": {"train_shards": str(tmp_path / "none-*.tar"), "frame_size": 56, "max_frames": 2},
        "training": {"batch_size": 2, "device": "cpu", "dtype": "float32", "threads": 2},
        "loss": {"type": "dpo", "beta": 0.1}}))
    monkeypatch.setattr(bench, "matmul_peak", lambda dev: 1e11)
    calls = []
    dpo_loss = train.dpo_loss
    monkeypatch.setattr(train, "dpo_loss", lambda *a: calls.append(1) or dpo_loss(*a))
    run = ["throughput", "--config", str(path), "--steps", "1", "--text-tokens", "8"]
    not_llm = sum(p.numel() for name, p in tiny_model.named_parameters() if not name.startswith("llm."))

    bench.main(run)
    out = capsys.readouterr().out
    assert f", {not_llm:,} trained (connector, dino) | loss dpo |" in out
    assert "8 tokens (chosen and rejected)" in out and "(2 threads)" in out  # the config's training.threads
    assert len(calls) == 3  # warm-up, timed step, FLOP count: each a DPO loss against the reference

    bench.main(run + ["--threads", "1", "--set", "loss.type=text_ce_answer_only", "--set", "model.freeze_llm=false"])
    out = capsys.readouterr().out
    total = sum(p.numel() for p in tiny_model.parameters())
    assert f", {total:,} trained (connector, dino, llm) | loss text_ce_answer_only |" in out
    assert "(1 threads)" in out and len(calls) == 3


def test_throughput_names_a_missing_init_from(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"init_from": str(tmp_path / "missing")}}))
    with pytest.raises(ValueError, match="'model.init_from' does not exist"):
        bench.main(["throughput", "--config", str(path)])


def test_alternate_reports_each_round_as_it_ends(capsys):
    times = bench.alternate({"a": lambda: None, "b": lambda: None}, 2, torch.device("cpu"), "case")
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0].strip() for line in lines] == ["case warm-up", "case round 1/2", "case round 2/2"]
    assert all("a " in line and "b " in line for line in lines) and len(times["a"]) == 2


def test_throughput_is_quick_by_default_and_says_so(capsys, monkeypatch):
    monkeypatch.setattr(bench, "matmul_peak", lambda dev: 1e11)
    bench.main(["throughput", "--config", "configs/quickstart.yaml", "--random-data", "--text-tokens", "8"])
    out = capsys.readouterr().out
    assert "quick run: batch 1 (config 16), 2 timed steps; --full for the config's own" in out
    assert re.search(r"warm-up: \d+\.\d\d s, peak memory so far [\d.]+ GB resident\n.*step 1/2: .*\n.*step 2/2: ", out)
    assert "batch 1 |" in out
