"""distributed.py's process conventions: the CPU thread default and OpenMP's wait policy, the shared --threads
flag, and user errors that end a script with their message alone and exit status 2."""

import argparse
import os
import subprocess
import sys

import pytest
import torch

import cli
import distributed
import generate
from config import ConfigError
from conftest import ROOT, script_error

PROBE = "import distributed, os, torch; print(distributed.WAIT_POLICY_APPLIES, os.environ['OMP_WAIT_POLICY'], " \
        "distributed.set_threads())"


def probe(code, **env):
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**clean, **env}, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_wait_policy_is_set_before_torch_loads_else_one_thread():
    cores = str(len(os.sched_getaffinity(0)))
    assert probe(PROBE) == ["True", "PASSIVE", cores]  # distributed first: sleeping OpenMP threads, every core
    assert probe("import torch; " + PROBE) == ["False", "PASSIVE", "1"]  # too late for libgomp: one thread
    assert probe("import torch; " + PROBE, OMP_WAIT_POLICY="ACTIVE") == ["True", "ACTIVE", cores]  # the user's
    assert probe(PROBE, OMP_NUM_THREADS="1") == ["True", "PASSIVE", "1"]  # torchrun's default is kept


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_threads_flag_sets_torch_threads(restore_threads):
    parser = argparse.ArgumentParser()
    cli.add_threads(parser)
    args = parser.parse_args(["--threads", "1"])
    assert args.threads == 1 and distributed.set_threads(args.threads) == 1 and torch.get_num_threads() == 1
    parser = argparse.ArgumentParser()
    cli.add_threads(parser, default=2)
    distributed.set_threads(parser.parse_args([]).threads)
    assert torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="at least 1"):
        distributed.set_threads(0)


def failing(error):
    def main():
        raise error
    return main


@pytest.mark.parametrize("error", [ConfigError("stage.yaml: unknown key 'training.lr'"),
                                   FileNotFoundError("checkpoint 'x' does not exist"), ValueError("bad flags")])
def test_user_errors_exit_2_with_the_message_alone(error, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.run(failing(error))
    assert exit_.value.code == 2 and capsys.readouterr().err == f"error: {error}\n"


def test_ctrl_c_ends_without_a_traceback(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.run(failing(KeyboardInterrupt()))
    assert exit_.value.code == 130 and capsys.readouterr().err == "interrupted\n"


def test_other_errors_keep_their_traceback():
    with pytest.raises(RuntimeError, match="a bug"):
        cli.run(failing(RuntimeError("a bug")))


def test_train_and_generate_scripts_exit_2_on_user_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: {batchsize: 4}\n")
    assert script_error("train.py", "--config", bad).startswith(f"error: {bad}: unknown key 'training.batchsize'")
    image = tmp_path / "photo.jpg"
    image.write_bytes(b"")
    with pytest.raises(SystemExit) as exit_:
        cli.run(lambda: generate.main(["--checkpoint", str(tmp_path / "none"), "--image", str(image),
                                                   "--prompt", "Colour?"]))
    assert exit_.value.code == 2 and "does not exist" in capsys.readouterr().err
