"""Never a stale answer: every stage of dvc.yaml and study/dvc.yaml declares the project files its command can
import and the params keys its config objects expose; params files hold every value; our caches are keyed by
the code that computes them."""

from __future__ import annotations

import ast
import copy
import importlib
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from mixtune.plumbing import lineage
from mixtune.plumbing.config import load_section
from mixtune.plumbing.errors import MixtuneError

DVC_FILES = ("dvc.yaml", "study/dvc.yaml")
PARAMS_FILES = {"params.yaml": ("prepare", "mix", "model", "train", "evaluate", "search", "register"),
                "study/params.yaml": ("study",), "study/paper.yaml": ("study",)}


def test_imports_are_found_in_functions_and_through_every_import_form():
    src = '''
import json
import mixtune.stages.train
from mixtune.core import metrics as M
from mixtune.plumbing import lineage
from mixtune.plumbing.config import MixConfig
from mixtune.nonexistent import x


def f():
    from mixtune.stages import search
    import mixtune.core.model as mm


class C:
    def g(self):
        from mixtune.stages.evaluate import correct
'''
    assert lineage.imported(ast.parse(src)) == {
        "mixtune.stages.train", "mixtune.core", "mixtune.core.metrics", "mixtune.plumbing", "mixtune.plumbing.lineage",
        "mixtune.plumbing.config", "mixtune.stages", "mixtune.stages.search", "mixtune.core.model",
        "mixtune.stages.evaluate"}


def test_a_stage_imports_only_what_it_runs_not_the_cli():
    # dvc.yaml runs `python -m mixtune.stages.mix`: its code is mix.py and what it imports, never cli.py (the
    # user's command) nor another stage's module
    mods = lineage.closure({"mixtune.stages.mix"})
    assert {"mixtune", "mixtune.stages", "mixtune.stages.mix", "mixtune.plumbing.config", "mixtune.plumbing.entry",
            "mixtune.plumbing.errors"} <= mods
    assert not mods & {"mixtune.cli", "mixtune.stages.train", "mixtune.stages.search", "mixtune.stages.register",
                       "mixtune.stages.evaluate", "mixtune.core.tune"}
    shared = set.intersection(*(set(s["deps"]) for _, _, s in _stages()))
    assert "src/mixtune/cli.py" not in shared and all(
        d.startswith("src/mixtune/plumbing/") or d.endswith("__init__.py") for d in shared if d.startswith("src/")), shared


# --- the stages' declarations -------------------------------------------------------------------------------


def _stages():
    """(dvc file, stage name, stage) with matrix items replaced by their first values."""
    study = yaml.safe_load((REPO / "study" / "params.yaml").read_text())["study"]
    item = {"target": next(iter(study["targets"])), "size": str(study["sizes"][0])}
    out = []
    for f in DVC_FILES:
        for name, stage in yaml.safe_load((REPO / f).read_text())["stages"].items():
            text = yaml.safe_dump(stage)
            for k, v in item.items():
                text = text.replace("${item.%s}" % k, v)
            out.append((f, name, yaml.safe_load(text)))
    return out


def _resolve(node: ast.expr, module):
    """A literal tuple, or a constant of the stage's module (`MIX_KEYS`)."""
    if isinstance(node, ast.Name):
        return getattr(module, node.id)
    return ast.literal_eval(node)


def required_params(func, args) -> set[tuple[str, str]]:
    """(params file, key) for every load_section call in a command's function: the whole section, or each key
    of `keys=` (the config object exposes only those)."""
    tree = ast.parse(Path(func.__code__.co_filename).read_text())
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == func.__name__)
    out = set()
    for call in ast.walk(fn):
        if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "load_section":
            section = ast.literal_eval(call.args[0])
            path = getattr(args, call.args[1].attr)  # args.params / args.study_params
            keys = next((_resolve(k.value, sys.modules[func.__module__]) for k in call.keywords if k.arg == "keys"), None)
            out |= {(path, section)} if keys is None else {(path, f"{section}.{k}") for k in keys}
    return out


def declared_params(stage: dict) -> set[tuple[str, str]]:
    out = set()
    for p in stage.get("params", []):
        if isinstance(p, str):
            out.add(("params.yaml", p))
        else:
            out |= {(f, k) for f, keys in p.items() for k in keys}
    return out


def _covers(declared: set, key: tuple[str, str]) -> bool:
    f, k = key
    parts = k.split(".")
    return any((f, ".".join(parts[:i])) in declared for i in range(1, len(parts) + 1))


