"""register: the final adapter (train), as evaluate measured it, becomes a new version of the task's registered
model with alias `candidate`. Alias `champion` moves to it only if it beats the champion on the same test
examples by more than register.min_gain (and, with register.require_interval, the paired 95% interval of the
gain lies above 0), by the metric evaluate used. Nothing is scored again: the candidate's answers are
eval/predictions.jsonl, and each register run keeps them as an artifact, so a later candidate is compared with
the champion on the same examples, paired. Versions are never deleted; the same adapter is never registered
twice (versions are keyed by the sha256 of the adapter and the recipe it is served with). The version is
the task's pyfunc (serve.py): the adapter, the base model's reference and prepare's prompt recipe, answering
raw task input the way evaluate scored it. `mixtune promote --version N` moves `champion` by hand.
Output: register/result.json (DVC metrics: the version, its test score, whether it was promoted).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from pathlib import Path

from mixtune.core import score
from mixtune.core.model import adapter_file, resolve_base
from mixtune.plumbing import entry
from mixtune.plumbing.config import ModelConfig, RegisterConfig, load_section
from mixtune.plumbing.errors import MixtuneError, first_line
from mixtune.plumbing.files import read_jsonl, sha256_file, write_json
from mixtune.plumbing.tracking import PREDICTIONS_TAG, data_hash, find_run, mix_label, stage_run, tracking_uri

# Of evaluate's keys, the ones register reads: the champion's interval, and how the served model answers
# (as evaluate answered).
EVALUATE_KEYS = ("bootstrap", "seed", "batch_size", "max_new_tokens")
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


def _decide(cfg: RegisterConfig, champion, test_sha: str, examples, preds, metric: str, eval_cfg) -> tuple[dict, bool, str]:
    """The candidate's test score (and the paired gain over the champion) and whether champion moves."""
    import mlflow

    scorer = score.Scorer(examples, metric)
    if champion is None:
        return score.compare(scorer, {"tuned": preds}, eval_cfg.bootstrap, eval_cfg.seed), True, \
            "first version: no champion yet"
    t = champion.tags
    champ = None
    if t.get("mixtune.test_sha256") == test_sha and "mixtune.register_run_id" in t:
        with contextlib.suppress(Exception):  # a champion registered before its predictions were kept
            champ = mlflow.artifacts.load_dict(f"runs:/{t['mixtune.register_run_id']}/{PREDICTIONS}")
    if champ is None or champ["ids"] != [ex["id"] for ex in examples]:  # a changed split or evaluate.max_examples
        return score.compare(scorer, {"tuned": preds}, eval_cfg.bootstrap, eval_cfg.seed), False, \
            (f"kept champion v{champion.version}: it was scored on other test examples; compare by hand and use "
             "`mixtune promote`")
    s = score.compare(scorer, {"tuned": preds, "champion": champ["predictions"]}, eval_cfg.bootstrap, eval_cfg.seed,
                      gains=(("tuned", "champion"),))
    g = s["tuned-champion"]
    vs = (f"{metric} {s['tuned']['value']:.3f} vs champion v{champion.version} {s['champion']['value']:.3f}: "
          f"gain {g['value']:+.3f} [{g['low']:+.3f}, {g['high']:+.3f}]")
    if g["value"] <= cfg.min_gain:
        return s, False, f"kept champion: {vs}, not above register.min_gain={cfg.min_gain}"
    if cfg.require_interval and g["low"] <= 0:
        return s, False, f"kept champion: {vs}, the interval does not lie above 0 (register.require_interval)"
    return s, True, f"promoted: {vs}"


def _numbers(result: dict) -> dict:
    """register/result.json (DVC metrics): the numbers `dvc exp show` compares; the name and the reason are
    printed, and are the version's tags."""
    return {k: v for k, v in result.items() if not isinstance(v, str)}


