"""One typed config that mirrors params.yaml. Each stage takes only its own section.

Validation errors become one line naming the file and the key: `params.yaml: mix.generalist_share: ...`.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from mixtune.plumbing.errors import MixtuneError


class _Section(BaseModel):
    # Unknown keys are typos; say so instead of ignoring them.
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- sources ------------------------------------------------------------------------------------------------

Format = Literal["alpaca", "messages", "prompt_completion", "classification"]
# The schema fields of each format, the keys its `columns` may map to a file's columns.
COLUMNS: dict[str, tuple[str, ...]] = {"alpaca": ("instruction", "input", "output"), "messages": ("messages",),
                                       "prompt_completion": ("prompt", "completion"),
                                       "classification": ("text", "label")}


class _SourceBase(_Section):
    name: str = Field(min_length=1)
    task: str | None = None  # defaults to `name`; several sources may share one task
    keywords: list[str] = []  # BIG-bench style skill keywords; capability is derived from them
    capability: list[Literal["understanding", "reasoning", "knowledge"]] = []

    @property
    def task_name(self) -> str:
        return self.task or self.name


class _RecordSource(_SourceBase):
    format: Format
    # schema field -> column in the file, e.g. {"instruction": "question", "output": "answer"}
    columns: dict[str, str] = {}
    # classification only: the prompt's instruction, the allowed labels, and a cap on input length
    instruction: str = "Classify the following text."
    labels: list[str] | None = None
    max_input_words: int | None = Field(default=None, gt=0)
    system: str | None = None
    # The data's own splits, kept as they are (prepare splits only what has none). `splits`: the other parts of
    # the source, each a file (file source) or a hub split such as `validation` (hf source), beside `path` or
    # `split`; `split_column`: a column holding each record's split (train; dev or validation; test).
    splits: dict[Literal["dev", "test"], str] = {}
    split_column: str | None = None

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, columns: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        allowed = COLUMNS.get(info.data.get("format"), ())
        unknown = [k for k in columns if k not in allowed]
        if allowed and unknown:  # a typo (`txt:` for `text:`) would leave the field on its default column
            raise PydanticCustomError(
                "unknown_column", "unknown key {key} (the {format} format's columns: {allowed})",
                {"key": repr(unknown[0]), "format": info.data["format"], "allowed": ", ".join(allowed)})
        return columns


class FileSource(_RecordSource):
    kind: Literal["file"]
    path: str
    file_format: Literal["jsonl", "json", "csv", "parquet"] | None = None  # default: from the extension


class HFSource(_RecordSource):
    kind: Literal["hf"]
    dataset: str  # a hub id, or a builder name such as "json"/"parquet" with data_files
    config: str | None = None
    split: str = "train"
    data_files: str | list[str] | dict[str, str | list[str]] | None = None  # a dict: files per hub split
    revision: str | None = None
    where: dict[str, str] = {}  # keep only the rows whose columns equal these values


class _TaskArchive(_SourceBase):  # a collection of tasks in one archive, read in place, never installed
    path: str
    tasks: list[str] = []  # keep only these tasks (a name also selects the tasks under it); empty = all
    exclude_tasks: list[str] = []
    max_per_task: int = Field(default=100, gt=0)  # so no task dominates the pool

    def selects(self, task: str) -> bool:
        def named(names: list[str]) -> bool:
            return any(task == n or task.startswith(n + "/") for n in names)
        return (not self.tasks or named(self.tasks)) and not named(self.exclude_tasks)

    def sample(self, n: int, seed: int, task: str) -> list[int]:
        """The indices of a task's examples kept: all, or a sample of max_per_task seeded per task (so it does
        not depend on the archive's order), in their order."""
        if n <= self.max_per_task:
            return list(range(n))
        return sorted(random.Random(f"{seed}:{task}").sample(range(n), self.max_per_task))


class BigbenchSource(_TaskArchive):
    kind: Literal["bigbench"]  # a BIG-bench sdist or repository tarball
    include_keywords: list[str] = []  # keep tasks with any of these keywords; empty = all
    exclude_keywords: list[str] = []


class EvalsSource(_TaskArchive):
    kind: Literal["evals"]  # the `evals` wheel: the OpenAI Evals registry, its samples files the tasks


Source = Annotated[FileSource | HFSource | BigbenchSource | EvalsSource, Field(discriminator="kind")]


# --- stages -------------------------------------------------------------------------------------------------


