"""search: how much generalist data helps this task? The dev score drawn as a curve over the generalist share
in [0, search.max_share], one search per specialist size, on the specialist DEV split (test never chooses).

A trial is the pipeline in small, mix -> train -> dev score (+ the forgetting probe), and a nested MLflow run
under the search's run. Every trial runs to the end: a share is answered or not tried. The first `search.grid`
trials are shares evenly spaced over the range, the pure specialist first; later ones (up to `n_trials`) come
from Optuna's GPSampler, a Gaussian process fitted to the curve so far, which suits a 1-D, 6-20 trial search.
Trial adapters go to the trial cache (mixtune.core.trial), where the train stage finds the recommended share's.
The answer (core/search_answer.py): the near-optimal range and one share in it.

The Optuna storage is search/optuna.journal, in the repository but not a DVC output, so a re-run continues the
search and runs only the missing trials; or the database at `search.storage`, shared by `mixtune search
--worker` processes on several machines. Outputs (not of a worker): search/best.json, search/metrics.json,
search/trials.csv (DVC plot), search/specialist_adapter/ (the share-0 trial's), and the answer in the search
run's description.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
from pathlib import Path

from mixtune.core import metrics as M
from mixtune.core import score
from mixtune.core.model import load_tokenizer, release_memory, resolve_base, train_precision
from mixtune.core.search_answer import log_summary, recommend, trial_rows, trials_csv
from mixtune.plumbing import entry, lineage
from mixtune.plumbing.config import MixConfig, ModelConfig, SearchConfig, TrainConfig
from mixtune.plumbing.errors import MixtuneError
from mixtune.plumbing.files import atomic_dir, atomic_file, read_jsonl, sha256_file, write_json
from mixtune.plumbing.search_storage import SAME_SHARE, Claim, count, grid, minutes, open_study, parent_run
from mixtune.plumbing.search_storage import sampler, share_of, time_left, trial_run
from mixtune.plumbing.tracking import Timer, repo_root, stage_run

MIX_KEYS = ("specialist_size", "seed")  # of params.yaml's sections, the keys the search reads (dvc.yaml: the same)
SCORE_KEYS = ("batch_size", "max_new_tokens", "bootstrap")


def study_definition(cfg: SearchConfig, mix_cfg, train_cfg: TrainConfig, model_cfg: ModelConfig, score_cfg,
                     size: int, prepared: Path) -> dict:
    """Everything that computes a trial's score; the search's name is its hash. Changing n_trials, timeout,
    the storage or how the answer is read from the curve (recommend, max_forgetting) continues a search;
    changing the data, the model, the training, the scoring, the range, the grid or the code that computes a
    trial (its syntax, not its comments) starts a new one, and the old one stays in storage."""
    files = [prepared / "specialist" / "train.jsonl", prepared / "specialist" / "dev.jsonl",
             prepared / "generalist.jsonl", prepared / "generalist_probe.jsonl"]
    return {"specialist_size": size, "mix_seed": mix_cfg.seed, "model": model_cfg.model_dump(),
            "train": train_cfg.model_dump(), "score": {k: getattr(score_cfg, k) for k in SCORE_KEYS},
            "data_sha256": [sha256_file(f)[:16] for f in files],
            "search": cfg.model_dump(include={"max_share", "seed", "grid"}),
            "code_sha256": lineage.fingerprint(["mixtune.stages.search"])[:16]}  # not __name__: "__main__" under -m


class _Trials:
    """What every trial of one search needs, loaded once per process; `__call__` is Optuna's objective."""

    def __init__(self, cfg, mix_cfg, train_cfg, model_cfg, eval_cfg, base, dev, probe, metric, prepared, study,
                 claim, parent, timer: Timer):
        self.cfg, self.mix_cfg, self.train_cfg, self.model_cfg, self.eval_cfg = cfg, mix_cfg, train_cfg, model_cfg, \
            eval_cfg
        self.timer = timer  # the seconds this process spends in MLflow calls (the stage's run logs them)
        self.base, self.dev, self.probe, self.metric = base, dev, probe, metric
        self.prepared, self.claim, self.parent = prepared, claim, parent
        self.size = study.user_attrs["specialist_size"]
        self.folder = repo_root() / ".cache" / "search" / study.study_name
        self.tokenizer = load_tokenizer(base)
        self.prec = train_precision(train_cfg.precision)
        self.scorer = score.Scorer(dev, metric)
        self.numbers: list[int] = []  # the trials this process ran
        self.trained: list[int] = []  # of them, those it trained (not taken from the cache): what a trial costs

    def predict(self, model, examples: list[dict]) -> list[str]:
        return score.predict(model, self.tokenizer, examples, self.eval_cfg)

    def _probe(self, model) -> str:
        """The model's score on each probe question, as bits (evaluate's forgetting scores the same way)."""
        return M.to_bits(score.probe_scorer(self.probe).encode(self.predict(model, self.probe)))

    def base_probe(self, study) -> None:
        """The base model's answers to the probe, once per search: every trial's forgetting is against them."""
        if "base_probe" not in study.user_attrs and self.probe:
            from mixtune.core.model import load_base

            study.set_user_attr("base_probe", self._probe(load_base(self.base)))

    def __call__(self, trial) -> float:
        share = trial.suggest_float("generalist_share", 0.0, self.cfg.max_share)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        self.claim.release()  # the trial is RUNNING and names its process: others may start the next one
        self.numbers.append(trial.number)
        print(f"search n={self.size}: trial {trial.number} r={share:.2f}: training", flush=True)
        folder = self.folder / str(trial.number)
        with trial_run(self.parent, trial, share, self.size, self.timer):
            try:
                return self._run(trial, share, folder)
            finally:
                shutil.rmtree(folder, ignore_errors=True)  # the mix's manifest is logged, and it can be remade
                # The trial's model outlives it in a reference cycle until a full collection: without this, the
                # next trial trained beside it (514 MB of the default model, alive after its trial returned).
                release_memory()

    def _run(self, trial, share: float, folder: Path) -> float:
        import mlflow

        from mixtune.core import trial as core
        from mixtune.core import tune
        from mixtune.stages import mix

        manifest = mix.run(MixConfig(specialist_size=self.size, generalist_share=share, seed=self.mix_cfg.seed,
                                     corrupt_generalist=0.0), self.prepared, folder / "mix")
        trial.set_user_attr("mix_sha256", manifest["sha256"])
        with self.timer():
            mlflow.log_dict(manifest, "mix_manifest.json")
            mlflow.log_params({"generalist_size": manifest["generalist_size"], "total": manifest["total"]})
            mlflow.set_tag("mixtune.mix_sha256", manifest["sha256"])
        key = core.key(self.train_cfg, self.model_cfg, manifest["sha256"], self.prec)
        hit = core.cached(key)
        if hit is None:
            model, stored = self._train(trial, share, folder, key, manifest)
        else:  # this mix, config and code trained before (another search, the benchmark's grid): not again
            from mixtune.core.model import load_adapter, load_base

            stored, meta = hit, json.loads((hit / "meta.json").read_text())
            done = json.loads((hit / "metrics.json").read_text())
            tokens = done["trained_tokens"]
            _set_attrs(trial, {"trained_tokens": tokens, "steps": done["steps"]})
            model = load_adapter(load_base(self.base), hit / "adapter")
            with self.timer():
                mlflow.set_tag("mixtune.reused_trial_run_id", meta["run_id"])
                mlflow.log_metrics({"trained_tokens": tokens, "steps": done["steps"]})  # as a trained trial
            print(f"search n={self.size}: trial {trial.number} r={share:.2f}: the adapter of {meta['by']} (same "
                  "mix, config and code), not trained again", flush=True)
        with tune.scoring(model):  # a loaded adapter holds no bf16 copies: scoring() leaves it as it is
            preds = self.predict(model, self.dev)
            probe = self._probe(model) if self.probe else ""
        cmp = score.compare(self.scorer, {"trial": preds}, self.eval_cfg.bootstrap, self.cfg.seed)["trial"]
        value, per_task = cmp["value"], cmp["per_task"]
        _set_attrs(trial, {"dev_metric": value, "dev_low": cmp["low"], "dev_high": cmp["high"],
                           "dev_per_task": per_task, "dev_predictions": preds, "probe": probe})
        metrics = {f"dev.{self.metric}": value, f"dev.{self.metric}_low": cmp["low"],
                   f"dev.{self.metric}_high": cmp["high"]}
        if len(per_task) > 1:
            metrics |= {f"dev.{self.metric}.{t}": v for t, v in per_task.items()}
        if probe:
            metrics["probe_accuracy"] = float(M.from_bits(probe).mean())
        run_id = mlflow.active_run().info.run_id
        with self.timer():
            mlflow.log_metrics(metrics)
            mlflow.set_tag("mlflow.note.content", f"share {share:.2f}: dev {self.metric} {value:.3f} "
                                                  f"[{cmp['low']:.3f}, {cmp['high']:.3f}]")
            mlflow.log_artifacts(str(stored / "adapter"), "adapter")  # for a search whose trials ran elsewhere
        _set_attrs(trial, {"adapter": str(stored / "adapter"), "adapter_uri": f"runs:/{run_id}/adapter"})
        return value

    def _train(self, trial, share: float, folder: Path, key: str, manifest: dict):
        """Train the trial's mix (the train stage's way, mixtune.trial) and store it under `key`; -> (the trained
        model, its cache folder). An interrupted trial is FAIL, never resumed: no checkpoints."""
        import mlflow

        from mixtune.core import trial as core
        from mixtune.core import tune

        log_rows: list[dict] = []
        self.trained.append(trial.number)
        trainer = tune.tuner(self.train_cfg, self.base, read_jsonl(folder / "mix" / "train.jsonl"),
                              folder / "checkpoints", self.prec, self.tokenizer, timer=self.timer, log_rows=log_rows)
        try:
            result = trainer.train()
        finally:  # a failed trial's compute counts too
            tokens = tune.trained_tokens(trainer)
            _set_attrs(trial, {"trained_tokens": tokens, "steps": trainer.state.global_step})
            with self.timer():
                mlflow.log_metrics({"trained_tokens": tokens, "steps": trainer.state.global_step})
            release_memory()  # what training freed, before scoring and the next trial
        stored = core.store(key, trainer.model, self.tokenizer, core.tracked(trainer, result.training_loss, log_rows),
                            log_rows, {"by": f"search trial {trial.number} (share {share:.2f}, search "
                                             f"{trial.study.study_name})",
                                       "search": trial.study.study_name, "trial": trial.number, "share": share,
                                       "run_id": mlflow.active_run().info.run_id, "mix_sha256": manifest["sha256"]})
        return trainer.model, stored


