"""What a new user meets at the command line: every command answers --help and a mistyped flag before torch or
transformers load, errors name the file or checkpoint without a usage block or a traceback, and a corrupt video's
bytes never reach the terminal."""

import subprocess
import sys

import pytest

from conftest import ROOT, script_error, tiny_model_kwargs

COMMANDS = [  # a command line each that argparse accepts up to the flags under test
    ["train.py"], ["generate.py"], ["benchmark.py"], ["attention_viz.py"], ["bench.py", "step"], ["bench.py", "long"],
    ["data.py"], ["prepare.py", "openvid"], ["synthetic.py"], ["demo.py"], ["live.py"],
]
PROBE = """
import runpy, sys
sys.argv = [{script!r}] + {args!r}
try:
    runpy.run_path({script!r}, run_name="__main__")
except SystemExit as e:
    print("exit", e.code)
print("loaded", *sorted(m for m in ("torch", "transformers", "av", "decord", "webdataset") if m in sys.modules))
"""


def probe(script, args):
    out = subprocess.run([sys.executable, "-c", PROBE.format(script=script, args=args)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    lines = out.stdout.splitlines()
    return lines[-2], lines[-1], out.stderr


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_and_flag_errors_answer_before_torch_loads(command):
    script, args = command[0], command[1:]
    exit_, loaded, _ = probe(script, args + ["--help"])
    assert exit_ == "exit 0" and loaded == "loaded", (script, loaded)
    exit_, loaded, err = probe(script, args + ["--no-such-flag"])
    assert exit_ == "exit 2" and loaded == "loaded" and "error:" in err, (script, loaded)


@pytest.fixture
def saved(tmp_path, tokenizer):
    from model import FoveatedVLM

    FoveatedVLM(**tiny_model_kwargs()).save_pretrained(str(tmp_path / "ckpt"), tokenizer=tokenizer)
    return str(tmp_path / "ckpt")


def test_file_errors_name_the_file_without_a_usage_block(tmp_path, saved):
    bad = tmp_path / "x.mp4"
    bad.write_bytes(b"\x00\x01garbage\xff" * 2000)  # not a video: decord would print these bytes as its name
    for script in ("generate.py", "attention_viz.py"):
        extra = ["--prompt", "What?"] if script == "generate.py" else []
        err = script_error(script, "--checkpoint", saved, "--video", bad, *extra)
        assert err.startswith(f"error: cannot read {bad}: bad_video") and "usage:" not in err, err
        assert "garbage" not in err and len(err.splitlines()) == 1, err
        err = script_error(script, "--checkpoint", saved, "--video", tmp_path / "none.mp4", *extra)
        assert err == f"error: {tmp_path / 'none.mp4'} does not exist\n"
    (tmp_path / "checkpoints").mkdir()
    for name in ("checkpoints/nope", "./checkpoints/nope"):  # a mistyped local path is not sent to the hub
        out = subprocess.run([sys.executable, f"{ROOT}/generate.py", "--checkpoint", name, "--image", str(bad),
                              "--prompt", "What?"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and out.stderr == f"error: checkpoint '{name}' does not exist\n", out.stderr


def test_data_inspector_names_missing_shards_before_loading_a_tokenizer(tmp_path):
    path = tmp_path / "stage1.yaml"
    path.write_text("model: {llm: HuggingFaceTB/SmolLM2-135M-Instruct}\ndata: {train_shards: data/none/*.tar}\n")
    err = script_error("data.py", "--config", path)
    assert "'data.train_shards'" in err and "data/none/*.tar" in err and "hf download" not in err, err
