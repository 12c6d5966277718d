"""train.py: the loss falls, a SIGKILLed run resumes where it stopped, DPO's loss, and 2-process DDP on gloo."""

import glob
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

import checkpoint
import config
import train
from conftest import ROOT, TINY_DINO, TINY_LLM, read_log, write_colour_shard, write_config
from data import ShardDataset, make_loader
from frames import normalise_pixels


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    write_colour_shard(d / "train.tar", 256, 0)  # each rank's share exceeds the loader's 100-sample shuffle buffer
    write_colour_shard(d / "val.tar", 16, 1)
    write_colour_shard(d / "text.tar", 256, 2, kind="text")
    write_colour_shard(d / "dpo.tar", 256, 3, kind="dpo")
    return d


def test_dpo_loss_hand_computed():
    policy = {"chosen_logps": torch.tensor([-1.0, -4.0]), "rejected_logps": torch.tensor([-3.0, -2.0])}
    reference = {"chosen_logps": torch.tensor([-2.0, -3.0]), "rejected_logps": torch.tensor([-1.0, -2.5])}
    loss, m = train.dpo_loss(policy, reference, beta=0.1)
    # margins: ((-1+2) - (-3+1)) = 3 and ((-4+3) - (-2+2.5)) = -1.5
    expected = (math.log1p(math.exp(-0.3)) + math.log1p(math.exp(0.15))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["reward_acc"].item() == 0.5 and m["reward_margin"].item() == pytest.approx((0.3 - 0.15) / 2)


def val_losses(checkpoint_dir, config_path, tokenizer, modes):
    """Each mode's mean loss over the config's first eval.max_samples validation samples, from the model saved in
    `checkpoint_dir`, computed here with the model's own forward: the reference for what train.py logs."""
    cfg = config.load(config_path)
    model = train.FoveatedVLM.from_pretrained(checkpoint_dir).eval()
    dataset = ShardDataset(cfg.data.val_shards, tokenizer, cfg.data, loss=cfg.loss.type, train=False)
    loader = make_loader(dataset, cfg.training.batch_size, tokenizer.pad_token_id)
    sums, n = dict.fromkeys(modes, 0.0), 0
    with torch.no_grad():
        for batch in loader:
            mask = batch["frame_mask"]
            frames = torch.zeros(*mask.shape, *batch["pixels"].shape[1:])  # [B, T, 3, H, W], as the API takes them
            frames[mask] = normalise_pixels(batch["pixels"])[batch["frame_idx"]]
            for mode in modes:
                loss = model(frames, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], mask,
                             mode=mode)["loss"]
                sums[mode] += loss.item() * len(mask)
            n += len(mask)
            if n >= cfg.eval.max_samples:
                break
    return {mode: total / n for mode, total in sums.items()}


@pytest.mark.slow
def test_loss_falls_with_validation_and_text_retention(tmp_path, shards, one_thread, tokenizer):
    data = {"train_shards": str(shards / "train.tar"), "val_shards": str(shards / "val.tar"),
            "text_shards": str(shards / "text.tar"), "text_ratio": 0.25}
    path = write_config(tmp_path, data=data,
                        training={"total_samples": 96},
                        eval={"every_steps": 12, "max_samples": 8, "modes": ["autoregressive", "coarse_only"]},
                        checkpoint={"save_every_steps": 12})
    train.main(["--config", path])
    rows = read_log(str(tmp_path / "run"))
    losses = [float(r["loss"]) for r in rows if r.get("loss")]
    vals = {k: [float(r[k]) for r in rows if r.get(k)] for k in
            ("val_loss", "val_loss_autoregressive", "val_loss_coarse_only")}
    assert losses[-1] < losses[0] - 1.0, losses
    assert all(len(v) == 2 and v[-1] < v[0] for v in vals.values()), vals
    # the last validation (step 24) logged each mode's own loss of the step-24 model (the modes differ by 2e-3 to 8e-3)
    expected = val_losses(str(tmp_path / "run" / "latest"), path, tokenizer, ("coarse_fine", "autoregressive",
                                                                              "coarse_only"))
    for name, mode in (("val_loss", "coarse_fine"), ("val_loss_autoregressive", "autoregressive"),
                       ("val_loss_coarse_only", "coarse_only")):
        assert vals[name][-1] == pytest.approx(expected[mode], abs=1e-5), (name, vals[name], expected)
    assert os.path.exists(tmp_path / "run" / "best" / "model.safetensors")


