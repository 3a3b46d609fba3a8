"""One trial core: tune an adapter on a mix and keep what it trained, under one key, for whoever needs it next.

The train stage and a search trial train the same way (`tune.tuner`), from the same mix file, and write the
same three things (`save`): the adapter, its loss curve and its tracked metrics. A search trial stores them in
.cache/adapters/<key>, where the key names everything that computes them: the mix's sha256, the training and
model config, the precision and the code (`lineage.fingerprint`, comments and docstrings aside). When
`mix.generalist_share: auto` lands on a share a trial trained, the train stage finds the same key and takes
the trial's outputs instead of training them again (byte for byte what it would train: test_trial). A study
cell trains and stores on the same core, so a cell, a trial and the train stage never train one mix twice.
Every entry's meta.json says who trained it (`by`) and in which MLflow run (`run_id`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

from mixtune.plumbing import lineage
from mixtune.plumbing.files import atomic_dir, atomic_file, write_json

TRACKED = ("train_loss", "final_loss", "steps", "trained_tokens")  # train/metrics.json: no timings
CODE = ("mixtune.core.trial", "mixtune.core.tune", "mixtune.stages.train")  # what trains and stores a trial
LOSS_FIELDS = ["step", "loss", "learning_rate", "grad_norm"]  # train/loss.csv: tokens/s is a timing, MLflow's


def key(train_cfg, model_cfg, mix_sha256: str, prec: str) -> str:
    blob = json.dumps({"train": train_cfg.model_dump(), "model": model_cfg.model_dump(), "mix": mix_sha256,
                       "precision": prec, "code": lineage.fingerprint(list(CODE))[:16]},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_dir() -> Path:
    from mixtune.plumbing.tracking import repo_root

    return repo_root() / ".cache" / "adapters"


def cached(k: str) -> Path | None:
    """The folder a trial stored under key `k`, if it is complete (written atomically: whole or absent)."""
    path = cache_dir() / k
    return path if (path / "meta.json").is_file() else None


def tracked(trainer, train_loss: float, log_rows: list[dict]) -> dict:
    """train/metrics.json's numbers: what was trained, no timings (a re-run that trains the same changes none)."""
    from mixtune.core import tune

    return {"train_loss": train_loss, "final_loss": log_rows[-1]["loss"] if log_rows else None,
            "steps": trainer.state.global_step, "trained_tokens": tune.trained_tokens(trainer)}


def save(model, tokenizer, metrics: dict, log_rows: list[dict], out: Path, meta: dict | None = None) -> None:
    """out/adapter, out/loss.csv, out/metrics.json (and out/meta.json: who trained it, for a cache entry)."""
    from mixtune.core import tune

    tune.save_adapter(model, tokenizer, out / "adapter")
    with atomic_file(out / "loss.csv") as f:
        w = csv.DictWriter(f, fieldnames=LOSS_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(log_rows)
    write_json(out / "metrics.json", {k: metrics[k] for k in TRACKED})
    if meta is not None:
        write_json(out / "meta.json", meta)


def store(k: str, model, tokenizer, metrics: dict, log_rows: list[dict], meta: dict) -> Path:
    """A trial's outputs into the cache under `k`, all or nothing."""
    path = cache_dir() / k
    with atomic_dir(path) as tmp:
        save(model, tokenizer, metrics, log_rows, tmp, meta)
    return path


def take(hit: Path, out: Path) -> dict:
    """A cached trial's adapter, loss curve and metrics as the train stage's outputs; -> its meta."""
    with atomic_dir(out / "adapter") as tmp:
        shutil.copytree(hit / "adapter", tmp, dirs_exist_ok=True)
    for name in ("loss.csv", "metrics.json"):
        with atomic_file(out / name, "wb") as f:
            f.write((hit / name).read_bytes())
    return json.loads((hit / "meta.json").read_text())
