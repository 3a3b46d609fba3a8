"""register, promote, predict and a served model, after one tiny search -> mix (auto) -> train -> evaluate (run
once, copied per test). Register reads what evaluate wrote; a test that needs a better or worse candidate writes
evaluate's outputs for another real trial adapter (its logged model), with the test answers it wants."""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import search_project as sp

from mixtune.plumbing.files import read_jsonl, write_json, write_jsonl

NAME = f"mixtune-{sp.TASK}"
SEARCH = {"n_trials": 2, "grid": 2, "max_share": 0.5, "sizes": [16, 40]}  # shares 0 and 0.5
TRIALS = [(size, n) for size in SEARCH["sizes"] for n in range(2)]


@pytest.fixture(scope="module")
def searched(tmp_path_factory, tiny_model) -> Path:
    """A project after the whole chain: a search at two sizes (two searches of two grid shares each: four mixes,
    four adapters), the final adapter trained at the recommended share and evaluated, all in its MLflow store."""
    from mixtune.stages import evaluate, mix, search, train

    root = tmp_path_factory.mktemp("searched")
    sp.make_project(root, tiny_model, search=SEARCH, mix={"generalist_share": "auto"})
    (root / "data.dvc").write_text("outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  path: data\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        search.run(*sp.search_sections(root))
        mix.run(sp.load(root, "mix"))
        train.run(sp.load(root, "train"), sp.load(root, "model"))
        evaluate.run(sp.load(root, "evaluate"), sp.load(root, "model"), "auto")
    return root


@pytest.fixture
def project(searched, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "project"
    shutil.copytree(searched, root)
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    return root


def client():
    from mlflow import MlflowClient

    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])  # the env, not the last mlflow.set_tracking_uri


def runs_of(stage: str) -> list:
    exp = client().get_experiment_by_name(f"mixtune/{sp.TASK}")
    return client().search_runs([exp.experiment_id], f"tags.`mixtune.stage` = '{stage}'")


def versions() -> dict[str, dict]:
    return {str(v.version): v.tags for v in client().search_model_versions(f"name = '{NAME}'")}


def alias(name: str) -> str:
    return str(client().get_model_version_by_alias(NAME, name).version)


def evaluated_as(root: Path, size_trial: tuple[int, int], correct: int, n: int = 12) -> None:
    """train/ and eval/ as if this trial's adapter were the final one and evaluate had found its first `correct`
    of the first `n` test examples right (accuracy)."""
    size, number = size_trial
    t = sp.study(root, size=size).trials[number]
    shutil.rmtree(root / "train" / "adapter")
    shutil.copytree(t.user_attrs["adapter"], root / "train" / "adapter")
    test = read_jsonl(root / "prepared" / "specialist" / "test.jsonl")[:n]
    write_jsonl(root / "eval" / "predictions.jsonl", [
        {"id": ex["id"], "task": ex["task"], "gold": ex["completion"],
         "tuned": ex["completion"] if i < correct else next(o for o in ex["options"] if o != ex["completion"])}
        for i, ex in enumerate(test)])
    details = json.loads((root / "eval" / "details.json").read_text())
    write_json(root / "eval" / "details.json", {**details, "metric": "accuracy", "share_source": "manual"})
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    write_json(root / "eval" / "metrics.json", {**metrics, "share": t.params["generalist_share"]})