@pytest.mark.parametrize("dvc_file,name,stage", _stages(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_stage_declares_what_its_command_reads(dvc_file, name, stage):
    python, m, module, *argv = shlex.split(stage["cmd"])
    assert (python, m) == ("python", "-m") and module.startswith("mixtune.stages."), stage["cmd"]
    stage_module = importlib.import_module(module)
    args = stage_module.parser().parse_args(argv)
    func = getattr(args, "func", stage_module.command)
    code = {str(p.relative_to(REPO)) for p in lineage.files(lineage.closure({module}))}
    deps = set(stage["deps"])
    declared_code = {d for d in deps if d.startswith("src/")}
    missing = sorted(code - declared_code)
    extra = sorted(declared_code - code)  # declared but not importable: a rerun for nothing
    assert not missing and not extra, f"{dvc_file}:{name}: deps missing {missing}, not imported {extra}"

    needed, declared = required_params(func, args), declared_params(stage)
    missing = sorted(k for k in needed if not _covers(declared, k))
    extra = sorted(k for k in declared if not any(_covers({k}, n) or _covers({n}, k) for n in needed))
    assert not missing and not extra, f"{dvc_file}:{name}: params missing {missing}, not read {extra}"


def test_the_declaration_check_fails_on_an_undeclared_import():
    """The check above on the dvc.yaml before this rule: `search` did not declare config.py nor metrics.py."""
    (_, _, stage), = [s for s in _stages() if s[1] == "search"]
    old = copy.deepcopy(stage)
    old["deps"] = [d for d in old["deps"] if d not in ("src/mixtune/plumbing/config.py", "src/mixtune/core/metrics.py")]
    with pytest.raises(AssertionError,
                       match=r"deps missing \['src/mixtune/core/metrics.py', 'src/mixtune/plumbing/config.py'\]"):
        test_every_stage_declares_what_its_command_reads("dvc.yaml", "search", old)
    old = copy.deepcopy(stage)
    old["params"] = [p for p in old["params"] if p != "evaluate.max_new_tokens"]
    with pytest.raises(AssertionError, match=r"params missing \[\('params.yaml', 'evaluate.max_new_tokens'\)\]"):
        test_every_stage_declares_what_its_command_reads("dvc.yaml", "search", old)


def test_a_key_the_stage_did_not_declare_cannot_be_read():
    mix = load_section("mix", REPO / "params.yaml", keys=("specialist_size", "seed"))
    assert (mix.specialist_size, mix.seed) == (64, 0)
    with pytest.raises(AttributeError):
        mix.generalist_share


# --- one source of defaults ---------------------------------------------------------------------------------


def _leaves(d: dict, prefix: str = ""):
    """Every key path of a section, not descending into sources and study targets: their optional fields are
    the schema of a user's data description, not project defaults."""
    for k, v in d.items():
        path = f"{prefix}{k}"
        yield path
        if isinstance(v, dict) and k not in ("targets", "columns", "where"):
            yield from _leaves(v, path + ".")


@pytest.mark.parametrize("params_file", list(PARAMS_FILES))
def test_every_key_comes_from_the_params_file(params_file, tmp_path):
    """Without any one key of the file, loading its section fails and names the file and the key: config.py
    has no default of its own."""
    raw = yaml.safe_load((REPO / params_file).read_text())
    for section in PARAMS_FILES[params_file]:
        load_section(section, REPO / params_file)  # whole, the file loads
        for path in _leaves(raw[section]):
            cut = copy.deepcopy(raw)
            *parents, last = path.split(".")
            node = cut[section]
            for p in parents:
                node = node[p]
            del node[last]
            f = tmp_path / "params.yaml"
            f.write_text(yaml.safe_dump(cut))
            with pytest.raises(MixtuneError) as e:
                load_section(section, f)
            assert str(e.value) == f"{f}: {section}.{path}: Field required", path


def test_a_missing_section_names_the_file(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("mix: {}\n")
    with pytest.raises(MixtuneError, match=rf"^{f}: train: missing section$"):
        load_section("train", f)


# --- caches keyed by their code -----------------------------------------------------------------------------


def _fingerprint(src: Path, module: str) -> str:
    out = subprocess.run([sys.executable, "-c", f"from mixtune.plumbing import lineage; print(lineage.fingerprint(['{module}']))"],
                         env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                         check=True, cwd=src)
    return out.stdout.strip()


def test_a_cache_key_changes_with_code_in_any_module_it_can_import_not_with_a_comment(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO / "src" / "mixtune", src / "mixtune")
    before = {m: _fingerprint(src, m) for m in ("mixtune.stages.search", "mixtune.stages.study")}
    assert before["mixtune.stages.search"] == lineage.fingerprint(["mixtune.stages.search"])  # the copy is what runs

    score = src / "mixtune" / "core" / "score.py"
    text = score.read_text()
    # A comment, a docstring and blank lines: the same code, the same key (no new search, no stale cell).
    commented = text.replace('"""score: the one way', '"""score (reworded): the one way', 1) + "\n\n# a note\n"
    commented = commented.replace("def task_kind(", "# why: a note\ndef task_kind(", 1)
    assert commented != text
    score.write_text(commented)
    assert {m: _fingerprint(src, m) for m in before} == before

    register = src / "mixtune" / "stages" / "register.py"
    register.write_text(register.read_text() + "X = 1\n")
    assert {m: _fingerprint(src, m) for m in before} == before  # neither search nor study imports register

    score.write_text(commented + "X = 1\n")
    after = {m: _fingerprint(src, m) for m in before}
    assert after["mixtune.stages.search"] != before["mixtune.stages.search"]
    assert after["mixtune.stages.study"] != before["mixtune.stages.study"]


def test_the_docs_rerun_table_is_the_one_derived_from_dvc_yaml():
    table = lineage.rerun_table(REPO)
    assert table in (REPO / "docs" / "pipeline.md").read_text(), \
        f"docs/pipeline.md: replace the table by (python -m mixtune.plumbing.lineage):\n{table}"
    rows = lineage.reruns(REPO)
    # what the README promises in words
    assert rows["`mix.generalist_share`, `mix.corrupt_generalist`"] == ["mix", "train", "evaluate", "register"]
    assert next(v for k, v in rows.items() if "`core/score.py`" in k) == ["search", "mix", "train", "evaluate", "register",
                                                                     "study-prepare", "study-screen", "study-run", "study-report"]
    assert next(v for k, v in rows.items() if "`stages/register.py`" in k) == ["register"]


def test_a_stage_run_as_main_cannot_key_its_cache_by_no_code():
    # `python -m mixtune.stages.search` is `__main__` to itself: that name resolved to the package's __init__
    # alone, and the search's Optuna study was keyed by no code (an edited score.py replayed old trials).
    assert lineage.closure(["mixtune.stages.search"]) >= {"mixtune.core.score", "mixtune.core.trial"}
    for call in (lineage.fingerprint, lineage.closure):
        with pytest.raises(ValueError, match="__main__"):
            call(["__main__"])
