"""Learning-rate schedules for the three parameter groups (connector, dino, llm), as torch LambdaLR factors.

All schedules warm up linearly from 0 over the first `warmup_ratio` of the steps, then:
- cosine: each group decays from its peak LR to `min_lr_ratio` x peak along a half cosine;
- constant: each group stays at its peak LR;
- converging (stage 1): each group moves along a half cosine from its own LR to `target_lr`, so the connector
  falls from lr_connector while the backbones rise from lr_dino / lr_llm and all meet at the end.
A LambdaLR keeps the state (step count) that checkpoint.py saves and restores on resume.
"""

import math

from torch.optim.lr_scheduler import LambdaLR

from config import SCHEDULES


def lr_at(step, peak, total_steps, warmup_steps, schedule, target_lr=None, min_lr_ratio=0.1):
    """The LR of one group at optimizer step `step` (0-based: the LR the step-th update uses)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps - 1))
    cos = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    if schedule == "constant":
        return peak
    if schedule == "cosine":
        return peak * (min_lr_ratio + (1.0 - min_lr_ratio) * cos)
    if schedule == "converging":
        assert target_lr is not None, "the converging schedule needs training.target_lr"
        return target_lr + (peak - target_lr) * cos
    raise ValueError(f"unknown schedule {schedule!r}; choose from {SCHEDULES}")


def build(optimizer, training, total_steps):
    """A LambdaLR over an optimizer whose param groups (config.PARAM_GROUPS) carry their peak LR as `lr`."""
    if training.schedule == "converging" and training.target_lr is None:
        raise ValueError("training.schedule 'converging' needs training.target_lr")
    warmup = round(training.warmup_ratio * total_steps)

    def factor(peak):
        if peak == 0:
            return lambda step: 0.0
        return lambda step: lr_at(step, peak, total_steps, warmup, training.schedule, training.target_lr,
                                  training.min_lr_ratio) / peak

    return LambdaLR(optimizer, [factor(group["lr"]) for group in optimizer.param_groups])
