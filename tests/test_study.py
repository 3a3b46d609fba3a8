"""The study: the corruption knob, the mixing-law fit, the study machinery on a tiny model and a tiny grid, and
the report, whose every number must come from the study's own results."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, merged, sentence
from workspace import use_store

from mixtune.core import metrics as M
from mixtune.core.schema import make_example
from mixtune.plumbing.config import MixConfig, load_section
from mixtune.plumbing.files import read_jsonl, write_json, write_jsonl
from mixtune.stages import mix

# --- the corruption knob ------------------------------------------------------------------------------------


def _pool(root: Path) -> Path:
    """prepared/: 40 specialist examples; a pool of 30 multiple-choice (3 tasks) and 30 generative examples
    (3 tasks, 10 distinct answers each)."""
    rng = random.Random(5)
    spec = [make_example(id=f"s/{i}", source="s", task="t", keywords=[], capability=None,
                         prompt=[{"role": "user", "content": sentence(rng, 6)}], completion="a", options=["a", "b"])
            for i in range(40)]
    gen = [make_example(id=f"mc/{i}", source="g", task=f"mc{i % 3}", keywords=[], capability=None,
                        prompt=[{"role": "user", "content": sentence(rng, 6)}], completion="yes",
                        options=["yes", "no", "maybe"]) for i in range(30)]
    gen += [make_example(id=f"free/{i}", source="g", task=f"free{i % 3}", keywords=[], capability=None,
                         prompt=[{"role": "user", "content": sentence(rng, 6)}], completion=sentence(rng, 2),
                         options=None) for i in range(30)]
    write_jsonl(root / "prepared" / "specialist" / "train.jsonl", spec)
    write_jsonl(root / "prepared" / "generalist.jsonl", gen)
    return root / "prepared"


@pytest.mark.parametrize("rate, expected", [(0.0, 0), (0.25, 10), (0.5, 20), (1.0, 40)])
def test_corruption_changes_exactly_the_requested_fraction(tmp_path, rate, expected):
    prepared = _pool(tmp_path)
    pool = {ex["id"]: ex for ex in read_jsonl(prepared / "generalist.jsonl")}
    # 40 specialist at share 0.5: 40 generalist examples drawn, round(rate * 40) of them corrupted.
    m = mix.run(MixConfig(specialist_size=40, generalist_share=0.5, seed=3, corrupt_generalist=rate), prepared,
                tmp_path / "mix")
    drawn = [ex for ex in read_jsonl(tmp_path / "mix" / "train.jsonl") if ex["source"] == "g"]
    changed = [ex for ex in drawn if ex["completion"] != pool[ex["id"]]["completion"]]
    assert (m["generalist_size"], m["corrupted"], len(changed)) == (40, expected, expected)
    answers = {t: {ex["completion"] for ex in pool.values() if ex["task"] == t} for t in {e["task"] for e in drawn}}
    for ex in changed:  # a wrong answer of the same task: another option, else another answer of the task
        assert ex["completion"] in (ex["options"] or answers[ex["task"]])
        assert {k: v for k, v in ex.items() if k != "completion"} == \
               {k: v for k, v in pool[ex["id"]].items() if k != "completion"}
    spec = [ex for ex in read_jsonl(tmp_path / "mix" / "train.jsonl") if ex["source"] == "s"]
    assert len(spec) == 40 and all(ex["completion"] == "a" for ex in spec)


def test_corruption_is_seeded_and_zero_is_byte_identical(tmp_path):
    prepared = _pool(tmp_path)

    def run(rate, seed, name):
        mix.run(MixConfig(specialist_size=20, generalist_share=0.5, seed=seed, corrupt_generalist=rate),
                prepared, tmp_path / name)
        return (tmp_path / name / "train.jsonl").read_bytes()

    assert run(0.5, 1, "a") == run(0.5, 1, "b") != run(0.5, 2, "c")
    clean = mix.run(MixConfig(specialist_size=20, generalist_share=0.5, seed=1, corrupt_generalist=0.0), prepared, tmp_path / "d")
    assert clean["corrupted"] == 0 and run(0.0, 1, "e") == (tmp_path / "d" / "train.jsonl").read_bytes()


def test_corruption_counts_only_examples_that_have_another_answer(tmp_path, cli):
    rng = random.Random(1)

    def example(i, task, answer):
        return make_example(id=f"g/{i}", source="g", task=task, keywords=[], capability=None,
                            prompt=[{"role": "user", "content": sentence(rng, 5)}], completion=answer, options=None)

    # Task "same" answers 42 every time: nothing wrong to give it. Task "var" has 10 different answers.
    _pool(tmp_path)
    write_jsonl(tmp_path / "prepared" / "generalist.jsonl",
                [example(i, "same", "42") for i in range(10)] + [example(10 + i, "var", str(i)) for i in range(10)])
    m = mix.run(MixConfig(specialist_size=20, generalist_share=0.5, seed=0, corrupt_generalist=0.5), tmp_path / "prepared",
                tmp_path / "mix")
    assert (m["generalist_size"], m["corrupted"]) == (20, 5)  # half of the 10 that can be corrupted
    write_jsonl(tmp_path / "prepared" / "generalist.jsonl", [example(i, "same", "42") for i in range(10)])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"mix": {"specialist_size": 10, "generalist_share": 0.5, "seed": 0, "corrupt_generalist": 1.0}}))
    rc, _, err = cli("--params", tmp_path / "params.yaml", "mix", "--prepared", tmp_path / "prepared",
                     "--out", tmp_path / "mix2")
    assert rc == 1 and not (tmp_path / "mix2").exists()
    assert err.strip().splitlines() == [f"mixtune mix: error: {tmp_path / 'prepared' / 'generalist.jsonl'}: "
                                        "mix.corrupt_generalist=1.0: none of the 10 drawn generalist examples has "
                                        "another answer in its task to put in its place"]


# --- the mixing law -----------------------------------------------------------------------------------------


def _synthetic(curve, shares, seeds=3, n=600, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([(rng.random((seeds, n)) < curve(r)).astype(float) for r in shares])


def test_fit_recovers_a_known_interior_optimum():
    shares = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    fit = M.fit_share(shares, _synthetic(lambda r: 0.5 + 0.6 * r - 1.0 * r * r, shares), 0.5, 300, 0)
    assert abs(fit["share"] - 0.3) < 0.03  # the true optimum: 0.6 / (2 * 1.0)
    assert fit["share_low"] <= 0.3 <= fit["share_high"]
    assert fit["value_low"] <= 0.59 <= fit["value_high"]  # the true best score 0.5 + 0.09


def test_fit_puts_a_monotone_curve_at_its_end_and_needs_three_shares():
    rising = M.fit_share([0.0, 0.25, 0.5], _synthetic(lambda r: 0.4 + 0.4 * r, [0.0, 0.25, 0.5]), 0.5, 200, 0)
    falling = M.fit_share([0.0, 0.25, 0.5], _synthetic(lambda r: 0.8 - 0.4 * r, [0.0, 0.25, 0.5]), 0.5, 200, 0)
    assert rising["share"] == 0.5 and falling["share"] == 0.0
    assert M.fit_share([0.0, 0.5], _synthetic(lambda r: 0.5, [0.0, 0.5]), 0.5, 100, 0) is None


def test_two_way_resamples_are_paired():
    scores = _synthetic(lambda r: 0.5, [0.0, 0.0], seed=4)
    scores[1] = scores[0]  # two identical conditions: every resampled difference is exactly 0
    boot = M.resample_means(scores, 50, 0)
    assert boot.shape == (50, 2) and np.array_equal(boot[:, 0], boot[:, 1])


# --- the study on a tiny model ------------------------------------------------------------------------------


def _study_params(tiny_model: Path, **over) -> dict:
    src = {"name": "a", "kind": "file", "path": "a.jsonl", "format": "classification",
           "columns": {"text": "text", "label": "label"}, "labels": ["a", "b", "c"],
           "instruction": "Which class? Answer with one of: a, b, c.", "keywords": ["logical reasoning"]}
    study = {
        "preset": "tiny", "note": "a tiny grid",
        "model": {"base": str(tiny_model)},
        "train": {"lora": {"r": 4, "alpha": 8}, "max_steps": 2, "batch_size": 4, "precision": "fp32",
                  "max_length": 256, "learning_rate": 1e-3, "group_by_length": False},
        "evaluate": {"batch_size": 8, "bootstrap": 100},
        "prepare": {"dev_fraction": 0.2, "test_fraction": 0.2, "min_eval_examples": 0, "generalist": [
            {"name": "related", "kind": "file", "path": "related.jsonl", "format": "alpaca",
             "keywords": ["logical reasoning", "multiple choice"]},
            {"name": "other", "kind": "file", "path": "other.jsonl", "format": "alpaca", "keywords": ["translation"]}]},
        "targets": {"a": {"capability": "reasoning", "source": src},
                    "a_uncovered": {"capability": "reasoning", "source": src,
                                    "pool_exclude_keywords": ["logical reasoning"]}},
        "sizes": [4, 8], "shares": [0.0, 0.25, 0.5], "fixed_share": 0.5, "seeds": [0, 1],
        "dev_examples": 6, "test_examples": 8, "corrupt_generalist": [1.0], "corrupt_targets": ["a"], **over}
    # Over the cpu preset's values: config.py has no defaults of its own. The targets are the test's alone.
    repo = yaml.safe_load((REPO / "study" / "params.yaml").read_text())["study"]
    return {"study": {**merged(repo, study), "targets": study["targets"]}}


@pytest.fixture
def tiny_study(tmp_path, tiny_model, monkeypatch):
    rng = random.Random(9)
    write_jsonl(tmp_path / "a.jsonl", [{"text": sentence(rng, 8), "label": "abc"[i % 3]} for i in range(40)])
    for name, n in (("related", 30), ("other", 20)):
        write_jsonl(tmp_path / f"{name}.jsonl", [{"instruction": sentence(rng, 5), "input": "",
                                                  "output": sentence(rng, 2)} for _ in range(n)])
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "params.yaml").write_text(yaml.safe_dump(_study_params(tiny_model)))
    uri = use_store(monkeypatch, tmp_path)
    return tmp_path, uri


def _screened(root: Path, target: str, kept: bool = True, base: float = 0.25, specialist: float = 0.75) -> None:
    """A screen result written by hand, for tests of what comes after the screen (the screen has its own test):
    the tiny study's targets are random labels the tiny model cannot learn, which the screen would drop."""
    gain = specialist - base
    write_json(root / "study" / "screen" / f"{target}.json",
               {"target": target, "size": 8, "seed": 0, "dev_examples": 8, "base": base, "specialist": specialist,
                "gain": {"value": gain, "low": gain - 0.125, "high": gain + 0.125}, "kept": kept,
                "why": "kept" if kept else "dropped"})


