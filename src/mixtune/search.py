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
from mixtune.config import MixConfig, ModelConfig, SearchConfig, TrainConfig
from mixtune.errors import MixtuneError
from mixtune.files import atomic_dir, atomic_file, read_jsonl, sha256_file, write_json
from mixtune.model import load_tokenizer, precision, resolve_base
from mixtune.search_study import Claim, count, open_study, parent_run, share_of, trial_run
from mixtune.tracking import Timer, repo_root, stage_run

MIX_KEYS = ("specialist_size", "seed")  # of params.yaml's sections, the keys the search reads (dvc.yaml: the same)
SCORE_KEYS = ("batch_size", "max_new_tokens", "bootstrap")
BASELINES = (0.0, 0.5)  # the pure specialist and an even mix; they are also TPE's start-up trials
CSV_FIELDS = ["trial", "size", "share", "state", "dev_metric", "dev_low", "dev_high", "trained_tokens"]


def study_definition(cfg: SearchConfig, mix_cfg, train_cfg: TrainConfig, model_cfg: ModelConfig, score_cfg,
                     size: int, prepared: Path) -> dict:
    """Everything that computes a trial's score; the study's name is its hash. Changing n_trials, timeout or
    the storage continues a study; changing the data, the model, the training, the scoring or the code that
    computes a trial (this module and all it can import) starts a new one, and the old one stays in storage."""
    files = [prepared / "specialist" / "train.jsonl", prepared / "specialist" / "dev.jsonl",
             prepared / "generalist.jsonl"]
    return {"specialist_size": size, "mix_seed": mix_cfg.seed, "model": model_cfg.model_dump(),
            "train": train_cfg.model_dump(), "score": {k: getattr(score_cfg, k) for k in SCORE_KEYS},
            "data_sha256": [sha256_file(f)[:16] for f in files],
            "search": cfg.model_dump(include={"max_share", "seed", "eval_every", "dev_examples", "pruner"}),
            "code_sha256": lineage.fingerprint([__name__])[:16]}


