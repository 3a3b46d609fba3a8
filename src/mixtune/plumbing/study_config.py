"""The study's config: study/params.yaml's `study` section (the paper's experiment grid). Only the study's stages
import it, so an edit to it stales none of the main pipeline's stages."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from mixtune.plumbing.config import (
    SECTIONS,
    ModelConfig,
    PrepareConfig,
    ScoreConfig,
    Source,
    TrainConfig,
    _Section,
)

Capability = Literal["understanding", "reasoning", "knowledge"]


class StudyPrepareConfig(PrepareConfig):
    specialist: list[Source] = []  # each study target brings its own


class StudyTarget(_Section):
    """One target task of the study: its data, what it tests, and what is held out of the generalist pool."""

    source: Source  # a BIG-bench task (kind: bigbench, tasks: [...]) or the user's own file / hub dataset
    capability: Capability | None = None  # None: a task outside the capability comparison (e.g. BBC News)
    # Near relatives of the target, by task name (a name also holds out its subtasks); the target's own task is
    # always held out.
    hold_out: list[str] = []
    # Vary coverage: drop every pool task with one of these keywords (e.g. the target's own skill).
    pool_exclude_keywords: list[str] = []


class StudyConfig(_Section):
    """study/params.yaml: the paper's experiment grid (mixtune.study; README, "Should I add generalist data")."""

    preset: str
    note: str  # what the preset cuts to fit its budget; the report quotes it
    model: ModelConfig
    train: TrainConfig
    evaluate: ScoreConfig
    prepare: StudyPrepareConfig  # the generalist pool and the splits; each target brings its own source
    targets: dict[str, StudyTarget] = Field(min_length=1)
    sizes: list[Annotated[int, Field(gt=0)]] = Field(min_length=1)
    shares: list[Annotated[float, Field(ge=0, lt=1)]] = Field(min_length=2)  # must include 0, the specialist
    fixed_share: float = Field(gt=0, lt=1)  # "specialist + generalist at a fixed share": one of `shares`
    seeds: list[int] = Field(min_length=1)
    dev_examples: int = Field(gt=0)  # dev examples that choose the share (the search condition)
    test_examples: int = Field(gt=0)  # test examples every number of the report is measured on
    corrupt_generalist: list[Annotated[float, Field(gt=0, le=1)]]  # rates; 0 is the uncorrupted cell
    corrupt_targets: list[str]  # the targets the corruption rates run on (at every size, at the fixed share)

    @model_validator(mode="after")
    def _check(self) -> StudyConfig:
        if 0.0 not in self.shares:
            raise ValueError("shares must include 0.0 (the pure specialist)")
        if self.fixed_share not in self.shares:
            raise ValueError(f"fixed_share {self.fixed_share} must be one of shares {self.shares}")
        unknown = [t for t in self.corrupt_targets if t not in self.targets]
        if unknown:
            raise ValueError(f"corrupt_targets {unknown} are not targets ({sorted(self.targets)})")
        return self


SECTIONS["study"] = StudyConfig  # load_section("study", ...) validates with it
