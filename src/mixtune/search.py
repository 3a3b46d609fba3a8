"""search: how much generalist data helps this task? An Optuna study per specialist size over
mix.generalist_share in [0, search.max_share], scored on the specialist DEV split (test never chooses).

A trial is the pipeline in small, mix -> train -> dev score, in .cache/search/<study>/<trial>/, and a nested
MLflow run under the study's run. The baselines run first (share 0, the pure specialist, and 0.5); then seeded
TPE. Every `eval_every` steps a dev subset is scored and reported, and the pruner may stop the trial there.

The study lives in search/optuna.journal, in the repository but not a DVC output, so a re-run continues it and
runs only the missing trials; or in the database at `search.storage`, shared by `mixtune search --worker`
processes on several machines. Outputs (not of a worker): search/best.json, search/trials.csv (DVC plot),
search/adapter/ (the best trial's), and the answer in the study run's description.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np

from mixtune import lineage
from mixtune import metrics as M
from mixtune import score
from mixtune.config import MixConfig, ModelConfig, SearchConfig, TrainConfig
from mixtune.errors import MixtuneError
from mixtune.files import atomic_dir, atomic_file, read_jsonl, sha256_file, write_json
from mixtune.model import load_tokenizer, precision, release_memory, resolve_base
from mixtune.search_storage import Claim, count, open_study, parent_run, share_of, trial_run
from mixtune.tracking import Timer, repo_root, stage_run

MIX_KEYS = ("specialist_size", "seed")  # of params.yaml's sections, the keys the search reads (dvc.yaml: the same)
SCORE_KEYS = ("batch_size", "max_new_tokens", "bootstrap")
BASELINES = (0.0, 0.5)  # the pure specialist and an even mix; they are also TPE's start-up trials
CSV_FIELDS = ["trial", "size", "share", "state", "dev_metric", "dev_low", "dev_high", "forgetting", "trained_tokens"]


def study_definition(cfg: SearchConfig, mix_cfg, train_cfg: TrainConfig, model_cfg: ModelConfig, score_cfg,
                     size: int, prepared: Path) -> dict:
    """Everything that computes a trial's score; the study's name is its hash. Changing n_trials, timeout or
    the storage continues a study; changing the data, the model, the training, the scoring or the code that
    computes a trial (this module and all it can import) starts a new one, and the old one stays in storage."""
    files = [prepared / "specialist" / "train.jsonl", prepared / "specialist" / "dev.jsonl",
             prepared / "generalist.jsonl", prepared / "generalist_probe.jsonl"]
    return {"specialist_size": size, "mix_seed": mix_cfg.seed, "model": model_cfg.model_dump(),
            "train": train_cfg.model_dump(), "score": {k: getattr(score_cfg, k) for k in SCORE_KEYS},
            "data_sha256": [sha256_file(f)[:16] for f in files],
            "search": cfg.model_dump(include={"max_share", "seed", "eval_every", "dev_examples", "pruner"}),
            "code_sha256": lineage.fingerprint([__name__])[:16]}


class _Trials:
    """What every trial of one study needs, loaded once per process; `__call__` is Optuna's objective."""

    def __init__(self, cfg, mix_cfg, train_cfg, eval_cfg, base, dev, probe, metric, prepared, study, claim, parent,
                 timer: Timer):
        self.cfg, self.mix_cfg, self.train_cfg, self.eval_cfg = cfg, mix_cfg, train_cfg, eval_cfg
        self.timer = timer  # the seconds this process spends in MLflow calls (the stage's run logs them)
        self.base, self.dev, self.probe, self.metric = base, dev, probe, metric
        self.prepared, self.claim, self.parent = prepared, claim, parent
        self.size = study.user_attrs["specialist_size"]
        self.folder = repo_root() / ".cache" / "search" / study.study_name
        self.tokenizer = load_tokenizer(base)
        self.prec = precision(train_cfg.precision)
        self.scorer = score.Scorer(dev, metric)
        self.numbers: list[int] = []  # the trials this process ran

    def predict(self, model, examples: list[dict]) -> list[str]:
        return score.predict(model, self.tokenizer, examples, self.eval_cfg)

    def base_probe(self, study) -> None:
        """The base model's answers to the probe, once per study: every trial's forgetting is against them."""
        if "base_probe" not in study.user_attrs and self.probe:
            from mixtune.model import load_base

            study.set_user_attr("base_probe", _correct(self.probe, self.predict(load_base(self.base), self.probe)))

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
                shutil.rmtree(folder / "mix", ignore_errors=True)  # its manifest is logged, and it can be remade

    def _run(self, trial, share: float, folder: Path) -> float:
        import mlflow

        from mixtune import mix, train

        manifest = mix.run(MixConfig(specialist_size=self.size, generalist_share=share, seed=self.mix_cfg.seed,
                                     corrupt_generalist=0.0), self.prepared, folder / "mix")
        trial.set_user_attr("mix_sha256", manifest["sha256"])
        with self.timer():
            mlflow.log_dict(manifest, "mix_manifest.json")
            mlflow.log_params({"generalist_size": manifest["generalist_size"], "total": manifest["total"]})
            mlflow.set_tag("mixtune.mix_sha256", manifest["sha256"])
        # An interrupted trial is FAIL, never resumed: no checkpoints.
        trainer = train.tuner(self.train_cfg, self.base, read_jsonl(folder / "mix" / "train.jsonl"),
                              folder / "checkpoints", self.prec, self.tokenizer, callbacks=[self._pruning(trial)],
                              timer=self.timer)
        try:
            trainer.train()
        finally:  # a pruned trial's compute counts too
            tokens = train.trained_tokens(trainer)
            trial.set_user_attr("trained_tokens", tokens)
            with self.timer():
                mlflow.log_metrics({"trained_tokens": tokens, "steps": trainer.state.global_step})
            release_memory()  # what training freed, before scoring and the next trial
        model = trainer.model
        with train.scoring(model):
            preds = self.predict(model, self.dev)
            probe = _correct(self.probe, self.predict(model, self.probe)) if self.probe else ""
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
        train.save_adapter(model, self.tokenizer, folder / "adapter")
        with self.timer():
            mlflow.log_metrics(metrics)
            mlflow.set_tag("mlflow.note.content", f"share {share:.2f}: dev {self.metric} {value:.3f} "
                                                  f"[{cmp['low']:.3f}, {cmp['high']:.3f}]")
            mlflow.log_artifacts(str(folder / "adapter"), "adapter")  # for a study whose trials ran elsewhere
            run_id = mlflow.active_run().info.run_id
        _set_attrs(trial, {"adapter": str(folder / "adapter"), "adapter_uri": f"runs:/{run_id}/adapter"})
        return value

    def _pruning(self, trial):
        """Every eval_every steps: score the dev subset, report it, and stop here if the pruner says so. A
        baseline reports (later trials are compared with it) but runs to the end: the answer is measured on it."""
        import mlflow
        import optuna
        from transformers import TrainerCallback

        from mixtune import train

        subset = self.dev[: self.cfg.dev_examples]
        scorer, every, metric, predict = score.Scorer(subset, self.metric), self.cfg.eval_every, self.metric, \
            self.predict
        timer = self.timer
        prunable = not trial.user_attrs.get("baseline")

        class DevPruning(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kw):
                if state.global_step % every or state.global_step >= state.max_steps:  # the end scores all of dev
                    return
                with train.scoring(model):
                    value = scorer.value(scorer.encode(predict(model, subset)))[0]
                trial.report(value, state.global_step)
                with timer():
                    mlflow.log_metric(f"dev_subset.{metric}", value, step=state.global_step)
                if prunable and trial.should_prune():
                    raise optuna.TrialPruned(f"dev {metric} {value:.3f} on {len(subset)} examples at step "
                                             f"{state.global_step}")

        return DevPruning()