def _set_attrs(trial, attrs: dict) -> None:
    for k, v in attrs.items():
        trial.set_user_attr(k, v)


# --- stage --------------------------------------------------------------------------------------------------


def run(cfg: SearchConfig, mix_cfg, train_cfg: TrainConfig, model_cfg: ModelConfig, eval_cfg,
        worker: bool = False, prepared: Path = Path("prepared"), out: Path = Path("search")) -> dict:
    """`mix_cfg`, `eval_cfg`: MIX_KEYS of mix and SCORE_KEYS of evaluate (the full sections do too)."""
    dev_path = prepared / "specialist" / "dev.jsonl"
    if not dev_path.is_file():
        raise MixtuneError(f"{dev_path}: no such file (run the prepare stage first)")
    dev = read_jsonl(dev_path)
    if not dev:
        raise MixtuneError(f"{dev_path}: no dev examples; the search scores on them (set prepare.dev_fraction > 0)")
    sizes = cfg.sizes or [mix_cfg.specialist_size]
    if mix_cfg.specialist_size not in sizes:
        raise MixtuneError(f"search.sizes {sizes} must include mix.specialist_size={mix_cfg.specialist_size}: "
                           "the final adapter is trained at that size")
    probe = read_jsonl(prepared / "generalist_probe.jsonl")
    metric = score.metric_name(cfg.metric, dev)
    tasks = sorted({ex["task"] for ex in read_jsonl(prepared / "specialist" / "train.jsonl")})
    base = resolve_base(model_cfg.base)
    summaries, rows, started = {}, [], {}
    design = grid(cfg)
    for size in sizes:
        definition = study_definition(cfg, mix_cfg, train_cfg, model_cfg, eval_cfg, size, prepared)
        key = hashlib.sha256(json.dumps({**definition, "metric": metric}, sort_keys=True).encode()).hexdigest()[:10]
        name = f"{'+'.join(tasks)}-n{size}-{key}"
        claim = Claim(cfg.storage, name)
        study = open_study(cfg, name, size, claim, design)
        study.set_user_attr("tasks", "+".join(tasks))
        tags = {"mixtune.search": name, "mixtune.search.n_trials": str(cfg.n_trials), "mixtune.metric": metric}
        timer = Timer()
        parent = parent_run(study, claim, tasks, definition, tags, timer)
        objective = _Trials(cfg, mix_cfg, train_cfg, model_cfg, eval_cfg, base, dev, probe, metric, prepared,
                            study, claim, parent, timer)
        objective.base_probe(study)
        if worker:
            _optimize(study, objective, cfg, claim, len(design))
            started[name] = objective.numbers
            continue
        with stage_run("search", tasks, {}, tags, timer, run_id=parent.run_id):
            _optimize(study, objective, cfg, claim, len(design))
            summary = recommend(study, objective.scorer, cfg, eval_cfg.bootstrap)
            with timer():
                log_summary(study, summary)
        summaries[size] = summary
        rows += trial_rows(study, summary)
    if worker:
        return {"trials": started}  # study name -> the trials this worker ran
    return _write_outputs(summaries, mix_cfg.specialist_size, rows, tasks, out)