def test_tiny_study_end_to_end(tiny_study, cli):
    from mlflow import MlflowClient

    root, uri = tiny_study
    rc, out, err = cli("study", "prepare")
    assert rc == 0, err
    # Coverage: 30 of the 50 pool examples share "logical reasoning"; without that skill, 0 of 20.
    assert "study prepare a: splits {'train': 22, 'dev': 9, 'test': 9}, pool 50, coverage 0.600 (1 of 2" in out
    assert "study prepare a_uncovered: splits {'train': 22, 'dev': 9, 'test': 9}, pool 20, coverage 0.000" in out
    for target in ("a", "a_uncovered"):
        _screened(root, target)
    for target in ("a", "a_uncovered"):
        for size in (4, 8):
            rc, out, err = cli("study", "run", "--target", target, "--size", str(size))
            assert rc == 0, err
    docs = {(t, n): json.loads((root / "study" / "results" / f"{t}-n{n}.json").read_text())
            for t in ("a", "a_uncovered") for n in (4, 8)}
    # 1 base + 2 seeds x 3 shares; the corrupted cells (1 rate x 2 seeds) only for `a`, at every size.
    assert {k: len(d["cells"]) for k, d in docs.items()} == \
           {("a", 4): 9, ("a", 8): 9, ("a_uncovered", 4): 7, ("a_uncovered", 8): 7}
    cells = [c for c in docs[("a", 8)]["cells"] if not c.get("base")]
    # share r of n_s=8: round(8 r / (1 - r)) generalist examples; corruption 1.0 makes all 8 wrong.
    assert sorted((c["share"], c["corrupt"], c["generalist_size"], c["corrupted"]) for c in cells) == \
           [(0.0, 0.0, 0, 0)] * 2 + [(0.25, 0.0, 3, 0)] * 2 + [(0.5, 0.0, 8, 0)] * 2 + [(0.5, 1.0, 8, 8)] * 2
    assert all(len(c["test"]["correct"]) == 8 and len(c["dev"]["correct"]) == 6 for c in cells)
    # The base model is scored once per target: the second size reads it from the cache.
    base = [d["cells"][0] for d in docs.values()]
    assert base[0]["run_id"] == base[1]["run_id"] and base[2]["run_id"] == base[3]["run_id"]

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("mixtune/study")
    n_runs = len(client.search_runs([exp.experiment_id]))
    rc, out, _ = cli("study", "run", "--target", "a", "--size", "8")  # again: every cell from the cache
    assert rc == 0 and out.count("(cached)") == 9
    assert json.loads((root / "study" / "results" / "a-n8.json").read_text())["cells"] == docs[("a", 8)]["cells"]

    rc, out, err = cli("study", "report")
    assert rc == 0, err
    assert len(client.search_runs([exp.experiment_id])) == n_runs + 2  # the re-run's stage run and the report
    report = (root / "reports" / "study.md").read_text()
    assert report.count("Verdict at this scale") == 3 and "What this preset cuts: a tiny grid" in report
    for png in ("score_vs_size", "gain_vs_coverage", "gain_by_capability", "gain_vs_corruption", "mixing_law"):
        assert (root / "reports" / "study" / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(study/{png}.png)" in report
    scores = (root / "reports" / "study" / "scores.csv").read_text().splitlines()
    assert len(scores) == 1 + 2 * 2 * 3  # targets x sizes x conditions
    (parent,) = client.search_runs([exp.experiment_id], "tags.`mixtune.stage` = 'study report'")
    for t, n in docs:  # the runs of the results the report read (a-n8's is the re-run's)
        run_id = json.loads((root / "study" / "results" / f"{t}-n{n}.json").read_text())["run_id"]
        assert client.get_run(run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert "study.md" in [a.path for a in client.list_artifacts(parent.info.run_id)]

    # A cell trains on the trial core: with its result gone, the cell takes the adapter it stored there (the
    # trial core's cache, shared with the search and the train stage) and scores it again, to the same numbers.
    for path in (root / ".cache" / "study" / "cells").glob("*.json"):
        if "adapter_key" in json.loads(path.read_text()):
            path.unlink()
    rc, out, err = cli("study", "run", "--target", "a", "--size", "8")
    assert rc == 0, err
    assert out.count("the adapter of study cell a n=8 ") == 8 and out.count("(cached)") == 1  # the base model's
    again = json.loads((root / "study" / "results" / "a-n8.json").read_text())["cells"]
    same = ("dev", "test", "trained_tokens", "train_loss", "adapter_key", "share", "seed", "corrupt")
    assert [{k: c.get(k) for k in same} for c in again] == [{k: c.get(k) for k in same} for c in docs[("a", 8)]["cells"]]


def test_the_screen_keeps_a_target_the_model_learns_and_drops_one_it_cannot(tmp_path, monkeypatch, cli):
    """Planted targets on the tiny model: in `learnable` the answer is the word the text repeats (a or b, then two
    random words); in
    `noise` the answer is drawn at random, so nothing in the text predicts it. The screen keeps the first (the
    tuned model beats the base model beyond the interval) and drops the second, whose run then measures nothing."""
    from tiny import build_tiny_model

    rng = random.Random(5)
    tiny_model = build_tiny_model(tmp_path / "learner", [sentence(rng, 20) for _ in range(300)] +
                                  ["Which class? Answer with one of: a, b."], embedding_scale=25.0)
    learnable = [{"text": " ".join([label] * 6 + [sentence(rng, 2)]), "label": label} for label in "ab" * 40]
    noise = [{"text": sentence(rng, 6), "label": rng.choice("ab")} for _ in range(80)]
    for name, rows in (("learnable", learnable), ("noise", noise)):
        write_jsonl(tmp_path / f"{name}.jsonl", rows)
    write_jsonl(tmp_path / "pool.jsonl", [{"instruction": sentence(rng, 5), "input": "", "output": sentence(rng, 2)}
                                          for _ in range(60)])
    params = _study_params(tiny_model, sizes=[32], seeds=[0], dev_examples=16, corrupt_targets=[])
    study = params["study"]
    study["train"].update(max_steps=60, learning_rate=1e-2, batch_size=8, warmup_ratio=0.0)
    study["prepare"].update(dev_fraction=0.2, test_fraction=0.2, generalist=[
        {"name": "pool", "kind": "file", "path": "pool.jsonl", "format": "alpaca", "keywords": ["translation"]}])
    source = {"kind": "file", "format": "classification", "columns": {"text": "text", "label": "label"},
              "labels": ["a", "b"], "instruction": "Which class? Answer with one of: a, b."}
    study["targets"] = {name: {"capability": "reasoning", "source": {**source, "name": name, "path": f"{name}.jsonl"}}
                        for name in ("learnable", "noise")}
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "params.yaml").write_text(yaml.safe_dump(params))
    use_store(monkeypatch, tmp_path)
    assert cli("study", "prepare")[0] == 0
    rc, out, err = cli("study", "screen", "--target", "learnable")
    assert rc == 0, err
    kept = json.loads((tmp_path / "study" / "screen" / "learnable.json").read_text())
    # every dev answer right against the base model's 8 of 16
    assert (kept["kept"], kept["base"], kept["specialist"], kept["dev_examples"]) == (True, 0.5, 1.0, 16), kept
    assert kept["gain"]["low"] > 0
    assert out.strip().splitlines()[-1].startswith("study screen learnable: kept: the pure specialist beats the base "
                                                   "model on dev by +0.500 [")
    rc, out, err = cli("study", "screen", "--target", "noise")
    assert rc == 0, err
    dropped = json.loads((tmp_path / "study" / "screen" / "noise.json").read_text())
    assert not dropped["kept"] and dropped["gain"]["low"] <= 0 <= dropped["gain"]["high"], dropped
    # The screen's cells are the run's: the learnable target's run reads them back; the dropped one runs nothing.
    rc, out, err = cli("study", "run", "--target", "learnable", "--size", "32")
    assert rc == 0 and out.count("(cached)") == 2, err
    rc, out, err = cli("study", "run", "--target", "noise", "--size", "32")
    assert rc == 0 and out.strip().splitlines()[-1] == "study run noise n=32: dropped by its screen, nothing to run"
    doc = json.loads((tmp_path / "study" / "results" / "noise-n32.json").read_text())
    assert doc["cells"] == [] and doc["dropped"] == dropped["why"]


def test_study_bad_input_is_one_line(tiny_study, cli, tiny_model):
    root, _ = tiny_study
    rc, _, err = cli("study", "run", "--target", "nope", "--size", "4")
    assert (rc, err.strip()) == (1, "mixtune study: error: study: unknown target 'nope' (targets: a, a_uncovered)")
    rc, _, err = cli("study", "run", "--target", "a", "--size", "4")
    assert (rc, err.strip()) == (1, "mixtune study: error: study/prepared/a: not prepared "
                                    "(run `mixtune study prepare --target a`)")
    (root / "study" / "params.yaml").write_text(yaml.safe_dump(_study_params(tiny_model, fixed_share=0.3)))
    rc, _, err = cli("study", "report")
    assert rc == 1 and err.strip() == ("mixtune study: error: study/params.yaml: study: Value error, fixed_share "
                                       "0.3 must be one of shares [0.0, 0.25, 0.5]")


def test_a_diverging_cell_is_one_line_and_leaves_no_result(tiny_study, cli, tiny_model):
    root, _ = tiny_study
    params = _study_params(tiny_model)
    # A real divergence, not a mock: 4 steps at lr 1e30, logged only at the end (logging_steps 5), so the check
    # must read the final train_loss.
    params["study"]["train"].update(learning_rate=1e30, max_steps=4, warmup_ratio=0.0)
    (root / "study" / "params.yaml").write_text(yaml.safe_dump(params))
    assert cli("study", "prepare", "--target", "a")[0] == 0
    _screened(root, "a")
    rc, out, err = cli("study", "run", "--target", "a", "--size", "4")
    assert rc == 1 and "study a base model [1/9]" in out  # 1 base + 2 seeds x (3 shares + 1 corrupted)
    assert err.strip().splitlines()[-1] == ("mixtune study: error: study: a n=4 seed=0 share=0: training loss is nan "
                                            "at step 4; lower train.learning_rate or check the data")
    assert not (root / "study" / "results").exists()
    assert len(list((root / ".cache" / "study" / "cells").glob("*.json"))) == 1  # only the base model's cell


# --- the report from a fixture study ------------------------------------------------------------------------


def _fixture_study(root: Path, tiny_model: Path) -> object:
    """Results written by hand: every test score is known, so the report's numbers can be checked."""
    params = _study_params(tiny_model)
    params["study"]["targets"]["b"] = {"capability": "understanding", "source": params["study"]["targets"]["a"]
                                       ["source"] | {"name": "b", "keywords": ["reading comprehension"]}}
    # z: a candidate its screen dropped (the model did not learn it): listed, in no table of scores or claim
    params["study"]["targets"]["z"] = {"capability": "knowledge", "source": params["study"]["targets"]["a"]
                                       ["source"] | {"name": "z"}}
    (root / "study").mkdir(parents=True, exist_ok=True)
    (root / "study" / "params.yaml").write_text(yaml.safe_dump(params))
    cfg = load_section("study", root / "study" / "params.yaml")
    coverage = {"a": 0.6, "a_uncovered": 0.0, "b": 0.25, "z": 0.1}
    # Test score p(target, size, share): scarce data gains more; `a` gains more than `a_uncovered`.
    gain = {"a": 0.5, "a_uncovered": 0.125, "b": 0.25}
    for name in cfg.targets:
        _screened(root, name, kept=name != "z", base=0.25 if name != "z" else 0.5, specialist=0.5)
        write_json(root / "study" / "prepared" / name / "stats.json",
                   {"splits": {"train": 24, "dev": 8, "test": 8}, "generalist_pool": 50,
                    "coverage": {"coverage": coverage[name], "tasks": 1, "pool_tasks": 2, "keywords": []}})
        if name == "z":
            continue  # its runs measured nothing
        for size in cfg.sizes:
            def row(p):  # 40 test examples, the first round(40 p) right
                k = round(40 * p)
                return {"score": k / 40, "correct": "1" * k + "0" * (40 - k)}

            cells = [{"base": True, "dev": row(0.25), "test": row(0.25), "run_id": f"{name}-base", "seconds": 6.0}]
            for seed in cfg.seeds:
                for share in cfg.shares:
                    p = 0.25 + gain[name] * (share / 0.5) * (2 if size == 4 else 1) / 2
                    cells.append({"seed": seed, "share": share, "corrupt": 0.0, "size": size, "dev": row(p),
                                  "test": row(p), "run_id": f"{name}-{size}-{seed}-{share}", "seconds": 6.0})
                if name == "a":  # corrupted at both sizes
                    cells.append({"seed": seed, "share": 0.5, "corrupt": 1.0, "size": size, "dev": row(0.125),
                                  "test": row(0.125), "run_id": f"c-{size}-{seed}", "seconds": 6.0})
            write_json(root / "study" / "results" / f"{name}-n{size}.json",
                       {"target": name, "size": size, "run_id": None, "cells": cells})
    return cfg


def _numbers(value, out: set) -> set:
    if isinstance(value, dict):
        for v in value.values():
            _numbers(v, out)
    elif isinstance(value, list):
        for v in value:
            _numbers(v, out)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        for fmt in ("{:.3f}", "{:+.3f}", "{:.2f}", "{:g}", "{}"):
            out.add(fmt.format(value))
        out.add(f"{value / 60:.1f}")  # minutes
    return out


def test_report_numbers_all_come_from_the_results(tmp_path, tiny_model, monkeypatch):
    from mixtune.core import study_render
    from mixtune.stages import study_report

    cfg = _fixture_study(tmp_path, tiny_model)
    monkeypatch.chdir(tmp_path)
    agg = study_report.aggregate(cfg)
    text = study_render.render(agg, {"score_vs_size": "study/score_vs_size.png"})
    known = _numbers(agg, set())
    body = re.sub(r"\(study/[a-z_]+\.png\)|`[^`]*`", "", text)  # image paths and the model path
    found = re.findall(r"[+-]?\d+(?:\.\d+)?", body)
    assert found and [n for n in found if n not in known and n.lstrip("+") not in known
                      and n not in {"1", "2", "3", "95", "80"}] == []  # the claims' numbering, 95% intervals, 80% power
    rows = {(r["target"], r["size"]): r for r in agg["rows"]}
    assert {t for t, _ in rows} == {"a", "a_uncovered", "b"}  # z was dropped by its screen
    # The plots draw the kept targets only: one panel each (a dropped target has no rows to draw).
    figs = study_render.figures(agg)
    assert [ax.get_title() for ax in figs["score_vs_size"].axes] == \
           ["a (reasoning)", "a_uncovered (reasoning)", "b (understanding)"]
    assert "| z | knowledge | 0.500 | 0.500 | +0.000 [-0.125, +0.125] | dropped |" in text
    assert "| a | reasoning | 0.250 | 0.500 | +0.250 [+0.125, +0.375] | kept |" in text
    # a at 4 examples goes from 10/40 right (share 0) to 30/40 (share 0.5). The searched share is the search's
    # own choice on dev (search_answer.choose): the smallest share within noise of the best. b at 8 scores 10,
    # 12 and 15 of 40 at shares 0, 0.25 and 0.5 (the first k right): 0.25 is 3 examples short of 0.5, and a
    # resample draws none of those 3 about 4.4% of the time ((37/40)^40), so its paired interval reaches 0;
    # share 0 (5 short: 0.5%) does not. a at 4 (0.25 is 10 short) searches 0.5.
    a4 = rows[("a", 4)]
    assert (a4["base"]["value"], a4["specialist"]["value"], a4["fixed"]["value"]) == (0.25, 0.25, 0.75)
    assert a4["gain_fixed"]["value"] == 0.5 and 0.3 < a4["gain_fixed"]["low"] < 0.5 < a4["gain_fixed"]["high"]
    assert rows[("b", 8)]["searched_share"] == 0.25 and rows[("a", 4)]["searched_share"] == 0.5
    assert f"| a | 4 | 0.250 | {study_render._iv(a4['specialist'])} | {study_render._iv(a4['fixed'])} |" in text
    claims = agg["claims"]
    # a gains (0.5 + 0.25) / 2 = 0.375 on average, a_uncovered (0.125 + 0.05) / 2 = 0.0875 (15 and 12 of 40
    # right at share 0.5); every target gains more with 4 examples than with 8.
    cov, scarce = claims["coverage"]["parts"]
    assert (round(cov["value"], 6), cov["status"], scarce["status"]) == (0.2875, "confirmed", "confirmed")
    assert [p["name"] for p in claims["capability"]["parts"]] == ["understanding: b", "reasoning: a"]
    assert claims["coverage"]["verdict"] == claims["capability"]["verdict"] == "confirmed"
    # Corruption 1.0 scores 5/40 at both sizes, against the clean mix's 30/40 (4 examples) and 20/40 (8), and
    # the specialist's 10/40: a drop and a hurt part per size.
    parts = claims["knowledge"]["parts"]
    assert [(p["name"], p["value"]) for p in parts] == [
        ("corruption lowers a at 4 examples", 0.625), ("corrupted data hurts a at 4 examples", 0.125),
        ("corruption lowers a at 8 examples", 0.375), ("corrupted data hurts a at 8 examples", 0.125)]
    assert claims["knowledge"]["verdict"] == "confirmed"
    # a_uncovered's specialist scores equal the base model's 10/40 and its best mix (15/40) stays within noise
    # of it: the report calls it a floor effect.
    assert agg["floor"] == ["a_uncovered"] and "learned nothing measurable on a_uncovered" in text


def test_presets_validate():
    from conftest import REPO

    cpu, paper = (load_section("study", REPO / "study" / f) for f in ("params.yaml", "paper.yaml"))
    assert (cpu.preset, paper.preset) == ("cpu", "paper")
    # Each capability has a target, and one target is also run with its coverage removed (cpu).
    assert {t.capability for t in cpu.targets.values()} == {"understanding", "reasoning", "knowledge", None}
    assert [n for n, t in cpu.targets.items() if t.pool_exclude_keywords] == ["arithmetic_uncovered"]
    assert len(cpu.seeds) >= 2 and len(paper.seeds) >= 3 and paper.sizes == [64, 256, 1024]
    # The knowledge targets are the ones corrupted, at both sizes (cells), and the cpu preset's sizes span 8x.
    assert {cpu.targets[t].capability for t in cpu.corrupt_targets} == {"knowledge"}
    assert max(cpu.sizes) >= 8 * min(cpu.sizes)


def test_minimum_detectable_effect_by_hand():
    import numpy as np

    from mixtune.core.metrics import min_detectable_effect

    # Bootstrap values -1 and +1, 500 each: sample standard deviation sqrt(1000 / 999). At 95% and 80% power the
    # effect is (1.959964 + 0.841621) standard errors.
    values = np.array([-1.0, 1.0] * 500)
    assert min_detectable_effect(values) == pytest.approx(2.801585 * (1000 / 999) ** 0.5, abs=1e-5)
    assert min_detectable_effect(values * 0.01) == pytest.approx(0.02803, abs=1e-5)  # scales with the error
    assert min_detectable_effect(values, power=0.5) == pytest.approx(1.959964 * (1000 / 999) ** 0.5, abs=1e-5)


def test_each_comparison_is_confirmed_contradicted_or_inconclusive_with_its_detectable_effect():
    import numpy as np

    from mixtune.stages.study_report import _part

    rng = np.random.default_rng(0)

    def status(mean, sd):
        return _part("p", "c", rng.normal(mean, sd, 4000), mean)

    assert status(0.10, 0.02)["status"] == "confirmed"
    assert status(-0.10, 0.02)["status"] == "contradicted"  # the opposite effect
    # Powered (detects 0.056, under 0.08) and the interval [-0.04, 0.04] rules out a gain of 0.08: contradicted.
    powered = status(0.0, 0.02)
    assert powered["status"] == "contradicted" and powered["mde"] == pytest.approx(0.056, abs=0.003)
    # The same null result from a design that could only detect 0.28: inconclusive, never "not confirmed".
    weak = status(0.0, 0.1)
    assert weak["status"] == "inconclusive" and weak["mde"] == pytest.approx(0.28, abs=0.015)
    # Powered, but the interval reaches past 0.08: a gain that size is not ruled out.
    assert status(0.04, 0.025)["status"] == "inconclusive"  # [-0.009, +0.089], detects 0.07


def test_verdicts():
    from mixtune.stages.study_report import _verdict

    def part(status, mde=0.1):
        return {"status": status, "mde": mde}

    assert _verdict([part("confirmed"), part("confirmed")]) == "confirmed"
    assert _verdict([part("contradicted"), part("contradicted")]) == "contradicted"
    assert _verdict([part("inconclusive", 0.21), part("inconclusive", 0.13)]) == \
        "inconclusive: could detect only gains above 0.130"
    assert _verdict([part("confirmed"), part("inconclusive")]) == "mixed: 1 confirmed, 1 inconclusive"
    assert _verdict([part("contradicted"), part("confirmed"), part("contradicted")]) == \
        "mixed: 1 confirmed, 2 contradicted"
    assert _verdict([]) == "not tested"


def test_a_report_on_results_another_clone_ran_is_written(tmp_path, tiny_model, monkeypatch, capsys):
    """study/results is committed to git, and the runs its files name are in the MLflow store of the clone that
    ran them: the report stage on another clone nests none of them and says so (it failed with a traceback)."""
    from mixtune.plumbing.files import write_json
    from mixtune.stages import study_report

    cfg = _fixture_study(tmp_path, tiny_model)
    results = sorted((tmp_path / "study" / "results").glob("*.json"))
    for i, path in enumerate(results):
        write_json(path, {**json.loads(path.read_text()), "run_id": f"{i:032x}"})  # in no store here
    use_store(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    study_report.run(cfg)
    assert "Verdict at this scale" in (tmp_path / "reports" / "study.md").read_text()
    assert len(results) == 6 and ("study report: 6 of 6 result files' runs are not in this MLflow "
            "store") in capsys.readouterr().out
