"""End to end: `dvc repro` of the data stages on real data (BBC News and a real OpenAI Evals subset), and a
`mixtune --help` that imports nothing heavy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import REAL_BBC, REPO

from mixtune.core import evals

BIN = Path(sys.executable).parent
DATA_STAGES = ("prepare", "mix")
HEAVY = ("torch", "transformers", "trl", "peft", "mlflow", "optuna", "datasets", "accelerate")


def _env() -> dict:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", DVC_NO_ANALYTICS="1",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def sh(cwd: Path, *cmd: str) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


@pytest.mark.e2e
def test_dvc_repro_data_stages(tmp_path, evals_subset):
    if not REAL_BBC.is_file():
        pytest.skip(f"{REAL_BBC} is absent: run `mixtune fetch` (or `make fetch`) first")
    archive, tasks = evals_subset
    repo = tmp_path / "repo"
    (repo / "data" / "generalist").mkdir(parents=True)
    (repo / "data" / "specialist").mkdir()
    shutil.copyfile(archive, repo / "data" / "generalist" / archive.name)
    shutil.copyfile(REAL_BBC, repo / "data" / "specialist" / REAL_BBC.name)

    # The project's own data stages, as dvc.yaml declares them today (later stages left out).
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    pipeline = {"stages": {name: stages[name] for name in DATA_STAGES}}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    for stage in pipeline["stages"].values():  # code deps (src/mixtune/*.py) must exist for DVC to hash them
        for dep in stage.get("deps", []):
            if not dep.startswith("src/"):  # data, the other stage's outputs, the search's answer
                continue
            src, dst = REPO / dep, repo / dep
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src, dst) if src.is_dir() else shutil.copyfile(src, dst)

    params = {
        "prepare": {
            "seed": 0, "dev_fraction": 0.1, "test_fraction": 0.1, "decontaminate_ngram": 13,
            "generalist_max_chars": 2000, "generalist_probe": 20, "too_long": "error", "min_eval_examples": 20,
            "max_record_chars": 100000, "allow_unversioned": False,
            "specialist": [{
                "name": "bbc_news", "kind": "file", "path": "data/specialist/bbc_news.jsonl",
                "format": "classification", "columns": {"text": "text", "label": "label"},
                "labels": ["business", "entertainment", "politics", "sport", "tech"],
                "instruction": "What is the topic of this BBC News article?", "max_input_words": 60,
                "keywords": ["text classification", "topic classification"]}],
            "generalist": [{"name": "evals", "kind": "evals", "path": f"data/generalist/{archive.name}",
                            "max_per_task": 40}],
        },
        "mix": {"specialist_size": 200, "generalist_share": 0.0, "seed": 0, "corrupt_generalist": 0.0},
        "model": {"base": str(REPO / "models" / "SmolLM2-135M-Instruct")},  # its tokenizer measures the examples
        "train": {"max_length": 512},
    }
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # The search's answer, as `mix.generalist_share: auto` reads it (the search stage itself is tested elsewhere).
    (repo / "search").mkdir()
    (repo / "search" / "best.json").write_text(json.dumps({"size": 200, "recommended_share": 0.25}))

    sh(repo, "git", "init", "-q")
    sh(repo, str(BIN / "dvc"), "init", "-q")
    sh(repo, str(BIN / "dvc"), "add", "-q", "data")
    first = sh(repo, str(BIN / "dvc"), "repro")
    assert "Running stage 'prepare'" in first and "Running stage 'mix'" in first

    stats = json.loads((repo / "prepared" / "stats.json").read_text())
    assert stats["specialist"] == {"bbc_news": {"read": 2225, "too_long": 0, "truncated": 0}}  # the fetched, sha256-verified corpus
    assert stats["specialist_duplicates_removed"] == 117
    assert stats["splits"] == {"train": 1686, "dev": 211, "test": 211}
    for name, n in stats["splits"].items():
        assert count_lines(repo / "prepared" / "specialist" / f"{name}.jsonl") == n
    gen = stats["generalist"]["evals"]
    # every sampled record (40 per task at most) is an example or counted as left out
    with zipfile.ZipFile(archive) as zf:
        sampled = sum(min(40, len(evals.records(zf.read(f"{evals.DATA_DIR}{t}.jsonl")))) for t in tasks)
    assert gen["read"] > 0 and gen["read"] + gen.get("other_format_removed", 0) == sampled
    assert gen["target_task_removed"] == 0
    assert stats["generalist_pool"] == (gen["read"] - gen["too_long_removed"] - stats["generalist_duplicates_removed"]
                                        - stats["decontaminated"] - stats["generalist_probe"])
    assert count_lines(repo / "prepared" / "generalist.jsonl") == stats["generalist_pool"]
    # The probe: multiple-choice pool questions set aside, never in the pool the mix draws from.
    probe = [json.loads(line) for line in open(repo / "prepared" / "generalist_probe.jsonl")]
    assert len(probe) == stats["generalist_probe"] == 20 and all(ex["options"] for ex in probe)
    pool_ids = {json.loads(line)["id"] for line in open(repo / "prepared" / "generalist.jsonl")}
    assert not pool_ids & {ex["id"] for ex in probe}
    pool_tasks = {json.loads(line)["task"] for line in open(repo / "prepared" / "generalist.jsonl")}
    # every pool task is one of the subset's; a task whose examples are all too long drops out
    assert pool_tasks and pool_tasks <= set(tasks) and stats["generalist_tasks"] == len(pool_tasks)
    manifest = json.loads((repo / "mix" / "manifest.json").read_text())
    assert manifest["total"] == 200 and manifest["by_source"] == {"bbc_news": 200}
    assert count_lines(repo / "mix" / "train.jsonl") == 200
    assert "up to date" in sh(repo, str(BIN / "dvc"), "status")

    # A mix parameter changes: only `mix` reruns.
    params["mix"]["generalist_share"] = 0.2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    second = sh(repo, str(BIN / "dvc"), "repro")
    assert "Stage 'prepare' didn't change, skipping" in second
    assert "Running stage 'mix'" in second and "Running stage 'prepare'" not in second
    manifest = json.loads((repo / "mix" / "manifest.json").read_text())
    assert manifest["total"] == 250 and manifest["by_source"] == {"bbc_news": 200, "evals": 50}
    assert "up to date" in sh(repo, str(BIN / "dvc"), "status")

    # auto: the share the search recommends (search/best.json), recorded as such.
    params["mix"]["generalist_share"] = "auto"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert "Running stage 'mix'" in sh(repo, str(BIN / "dvc"), "repro")
    manifest = json.loads((repo / "mix" / "manifest.json").read_text())
    assert (manifest["generalist_share"], manifest["share_source"], manifest["generalist_size"]) == (0.25, "auto", 67)

    # A comment in a module only `mix` imports: `mix` is stale, `prepare` is not; the code it shares is both's.
    with open(repo / "src" / "mixtune" / "cli.py", "a") as f:  # the user's command, no stage's code
        f.write("# a comment\n")
    assert "up to date" in sh(repo, str(BIN / "dvc"), "status")
    with open(repo / "src" / "mixtune" / "stages" / "mix.py", "a") as f:
        f.write("# a comment\n")
    status = sh(repo, str(BIN / "dvc"), "status")
    assert "mix:" in status and "prepare:" not in status and "modified:" in status
    third = sh(repo, str(BIN / "dvc"), "repro")
    assert "Running stage 'mix'" in third and "Running stage 'prepare'" not in third
    with open(repo / "src" / "mixtune" / "plumbing" / "config.py", "a") as f:
        f.write("# a comment\n")
    status = sh(repo, str(BIN / "dvc"), "status")
    assert "mix:" in status and "prepare:" in status


def test_help_is_fast_and_imports_nothing_heavy():
    exe = BIN / "mixtune"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mixtune.cli"]
    proc = subprocess.run([*cmd, "--help"], capture_output=True, text=True, env=_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    for command in DATA_STAGES:
        assert command in proc.stdout
    probe = ("import json, sys, contextlib, io\n"
             "import mixtune.cli as cli\n"
             "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
             "    cli.main(['--help'])\n"
             f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
