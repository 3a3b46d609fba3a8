"""register: the search's best adapter, scored once on the specialist TEST split, becomes a new version of the
task's registered model with alias `candidate`. Alias `champion` moves to it only if it beats the champion on
the same test split by more than register.min_gain (and, with register.require_interval, the paired 95%
interval of the gain lies above 0). Versions are never deleted; the same adapter is never registered twice
(versions are keyed by the adapter's sha256). `mixtune promote --version N` moves `champion` by hand.

The champion's test predictions are an artifact of the register run that scored it, so the gain is paired
(same examples) without scoring the champion again. Output: register/result.json (DVC metrics).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from mixtune.config import ModelConfig, RegisterConfig, load_section
from mixtune.errors import MixtuneError, first_line
from mixtune.files import read_jsonl, sha256_file, write_json
from mixtune.model import load_adapter, load_base, load_tokenizer, precision, require_adapter, resolve_base
from mixtune.tracking import data_hash, stage_run, tracking_uri

EVALUATE_KEYS = ("batch_size", "max_new_tokens", "max_examples", "bootstrap", "seed")  # the keys register reads
PREDICTIONS = "test_predictions.json"  # in each register run: the candidate's predictions on the test split


def default_name(tasks: list[str]) -> str:
    return "mixtune-" + "+".join(tasks)


def model_name(params: str | Path = "params.yaml", search: Path = Path("search")) -> str:
    """register.name, else the name the register stage gives the task's model (from search/best.json)."""
    name = load_section("register", params).name
    if name:
        return name
    best = search / "best.json"
    if not best.is_file():
        raise MixtuneError(f"{best}: no such file; give --name or set register.name")
    return default_name(json.loads(best.read_text())["tasks"])


@contextlib.contextmanager
def registry_errors():
    """Any failure to reach or update the registry: one line naming the store."""
    try:
        yield
    except MixtuneError:
        raise
    except Exception as e:
        raise MixtuneError(f"MLflow store {tracking_uri()}: {first_line(e)}") from None


def _champion(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, "champion")
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None  # no such model yet, or no champion
        raise


def _decide(cfg: RegisterConfig, champion, test_sha: str, examples, preds, eval_cfg) -> tuple[dict, bool, str]:
    """The candidate's test metrics (and the paired gain over the champion) and whether champion moves."""
    import mlflow

    from mixtune.evaluate import summarize

    def alone() -> dict:  # the candidate's own score (summarize pairs it with itself; the gain is unused)
        return {"tuned": summarize(examples, preds, preds, eval_cfg)["tuned"]}

    if champion is None:
        return alone(), True, "first version: no champion yet"
    t = champion.tags
    champ = None
    if t.get("mixtune.test_sha256") == test_sha and "mixtune.register_run_id" in t:
        champ = mlflow.artifacts.load_dict(f"runs:/{t['mixtune.register_run_id']}/{PREDICTIONS}")
    if champ is None or champ["ids"] != [ex["id"] for ex in examples]:  # a changed split or evaluate.max_examples
        return alone(), False, (f"kept champion v{champion.version}: it was scored on other test examples; "
                                "compare by hand and use `mixtune promote`")
    s = summarize(examples, preds, champ["predictions"], eval_cfg)
    key = t["mixtune.test_metric"]
    gain, low, high = s["gain"][key], s["gain"][f"{key}_low"], s["gain"][f"{key}_high"]
    vs = (f"{key} {s['tuned'][key]:.3f} vs champion v{champion.version} {s['base'][key]:.3f}: "
          f"gain {gain:+.3f} [{low:+.3f}, {high:+.3f}]")
    if gain <= cfg.min_gain:
        return s, False, f"kept champion: {vs}, not above register.min_gain={cfg.min_gain}"
    if cfg.require_interval and low <= 0:
        return s, False, f"kept champion: {vs}, the interval does not lie above 0 (register.require_interval)"
    return s, True, f"promoted: {vs}"