def one_line(err: str, *fragments: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def test_first_version_is_champion_from_evaluates_answers_and_no_duplicate(project, cli):
    details = json.loads((project / "eval" / "details.json").read_text())
    measured = json.loads((project / "eval" / "metrics.json").read_text())
    evaluated = runs_of("evaluate")[0]
    rc, out, err = cli("register")
    assert rc == 0, err
    result = json.loads((project / "register" / "result.json").read_text())
    # numbers only (`dvc exp show`): the name and the reason are printed and are the version's tags
    assert result["version"] == 1 and result["created"] and result["promoted"] and result["champion"] == 1
    assert not [k for k, v in result.items() if isinstance(v, str)]
    assert f"{NAME} version 1: first version" in out
    assert alias("champion") == "1" and alias("candidate") == "1"
    run = client().get_run(versions()["1"]["mixtune.register_run_id"])
    assert run.info.run_name == f"register r={measured['share']:.2f} auto, n=16"
    tags = versions()["1"]
    # evaluate's test score, by evaluate's metric (auto: macro-F1 for this classification task), not a second pass
    assert details["metric"] == "macro_f1" and tags["mixtune.test_metric"] == "macro_f1"
    assert result["test_score"] == pytest.approx(measured["macro_f1"]["tuned"]["value"])
    assert float(tags["mixtune.test_score"]) == result["test_score"]
    assert float(tags["mixtune.test_low"]) <= result["test_score"] <= float(tags["mixtune.test_high"])
    assert tags["mixtune.test_n"] == "12" and tags["mixtune.data_md5"] == "0123456789abcdef0123456789abcdef.dir"
    # the share, how it was chosen, and the forgetting travel with the version
    assert float(tags["mixtune.generalist_share"]) == measured["share"] and tags["mixtune.share_source"] == "auto"
    assert float(tags["mixtune.forgetting"]) == pytest.approx(measured["forgetting"]["tuned"]["value"])
    assert tags["mixtune.decision"] == "promoted" and tags["mixtune.reason"] == "first version: no champion yet"
    assert tags["mixtune.champion_version"] == "" and tags["mixtune.champion_score"] == ""
    # what the registry page shows: the version's score and decision, the model's what-it-is
    t = measured["macro_f1"]["tuned"]
    assert client().get_model_version(NAME, "1").description == (
        f"test macro_f1 {t['value']:.3f} [{t['low']:.3f}, {t['high']:.3f}] on 12 examples, generalist share "
        f"{measured['share']:.2f} (auto): first version: no champion yet")
    assert client().get_registered_model(NAME).description.startswith(f"{sp.TASK}: ")
    # the runs that made it, found by the files' sha256: evaluate's (of its predictions) and train's (of the adapter)
    assert tags["mixtune.evaluate_run_id"] == evaluated.info.run_id
    assert tags["mixtune.source_run_id"] == runs_of("train")[0].info.run_id == evaluated.data.tags["mixtune.train_run_id"]
    # The test predictions, kept with the register run: the next candidate's gain is paired on them.
    from mlflow.artifacts import load_dict

    preds = load_dict(f"runs:/{tags['mixtune.register_run_id']}/test_predictions.json")
    assert preds["predictions"] == [r["tuned"] for r in read_jsonl(project / "eval" / "predictions.jsonl")]

    rc, out, err = cli("register")
    assert rc == 0, err
    again = json.loads((project / "register" / "result.json").read_text())
    assert again["version"] == 1 and not again["created"] and f"{NAME} version 1: already registered" in out
    assert list(versions()) == ["1"] and alias("champion") == "1"


def test_champion_moves_only_for_a_candidate_that_beats_it(project, cli, tiny_model):
    evaluated_as(project, TRIALS[0], 6)  # 0.5
    assert cli("register")[0] == 0
    assert alias("champion") == "1"

    evaluated_as(project, TRIALS[1], 3)  # 0.25: worse
    rc, out, err = cli("register")
    assert rc == 0, err
    assert alias("candidate") == "2" and alias("champion") == "1"
    tags = versions()["2"]
    assert tags["mixtune.decision"] == "kept" and tags["mixtune.champion_version"] == "1"
    assert tags["mixtune.test_score"] == "0.25" and tags["mixtune.champion_score"] == "0.5"
    assert tags["mixtune.reason"].startswith("kept champion: accuracy 0.250 vs champion v1 0.500: gain -0.250 [")

    evaluated_as(project, TRIALS[2], 7)  # better by one example: the paired interval reaches 0
    sp.write_params(project, tiny_model, search=SEARCH, register={"require_interval": True})
    assert cli("register")[0] == 0
    assert alias("candidate") == "3" and alias("champion") == "1"
    assert "the interval does not lie above 0" in versions()["3"]["mixtune.reason"]

    evaluated_as(project, TRIALS[3], 12)  # 1.0
    assert cli("register")[0] == 0
    assert alias("candidate") == "4" and alias("champion") == "4"
    result = json.loads((project / "register" / "result.json").read_text())
    assert result["promoted"] and result["gain"] == 0.5 and result["gain_low"] > 0
    assert versions()["4"]["mixtune.reason"].startswith("promoted: accuracy 1.000 vs champion v1 0.500: gain +0.500")
    assert sorted(versions()) == ["1", "2", "3", "4"]  # never deleted


def test_a_champion_scored_on_other_test_examples_is_kept(project, cli):
    evaluated_as(project, TRIALS[0], 6)
    assert cli("register")[0] == 0
    evaluated_as(project, TRIALS[1], 10, n=10)  # evaluate.max_examples=10: not the same examples
    assert cli("register")[0] == 0
    assert alias("candidate") == "2" and alias("champion") == "1"
    assert versions()["2"]["mixtune.reason"].startswith("kept champion v1: it was scored on other test examples")


def test_promote_by_hand_and_roll_back(project, cli):
    evaluated_as(project, TRIALS[0], 12)
    cli("register")
    evaluated_as(project, TRIALS[1], 0)
    cli("register")
    assert alias("champion") == "1"

    rc, out, err = cli("promote", "--version", "2")
    assert rc == 0, err
    assert out.strip() == f"promote: {NAME} version 2 is champion (was 1)"
    assert alias("champion") == "2" and "champion was v1" in versions()["2"]["mixtune.promoted"]
    assert cli("promote", "--version", "1")[0] == 0  # rollback
    assert alias("champion") == "1"
    rc, out, err = cli("promote", "--version", "9")
    assert rc == 1
    one_line(err, "mixtune promote: error: ", f"registered model '{NAME}' has no version 9")


def test_unreachable_store_is_one_line_and_changes_nothing(project, cli, monkeypatch):
    assert cli("register")[0] == 0
    result = (project / "register" / "result.json").read_bytes()
    uri = os.environ["MLFLOW_TRACKING_URI"]

    closed = f"http://127.0.0.1:{sp.free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", closed)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    evaluated_as(project, TRIALS[0], 5)
    rc, out, err = cli("register")
    assert rc == 1 and out == ""
    one_line(err, f"mixtune register: error: MLflow store {closed}: ")
    rc, out, err = cli("promote", "--version", "1")
    assert rc == 1
    one_line(err, f"mixtune promote: error: MLflow store {closed}: ")
    assert (project / "register" / "result.json").read_bytes() == result

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert list(versions()) == ["1"] and alias("champion") == "1"


