"""study_cell: one cell of the study (a target at one size, share, seed and corruption rate), measured on the
trial core (mixtune.core.trial): mix, tune or take the stored adapter, score on the dev and test subsets. Its
result is kept in .cache/study/cells/<key>.json as soon as it is measured; the key hashes everything that
determines it, this module's code and all it imports included.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from mixtune.core import metrics as M
from mixtune.core.model import release_memory
from mixtune.plumbing import lineage
from mixtune.plumbing.config import MixConfig
from mixtune.plumbing.errors import MixtuneError
from mixtune.plumbing.files import atomic_file, read_jsonl, sha256_file
from mixtune.plumbing.study_config import StudyConfig


class Cells:
    """What every cell of one target needs, loaded once: the base model's tokenizer, dev and test subsets."""

    def __init__(self, cfg: StudyConfig, target: str, prepared: Path):
        from mixtune.core.model import load_tokenizer, resolve_base, train_precision

        self.cfg, self.target, self.prepared = cfg, target, prepared
        self.base = resolve_base(cfg.model.base)
        self.tokenizer = load_tokenizer(self.base)
        self.prec = train_precision(cfg.train.precision)
        spec = prepared / "specialist"
        self.dev = read_jsonl(spec / "dev.jsonl")[: cfg.dev_examples]
        self.test = read_jsonl(spec / "test.jsonl")[: cfg.test_examples]
        if not self.dev or not self.test:
            raise MixtuneError(f"{spec}: the study needs dev and test examples (prepare.dev_fraction, test_fraction)")
        files = [spec / "train.jsonl", spec / "dev.jsonl", spec / "test.jsonl", prepared / "generalist.jsonl"]
        # Everything a cell's numbers depend on besides the cell itself, the code that computes it included.
        self.definition = {"model": cfg.model.model_dump(), "train": cfg.train.model_dump(),
                           "evaluate": cfg.evaluate.model_dump(include={"batch_size", "max_new_tokens"}),
                           "dev_examples": cfg.dev_examples, "test_examples": cfg.test_examples,
                           "data": [sha256_file(f)[:16] for f in files],
                           "code": lineage.fingerprint(["mixtune.stages.study_cell"])[:16]}

    def key(self, cell: dict) -> str:
        blob = json.dumps({**self.definition, **cell}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def score(self, model) -> dict:
        from mixtune.core.score import correct

        out = {}
        for split, examples in (("dev", self.dev), ("test", self.test)):
            c = correct(model, self.tokenizer, examples, self.cfg.evaluate)
            out[split] = {"score": float(np.mean(c)), "correct": M.to_bits(c)}
        return out

    def run(self, cell: dict, cache: Path) -> dict:
        """The cell's result, measured now or read back from the cache."""
        path = cache / f"{self.key(cell)}.json"
        if path.is_file():
            return {**json.loads(path.read_text()), "cached": True}
        import mlflow

        t = time.perf_counter()
        with mlflow.start_run(run_name=cell_name(cell), nested=True,
                              tags={"mixtune.stage": "study-cell", "mixtune.target": self.target}) as run:
            mlflow.log_params(cell)
            result = self._base() if cell.get("base") else self._tuned(cell)
            release_memory()  # the cell's model, in a reference cycle: not beside the next cell's (as search.py)
            result.update(cell, seconds=time.perf_counter() - t, run_id=run.info.run_id)
            mlflow.log_metrics({f"{s}.score": result[s]["score"] for s in ("dev", "test")}
                               | {"trained_tokens": result.get("trained_tokens", 0), "seconds": result["seconds"]})
        with atomic_file(path) as f:
            json.dump(result, f)
        return {**result, "cached": False}

    def _base(self) -> dict:
        from mixtune.core.model import load_base

        return self.score(load_base(self.base))

    def _tuned(self, cell: dict) -> dict:
        """Mix, tune and score one cell on the trial core (mixtune.core.trial): an adapter a search trial, the
        train stage or another cell trained from the same mix, config and code is taken from its cache, and
        one trained here is stored there."""
        from mixtune.core import trial, tune
        from mixtune.core.model import load_adapter, load_base
        from mixtune.stages import mix

        train_cfg = self.cfg.train.model_copy(update={"seed": cell["seed"]})
        with tempfile.TemporaryDirectory(prefix="mixtune-cell-") as tmp:
            manifest = mix.run(MixConfig(specialist_size=cell["size"], generalist_share=cell["share"],
                                         seed=cell["seed"], corrupt_generalist=cell["corrupt"]),
                               self.prepared, Path(tmp) / "mix")
            k = trial.key(train_cfg, self.cfg.model, manifest["sha256"], self.prec)
            if (hit := trial.cached(k)) is not None:
                metrics = json.loads((hit / "metrics.json").read_text())
                print(f"study: {self.target} {cell_name(cell)}: the adapter of "
                      f"{json.loads((hit / 'meta.json').read_text())['by']} (same mix, config and code)")
                scores = self.score(load_adapter(load_base(self.base), hit / "adapter"))
            else:
                import mlflow

                # A cell is short: no checkpoints, an interrupted one is simply run again.
                log_rows: list[dict] = []
                trainer = tune.tuner(train_cfg, self.base, read_jsonl(Path(tmp) / "mix" / "train.jsonl"),
                                     Path(tmp) / "checkpoints", self.prec, self.tokenizer, log_rows=log_rows)
                try:
                    result = trainer.train()
                except MixtuneError as e:
                    raise MixtuneError(f"study: {self.target} {cell_name(cell)}: {e}") from None
                metrics = trial.tracked(trainer, result.training_loss, log_rows)
                trial.store(k, trainer.model, self.tokenizer, metrics, log_rows,
                            {"by": f"study cell {self.target} {cell_name(cell)}", "mix_sha256": manifest["sha256"],
                             "run_id": mlflow.active_run().info.run_id})
                with tune.scoring(trainer.model) as model:
                    scores = self.score(model)
            return {**scores, "trained_tokens": metrics["trained_tokens"], "mix_sha256": manifest["sha256"],
                    "generalist_size": manifest["generalist_size"], "corrupted": manifest["corrupted"],
                    "train_loss": metrics["train_loss"], "adapter_key": k}


def cell_name(cell: dict) -> str:
    if cell.get("base"):
        return "base model"
    name = f"n={cell['size']} seed={cell['seed']} share={cell['share']:g}"
    return name + (f" corrupt={cell['corrupt']:g}" if cell["corrupt"] else "")