class _Trials:
    """What every trial of one study needs, loaded once per process; `__call__` is Optuna's objective."""

    def __init__(self, cfg, mix_cfg, train_cfg, eval_cfg, base, dev, prepared, study, claim, parent):
        self.cfg, self.mix_cfg, self.train_cfg, self.eval_cfg = cfg, mix_cfg, train_cfg, eval_cfg
        self.base, self.dev, self.prepared, self.claim, self.parent = base, dev, prepared, claim, parent
        self.size = study.user_attrs["specialist_size"]
        self.folder = repo_root() / ".cache" / "search" / study.study_name
        self.tokenizer = load_tokenizer(base)
        self.prec = precision(train_cfg.precision)
        self.metric = metric_name(dev)
        self.numbers: list[int] = []  # the trials this process ran

    def correct(self, model, examples: list[dict]) -> list[float]:
        from mixtune.evaluate import correct

        return correct(model, self.tokenizer, examples, self.eval_cfg, self.prec)

    def __call__(self, trial) -> float:
        share = trial.suggest_float("generalist_share", 0.0, self.cfg.max_share)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        self.claim.release()  # the trial is RUNNING and names its process: others may start the next one
        self.numbers.append(trial.number)
        folder = self.folder / str(trial.number)
        with trial_run(self.parent, trial, share, self.size):
            try:
                return self._run(trial, share, folder)
            finally:
                shutil.rmtree(folder / "mix", ignore_errors=True)  # its manifest is logged, and it can be remade

    def _run(self, trial, share: float, folder: Path) -> float:
        import mlflow

        from mixtune import mix, train

        manifest = mix.run(MixConfig(specialist_size=self.size, generalist_share=share, seed=self.mix_cfg.seed,
                                     corrupt_generalist=0.0),
                           self.prepared, folder / "mix")
        trial.set_user_attr("mix_sha256", manifest["sha256"])
        mlflow.log_dict(manifest, "mix_manifest.json")
        mlflow.log_params({"generalist_size": manifest["generalist_size"], "total": manifest["total"]})
        mlflow.set_tag("mixtune.mix_sha256", manifest["sha256"])
        trainer = train.build_trainer(self.train_cfg, self.base, read_jsonl(folder / "mix" / "train.jsonl"),
                                      folder / "checkpoints", self.prec, self.tokenizer)
        trainer.args.set_save(strategy="no")  # an interrupted trial is FAIL, never resumed: no checkpoints
        train.add_progress(trainer, self.train_cfg, Timer(), [])
        trainer.add_callback(self._pruning(trial, trainer))
        try:
            trainer.train()
        finally:
            tokens = round(train.dataset_tokens(trainer) * (trainer.state.epoch or 0.0))
            trial.set_user_attr("trained_tokens", tokens)
            mlflow.log_metrics({"trained_tokens": tokens, "steps": trainer.state.global_step})
        correct = self.correct(trainer.model, self.dev)
        value, low, high = mean_interval(correct, self.eval_cfg.bootstrap, self.cfg.seed)
        _set_attrs(trial, {"dev_metric": value, "dev_low": low, "dev_high": high,
                           "dev_correct": M.to_bits(correct)})
        mlflow.log_metrics({f"dev.{self.metric}": value, f"dev.{self.metric}_low": low,
                            f"dev.{self.metric}_high": high})
        train.save_adapter(trainer.model, self.tokenizer, folder / "adapter")
        info = train.log_adapter(trainer.model, self.tokenizer, self.base, self.eval_cfg.max_new_tokens)
        _set_attrs(trial, {"adapter": str(folder / "adapter"), "model_uri": info.model_uri})
        return value

    def _pruning(self, trial, trainer):
        """Every eval_every steps: score the dev subset, report it, and stop here if the pruner says so. A
        baseline reports (later trials are compared with it) but runs to the end: the answer is measured on it."""
        import mlflow
        import optuna
        from transformers import TrainerCallback

        subset, every, metric, correct = self.dev[: self.cfg.dev_examples], self.cfg.eval_every, self.metric, \
            self.correct
        prunable = not trial.user_attrs.get("baseline")

        class DevPruning(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step % every or state.global_step >= state.max_steps:  # the end scores all of dev
                    return
                value = float(np.mean(correct(trainer.model, subset)))
                trial.report(value, state.global_step)
                mlflow.log_metric(f"dev_subset.{metric}", value, step=state.global_step)
                if prunable and trial.should_prune():
                    raise optuna.TrialPruned(f"dev {metric} {value:.3f} on {len(subset)} examples at step "
                                             f"{state.global_step}")

        return DevPruning()


def _set_attrs(trial, attrs: dict) -> None:
    for k, v in attrs.items():
        trial.set_user_attr(k, v)


def metric_name(examples: list[dict]) -> str:
    return "accuracy" if all(ex["options"] for ex in examples) else "exact_match"  # as evaluate.summarize


def mean_interval(correct: list[float], resamples: int, seed: int) -> tuple[float, float, float]:
    c = np.asarray(correct, dtype=float)
    low, high = M.bootstrap(lambda idx: float(c[idx].mean()), len(c), resamples, seed)
    return float(c.mean()), low, high


def paired_gain(trial, base, resamples: int, seed: int) -> tuple[float, float, float]:
    """trial - base on the same dev examples, with the 95% paired bootstrap interval."""
    t, b = (M.from_bits(x.user_attrs["dev_correct"]) for x in (trial, base))
    low, high = M.bootstrap(lambda idx: float(t[idx].mean() - b[idx].mean()), len(t), resamples, seed)
    return float(t.mean() - b.mean()), low, high


# --- the answer ---------------------------------------------------------------------------------------------


def summarize(study, task: str, metric: str, resamples: int, seed: int, max_share: float) -> dict:
    """Best share, its dev score, and its paired gain over the pure specialist (same dev examples)."""
    from optuna.trial import TrialState

    size = study.user_attrs["specialist_size"]
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not done:
        raise MixtuneError(f"search: no trial of study {study.study_name} completed (see its MLflow runs)")

    def rank(t):  # a tie goes to less generalist data
        return t.value, -t.params["generalist_share"]

    best = max(done, key=rank)
    base = next((t for t in done if t.params["generalist_share"] == 0.0), None)
    a = best.user_attrs
    out = {"size": size, "study": study.study_name, "metric": metric, "trial": best.number,
           "generalist_share": best.params["generalist_share"], "dev_metric": a["dev_metric"],
           "dev_low": a["dev_low"], "dev_high": a["dev_high"], "run_id": a["mlflow_run_id"],
           "model_uri": a["model_uri"], "adapter": a["adapter"], "mix_sha256": a["mix_sha256"],
           "trained_tokens_total": sum(t.user_attrs.get("trained_tokens", 0) for t in study.trials),
           "trials": {s.name.lower(): count(study, (s,)) for s in
                      (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}}
    head = f"For {task} at {size} examples, "
    score = f"dev {metric} {a['dev_metric']:.2f} [{a['dev_low']:.2f}, {a['dev_high']:.2f}]"
    best_share = f"the best generalist share is r*={out['generalist_share']:.2f}: {score}"
    if base is None:
        out["answer"] = f"{head}{best_share}; the pure specialist did not complete, so there is no gain to report."
    elif best is not base:
        gain = paired_gain(best, base, resamples, seed)
        out.update(zip(("gain", "gain_low", "gain_high"), gain))
        out["answer"] = f"{head}{best_share}, {gain[0]:+.2f} [{gain[1]:+.2f}, {gain[2]:+.2f}] over the pure specialist."
    else:  # a tie goes to the pure specialist too: generalist data must earn its place
        out.update(gain=0.0, gain_low=0.0, gain_high=0.0)
        out["answer"] = f"{head}generalist data does not help here: the pure specialist scores {score}"
        runner_up = max((t for t in done if t is not base), key=rank, default=None)
        if runner_up is None:
            out["answer"] += "."
        else:
            g = paired_gain(runner_up, base, resamples, seed)
            out["answer"] += (f"; the best mix (r={runner_up.params['generalist_share']:.2f}) scores "
                              f"{g[0]:+.2f} [{g[1]:+.2f}, {g[2]:+.2f}] against it.")
    fit = share_fit(done, max_share, resamples, seed)
    if fit:
        out["fit"] = fit
        out["answer"] += (f" The mixing law fitted to the {len(done)} trials (quadratic in the share) puts the best "
                          f"share at r={fit['share']:.2f} [{fit['share_low']:.2f}, {fit['share_high']:.2f}].")
    return out


def share_fit(done: list, max_share: float, resamples: int, seed: int) -> dict | None:
    """The study's mixing-law fit (metrics.fit_share, as in the study's report) over the completed trials."""
    shares = [t.params["generalist_share"] for t in done]
    scores = np.array([[M.from_bits(t.user_attrs["dev_correct"])] for t in done])
    return M.fit_share(shares, scores, max_share, resamples, seed)


def trial_rows(study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        rows.append({"trial": t.number, "size": study.user_attrs["specialist_size"], "share": share_of(t),
                     "state": t.state.name, "dev_metric": a.get("dev_metric"), "dev_low": a.get("dev_low"),
                     "dev_high": a.get("dev_high"), "trained_tokens": a.get("trained_tokens")})
    return rows


def trials_csv(rows: list[dict]) -> str:
    f = io.StringIO()
    w = csv.DictWriter(f, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return f.getvalue()


def _figure(rows: list[dict], best: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = sorted((r for r in rows if r["state"] == "COMPLETE"), key=lambda r: r["share"])
    x, y = [r["share"] for r in done], np.array([r["dev_metric"] for r in done])
    err = np.array([[r["dev_metric"] - r["dev_low"] for r in done], [r["dev_high"] - r["dev_metric"] for r in done]])
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.errorbar(x, y, yerr=err, fmt="o", capsize=3, label="trial (95% interval)")
    ax.plot([best["generalist_share"]], [best["dev_metric"]], "r*", markersize=14, label="best")
    ax.set_xlabel("generalist share of the training set")
    ax.set_ylabel(f"dev {best['metric']}")
    ax.set_title(f"{best['size']} specialist examples")
    ax.legend()
    fig.tight_layout()
    return fig


def _log_summary(study, summary: dict) -> None:
    """Into the study's run (active): best values as metrics (they change as the study grows), the answer as
    its description, the trials table and the plot."""
    import mlflow

    rows = trial_rows(study)
    keys = ("generalist_share", "dev_metric", "dev_low", "dev_high", "gain", "gain_low", "gain_high")
    mlflow.log_metrics({f"best.{k}": float(summary[k]) for k in keys if k in summary})
    mlflow.log_metric("trained_tokens_total", summary["trained_tokens_total"])  # the search's compute
    mlflow.log_metrics({f"trials.{k}": v for k, v in summary["trials"].items()})
    mlflow.set_tags({"mlflow.note.content": summary["answer"], "mixtune.best_run_id": summary["run_id"]})
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
    tasks = sorted({ex["task"] for ex in read_jsonl(prepared / "specialist" / "train.jsonl")})
    base = resolve_base(model_cfg.base)
    summaries, rows, started = [], [], {}
    baselines = [s for s in baselines if s <= cfg.max_share]
    for size in cfg.sizes or [mix_cfg.specialist_size]:
        definition = study_definition(cfg, mix_cfg, train_cfg, model_cfg, eval_cfg, size, prepared)
        key = hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()[:10]
        name = f"{'+'.join(tasks)}-n{size}-{key}"
        claim = Claim(cfg.storage, name)
        study = open_study(cfg, name, size, claim, baselines)
        tags = {"mixtune.study": name, "mixtune.search.n_trials": str(cfg.n_trials)}
        parent = parent_run(study, claim, tasks, definition, tags)
        objective = _Trials(cfg, mix_cfg, train_cfg, eval_cfg, base, dev, prepared, study, claim, parent)
        if worker:
            _optimize(study, objective, cfg, claim)
            started[name] = objective.numbers
            continue
        with stage_run("search", tasks, {}, tags, run_id=parent.run_id):
            _optimize(study, objective, cfg, claim)
            summary = summarize(study, "+".join(tasks), objective.metric, eval_cfg.bootstrap, cfg.seed,
                                cfg.max_share)
            _log_summary(study, summary)
        summaries.append(summary)
        rows += trial_rows(study)
    if worker:
        return {"trials": started}  # study name -> the trials this worker ran
    return _write_outputs(summaries, rows, tasks, out)


def _optimize(study, objective: _Trials, cfg: SearchConfig, claim: Claim) -> None:
    """Run trials until the study holds n_trials finished or running ones (its other processes' included).
    Counting and starting a trial happen under the claim, so several workers never overshoot; each process
    tries at most the trials missing when it started, so a study whose trials all fail still ends."""
    import time

    import optuna
    from optuna.trial import TrialState

    deadline = time.monotonic() + cfg.timeout if cfg.timeout else None
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


def _write_outputs(summaries: list[dict], rows: list[dict], tasks: list[str], out: Path) -> dict:
    best = dict(max(summaries, key=lambda s: (s["dev_metric"], -s["size"])))
    src = Path(best["adapter"])
    with atomic_dir(out / "adapter") as tmp:
        if (src / "adapter_config.json").is_file():
            shutil.copytree(src, tmp, dirs_exist_ok=True)
        else:  # the best trial ran on another machine: take its adapter from MLflow
            import mlflow

            shutil.copytree(Path(mlflow.artifacts.download_artifacts(best["model_uri"])) / "peft", tmp,
                            dirs_exist_ok=True)
    best.update(tasks=tasks, adapter=str(out / "adapter"), trial_adapter=str(src),
                answer=" ".join(s["answer"] for s in summaries),
                sizes={str(s["size"]): {k: v for k, v in s.items() if k != "answer"} for s in summaries})
    with atomic_file(out / "trials.csv") as f:
        f.write(trials_csv(sorted(rows, key=lambda r: (r["size"], r["trial"]))))
    write_json(out / "best.json", best)
    return best