def test_a_save_between_log_steps_holds_the_skips_so_far(tmp_path, one_thread):
    """Skip counts reach every checkpoint, not only those at a log step: a resume from step 2 (logs at 3)
    continues the count instead of losing steps 1-2's."""
    write_colour_shard(tmp_path / "train.tar", 24, 4, corrupt=12)
    path = write_config(tmp_path, training={"total_samples": 16, "log_every": 3},
                        checkpoint={"save_every_steps": 2, "keep_last": 5})
    train.main(["--config", path])
    counts = [sum(checkpoint.load_state(str(tmp_path / "run" / f"step_{s:08d}"))["data"]["skip_reasons"].values())
              for s in (2, 4)]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0 < counts[0] <= counts[1] == summary["skipped"], (counts, summary["skipped"])


def test_skips_and_wall_time_add_up_over_a_resume_and_a_finished_run_is_kept(tmp_path, one_thread, capsys):
    write_colour_shard(tmp_path / "train.tar", 24, 4, corrupt=4)
    save_dir = tmp_path / "run"
    summaries = []
    for total in (32, 64):  # the second run resumes the first's final checkpoint (step 8) and trains to 16
        path = write_config(tmp_path, training={"total_samples": total}, checkpoint={"save_every_steps": 100})
        train.main(["--config", path])
        summaries.append(json.loads((save_dir / "summary.json").read_text()))
    first, summary = summaries
    # 16 steps read 64 good samples (3.2 passes over the shard's 20 good and 4 bad, shuffled before decoding)
    assert summary["skipped"] >= 6 and summary["skip_reasons"] == {"bad_image": summary["skipped"]}
    assert summary["skipped"] > first["skipped"] > 0 and summary["steps"] == 16
    assert summary["wall_time_s"] > first["wall_time_s"] > 0  # both processes' time
    state = checkpoint.load_state(str(save_dir / "latest"))
    assert state["wall_time_s"] == summary["wall_time_s"] and state["data"]["skip_reasons"] == summary["skip_reasons"]
    logged = [int(r["skipped"]) for r in read_log(str(save_dir)) if r.get("skipped")]
    assert logged == sorted(logged) and logged[-1] == summary["skipped"]
    capsys.readouterr()
    log = (save_dir / "log.csv").read_text()
    train.main(["--config", path])  # the same command again: the run is finished, nothing is overwritten
    assert "holds the finished run (step 16 of 16)" in capsys.readouterr().out
    assert json.loads((save_dir / "summary.json").read_text()) == summary and (save_dir / "log.csv").read_text() == log


def test_init_from_applies_visual_scale_and_lambda_coarse(tmp_path, tiny_model):
    tiny_model.save_pretrained(str(tmp_path / "stage1"))
    cfg = config.from_dict({"model": {"init_from": str(tmp_path / "stage1"), "visual_scale": 0.5,
                                      "lambda_coarse": 0.25}})
    model, _ = train.build_model(cfg, torch.device("cpu"))
    assert (tiny_model.settings.visual_scale, tiny_model.settings.lambda_coarse) == (0.14, 0.0)
    assert (model.settings.visual_scale, model.settings.lambda_coarse) == (0.5, 0.25)
    assert model.settings.query_dim == tiny_model.settings.query_dim
    assert model.training