def _correct(examples: list[dict], preds: list[str]) -> str:
    return M.to_bits([p == ex["completion"] for p, ex in zip(preds, examples)])


def _set_attrs(trial, attrs: dict) -> None:
    for k, v in attrs.items():
        trial.set_user_attr(k, v)


# --- the answer ---------------------------------------------------------------------------------------------


def _done(study) -> list:
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]


def forgetting_of(t, base_probe: str | None) -> float | None:
    """Held-out generalist accuracy lost against the base model (positive: forgotten)."""
    if not base_probe or not t.user_attrs.get("probe"):
        return None
    return float(M.from_bits(base_probe).mean() - M.from_bits(t.user_attrs["probe"]).mean())


def _paired(scorer: score.Scorer, a: list[str], b: list[str], resamples: int, seed: int) -> tuple[float, float, float]:
    g = score.compare(scorer, {"a": a, "b": b}, resamples, seed, gains=(("a", "b"),))["a-b"]
    return g["value"], g["low"], g["high"]


def _fit(done: list, scorer: score.Scorer, max_share: float, resamples: int, seed: int, spec) -> dict | None:
    """The mixing law over the completed trials (metrics.fit_curve: a quadratic in the share, refitted on
    paired resamples of the dev examples) and the fitted gain over the pure specialist at its best share."""
    shares = [t.params["generalist_share"] for t in done]
    if len(set(shares)) < 3:
        return None
    enc = [scorer.encode(t.user_attrs["dev_predictions"]) for t in done]
    spec_enc = scorer.encode(spec.user_attrs["dev_predictions"])
    return M.fit_curve(shares, lambda idx: np.array([scorer.value(e, idx)[0] for e in enc]), scorer.n, max_share,
                       resamples, seed, reference=lambda idx: scorer.value(spec_enc, idx)[0])


