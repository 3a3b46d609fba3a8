"""Helpers for the train/evaluate/tracking tests: a small prepared/ folder (classification, multiple choice and
generative examples whose words come from the tiny tokenizer's corpus), its mix, params, and the MLflow store."""

from __future__ import annotations

import random
from pathlib import Path

from conftest import section, sentence, write_params

from mixtune.core.schema import make_example
from mixtune.plumbing.config import TrainConfig
from mixtune.plumbing.files import write_json, write_jsonl
from mixtune.stages import mix

LABELS = ["a", "b", "c"]
INSTRUCTION = "Which class? Answer with one of: a, b, c."
TASK = "topic"


def classification(n: int, source: str, seed: int, start: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [make_example(id=f"{source}/{start + i}", source=source, task=TASK, keywords=["topic classification"],
                         capability=None,
                         prompt=[{"role": "user", "content": f"{INSTRUCTION}\n\n{sentence(rng, rng.randint(5, 14))}"}],
                         completion=rng.choice(LABELS), options=list(LABELS))
            for i in range(n)]


def generative(n: int, source: str, seed: int, task: str = TASK) -> list[dict]:
    rng = random.Random(seed)
    return [make_example(id=f"{source}/{i}", source=source, task=task, keywords=[], capability=None,
                         prompt=[{"role": "user", "content": sentence(rng, rng.randint(4, 10))}],
                         completion=sentence(rng, rng.randint(1, 3)), options=None)
            for i in range(n)]


def multiple_choice(n: int, source: str, seed: int) -> list[dict]:
    """Generalist multiple-choice questions: 2-4 options of 1-3 words each (different token lengths)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        options = [sentence(rng, rng.randint(1, 3)) for _ in range(rng.randint(2, 4))]
        out.append(make_example(id=f"{source}/{i}", source=source, task=f"g{i % 3}", keywords=["logical reasoning"],
                                capability=None, prompt=[{"role": "user", "content": sentence(rng, rng.randint(4, 10))}],
                                completion=rng.choice(options), options=options))
    return out


def write_prepared(root: Path, *, n_train: int = 40, n_dev: int = 8, n_test: int = 12, n_generalist: int = 30,
                   n_probe: int = 10, generative_test: bool = False) -> Path:
    """prepared/ as the prepare stage writes it: specialist train/dev/test, a generalist pool and its probe."""
    out = root / "prepared"
    write_jsonl(out / "specialist" / "train.jsonl", classification(n_train, "spec", seed=1))
    write_jsonl(out / "specialist" / "dev.jsonl", classification(n_dev, "spec", seed=2, start=n_train))
    test = generative(n_test, "spec", seed=3) if generative_test else \
        classification(n_test, "spec", seed=3, start=n_train + n_dev)
    write_jsonl(out / "specialist" / "test.jsonl", test)
    pool = multiple_choice(n_generalist, "gen", seed=4) + generative(10, "genfree", seed=5, task="free")
    write_jsonl(out / "generalist.jsonl", pool)
    write_jsonl(out / "generalist_probe.jsonl", multiple_choice(n_probe, "probe", seed=6))
    write_json(out / "stats.json", {"splits": {"train": n_train, "dev": n_dev, "test": n_test}})
    return out


def make_mix(root: Path, specialist_size: int = 32, generalist_share: float = 0.2) -> dict:
    return mix.run(section("mix", specialist_size=specialist_size, generalist_share=generalist_share, seed=0),
                   root / "prepared", root / "mix")


def train_config(**overrides) -> TrainConfig:
    """Small and deterministic: fp32, a few steps of batch 4, frequent logs and checkpoints."""
    cfg = {"max_steps": 8, "batch_size": 4, "precision": "fp32", "logging_steps": 2, "save_steps": 4,
           "lora": {"r": 4, "alpha": 8}, "learning_rate": 1e-3, **overrides}
    return section("train", **cfg)


def write_stage_params(path: Path, model: Path, train: TrainConfig | None = None, **sections) -> Path:
    """params.yaml with the tiny model (absolute path) and the train/evaluate sections the tests use."""
    train = train or train_config()
    return write_params(path, model={"base": str(model)}, train=train.model_dump(), **sections)


def use_store(monkeypatch, root: Path) -> str:
    """Run in `root` with a private MLflow store there; -> its URI."""
    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(root)
    return uri


def runs(uri: str, task: str = TASK) -> list:
    """The runs of the task's experiment, oldest first."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(f"mixtune/{task}")
    assert exp is not None, f"no experiment mixtune/{task} in {uri}"
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
