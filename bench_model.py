"""Times one coarse_fine training step (forward + backward) of FoveatedVLM at the real sizes (dinov2-small and
SmolLM2-135M shapes, random weights) with frame deduplication on and off:

  (a) 2 images replicated to 8 frames each, 64 text tokens per sample
  (b) one 16-frame video, 64 text tokens

Usage: python bench_model.py [--repeats 3] [--frame-size 224] [--device cpu]
"""

import argparse
import time

import torch

from model import FoveatedVLM
from pretrained import SHAPES


def step_seconds(model, frames, input_ids):
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    model(frames, input_ids, mode="coarse_fine", return_logits=False)["loss"].backward()
    if frames.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compare(model, frames, input_ids, repeats):
    """Median seconds per step with dedup on and off, the two measured in alternation (after a warm-up of
    each) so that a change in the machine's load hits both alike."""
    times = {True: [], False: []}
    for i in range(repeats + 1):
        for dedup in (True, False):
            model.dedup_frames = dedup
            seconds = step_seconds(model, frames, input_ids)
            if i:
                times[dedup].append(seconds)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frame-size", type=int, default=224)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = FoveatedVLM(llm_config=SHAPES["smollm2-135m"], dino_config=SHAPES["dinov2-small"]).to(args.device)
    model.train()
    n = model.count_parameters()
    print(f"model: {n['total'] / 1e6:.1f}M parameters (dino {n['dino'] / 1e6:.1f}M, llm {n['llm'] / 1e6:.1f}M, "
          f"connector {n['connector'] / 1e6:.2f}M), device {args.device}, {torch.get_num_threads()} threads")
    S = args.frame_size
    images = torch.randn(2, 1, 3, S, S, device=args.device).expand(2, 8, 3, S, S)
    cases = {
        "(a) 2 images x 8 frames": (images.contiguous(), torch.randint(3, 49152, (2, args.text_tokens))),
        "(b) 1 video x 16 frames": (torch.randn(1, 16, 3, S, S), torch.randint(3, 49152, (1, args.text_tokens))),
    }
    print(f"{'case':<26}{'dedup on (s/step)':>19}{'dedup off (s/step)':>20}{'speed-up':>10}")
    for name, (frames, ids) in cases.items():
        frames, ids = frames.to(args.device), ids.to(args.device)
        seconds = compare(model, frames, ids, args.repeats)
        print(f"{name:<26}{seconds[True]:>19.2f}{seconds[False]:>20.2f}{seconds[False] / seconds[True]:>9.2f}x")


if __name__ == "__main__":
    main()