def _optimize(study, objective: _Trials, cfg: SearchConfig, claim: Claim, n_grid: int) -> None:
    """Run trials until the search holds n_trials finished or running ones (its other processes' included).
    Counting and starting a trial happen under the claim, so several workers never overshoot; each process
    tries at most the trials missing when it started, so a search whose trials all fail still ends."""
    import time

    from optuna.trial import TrialState

    start = time.monotonic()
    deadline = start + cfg.timeout if cfg.timeout else None
    missing = cfg.n_trials - count(study, (TrialState.COMPLETE,))
    for _ in range(max(missing, 0)):
        if deadline is not None and time.monotonic() > deadline:
            break
        claim.acquire()
        try:
            claim.fail_stale(study)
            if count(study, (TrialState.COMPLETE, TrialState.RUNNING)) >= cfg.n_trials:
                break
            # After the grid (enqueued), a Gaussian process over the curve so far proposes the next share. Seeded
            # by the trial's number: reproducible, and no two processes (or re-runs) draw the same share.
            study.sampler = sampler(seed=cfg.seed + len(study.get_trials(deepcopy=False)), n_startup_trials=n_grid)
            study.optimize(objective, n_trials=1, catch=(Exception,))
        finally:
            claim.release()
        _progress(study, objective, cfg, time.monotonic() - start)