def recommend(study, scorer: score.Scorer, cfg, resamples: int) -> dict:
    """One recommended share for one study (one specialist size), with its dev gain over the pure specialist,
    and the forgetting at that share against the pure specialist's.

    The share: the mixing law's best share when at least 3 distinct shares completed and the fit is supported
    (a concave curve whose best share the resamples pin down to within half the searched range), else the best
    trial's. When no share beats the pure specialist beyond the interval, the answer is 0: generalist data has
    to earn its place."""
    from optuna.trial import TrialState

    size, metric = study.user_attrs["specialist_size"], scorer.metric
    done = _done(study)
    if not done:
        raise MixtuneError(f"search: no trial of study {study.study_name} completed (see its MLflow runs)")
    spec = next((t for t in done if t.params["generalist_share"] == 0.0), None)
    if spec is None:
        raise MixtuneError(f"search: the pure specialist (share 0) of study {study.study_name} did not complete; "
                           "run `dvc repro` again to retry it")
    base_probe = study.user_attrs.get("base_probe")
    spec_forgetting = forgetting_of(spec, base_probe)
    excluded = []
    if cfg.max_forgetting is not None and spec_forgetting is not None:
        excluded = [t for t in done if forgetting_of(t, base_probe) - spec_forgetting > cfg.max_forgetting]
    eligible = [t for t in done if t not in excluded]
    seed = cfg.seed
    spec_preds = spec.user_attrs["dev_predictions"]

    def rank(t):  # a tie goes to less generalist data
        return t.value, -t.params["generalist_share"]

    best = max(eligible, key=rank)
    out = {"size": size, "study": study.study_name, "metric": metric, "specialist_trial": spec.number,
           "specialist_dev": spec.value, "specialist_adapter": spec.user_attrs["adapter"],
           "specialist_adapter_uri": spec.user_attrs["adapter_uri"], "best_trial": best.number,
           "best_trial_share": best.params["generalist_share"], "best_trial_dev": best.value,
           "specialist_forgetting": spec_forgetting, "excluded_by_forgetting": [t.number for t in excluded],
           "trained_tokens_total": sum(t.user_attrs.get("trained_tokens", 0) for t in study.trials),
           "trials": {s.name.lower(): count(study, (s,)) for s in
                      (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}}
    fit = _fit(eligible, scorer, cfg.max_share, resamples, seed, spec)
    supported = bool(fit and fit["concave"] and fit["share_high"] - fit["share_low"] <= cfg.max_share / 2)
    if fit:
        out["fit"] = fit
    if supported:
        share, how = fit["share"], (f"the mixing law fitted to {len(eligible)} trials "
                                     f"(r in [{fit['share_low']:.2f}, {fit['share_high']:.2f}])")
        gain = (fit["gain"], fit["gain_low"], fit["gain_high"])
        forgetting = _interpolate([(t.params["generalist_share"], forgetting_of(t, base_probe)) for t in eligible],
                                  share)
    else:
        why = "fewer than 3 shares completed" if not fit else \
            "the mixing law does not pin the best share down" + (
                f" (r in [{fit['share_low']:.2f}, {fit['share_high']:.2f}])" if fit["concave"] else
                " (the fitted curve has no maximum inside the range)")
        share, how = best.params["generalist_share"], f"the best trial ({why})"
        gain = (0.0, 0.0, 0.0) if best is spec else _paired(scorer, best.user_attrs["dev_predictions"], spec_preds,
                                                              resamples, seed)
        forgetting = forgetting_of(best, base_probe)
    head = f"For {study.user_attrs.get('tasks', 'this task')} at {size} examples, "
    if share > 0 and gain[1] > 0:
        answer = (f"{head}use a generalist share of r={share:.2f}, from {how}: dev {metric} {gain[0]:+.3f} "
                  f"[{gain[1]:+.3f}, {gain[2]:+.3f}] over the pure specialist")
        recommended = share
    else:
        runner = best if best is not spec else max((t for t in eligible if t is not spec), key=rank, default=None)
        answer = f"{head}generalist data does not help here: use r=0 (the pure specialist, dev {metric} {spec.value:.3f})"
        if share > 0:
            answer += (f"; {how} puts the best share at r={share:.2f}, only {gain[0]:+.3f} "
                       f"[{gain[1]:+.3f}, {gain[2]:+.3f}] on dev {metric}")
        elif runner is not None:
            g = _paired(scorer, runner.user_attrs["dev_predictions"], spec_preds, resamples, seed)
            answer += (f"; the best mix (r={runner.params['generalist_share']:.2f}) scores {g[0]:+.3f} "
                       f"[{g[1]:+.3f}, {g[2]:+.3f}] against it")
        recommended, forgetting, gain = 0.0, spec_forgetting, (0.0, 0.0, 0.0)
    if forgetting is not None and spec_forgetting is not None:
        answer += (f". Held-out generalist accuracy lost against the base model: {forgetting:+.2f} at r={recommended:.2f}"
                   + (f", {spec_forgetting:+.2f} for the pure specialist." if recommended > 0 else "."))
    else:
        answer += "."
    if excluded:
        answer += (f" Left out by search.max_forgetting={cfg.max_forgetting}: r=" +
                   ", ".join(f"{t.params['generalist_share']:.2f}" for t in excluded) + ".")
    out.update(recommended_share=recommended, how="fit" if supported else "best trial", dev_gain=gain[0],
               dev_gain_low=gain[1], dev_gain_high=gain[2], forgetting=forgetting, answer=answer)
    return out


def _interpolate(points: list[tuple[float, float | None]], x: float) -> float | None:
    """Linear interpolation between the measured shares around x (the fitted share was never trained)."""
    pts = sorted((a, b) for a, b in points if b is not None)
    if not pts:
        return None
    xs, ys = zip(*pts)
    return float(np.interp(x, xs, ys))


def trial_rows(study) -> list[dict]:
    base_probe = study.user_attrs.get("base_probe")
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        rows.append({"trial": t.number, "size": study.user_attrs["specialist_size"], "share": share_of(t),
                     "state": t.state.name, "dev_metric": a.get("dev_metric"), "dev_low": a.get("dev_low"),
                     "dev_high": a.get("dev_high"),
                     "forgetting": forgetting_of(t, base_probe) if a.get("probe") else None,
                     "trained_tokens": a.get("trained_tokens")})
    return rows


def trials_csv(rows: list[dict]) -> str:
    f = io.StringIO()
    w = csv.DictWriter(f, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return f.getvalue()


def _figure(rows: list[dict], best: dict):
    """Two panels a person reads at a glance: dev score against share (with intervals and the fitted law), and
    the trade-off, each trial's dev score against its forgetting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = sorted((r for r in rows if r["state"] == "COMPLETE"), key=lambda r: r["share"])
    x, y = np.array([r["share"] for r in done]), np.array([r["dev_metric"] for r in done])
    err = np.array([[r["dev_metric"] - r["dev_low"] for r in done], [r["dev_high"] - r["dev_metric"] for r in done]])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax.errorbar(x, y, yerr=err, fmt="o", capsize=3, label="trial (95% interval)")
    if best.get("fit"):
        grid = np.linspace(0, max(x.max(), best["recommended_share"]), 50)
        c = best["fit"]["coef"]
        ax.plot(grid, c[0] + c[1] * grid + c[2] * grid ** 2, "-", color="grey", label="mixing law")
    ax.axvline(best["recommended_share"], color="r", ls="--", label=f"recommended r={best['recommended_share']:.2f}")
    ax.set_xlabel("generalist share of the training set")
    ax.set_ylabel(f"dev {best['metric']}")
    ax.set_title(f"{best['size']} specialist examples")
    ax.legend(fontsize=8)
    f = [(r["forgetting"], r["dev_metric"], r["share"]) for r in done if r["forgetting"] is not None]
    if f:
        ax2.scatter([a for a, _, _ in f], [b for _, b, _ in f])
        for a, b, sh in f:
            ax2.annotate(f"r={sh:.2f}", (a, b), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax2.set_xlabel("forgetting: held-out generalist accuracy lost")
    ax2.set_ylabel(f"dev {best['metric']}")
    ax2.set_title("task score against forgetting (up and left is better)")
    fig.tight_layout()
    return fig


def _log_summary(study, summary: dict) -> None:
    """Into the study's run (active): the answer as its description and metrics (they change as the study
    grows), the trials table and the figure."""
    import mlflow

    rows = trial_rows(study)
    keys = ("recommended_share", "dev_gain", "dev_gain_low", "dev_gain_high", "forgetting", "specialist_forgetting")
    mlflow.log_metrics({f"answer.{k}": float(summary[k]) for k in keys if summary.get(k) is not None})
    mlflow.log_metric("trained_tokens_total", summary["trained_tokens_total"])  # the search's compute
    mlflow.log_metrics({f"trials.{k}": v for k, v in summary["trials"].items()})
    mlflow.set_tags({"mlflow.note.content": summary["answer"], "mixtune.metric": summary["metric"]})
    mlflow.log_dict(summary, "best.json")
    mlflow.log_text(trials_csv(rows), "trials.csv")
    mlflow.log_figure(_figure(rows, summary), "dev_vs_share.png")


# --- stage --------------------------------------------------------------------------------------------------


def run(cfg: SearchConfig, mix_cfg, train_cfg: TrainConfig, model_cfg: ModelConfig, eval_cfg,
        worker: bool = False, prepared: Path = Path("prepared"), out: Path = Path("search"),
        baselines: tuple[float, ...] = BASELINES) -> dict:
    """`mix_cfg`, `eval_cfg`: MIX_KEYS of mix and SCORE_KEYS of evaluate (the full sections do too).
    `baselines`: the shares run first, unpruned (bench/bench_search.py passes a whole grid)."""
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
    baselines = [s for s in baselines if s <= cfg.max_share]
    for size in sizes:
        definition = study_definition(cfg, mix_cfg, train_cfg, model_cfg, eval_cfg, size, prepared)
        key = hashlib.sha256(json.dumps({**definition, "metric": metric}, sort_keys=True).encode()).hexdigest()[:10]
        name = f"{'+'.join(tasks)}-n{size}-{key}"
        claim = Claim(cfg.storage, name)
        study = open_study(cfg, name, size, claim, baselines)
        study.set_user_attr("tasks", "+".join(tasks))
        tags = {"mixtune.study": name, "mixtune.search.n_trials": str(cfg.n_trials), "mixtune.metric": metric}
        timer = Timer()
        parent = parent_run(study, claim, tasks, definition, tags, timer)
        objective = _Trials(cfg, mix_cfg, train_cfg, eval_cfg, base, dev, probe, metric, prepared, study, claim,
                            parent, timer)
        objective.base_probe(study)
        if worker:
            _optimize(study, objective, cfg, claim)
            started[name] = objective.numbers
            continue
        with stage_run("search", tasks, {}, tags, timer, run_id=parent.run_id):
            _optimize(study, objective, cfg, claim)
            summary = recommend(study, objective.scorer, cfg, eval_cfg.bootstrap)
            with timer():
                _log_summary(study, summary)
        summaries[size] = summary
        rows += trial_rows(study)
    if worker:
        return {"trials": started}  # study name -> the trials this worker ran
    return _write_outputs(summaries, mix_cfg.specialist_size, rows, tasks, out)


def _optimize(study, objective: _Trials, cfg: SearchConfig, claim: Claim) -> None:
    """Run trials until the study holds n_trials finished or running ones (its other processes' included).
    Counting and starting a trial happen under the claim, so several workers never overshoot; each process
    tries at most the trials missing when it started, so a study whose trials all fail still ends."""
    import time

    import optuna
    from optuna.trial import TrialState

    start = time.monotonic()
    deadline = start + cfg.timeout if cfg.timeout else None
    missing = cfg.n_trials - count(study, (TrialState.COMPLETE, TrialState.PRUNED))
    for _ in range(max(missing, 0)):
        if deadline is not None and time.monotonic() > deadline:
            break
        claim.acquire()
        try:
            claim.fail_stale(study)
            if count(study, (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)) >= cfg.n_trials:
                break
            # Seeded by the trial's number: reproducible, and no two processes (or re-runs) draw the same share.
            study.sampler = optuna.samplers.TPESampler(seed=cfg.seed + len(study.get_trials(deepcopy=False)),
                                                       n_startup_trials=len(BASELINES))
            study.optimize(objective, n_trials=1, catch=(Exception,))
        finally:
            claim.release()
        _progress(study, objective, cfg.n_trials, time.monotonic() - start)


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def _progress(study, objective: _Trials, n_trials: int, elapsed: float) -> None:
    """One line a person can follow per trial: its share, its dev score or fate, and the time left, estimated
    from this process's trials so far."""
    from optuna.trial import TrialState

    if not objective.numbers:
        return
    t = study.get_trials(deepcopy=False)[objective.numbers[-1]]
    done = count(study, (TrialState.COMPLETE, TrialState.PRUNED))
    if t.state == TrialState.COMPLETE:
        a = t.user_attrs
        fate = f"dev {objective.metric} {a['dev_metric']:.3f} [{a['dev_low']:.3f}, {a['dev_high']:.3f}]"
    elif t.state == TrialState.PRUNED:
        fate = f"pruned at step {t.last_step}"
    else:
        fate = "failed (see its MLflow run)"
    left = elapsed / len(objective.numbers) * max(n_trials - done, 0)
    print(f"search n={objective.size}: trial {t.number} r={share_of(t):.2f}: {fate}; {done} of {n_trials} trials done, "
          f"{_minutes(elapsed)} elapsed, about {_minutes(left)} left", flush=True)


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
    local = ("answer", "specialist_adapter", "specialist_adapter_uri")
    best.update(tasks=tasks, specialist_adapter=str(out / "specialist_adapter"),
                sizes={str(k): {f: v for f, v in s.items() if f not in local} for k, s in summaries.items()},
                answers=[s["answer"] for s in summaries.values()])
    with atomic_file(out / "trials.csv") as f:
        f.write(trials_csv(sorted(rows, key=lambda r: (r["size"], r["trial"]))))
    write_json(out / "best.json", {k: v for k, v in best.items() if k != "specialist_adapter_uri"})
    keys = ("recommended_share", "dev_gain", "dev_gain_low", "dev_gain_high", "forgetting", "specialist_forgetting",
            "specialist_dev", "best_trial_share", "best_trial_dev")
    write_json(out / "metrics.json", {**{k: best[k] for k in keys}, "trials": best["trials"]})
    return best