def test_stages_chain_through_save_dirs(tmp_path, shards, one_thread):
    """model.init_from takes a stage's save_dir: the next stage starts from its newest checkpoint's weights and,
    with no model.tokenizer set, its tokenizer; stage 3's DPO reference too."""
    short = {"training": {"total_samples": 8, "batch_size": 4}, "checkpoint": {"save_every_steps": 100}}
    train.main(["--config", write_config(tmp_path, "stage1", data={"train_shards": str(shards / "train.tar")},
                                         **short)])
    for name, previous, data in (("stage2", "stage1", "train.tar"), ("stage3", "stage2", "dpo.tar")):
        path = write_config(tmp_path, name, model={"init_from": str(tmp_path / previous)},
                            data={"train_shards": str(shards / data)}, **short,
                            loss={"type": "dpo" if name == "stage3" else "text_ce_answer_only"})
        raw = yaml.safe_load(open(path))
        del raw["model"]["tokenizer"]  # the tokenizer is the checkpoint's
        open(path, "w").write(yaml.safe_dump(raw))
        cfg = train.load_config(train.arguments(["--config", path]))
        model, _ = train.build_model(cfg, torch.device("cpu"))
        newest = train.FoveatedVLM.from_pretrained(checkpoint.newest(str(tmp_path / previous)))
        for (key, a), b in zip(newest.state_dict().items(), model.state_dict().values()):
            assert torch.equal(a, b), key
        assert newest.tokenizer is not None and newest.tokenizer.eos_token == "<|im_end|>"
        train.main(["--config", path])
        assert checkpoint.newest(str(tmp_path / name)).endswith("step_00000002")


@pytest.mark.slow
def test_quickstart_configs_run_and_the_loss_falls_on_the_synthetic_set(tmp_path, one_thread):
    """The shipped quickstart chain, shortened: synthetic.py's set, stage 1, stage 2 from stage 1's checkpoint."""
    import synthetic
    data = tmp_path / "synthetic"
    synthetic.main(["--out", str(data), "--captions", "48", "--mcq", "48", "--val", "8", "--eval", "2",
                    "--dpo", "2", "--text", "16"])
    short = ["training.log_every=2", "eval.every_steps=6", "eval.max_samples=8", "data.num_workers=0"]
    for stage, name, shards in [(1, "quickstart", "stage1/train-*.tar"), (2, "quickstart_stage2", "stage2/*-*.tar")]:
        val = "stage1/val-*.tar" if stage == 1 else "stage2/val-*.tar"
        sets = short + [f"data.train_shards={data / shards}", f"data.val_shards={data / val}",
                        f"data.text_shards={data / 'text/text-*.tar'}", "training.total_samples=192",
                        f"checkpoint.save_dir={tmp_path / name}"]
        if stage == 2:
            sets.append(f"model.init_from={tmp_path / 'quickstart' / 'latest'}")
        overrides = [a for x in sets for a in ("--set", x)]
        train.main(["--config", os.path.join(ROOT, "configs", f"{name}.yaml"), *overrides])
        rows = read_log(str(tmp_path / name))
        losses = [float(r["loss"]) for r in rows if r.get("loss")]
        vals = [float(r["val_loss"]) for r in rows if r.get("val_loss")]
        assert len(losses) == 6 and losses[-1] < losses[0] - 1.0, (stage, losses)
        assert len(vals) == 2 and vals[-1] < vals[0], (stage, vals)


