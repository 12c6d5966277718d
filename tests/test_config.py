"""config.py: an unknown key, a wrong type or a missing path stops the run naming the key and the file."""

import glob
import os

import pytest

import config
import train
from conftest import ROOT


def write(tmp_path, text, name="stage.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def checked(path, overrides=()):
    """config.load with the checks train.py adds before any work (files, libraries)."""
    cfg = config.load(path, overrides)
    train.check_config(cfg, config.source_name(path, overrides))
    return cfg


def shard(tmp_path):
    (tmp_path / "train-0.tar").write_bytes(b"")
    return str(tmp_path / "train-*.tar")


def test_loads_defaults_and_spec_number_forms(tmp_path):
    path = write(tmp_path, f"model: {{llm: some/llm}}\ndata: {{train_shards: '{shard(tmp_path)}'}}\n"
                           "training: {total_samples: 1_000_000, lr_connector: 1e-3, lr_llm: 1.0e-5, target_lr: 3}\n")
    cfg = config.load(path)
    assert cfg.training.total_samples == 1_000_000
    assert cfg.training.lr_connector == 1e-3 and isinstance(cfg.training.target_lr, float)
    assert cfg.checkpoint.keep_last == config.CheckpointConfig().keep_last  # defaults from the dataclass


@pytest.mark.parametrize("text, key", [
    ("training: {batchsize: 4}", "training.batchsize"),
    ("trainig: {batch_size: 4}", "trainig"),
    ("training: {batch_size: four}", "training.batch_size"),
    ("training: {compile: 1}", "training.compile"),
    ("loss: {type: ppo}", "loss.type"),
    ("data: {train_shards: [1, 2]}", "data.train_shards"),
    ("eval: {modes: [coarse_only, fine_only]}", "eval.modes"),
    ("model: {llm_config: {model_type: llama, hidden_sizee: 64}}", "model.llm_config.hidden_sizee' is not a llama "
                                                                  "config key (did you mean hidden_size?)"),
    ("model: {dino_config: {num_layers: 2}}", "model.dino_config.num_layers' is not a dinov2 config key"),
    ("model: {dino_config: {model_type: dinov9}}", "model.dino_config.model_type"),
    ("training: {batch_size: 0}", "training.batch_size' must be at least 1, got 0"),
    ("training: {threads: 0}", "training.threads' must be at least 1, got 0"),
    ("data: {num_workers: -1}", "data.num_workers' must be at least 0"),
])
def test_bad_key_or_type_names_key_and_file(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(config.ConfigError) as err:
        checked(path)
    assert key in str(err.value) and path in str(err.value)


def test_missing_paths_are_named(tmp_path):
    base = f"model: {{llm: x}}\ndata: {{train_shards: '{shard(tmp_path)}'}}\n"
    path = write(tmp_path, base + "model: {llm: x, init_from: nowhere/best}\n")
    with pytest.raises(config.ConfigError, match="model.init_from.*nowhere/best"):
        checked(path)
    path = write(tmp_path, "model: {llm: x}\ndata: {train_shards: data/missing/*.tar}\n")
    with pytest.raises(config.ConfigError, match="data.train_shards.*data/missing"):
        checked(path)
    path = write(tmp_path, base + "loss: {type: dpo}\n")
    with pytest.raises(config.ConfigError, match="model.init_from"):
        checked(path)


def test_set_overrides_are_typed_and_checked(tmp_path):
    path = write(tmp_path, f"model: {{llm: x}}\ndata: {{train_shards: '{shard(tmp_path)}'}}\n")
    cfg = config.load(path, ["training.lr_llm=2e-5", "training.compile=true", "wandb.run_name=abc"])
    assert cfg.training.lr_llm == 2e-5 and cfg.training.compile is True and cfg.wandb.run_name == "abc"
    with pytest.raises(config.ConfigError, match="training.lr_lllm"):
        config.load(path, ["training.lr_lllm=2e-5"])
    with pytest.raises(config.ConfigError, match="training.batch_size"):
        config.load(path, ["training.batch_size=2.5"])


def test_saved_config_round_trips(tmp_path):
    cfg = config.from_dict({"model": {"llm_config": {"hidden_size": 64}}, "training": {"lr_llm": 3e-5}})
    for name in ("c.yaml", "c.json"):
        config.save(cfg, str(tmp_path / name))
        assert config.load_saved(str(tmp_path / name)) == cfg


EVAL_DATA = os.path.join(ROOT, "configs", "eval_data.yaml")
SHIPPED = sorted(set(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))) - {EVAL_DATA})


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_shipped_configs_match_the_schema(path):
    cfg = config.load(path)  # keys and types; the data paths exist only after downloading
    loss = {1: "text_ce_all", 2: "text_ce_answer_only", 3: "dpo"}[cfg.stage]
    assert cfg.loss.type == loss
    if not os.path.basename(path).startswith("niah"):  # the recipe's stages chain; niah.yaml trains from scratch
        assert (cfg.stage == 1) == (cfg.model.init_from is None)
    if os.path.basename(path).startswith("quickstart"):  # fast on the CPU: no autocast there (README, Throughput)
        assert cfg.training.dtype == "float32" and cfg.training.device == "cpu"


def test_the_eval_data_yaml_the_help_names_lists_every_benchmark():
    """Every published benchmark; the needle-in-a-haystack set is synthetic (synthetic.py --niah, --niah DIR)."""
    import benchmark

    roots = benchmark.load_roots(EVAL_DATA)
    assert sorted(roots) == sorted(set(benchmark.READERS) - {"NIAH"})
    assert all(r.startswith("data/eval/") for r in roots.values())
    assert "configs/eval_data.yaml" in benchmark.__doc__


def test_architecture_keys_beside_init_from_are_errors(tmp_path):
    (tmp_path / "stage1").mkdir()
    base = (f"model: {{init_from: '{tmp_path / 'stage1'}', visual_scale: 0.5, lambda_coarse: 0.3, mode: coarse_only}}\n"
            f"data: {{train_shards: '{shard(tmp_path)}'}}\nloss: {{type: text_ce_answer_only}}\n")
    path = write(tmp_path, base)
    cfg = config.load(path)  # the settings that apply on top of the checkpoint are accepted
    assert (cfg.model.visual_scale, cfg.model.lambda_coarse, cfg.model.mode) == (0.5, 0.3, "coarse_only")
    for key, value in [("query_dim", "384"), ("llm", "HuggingFaceTB/SmolLM2-135M-Instruct"), ("deep_query", "true"),
                       ("llm_config", "{hidden_size: 64}")]:
        with pytest.raises(config.ConfigError, match=f"'model.{key}' cannot be set with model.init_from") as err:
            config.load(path, [f"model.{key}={value}"])
        assert path in str(err.value)
    cfg = config.load(path, ["model.init_from=null", "model.llm=x", "model.query_dim=96"])  # a new model: fine
    assert cfg.model.query_dim == 96


def test_dtype_and_threads_keys(tmp_path):
    path = write(tmp_path, f"model: {{llm: x}}\ndata: {{train_shards: '{shard(tmp_path)}'}}\n")
    assert config.load(path).training.dtype == "auto" and config.load(path).training.threads is None
    cfg = config.load(path, ["training.dtype=float16", "training.threads=1"])
    assert (cfg.training.dtype, cfg.training.threads) == ("float16", 1)
    with pytest.raises(config.ConfigError, match="training.dtype.*must be one of"):
        config.load(path, ["training.dtype=fp8"])
