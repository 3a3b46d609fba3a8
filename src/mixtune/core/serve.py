"""The registered model: the task's raw input in, the answer evaluate scored out, wherever it is called
(`mlflow.pyfunc.load_model`, `mixtune predict`, `mlflow models serve`).

An MLflow pyfunc that carries the adapter, the base model's reference (a local folder or a hub id) and the
task's prompt recipe (prepared/specialist/recipe.json: how prepare built each task's prompt from a raw record).
Its input is a table of the source's own input columns, as the user's data has them:

    classification     text                 alpaca     instruction, input (optional)
    prompt_completion  prompt               messages   messages (the conversation, ending with the turn to answer)
    BIG-bench task     input, options (optional: without them, a generative task)

and `task` when the model serves a scenario of several tasks. Each row's prompt is built by the function
prepare built the training and test prompts with (sources.prompter), and answered by the function evaluate
scored with (score.answer): for classification and multiple choice the option with the highest likelihood,
with every option's probability (the options' likelihoods, normalized over the options); for generation the
greedy text. Output, one per row: {"task", "prediction", "probabilities"} (probabilities null for generation).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from types import SimpleNamespace

import mlflow

from mixtune.core import readers, score, sources
from mixtune.plumbing.errors import MixtuneError
from mixtune.plumbing.files import write_json

ARTIFACT = "model"  # the logged model's name in its run


class Requests:
    """Request rows -> examples (task, prompt, options) as prepare builds them; a bad row is a one-line error
    naming the row and the field."""

    def __init__(self, recipe: dict, tokenizer=None) -> None:
        """`tokenizer`: the served model's, to cut inputs to the recipe's token budget as prepare did
        (prepare.too_long: truncate_input); without it (checking a file before the model loads) nothing is cut."""
        from mixtune.core.model import chat_tokens

        def prompt_tokens(prompt: list[dict]) -> int:
            return chat_tokens(tokenizer, [prompt], add_generation_prompt=True)[0]

        self.tasks = recipe["tasks"]
        self.build = {task: sources.prompter(entry, prompt_tokens if tokenizer else None)
                      for task, entry in self.tasks.items()}

    def __call__(self, rows: list, where) -> list[dict]:
        examples = []
        for i, row in enumerate(rows):
            at = where(i)
            if not isinstance(row, dict):
                raise MixtuneError(f"{at}: expected an object with fields, got {type(row).__name__}")
            row = {k: _plain(v) for k, v in row.items() if not _missing(v)}
            readers.check_surrogates(at, row)  # a lone "\ud83d" (JSON allows it): no tokenizer can encode it
            task = row.get("task", next(iter(self.tasks)) if len(self.tasks) == 1 else None)
            if task not in self.tasks:
                state = "missing" if task is None else f"{task!r} is not a task of this model"
                raise MixtuneError(f"{at}: field 'task': {state} (one of {', '.join(sorted(self.tasks))})")
            prompt, options = self.build[task](row, at)
            examples.append({"task": task, "prompt": prompt, "options": options})
        return examples


def _missing(value) -> bool:  # a column a table row leaves empty: None, or pandas' NaN
    return value is None or (isinstance(value, float) and math.isnan(value))


def _plain(value):
    """numpy arrays (pandas' list cells) -> lists, recursively; the prompt builders take JSON values."""
    if hasattr(value, "tolist") and not isinstance(value, str):
        value = value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def answers(examples: list[dict], preds: list[str], scores: list) -> list[dict]:
    """One output per example, from score.answer's answers and options' log-likelihoods (None: generated)."""
    return [{"task": ex["task"], "prediction": pred,
             "probabilities": None if s is None else _probabilities(ex["options"], s)}
            for ex, pred, s in zip(examples, preds, scores)]


def _probabilities(options: list[str], loglik: list[float]) -> dict[str, float]:
    """The options' likelihoods normalized over the options (a softmax, shifted by the largest: no overflow)."""
    top = max(loglik)
    weights = [math.exp(x - top) for x in loglik]
    total = sum(weights)
    return {o: w / total for o, w in zip(options, weights)}


class TaskModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from mixtune.core.model import load_adapter, load_base, load_tokenizer

        self.recipe = json.loads(Path(context.artifacts["recipe"]).read_text())
        base = self.recipe["base"]
        self.tokenizer = load_tokenizer(base)
        self.requests = Requests(self.recipe, self.tokenizer)
        self.model = load_adapter(load_base(base), Path(context.artifacts["adapter"])).eval()
        self.cfg = SimpleNamespace(**self.recipe["score"])

    def predict(self, context, model_input, params=None) -> list[dict]:
        rows = model_input.to_dict(orient="records") if hasattr(model_input, "to_dict") else list(model_input)
        examples = self.requests(rows, lambda i: f"row {i + 1}")
        preds, scores = score.answer(self.model, self.tokenizer, examples, self.cfg)
        return answers(examples, preds, scores)


def signature(recipe: dict):
    """Inputs: every task's source columns (required where the only task requires them), and `task`."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Map, Object, Property, Schema

    types = {"string": DataType.string, "strings": Array(DataType.string),
             "messages": Array(Object([Property("role", DataType.string), Property("content", DataType.string)]))}
    tasks, cols = recipe["tasks"], {}
    for entry in tasks.values():
        for col, kind, required in sources.request_fields(entry):
            cols[col] = (kind, required and len(tasks) == 1)
    inputs = [ColSpec(types[kind], col, required=req) for col, (kind, req) in cols.items()]
    inputs.append(ColSpec(DataType.string, "task", required=len(tasks) > 1))
    outputs = [ColSpec(DataType.string, "task"), ColSpec(DataType.string, "prediction"),
               ColSpec(Map(DataType.double), "probabilities", required=False)]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


def input_example(recipe: dict):
    """One raw record per task (the source's first), as the user's data holds it."""
    import pandas as pd

    tasks = recipe["tasks"]
    return pd.DataFrame([{**entry["example"], **({"task": task} if len(tasks) > 1 else {})}
                         for task, entry in tasks.items()])


def log_model(adapter: Path, recipe: dict):
    """Log the pyfunc in the active run; MLflow checks that its input example loads and answers."""
    import peft
    import pydantic
    import torch
    import transformers
    import yaml

    reqs = [f"transformers=={transformers.__version__}", f"peft=={peft.__version__}",
            f"torch=={torch.__version__.split('+')[0]}", f"pydantic=={pydantic.__version__}",
            f"pyyaml=={yaml.__version__}", "accelerate", "numpy", "pandas"]
    with tempfile.TemporaryDirectory() as tmp:
        write_json(Path(tmp) / "recipe.json", recipe)
        return mlflow.pyfunc.log_model(
            name=ARTIFACT, python_model=TaskModel(), artifacts={"adapter": str(adapter), "recipe": f"{tmp}/recipe.json"},
            signature=signature(recipe), input_example=input_example(recipe), pip_requirements=reqs,
            # the model carries the package (src/mixtune, all of it) it was evaluated with
            code_paths=[str(Path(__file__).resolve().parents[1])])