def run(cfg: RegisterConfig, model_cfg: ModelConfig, eval_cfg, prepared: Path = Path("prepared"),
        search: Path = Path("search"), out: Path = Path("register")) -> dict:
    best_path, test_path = search / "best.json", prepared / "specialist" / "test.jsonl"
    for path, stage in ((best_path, "search"), (test_path, "prepare")):
        if not path.is_file():
            raise MixtuneError(f"{path}: no such file (run the {stage} stage first)")
    best = json.loads(best_path.read_text())
    adapter = Path(best["adapter"])
    require_adapter(adapter)
    examples = read_jsonl(test_path)[: eval_cfg.max_examples]
    name = cfg.name or default_name(best["tasks"])
    metric = "accuracy" if all(ex["options"] for ex in examples) else "exact_match"
    key = {"mixtune.adapter_sha256": sha256_file(adapter / "adapter_model.safetensors"),
           "mixtune.test_sha256": sha256_file(test_path)}
    base_path = resolve_base(model_cfg.base)
    params = {"register": cfg.model_dump(), "model": model_cfg.model_dump(),
              "evaluate": {**eval_cfg.model_dump(), "split": "test"}}
    tags = {"mixtune.registered_model": name, "mixtune.source_run_id": best["run_id"]}

    # The run opens first: an unreachable store fails here, before anything is scored or changed.
    with stage_run("register", best["tasks"], params, tags) as mlrun:
        import mlflow

        client = mlflow.MlflowClient()
        with registry_errors():
            existing = [v for v in client.search_model_versions(f"name = '{name}'")
                        if v.tags.get("mixtune.adapter_sha256") == key["mixtune.adapter_sha256"]]
            champion = _champion(client, name)
        if existing:
            v = existing[0]
            with registry_errors():
                client.set_registered_model_alias(name, "candidate", v.version)
            result = {"name": name, "version": int(v.version), "created": False,
                      "champion": int(champion.version) if champion else None,
                      "test_score": float(v.tags.get("mixtune.test_score", "nan")),
                      "reason": f"already registered (same adapter); {v.tags.get('mixtune.reason', '')}"}
            write_json(out / "result.json", result)
            return result

        tokenizer = load_tokenizer(base_path)
        model = load_adapter(load_base(base_path), adapter)
        model.eval()
        from mixtune.evaluate import predict

        preds = predict(model, tokenizer, examples, eval_cfg, precision("auto"))
        mlflow.log_dict({"ids": [ex["id"] for ex in examples], "predictions": preds}, PREDICTIONS)
        with registry_errors():
            s, promote, reason = _decide(cfg, champion, key["mixtune.test_sha256"], examples, preds, eval_cfg)
        score = s["tuned"]
        mlflow.log_metrics({f"test.{k}": v for k, v in score.items()})
        version_tags = {
            **key, "mixtune.test_metric": metric, "mixtune.test_score": score[metric],
            "mixtune.test_low": score[f"{metric}_low"], "mixtune.test_high": score[f"{metric}_high"],
            "mixtune.test_n": len(examples), "mixtune.champion_version": champion.version if champion else "",
            "mixtune.champion_score": champion.tags.get("mixtune.test_score", "") if champion else "",
            "mixtune.data_md5": data_hash() or "", "mixtune.mix_sha256": best["mix_sha256"],
            "mixtune.source_run_id": best["run_id"], "mixtune.register_run_id": mlrun.info.run_id,
            "mixtune.generalist_share": best["generalist_share"], "mixtune.specialist_size": best["size"],
            "mixtune.decision": "promoted" if promote else "kept", "mixtune.reason": reason,
        }
        with registry_errors():
            v = mlflow.register_model(best["model_uri"], name, tags={k: str(x) for k, x in version_tags.items()})
            client.set_registered_model_alias(name, "candidate", v.version)
            if promote:
                client.set_registered_model_alias(name, "champion", v.version)
        mlflow.set_tags({"mixtune.version": v.version, "mixtune.decision": version_tags["mixtune.decision"],
                         "mlflow.note.content": reason})
        result = {"name": name, "version": int(v.version), "created": True, "metric": metric,
                  "test_score": score[metric], "test_low": score[f"{metric}_low"],
                  "test_high": score[f"{metric}_high"], "promoted": promote,
                  "champion": int(v.version) if promote else int(champion.version), "reason": reason}
        if "gain" in s:
            result.update(gain=s["gain"][metric], gain_low=s["gain"][f"{metric}_low"],
                          gain_high=s["gain"][f"{metric}_high"])
        write_json(out / "result.json", result)
    return result


def promote(version: int, name: str) -> dict:
    """Move `champion` to version N by hand (a rollback is promoting an older version)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.MlflowClient()
    with registry_errors():
        try:
            client.get_model_version(name, str(version))
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise MixtuneError(f"registered model {name!r} has no version {version}") from None
            raise
        champion = _champion(client, name)
        previous = int(champion.version) if champion else None
        client.set_registered_model_alias(name, "champion", str(version))
        client.set_model_version_tag(name, str(version), "mixtune.promoted",
                                     f"by hand at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}; champion was "
                                     f"{'v' + str(previous) if previous else 'none'}")
    return {"name": name, "version": version, "previous": previous}