class PrepareConfig(_Section):
    seed: int
    dev_fraction: float = Field(ge=0, lt=1)
    test_fraction: float = Field(gt=0, lt=1)
    decontaminate_ngram: int = Field(gt=0)  # words; 13 as in GPT-3's contamination study
    # Generalist examples longer than this (prompt + answer, in characters; ~4 per token) are left out of the
    # pool: truncated to train.max_length they would lose their answer and cost compute for no loss.
    generalist_max_chars: int = Field(gt=0)
    # A specialist example over train.max_length tokens would lose its answer to truncation and be dropped by
    # training: `error` stops with what to change; `truncate_input` cuts the input to fit, never the answer.
    too_long: Literal["error", "truncate_input"]
    min_eval_examples: int = Field(ge=0)  # a dev or test split smaller than this measures nothing: an error
    max_record_chars: int = Field(gt=0)  # a record larger than this (its input and answer) is an error
    # A file or BIG-bench source outside the data DVC versions (data/, a path a .dvc file or a dvc.yaml stage
    # tracks) is an error; true reads it anyway, and the card and the MLflow run say "not versioned".
    allow_unversioned: bool
    # Multiple-choice generalist questions set aside from the pool, never mixed in: every search trial and the
    # evaluate stage score them to measure forgetting (the same questions every time).
    generalist_probe: int = Field(ge=0)
    specialist: list[Source] = Field(min_length=1)
    generalist: list[Source]

    @model_validator(mode="after")
    def _check(self) -> PrepareConfig:
        if self.dev_fraction + self.test_fraction >= 1:
            raise ValueError("dev_fraction + test_fraction must be < 1")
        names = [s.name for s in [*self.specialist, *self.generalist]]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        if any(s.kind == "evals" for s in self.specialist):  # its tasks have no request format to serve
            raise ValueError("an evals source is a generalist pool only, not a specialist task")
        return self


class MixConfig(_Section):
    specialist_size: int = Field(gt=0)
    # Fraction of the FINAL training set drawn from the generalist pool (see README, "the ratio").
    generalist_share: Annotated[float, Field(ge=0, lt=1)] | Literal["auto"]  # auto: the search's recommendation
    seed: int
    # Fraction of the drawn generalist examples whose answer is replaced by a wrong one (another answer of the
    # same task): hallucinated generalist data, as a knob the study turns (claim 3).
    corrupt_generalist: float = Field(ge=0, le=1)


class ModelConfig(_Section):
    base: str = Field(min_length=1)  # a local folder (relative to the repo) or a hub id, for users with the hub


class LoraConfig(_Section):
    r: int = Field(gt=0)
    alpha: int = Field(gt=0)
    dropout: float = Field(ge=0, lt=1)  # > 0 costs ~30% of a CPU step (a copy per module)
    target_modules: str | list[str]


class TrainConfig(_Section):
    lora: LoraConfig
    learning_rate: float = Field(gt=0)
    lr_scheduler: str
    warmup_ratio: float = Field(ge=0, lt=1)
    epochs: float = Field(gt=0)
    max_steps: int  # > 0 overrides epochs
    batch_size: int = Field(gt=0)
    grad_accum: int = Field(gt=0)
    micro_tokens: int = Field(gt=0)  # padded tokens per forward/backward pass within a step: memory, not the result
    max_length: int = Field(gt=8)
    # Packing concatenates examples into one row; with SDPA that row's block mask costs attention quadratic in
    # the row's length (~4x slower on a CPU here). Worth it on a GPU with FlashAttention varlen kernels.
    packing: bool
    group_by_length: bool  # batches of similar length: less padding when generalist data is mixed in
    precision: Literal["auto", "bf16", "fp16", "fp32"]  # auto: bf16 where the hardware has it
    logging_steps: int = Field(gt=0)
    save_steps: int = Field(gt=0)  # checkpoints, so an interrupted run resumes
    seed: int


class ScoreConfig(_Section):
    """How an adapter is scored: what the search's trials, the study's cells and evaluate share."""

    batch_size: int = Field(gt=0)
    max_new_tokens: int = Field(gt=0)  # generative tasks
    bootstrap: int = Field(ge=100)  # resamples for the 95% interval


class EvaluateConfig(ScoreConfig):
    split: Literal["test", "dev"]
    max_examples: int | None = Field(gt=0)
    seed: int