def _progress(study, objective: _Trials, cfg: SearchConfig, elapsed: float) -> None:
    """One line a person can follow per trial: its share, its dev score or fate, and the time left, from what
    the trials this process trained cost (`search_storage.time_left`: the top of the range costs the most)."""
    from optuna.trial import TrialState

    from mixtune.stages.mix import generalist_count

    if not objective.numbers:
        return
    trials = study.get_trials(deepcopy=False)
    t = trials[objective.numbers[-1]]
    done = count(study, (TrialState.COMPLETE,))
    if t.state == TrialState.COMPLETE:
        a = t.user_attrs
        fate = f"dev {objective.metric} {a['dev_metric']:.3f} [{a['dev_low']:.3f}, {a['dev_high']:.3f}]"
    else:
        fate = "failed (see its MLflow run)"
    trained = [(generalist_count(objective.size, share_of(x)), x.user_attrs["trained_tokens"],
                (x.datetime_complete - x.datetime_start).total_seconds())
               for x in (trials[n] for n in objective.trained) if x.state == TrialState.COMPLETE]
    measured = {share_of(x) for x in trials if x.state in (TrialState.COMPLETE, TrialState.RUNNING)}
    grid_left = [r for r in grid(cfg) if all(abs(r - m) >= SAME_SHARE for m in measured)]
    left = max(cfg.n_trials - done, 0)
    estimate = time_left(trained, [generalist_count(objective.size, r) for r in grid_left][:left],
                         max(left - len(grid_left), 0), objective.size) if trained and left else 0.0
    print(f"search n={objective.size}: trial {t.number} r={share_of(t):.2f}: {fate}; {done} of {cfg.n_trials} trials "
          f"done, {minutes(elapsed)} elapsed, about {minutes(estimate)} left", flush=True)


