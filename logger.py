"""Training logs: one stdout line per logged step, the same figures in `<save_dir>/log.csv`, and wandb.

wandb (https://docs.wandb.ai) is imported only when `wandb.mode` is online or offline; with the default
`disabled` a do-nothing stand-in takes its place, so nothing needs installing and the loop never branches on it.
Offline runs write to <save_dir>/wandb and sync later with `wandb sync <save_dir>/wandb/offline-run-*`.
Only rank 0 logs (others get enabled=False).
"""

import csv
import json
import os
import time
from datetime import timedelta


class _NullRun:
    """Stands in for a wandb run when wandb is disabled."""

    def __init__(self):
        self.summary = {}

    def log(self, metrics, step=None):
        pass

    def finish(self):
        pass


def _wandb_run(section, config_dict, save_dir):
    if section.mode == "disabled":
        return _NullRun()
    try:
        import wandb
    except ImportError:
        raise RuntimeError(f"wandb.mode is {section.mode!r} but wandb is not installed: `pip install wandb`, "
                           "or set wandb.mode: disabled") from None
    return wandb.init(project=section.project, name=section.run_name, mode=section.mode, config=config_dict,
                      dir=save_dir, resume="allow")


def _fmt(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Logger:
    """`log(step, metrics)` prints `step 120/1000 | loss 2.31 | lr conn 1e-03 dino 1e-05 llm 1e-05 | ...`."""

    def __init__(self, save_dir, total_steps, wandb_section, config_dict, start_step=0, enabled=True):
        self.enabled, self.total_steps = enabled, total_steps
        self.csv_path = os.path.join(save_dir, "log.csv")
        self.start_time, self.start_step = time.time(), start_step
        self.run = _NullRun()
        if not enabled:
            return
        os.makedirs(save_dir, exist_ok=True)
        self.rows, self.columns = self._read_csv(start_step)
        self._write_csv()
        self.run = _wandb_run(wandb_section, config_dict, save_dir)

    def _read_csv(self, start_step):
        """Rows already logged by an earlier run of this save_dir, up to the step it resumes from."""
        if not os.path.exists(self.csv_path):
            return [], []
        with open(self.csv_path, newline="") as f:
            reader = csv.DictReader(f)
            rows = [r for r in reader if int(r["step"]) <= start_step]
            return rows, list(reader.fieldnames or [])

    def _write_csv(self):
        tmp = self.csv_path + ".tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.csv_path)

    def _append_csv(self, row):
        self.rows.append(row)
        if set(row) - set(self.columns):  # a new column: rewrite the file with the wider header
            self.columns += [k for k in row if k not in self.columns]
            self._write_csv()
            return
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns).writerow(row)

    def line(self, step, metrics, lrs=None, samples_per_s=None):
        parts = [f"step {step}/{self.total_steps}"]
        parts += [f"{k} {_fmt(v)}" for k, v in metrics.items()]
        if lrs:
            parts.append("lr " + " ".join(f"{k[:4]} {v:.2e}" for k, v in lrs.items()))
        if samples_per_s is not None:
            parts.append(f"{samples_per_s:.1f} samples/s")
        done = step - self.start_step
        if done > 0 and step < self.total_steps:
            eta = (time.time() - self.start_time) / done * (self.total_steps - step)
            parts.append(f"ETA {timedelta(seconds=round(eta))}")
        return " | ".join(parts)

    def log(self, step, metrics, lrs=None, samples_per_s=None):
        """One stdout line, one CSV row, one wandb entry for this step."""
        if not self.enabled:
            return
        print(self.line(step, metrics, lrs, samples_per_s), flush=True)
        row = {"step": step, "time": round(time.time() - self.start_time, 3), **metrics}
        row.update({f"lr_{k}": v for k, v in (lrs or {}).items()})
        if samples_per_s is not None:
            row["samples_per_s"] = round(samples_per_s, 3)
        self._append_csv(row)
        self.run.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def summary(self, **figures):
        """The run summary: printed, written to <save_dir>/summary.json, and set on the wandb run."""
        if not self.enabled:
            return
        figures.setdefault("wall_time_s", round(time.time() - self.start_time, 1))
        print("run summary: " + " | ".join(f"{k} {_fmt(v)}" for k, v in figures.items()), flush=True)
        with open(os.path.join(os.path.dirname(self.csv_path), "summary.json"), "w") as f:
            json.dump(figures, f, indent=2)
        for key, value in figures.items():
            self.run.summary[key] = value

    def close(self):
        self.run.finish()
