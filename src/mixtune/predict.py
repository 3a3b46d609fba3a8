"""predict: answer the prompts of a JSONL file with a registered model, e.g. models:/mixtune-bbc_news@champion.

The model loads through MLflow (mlflow.pyfunc: the base model plus the adapter), as `mlflow models serve` loads
it. Each prompt, text or chat messages, gets the tokenizer's chat template with the generation prompt, exactly
as training saw it; the model answers greedily. One {"prediction": ...} per input row (its "id" kept), written
atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

from mixtune.errors import MixtuneError, first_line
from mixtune.files import write_jsonl
from mixtune.tracking import tracking_uri


def _check_prompt(prompt, where: str) -> None:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise MixtuneError(f"{where}: field 'prompt': empty")
        return
    if not isinstance(prompt, list) or not prompt:
        raise MixtuneError(f"{where}: field 'prompt': expected text or a non-empty list of chat messages")
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise MixtuneError(f"{where}: field 'prompt[{i}]': expected {{\"role\": text, \"content\": text}}")


def read_prompts(path: Path) -> list[dict]:
    if not path.is_file():
        raise MixtuneError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise MixtuneError(f"{path}:{n}: not valid JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise MixtuneError(f"{path}:{n}: expected a JSON object")
            if "prompt" not in row:
                raise MixtuneError(f"{path}:{n}: field 'prompt': missing")
            _check_prompt(row["prompt"], f"{path}:{n}")
            rows.append(row)
    if not rows:
        raise MixtuneError(f"{path}: no prompts")
    return rows


def chat_prompt(tokenizer, prompt: str | list[dict]) -> str:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def load(model_uri: str):
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except Exception as e:  # no such model or alias, an unreachable store, a missing base model
        raise MixtuneError(f"{model_uri}: cannot load model: {first_line(e)}") from None


def run(model_uri: str, input_path: Path, output: Path) -> int:
    rows = read_prompts(input_path)  # bad input fails before the model loads
    model = load(model_uri)
    tokenizer = model.get_raw_model().tokenizer  # the pipeline's: the one logged with the adapter
    answers = model.predict([chat_prompt(tokenizer, r["prompt"]) for r in rows])
    return write_jsonl(output, ({**({"id": r["id"]} if "id" in r else {}), "prediction": a.strip()}
                                for r, a in zip(rows, answers)))
