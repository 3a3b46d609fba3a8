"""predict: answer a file of raw task records with a registered model, e.g. models:/mixtune-bbc_news@champion.

The input is a file like the task's source (jsonl, json, csv or parquet; its own column names, as the source's
`columns` maps them; `task` for a model of several tasks; an `id` column is kept). The model is the pyfunc
register logged (serve.py): each record is prompted as prepare prompted the training data and answered as
evaluate scored the test split. Every record is checked against the model's recipe before the model loads;
one JSON line per record, {"id"?, "task", "prediction", "probabilities"}, written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

from mixtune.core import readers
from mixtune.plumbing.errors import MixtuneError, first_line
from mixtune.plumbing.files import write_jsonl
from mixtune.plumbing.tracking import tracking_uri


def download(model_uri: str) -> Path:
    """The model's files (the adapter and recipe, not the base model), from the registry or a run."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    except Exception as e:  # no such model or alias, an unreachable store
        raise MixtuneError(f"{model_uri}: cannot load model: {first_line(e)}") from None


def recipe_of(model_dir: Path, model_uri: str) -> dict:
    path = model_dir / "artifacts" / "recipe.json"
    if not path.is_file():
        raise MixtuneError(f"{model_uri}: not a mixtune task model (no recipe); register it with `mixtune register`")
    return json.loads(path.read_text())


def run(model_uri: str, input_path: Path, output: Path, file_format: str | None = None) -> int:
    import pandas as pd

    from mixtune.core.serve import Requests

    if output.is_dir():
        raise MixtuneError(f"{output}: --output: is a directory; name the file to write, e.g. "
                           f"{output / 'predictions.jsonl'}")
    records = list(readers.file_records(input_path, str(input_path), file_format, "--input"))
    if not records:
        raise MixtuneError(f"{input_path}: no records")
    model_dir = download(model_uri)
    where = [w for w, _ in records]
    rows = [r for _, r in records]
    Requests(recipe_of(model_dir, model_uri))(rows, lambda i: where[i])  # bad records fail before the model loads

    import mlflow

    try:
        model = mlflow.pyfunc.load_model(str(model_dir))
    except Exception as e:  # a missing base model, an adapter that does not fit it
        raise MixtuneError(f"{model_uri}: cannot load model: {first_line(e)}") from None
    answers = model.predict(pd.DataFrame(rows))
    try:  # atomic: on an error the temp file beside it is removed and nothing is written
        return write_jsonl(output, ({**({"id": r["id"]} if "id" in r else {}), **a} for r, a in zip(rows, answers)))
    except OSError as e:  # a directory made meanwhile, no permission, a full disk
        raise MixtuneError(f"{output}: --output: cannot write: {e.strerror or first_line(e)}") from None