def _write_outputs(summaries: dict[int, dict], size: int, rows: list[dict], tasks: list[str], out: Path) -> dict:
    """search/best.json: the answer for mix.specialist_size (and each searched size under `sizes`);
    search/specialist_adapter: that size's pure-specialist trial adapter, evaluate's reference."""
    best = dict(summaries[size])
    src = Path(best["specialist_adapter"])
    with atomic_dir(out / "specialist_adapter") as tmp:
        if (src / "adapter_config.json").is_file():
            shutil.copytree(src, tmp, dirs_exist_ok=True)
        else:  # the trial ran on another machine: take its adapter from MLflow
            import mlflow

            shutil.copytree(mlflow.artifacts.download_artifacts(best["specialist_adapter_uri"]), tmp,
                            dirs_exist_ok=True)
    # Not in best.json: a run's URI (new on every run) and the trials' adapter paths (this clone's), which
    # would change it, and dvc.lock, on a re-run that found the same answer.
    local = ("answer", "specialist_adapter", "specialist_adapter_uri", "recommended_adapter")
    best.update(tasks=tasks, specialist_adapter=str(out / "specialist_adapter"),
                sizes={str(k): {f: v for f, v in s.items() if f not in local} for k, s in summaries.items()},
                answers=[s["answer"] for s in summaries.values()])
    with atomic_file(out / "trials.csv") as f:
        f.write(trials_csv(sorted(rows, key=lambda r: (r["size"], r["trial"]))))
    write_json(out / "best.json", {k: v for k, v in best.items() if k not in ("specialist_adapter_uri",
                                                                              "recommended_adapter")})
    keys = ("recommended_share", "dev_gain", "dev_gain_low", "dev_gain_high", "forgetting", "specialist_forgetting",
            "specialist_dev", "best_trial_share", "best_trial_dev", "near_optimal_low", "near_optimal_high")
    write_json(out / "metrics.json", {**{k: best[k] for k in keys}, "trials": best["trials"]})
    return best


# --- the stage's command (`python -m mixtune.stages.search`, `mixtune search`) -------------------------------------


def command(args) -> None:
    from mixtune.plumbing.config import load_section

    r = run(load_section("search", args.params), load_section("mix", args.params, keys=MIX_KEYS),
            load_section("train", args.params), load_section("model", args.params),
            load_section("evaluate", args.params, keys=SCORE_KEYS), worker=args.worker)
    if args.worker:
        for study, trials in r["trials"].items():
            print(f"search --worker: study {study}: ran trials {trials}")
    else:
        print("\n".join(f"search: {a}" for a in r["answers"]))


def parser():
    p = entry.parser("mixtune search", "search the generalist share with Optuna (dev split), one search per size")
    p.add_argument("--worker", action="store_true",
                   help="only run trials of the shared search (search.storage); write no outputs")
    return p


if __name__ == "__main__":
    sys.exit(entry.main(parser(), command))