def run(cfg: RegisterConfig, eval_cfg, model_cfg: ModelConfig, prepared: Path = Path("prepared"),
        train: Path = Path("train"), evaluation: Path = Path("eval"), out: Path = Path("register")) -> dict:
    """`eval_cfg`: evaluate's EVALUATE_KEYS."""
    test_path, adapter = prepared / "specialist" / "test.jsonl", adapter_file(train / "adapter")
    recipe_path = prepared / "specialist" / "recipe.json"
    for path, stage in ((evaluation / "details.json", "evaluate"), (evaluation / "predictions.jsonl", "evaluate"),
                        (evaluation / "metrics.json", "evaluate"), (test_path, "prepare"), (recipe_path, "prepare"),
                        (adapter, "train")):
        if not path.is_file():
            raise MixtuneError(f"{path}: no such file (run the {stage} stage first)")
    details = json.loads((evaluation / "details.json").read_text())
    measured = json.loads((evaluation / "metrics.json").read_text())
    rows = read_jsonl(evaluation / "predictions.jsonl")
    by_id = {ex["id"]: ex for ex in read_jsonl(test_path)}
    missing = [r["id"] for r in rows if r["id"] not in by_id]
    if missing:
        raise MixtuneError(f"{evaluation / 'predictions.jsonl'}: {len(missing)} ids not in {test_path} (e.g. "
                           f"{missing[0]}): run the evaluate stage again")
    examples, preds = [by_id[r["id"]] for r in rows], [r["tuned"] for r in rows]
    metric, tasks = details["metric"], details["tasks"]
    name = cfg.name or default_name(tasks)
    # What is served: the adapter, answering raw task input as evaluate answered the test split.
    recipe = {**json.loads(recipe_path.read_text()), "base": resolve_base(model_cfg.base),
              "score": {"batch_size": eval_cfg.batch_size, "max_new_tokens": eval_cfg.max_new_tokens}}
    adapter_sha = sha256_file(adapter)
    served = hashlib.sha256((adapter_sha + json.dumps(recipe, sort_keys=True)).encode()).hexdigest()
    key = {"mixtune.served_sha256": served, "mixtune.adapter_sha256": adapter_sha,
           "mixtune.test_sha256": sha256_file(test_path)}
    params = {"register": cfg.model_dump(), "evaluate": eval_cfg.model_dump()}
    tags = {"mixtune.registered_model": name}

    # The run opens first: an unreachable store fails here, before anything is changed.
    label = mix_label({"generalist_share": measured["share"], "share_source": details["share_source"],
                       "specialist_size": details["specialist_size"]})
    with stage_run("register", tasks, params, tags, label=label) as mlrun:
        import mlflow

        client = mlflow.MlflowClient()
        with registry_errors():  # the runs that made what is registered, found by the files' sha256
            evaluated = find_run(tasks, "evaluate", {PREDICTIONS_TAG: sha256_file(evaluation / "predictions.jsonl")})
            trained = client.get_run(evaluated).data.tags.get("mixtune.train_run_id", "") if evaluated else ""
            mlflow.set_tags({"mixtune.evaluate_run_id": evaluated or "", "mixtune.source_run_id": trained})
        with registry_errors():
            existing = [v for v in client.search_model_versions(f"name = '{name}'")
                        if v.tags.get("mixtune.served_sha256") == key["mixtune.served_sha256"]]
            champion = _champion(client, name)
        if existing:
            v = existing[0]
            with registry_errors():
                client.set_registered_model_alias(name, "candidate", v.version)
            result = {"name": name, "version": int(v.version), "created": False,
                      "champion": int(champion.version) if champion else None,
                      "test_score": float(v.tags.get("mixtune.test_score", "nan")),
                      "reason": f"already registered (same adapter and recipe); {v.tags.get('mixtune.reason', '')}"}
            write_json(out / "result.json", _numbers(result))
            return result

        mlflow.log_dict({"ids": [ex["id"] for ex in examples], "predictions": preds}, PREDICTIONS)
        with registry_errors():
            s, promote, reason = _decide(cfg, champion, key["mixtune.test_sha256"], examples, preds, metric, eval_cfg)
        tuned = s["tuned"]
        mlflow.log_metrics({f"test.{metric}": tuned["value"], f"test.{metric}_low": tuned["low"],
                            f"test.{metric}_high": tuned["high"]})
        forgetting = measured.get("forgetting", {}).get("tuned", {})
        version_tags = {
            **key, "mixtune.test_metric": metric, "mixtune.test_score": tuned["value"],
            "mixtune.test_low": tuned["low"], "mixtune.test_high": tuned["high"], "mixtune.test_n": len(examples),
            "mixtune.champion_version": champion.version if champion else "",
            "mixtune.champion_score": champion.tags.get("mixtune.test_score", "") if champion else "",
            "mixtune.data_md5": data_hash() or "", "mixtune.generalist_share": measured["share"],
            "mixtune.share_source": details["share_source"],
            "mixtune.forgetting": round(forgetting["value"], 9) if forgetting else "",  # 0.02, not 0.0200000000000001
            "mixtune.forgetting_interval": f"[{forgetting['low']:+.3f}, {forgetting['high']:+.3f}]" if forgetting else "",
            "mixtune.source_run_id": trained, "mixtune.evaluate_run_id": evaluated or "",
            "mixtune.register_run_id": mlrun.info.run_id,
            "mixtune.decision": "promoted" if promote else "kept", "mixtune.reason": reason,
        }
        from mixtune.core import serve

        with registry_errors():
            info = serve.log_model(train / "adapter", recipe)
            v = mlflow.register_model(info.model_uri, name, tags={k: str(x) for k, x in version_tags.items()})
            client.set_registered_model_alias(name, "candidate", v.version)
            if promote:
                client.set_registered_model_alias(name, "champion", v.version)
            # What the registry page shows beside each version and above them all.
            client.update_model_version(name, v.version, description=(
                f"test {metric} {tuned['value']:.3f} [{tuned['low']:.3f}, {tuned['high']:.3f}] on {len(examples)} "
                f"examples, generalist share {measured['share']:.2f} ({details['share_source']}): {reason}"))
            if not client.get_registered_model(name).description:
                client.update_registered_model(name, description=(
                    f"{' + '.join(tasks)}: {model_cfg.base} with a LoRA adapter tuned by mixtune. Takes the task's "
                    "raw records (mixtune predict, mlflow models serve) and answers with the prediction and its "
                    "option probabilities. `champion` is the version to serve; `candidate` the latest."))
        mlflow.set_tags({"mixtune.version": v.version, "mixtune.decision": version_tags["mixtune.decision"],
                         "mlflow.note.content": reason})
        result = {"name": name, "version": int(v.version), "created": True, "metric": metric,
                  "test_score": tuned["value"], "test_low": tuned["low"], "test_high": tuned["high"],
                  "promoted": promote, "champion": int(v.version) if promote else int(champion.version),
                  "reason": reason}
        if "tuned-champion" in s:
            g = s["tuned-champion"]
            result.update(gain=g["value"], gain_low=g["low"], gain_high=g["high"])
        write_json(out / "result.json", _numbers(result))
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


# --- the stage's command (`python -m mixtune.stages.register`, `mixtune register`) ---------------------------------


def command(args) -> None:
    r = run(load_section("register", args.params), load_section("evaluate", args.params, keys=EVALUATE_KEYS),
            load_section("model", args.params))
    print(f"register: {r['name']} version {r['version']}: {r['reason']}")


def parser():
    return entry.parser("mixtune register", "register the tuned adapter as evaluated; champion moves if it wins")


if __name__ == "__main__":
    sys.exit(entry.main(parser(), command))