# --- using the champion: served = evaluated -------------------------------------------------------------


@pytest.fixture
def registered(project, cli) -> Path:
    assert cli("register")[0] == 0
    return project


def raw_test_records(root: Path) -> list[dict]:
    """The test split as the user's file holds it (id topic/N: the file's Nth record), without its labels."""
    raw = read_jsonl(root / sp.SOURCE["path"])
    return [{"id": ex["id"], "text": raw[int(ex["id"].split("/")[1])]["text"]}
            for ex in read_jsonl(root / "prepared" / "specialist" / "test.jsonl")]


def evaluated(root: Path) -> list[str]:
    return [r["tuned"] for r in read_jsonl(root / "eval" / "predictions.jsonl")]


@pytest.fixture
def scored(registered) -> list[dict]:
    """Each test example's option probabilities by score.answer, the function evaluate scored with, on the
    final adapter and the prepared prompts."""
    from types import SimpleNamespace

    from mixtune.core import score
    from mixtune.core.model import load_adapter, load_base, load_tokenizer
    from mixtune.core.serve import answers

    base, cfg = sp.load(registered, "model").base, sp.load(registered, "evaluate")
    test = read_jsonl(registered / "prepared" / "specialist" / "test.jsonl")
    model = load_adapter(load_base(base), registered / "train" / "adapter")
    cfg = SimpleNamespace(batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens)
    return answers(test, *score.answer(model, load_tokenizer(base), test, cfg))


def check_answers(answers: list[dict], labels: list[str], scored: list[dict]) -> None:
    """Evaluate's labels, and the probabilities of evaluate's scoring function (they vary: not a constant)."""
    assert [a["prediction"] for a in answers] == labels
    for a, s in zip(answers, scored, strict=True):
        assert a["task"] == sp.TASK and sorted(a["probabilities"]) == sp.LABELS
        assert a["probabilities"] == pytest.approx(s["probabilities"], abs=1e-5)
        assert max(a["probabilities"], key=a["probabilities"].get) == a["prediction"]
    spread = [a["probabilities"]["a"] for a in answers]
    assert max(spread) - min(spread) > 1e-3


