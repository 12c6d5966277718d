"""The modules' layering (README, Project structure): an AST walk over every import of every module, at module
level and inside functions (import-linter cannot take top-level modules that are not a package). A module imports
only modules of its own layer or lower ones, and no import cycle exists."""

import ast
import os
import subprocess
import sys

from conftest import ROOT

LAYERS = [  # lowest first
    ["config"],  # settings, choice lists and defaults: imports nothing of the project, nor torch
    ["cli", "distributed", "layout", "collate", "text_interleave", "logger", "shards", "schedule", "frames",
     "tokenization", "pretrained", "checkpoint"],  # one concern each, over the libraries
    ["inputs", "encoder", "streaming", "model"],  # the model
    ["data", "eval_readers", "lmms_protocol"],  # what training and evaluation read, and how lmms-eval asks
    ["train", "memory", "benchmark", "generate", "live", "attention_viz", "demo", "bench", "synthetic", "prepare",
     "converters", "lmms_adapter"],  # the commands (memory: bench.py memory's estimate, over train.py's step)
]


def modules():
    """{module name: file} of the root's modules and of converters/ (as converters.<name>)."""
    found = {f[:-3]: os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith(".py")}
    folder = os.path.join(ROOT, "converters")
    found.update({f"converters.{f[:-3]}": os.path.join(folder, f) for f in os.listdir(folder)
                  if f.endswith(".py") and f != "__init__.py"})
    return found


def project_imports(file, names):
    """The project modules `file` imports anywhere in it (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(open(file).read())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in names} | {t.split(".")[0] for t in targets if t.split(".")[0] in names}
    return found


def graph():
    names = modules()
    return {m: project_imports(f, set(names)) - {m} for m, f in names.items()}


def layer(module):
    for i, members in enumerate(LAYERS):
        if module in members or module.split(".")[0] in members:
            return i
    raise AssertionError(f"module {module} is in no layer of LAYERS: place it there")


def test_every_module_imports_only_its_layer_or_lower():
    wrong = [(m, d) for m, deps in graph().items() for d in deps if layer(d) > layer(m)]
    assert not wrong, f"imports of a higher layer: {wrong}"
    assert not graph()["config"], "config.py imports nothing of the project"


def test_no_import_cycles():
    g, state, cycles = graph(), {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(g[m]):
            if state.get(d) == "open":
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import cycles: {cycles}"


def loaded_by(module):
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    return set(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.split())


def test_what_an_import_loads():
    """`import config` loads no other module of the project, no torch, decoder or webdataset; decoding a video
    loads no transformers; generating loads no table or shard reader."""
    names = set(modules())
    config = loaded_by("config")
    assert config & names == {"config"} and not config & {"torch", "av", "decord", "webdataset", "transformers"}
    assert "transformers" not in loaded_by("frames")
    assert not loaded_by("generate") & {"pandas", "webdataset", "eval_readers", "data"}