def test_wandb_offline_run_holds_the_logged_figures(tmp_path, shards, one_thread, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    path = write_config(tmp_path, data={"train_shards": str(shards / "train.tar")}, training={"total_samples": 16},
                        wandb={"mode": "offline", "project": "fvlm-test", "run_name": "tiny"})
    train.main(["--config", path])
    runs = glob.glob(str(tmp_path / "run" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1, runs  # what `wandb sync` uploads later
    records = open(runs[0], "rb").read()
    for name in (b"fvlm-test", b"grad_norm", b"lr_connector", b"samples_per_s", b"final_loss"):
        assert name in records, name


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # small ops on a busy CPU: one thread per process is fastest


@pytest.mark.slow
def test_sigkill_mid_training_resumes(tmp_path, shards):
    path = write_config(tmp_path, data={"train_shards": str(shards / "train.tar")},
                        training={"total_samples": 32, "batch_size": 2}, checkpoint={"save_every_steps": 2})
    save_dir = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "train.py", "--config", path], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not [s for s, _ in checkpoint.checkpoints(save_dir) if s >= 4] and time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint.checkpoints(save_dir)[-1][0]
    assert 4 <= killed_at < 16
    out = subprocess.run([sys.executable, "train.py", "--config", path], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"resumed from {save_dir}/step_{killed_at:08d}: step {killed_at}" in out.stdout
    first = next(line for line in out.stdout.splitlines() if line.startswith("step "))
    assert first.startswith(f"step {killed_at + 2}/16"), first
    state = checkpoint.load_state(os.path.join(save_dir, "latest"))
    assert state["step"] == 16 and state["samples_seen"] == 32
    assert state["scheduler"]["last_epoch"] == 16
    steps = [int(r["step"]) for r in read_log(save_dir) if r.get("loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 16  # the CSV continues, without duplicated steps


DRIVER = """
import os, sys, torch
import train
model = train.main(sys.argv[1:])
torch.save(model.state_dict(), sys.argv[-1].replace(".yaml", f"-rank{os.environ['RANK']}.pt"))
"""


def torchrun(tmp_path, config_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(driver), "--config", config_path], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env={**ENV, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ranks = [torch.load(config_path.replace(".yaml", f"-rank{r}.pt"), weights_only=True) for r in (0, 1)]
    return out.stdout, ranks


@pytest.mark.slow
def test_two_process_gloo_keeps_ranks_identical_ce_then_dpo(tmp_path, shards):
    init = {k: v.clone() for k, v in train.FoveatedVLM(llm_config=TINY_LLM, dino_config=TINY_DINO,
                                                       query_dim=24).state_dict().items()}
    write_colour_shard(tmp_path / "bad.tar", 64, 5, corrupt=48)  # rank 1's shard; rank 0 reads train.tar
    ce = write_config(tmp_path, "ce", data={"train_shards": [str(shards / "train.tar"), str(tmp_path / "bad.tar")],
                                            "text_shards": str(shards / "text.tar"), "text_ratio": 0.5},
                      training={"total_samples": 32, "batch_size": 2, "grad_accum": 2},
                      checkpoint={"save_every_steps": 100})
    stdout, (r0, r1) = torchrun(tmp_path, ce)
    assert "4 steps of 8 samples | 2 x cpu" in stdout
    for name in r0:
        assert torch.equal(r0[name], r1[name]), name
    assert any(not torch.equal(r0[k], init[k]) for k in init if k in r0)
    summary = json.loads((tmp_path / "ce" / "summary.json").read_text())
    assert summary["skipped"] > 0 and summary["skip_reasons"] == {"bad_image": summary["skipped"]}  # rank 1's
    dpo = write_config(tmp_path, "dpo", model={"init_from": str(tmp_path / "ce" / "latest")},
                       data={"train_shards": str(shards / "dpo.tar")}, loss={"type": "dpo", "beta": 0.1},
                       training={"total_samples": 16, "batch_size": 2, "lr_llm": 1e-3})
    stdout, (d0, d1) = torchrun(tmp_path, dpo)
    assert "reward_acc" in stdout
    for name in d0:
        assert torch.equal(d0[name], d1[name]), name
    assert any(not torch.equal(d0[k], r0[k]) for k in r0)


def test_nonfinite_losses_skip_then_stop_with_checkpoint_intact(tmp_path, shards, one_thread, monkeypatch):
    path = write_config(tmp_path, data={"train_shards": str(shards / "train.tar")},
                        training={"total_samples": 32, "batch_size": 2, "max_nonfinite_steps": 3},
                        checkpoint={"save_every_steps": 2})
    forward, calls = train.StepModule.forward, []

    def nan_after_four(self, batch, *args):  # steps 1-4 train normally, then every loss is NaN
        out = forward(self, batch, *args)
        calls.append(1)
        return {**out, "loss": out["loss"] * float("nan")} if len(calls) > 4 else out

    monkeypatch.setattr(train.StepModule, "forward", nan_after_four)
    with pytest.raises(RuntimeError, match="3 steps in a row had a non-finite loss"):
        train.main(["--config", path])
    save_dir = str(tmp_path / "run")
    latest = checkpoint.find_resume(save_dir, "auto")
    assert latest.endswith("step_00000004") and checkpoint.load_state(latest)["step"] == 4
    weights = train.FoveatedVLM.from_pretrained(latest).state_dict()
    assert all(torch.isfinite(w).all() for w in weights.values())
    rows = read_log(save_dir)
    assert [r["nonfinite_skipped"] for r in rows if r.get("nonfinite_skipped")] == ["1", "2", "3"]


def wait_for_log_rows(save_dir, rows, proc, timeout=180):
    """Wait until the running training process has logged `rows` steps (log.csv)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if os.path.exists(os.path.join(save_dir, "log.csv")) and len(read_log(save_dir)) >= rows:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {rows} logged steps in {timeout} s")


@pytest.mark.slow
def test_ctrl_c_saves_the_last_completed_step_and_the_run_resumes_there(tmp_path, shards):
    """A Ctrl-C reaches the whole process group (the loader's worker too): the step in progress ends, that step is
    saved although no save step was reached, and the same command resumes from it."""
    path = write_config(tmp_path, data={"train_shards": str(shards / "train.tar"), "num_workers": 1},
                        training={"total_samples": 64, "batch_size": 2, "log_every": 1},
                        checkpoint={"save_every_steps": 1000})
    save_dir = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "train.py", "--config", path], cwd=ROOT, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    wait_for_log_rows(save_dir, 3, proc)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    step = int(re.search(r"stopped on request at step (\d+) of 32: saved step \1", err).group(1))
    assert "SIGINT: saving a checkpoint" in err and "Traceback" not in err and 3 <= step < 32
    assert checkpoint.newest(save_dir).endswith(f"step_{step:08d}")
    assert checkpoint.load_state(checkpoint.newest(save_dir))["step"] == step
    again = subprocess.run([sys.executable, "train.py", "--config", path], cwd=ROOT, env=ENV, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0 and f"resumed from {save_dir}/step_{step:08d}: step {step}" in again.stdout


def test_a_restart_with_nothing_to_resume_says_so(tmp_path, shards, one_thread, capsys):
    path = write_config(tmp_path, data={"train_shards": str(shards / "train.tar")},
                        training={"total_samples": 8, "batch_size": 4})
    os.makedirs(tmp_path / "run")
    (tmp_path / "run" / "log.csv").write_text("step,loss\n1,9.0\n")  # a run stopped before its first save
    train.main(["--config", path])
    assert "holds no checkpoint to resume from" in capsys.readouterr().out


@pytest.mark.slow
def test_ctrl_c_under_torchrun_saves_once_and_every_rank_stops(tmp_path, shards):
    """torchrun passes a Ctrl-C on to each rank's process group: every rank stops at the same step, rank 0
    saves it."""
    path = write_config(tmp_path, data={"train_shards": str(shards / "train.tar"), "num_workers": 1},
                        training={"total_samples": 256, "batch_size": 2, "log_every": 1},
                        checkpoint={"save_every_steps": 1000})
    save_dir = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train.py", "--config", path], cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    wait_for_log_rows(save_dir, 2, proc, timeout=300)
    os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C reaches torchrun, which passes it on
    out, err = proc.communicate(timeout=120)
    stops = re.findall(r"stopped on request at step (\d+) of 64: saved step \1", err)
    assert len(stops) == 1, err[-3000:]  # rank 0's report
    step = int(stops[0])
    assert checkpoint.newest(save_dir).endswith(f"step_{step:08d}") and len(checkpoint.checkpoints(save_dir)) == 1
    assert checkpoint.load_state(checkpoint.newest(save_dir))["step"] == step