def test_the_champion_takes_raw_records_and_answers_as_evaluate_did(registered, cli, scored):
    """Raw test records in (the text only): the labels evaluate scored, through mlflow.pyfunc.load_model and
    through `mixtune predict` on a CSV; every prompt is exactly prepare's."""
    import mlflow
    import pandas as pd

    from mixtune.core.serve import Requests

    records, labels, uri = raw_test_records(registered), evaluated(registered), f"models:/{NAME}@champion"
    recipe = json.loads((registered / "prepared" / "specialist" / "recipe.json").read_text())
    test = read_jsonl(registered / "prepared" / "specialist" / "test.jsonl")
    assert [ex["prompt"] for ex in Requests(recipe)(records, str)] == [ex["prompt"] for ex in test]

    check_answers(mlflow.pyfunc.load_model(uri).predict(pd.DataFrame(records)), labels, scored)

    pd.DataFrame(records).to_csv(registered / "articles.csv", index=False)
    rc, out, err = cli("predict", "--model", uri, "--input", "articles.csv", "--output", "preds.jsonl")
    assert rc == 0, err
    assert out.strip() == "predict: 12 predictions in preds.jsonl"
    preds = read_jsonl(registered / "preds.jsonl")
    assert [p["id"] for p in preds] == [r["id"] for r in records]
    check_answers([{k: v for k, v in p.items() if k != "id"} for p in preds], labels, scored)

    # The registry shows how to call it: the source's own column, and one of its raw records.
    info = mlflow.models.get_model_info(uri)
    assert info.signature.inputs.to_dict() == [{"type": "string", "name": "text", "required": True},
                                               {"type": "string", "name": "task", "required": False}]
    model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    example = json.loads((model_dir / "serving_input_example.json").read_text())
    # it carries the whole package it was evaluated with, not one folder of it
    carried = {str(f.relative_to(model_dir / "code" / "mixtune")) for f in (model_dir / "code" / "mixtune").rglob("*.py")}
    assert {"core/serve.py", "core/score.py", "core/sources.py", "plumbing/files.py", "cli.py"} <= carried
    assert example["dataframe_split"]["data"] == [[read_jsonl(registered / sp.SOURCE["path"])[0]["text"]]]
    v = client().get_model_version(NAME, "1")
    assert v.run_id == versions()["1"]["mixtune.register_run_id"] and v.tags["mixtune.served_sha256"]


def test_mlflow_models_serve_answers_raw_records_as_evaluate_did(registered, scored):
    """A real `mlflow models serve` on 127.0.0.1: raw records in, evaluate's labels and the options'
    probabilities out; a record without its text is refused with the field named."""
    serve = ["models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager", "local"]
    records = [{"text": r["text"]} for r in raw_test_records(registered)]
    with sp.mlflow_service(serve, registered, "/ping", 240) as url:
        def post(payload: dict):
            req = urllib.request.Request(f"{url}/invocations", data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=120) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        status, body = post({"dataframe_records": records})
        assert status == 200
        check_answers(body["predictions"], evaluated(registered), scored)
        status, body = post({"dataframe_records": [{"title": "no text"}]})
        assert status == 400 and "text" in body["message"]


@pytest.mark.parametrize("content, name, fragment", [
    ("id,text\n1,fine\n2,\n", "in.csv", "in.csv:3: field 'text': empty"),
    ("id,body\n1,fine\n", "in.csv", "in.csv:2: field 'text': missing"),
    ('{"text": "fine"}\n{"text": 5}\n', "in.jsonl", "in.jsonl:2: field 'text': expected text, got int"),
    ('{"text": "fine"}\n{"text": "cut\n', "in.jsonl", "in.jsonl:2: not valid JSON"),
    ('{"text": "fine", "task": "other"}\n', "in.jsonl", "in.jsonl:1: field 'task': 'other' is not a task of this model"),
    ("", "in.txt", "in.txt: --input: unknown file format 'txt'"),
])
def test_predict_bad_records_are_one_line_before_the_model_loads(registered, cli, monkeypatch, content, name,
                                                                 fragment):
    def no_model(*a, **kw):
        raise AssertionError("the model loaded before the input was checked")

    monkeypatch.setattr("mlflow.pyfunc.load_model", no_model)
    (registered / name).write_text(content)
    rc, out, err = cli("predict", "--model", f"models:/{NAME}@champion", "--input", name, "--output", "p.jsonl")
    assert rc == 1 and out == ""
    one_line(err, "mixtune predict: error: ", fragment)
    assert not (registered / "p.jsonl").exists()


def test_make_ui_prints_links_to_the_runs_the_latest_search_and_the_registered_model(registered):
    from mixtune.plumbing.ui import links

    exp = client().get_experiment_by_name(f"mixtune/{sp.TASK}")
    # made by the stages so that the UI opens it on its runs, not on MLflow 3's GenAI overview
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    [latest] = client().search_runs([exp.experiment_id], "tags.`mixtune.stage` = 'search'",
                                    order_by=["attributes.start_time DESC"], max_results=1)
    base = "http://127.0.0.1:5999"
    assert links(base) == [
        f"mixtune/{sp.TASK}: its runs            {base}/#/experiments/{exp.experiment_id}/runs",
        f"mixtune/{sp.TASK}: the latest search   {base}/#/experiments/{exp.experiment_id}/runs/{latest.info.run_id}/artifacts",
        f"{NAME} (candidate=v1, champion=v1): {base}/#/models/{NAME}"]
    assert "dev_vs_share.png" in {a.path for a in client().list_artifacts(latest.info.run_id)}  # the charts