class SearchConfig(_Section):
    n_trials: int = Field(gt=0)  # trials wanted in all, per size; a re-run runs only the missing ones
    # The first trials: `grid` shares evenly spaced over [0, max_share] (0 is the pure specialist); the trials
    # after them (up to n_trials) are proposed by a Gaussian process fitted to the curve so far.
    grid: int = Field(gt=0)
    # The task's own metric (score.py): auto = macro_f1 (classification), accuracy (multiple choice), rouge_l
    # (generation); a scenario of several tasks is scored by the mean of its tasks'.
    metric: Literal["auto", "accuracy", "macro_f1", "exact_match", "token_f1", "rouge_l"]
    # Which share of the near-optimal range (within noise of the best) to recommend.
    recommend: Literal["fewest_tokens", "least_forgetting"]
    # Recommend only shares that lose at most this much held-out generalist accuracy against the base model
    # (null: any); the answer names the smallest share within it.
    max_forgetting: float | None = Field(ge=0, le=1)
    timeout: float | None = Field(gt=0)  # seconds; no new trial starts after it
    max_share: float = Field(gt=0, lt=1)  # generalist_share is searched in [0, max_share]
    seed: int
    # None: a file-backed search in the repository (search/optuna.journal). A database URL, e.g.
    # postgresql://user@host/db: one search that `mixtune search --worker` processes on several machines share.
    storage: str | None = Field(pattern=r"^[a-z][a-z0-9+]*://")
    sizes: list[Annotated[int, Field(gt=0)]] | None = Field(min_length=1)  # None: [mix.specialist_size]

    @model_validator(mode="after")
    def _check(self) -> SearchConfig:
        if self.n_trials < self.grid:
            raise ValueError(f"n_trials ({self.n_trials}) must be at least grid ({self.grid}): the grid spans the "
                             "range, and a cut grid would leave its top untried")
        return self


class RegisterConfig(_Section):
    name: str | None = Field(min_length=1)  # null: mixtune-<specialist tasks joined by +>
    min_gain: float = Field(ge=0)  # champion moves only if the test score beats it by more than this
    require_interval: bool  # ...and, if set, the paired 95% interval of the gain lies above 0


# params.yaml's sections, each validated on its own; mixtune.plumbing.study_config adds study/params.yaml's
# `study`, so that only the study's stages depend on its schema.
SECTIONS: dict[str, type[_Section]] = {
    "prepare": PrepareConfig, "mix": MixConfig, "model": ModelConfig, "train": TrainConfig,
    "evaluate": EvaluateConfig, "search": SearchConfig, "register": RegisterConfig}


_KINDS = ("file", "hf", "bigbench", "evals")  # the tags pydantic puts in an error's loc for the Source union


def _format_error(path: Path, section: str, err: ValidationError) -> str:
    e = err.errors()[0]
    parts = [section, *(p for p in e["loc"] if not str(p).startswith("function-after"))]
    # Drop the union tag pydantic inserts after a list index: `specialist.0.format`, not `specialist.0.file.format`.
    parts = [p for i, p in enumerate(parts) if not (p in _KINDS and i and isinstance(parts[i - 1], int))]
    msg, got = e["msg"], e.get("input")
    got = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
    if e["type"] in ("union_tag_invalid", "union_tag_not_found"):  # name the field: `...0.kind`
        parts.append("kind")
        expected = ", ".join(_KINDS)
        tag = (e.get("ctx") or {}).get("tag")
        msg, got = (f"unknown source kind (expected one of {expected})", f" (got {tag!r})") if tag is not None \
            else (f"missing (one of {expected})", "")
    loc = ".".join(str(p) for p in parts)
    return f"{path}: {loc}: {msg}{got}"


@functools.cache
def _subset(section: str, keys: tuple[str, ...]) -> type[_Section]:
    """A config class with only `keys` of a section's fields, validated as in the full class."""
    cls = SECTIONS[section]
    unknown = [k for k in keys if k not in cls.model_fields]
    if unknown:
        raise ValueError(f"{section}: no such keys {unknown}")  # a programming error, not the user's
    fields = {k: (cls.model_fields[k].annotation, cls.model_fields[k]) for k in keys}
    return create_model(f"{cls.__name__}[{','.join(keys)}]", __base__=_Section, **fields)


def load_section(section: str, path: str | Path = "params.yaml", keys: tuple[str, ...] | None = None):
    """Validate and return one section of a params file: a stage never depends on another stage's keys.

    `keys`: the stage reads only these keys of the section (dvc.yaml declares them, `section.key`); the object
    returned has no others, so reading an undeclared key fails at once instead of going unnoticed by DVC."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MixtuneError(f"{path}: no such file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise MixtuneError(f"{path}{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise MixtuneError(f"{path}: expected a mapping of sections")
    if section not in raw:
        raise MixtuneError(f"{path}: {section}: missing section")
    values = raw[section]
    cls = SECTIONS[section]
    if keys is not None:
        cls = _subset(section, tuple(keys))
        if isinstance(values, dict):
            values = {k: v for k, v in values.items() if k in keys}
    try:
        return cls.model_validate(values)
    except ValidationError as e:
        raise MixtuneError(_format_error(path, section, e)) from None
