"""The search's answer, from the curve its trials draw: the dev score at each share with a paired 95% band, the
best share with its interval, the near-optimal range (every share whose paired dev score is within noise of
the best's), and one share in that range by a stated rule (`search.recommend`):

    fewest_tokens     the smallest share in the range: the same score, for the fewest generalist tokens
    least_forgetting  the share in the range that forgets least of the held-out generalist probe

With `search.max_forgetting`, only shares that lose at most that much probe accuracy against the base model are
recommended, and the answer names the smallest such share. A best share at the top of the searched range is
said: the curve may still rise beyond it. Every interval resamples the same dev examples for every share, so a
difference between two shares is paired.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from mixtune.core import metrics as M
from mixtune.plumbing.errors import MixtuneError
from mixtune.plumbing.search_storage import count, share_of

CSV_FIELDS = ["trial", "size", "share", "state", "dev_metric", "dev_low", "dev_high", "near_optimal", "forgetting",
              "trained_tokens", "steps"]


def forgetting_of(t, base_probe: str | None) -> float | None:
    """Held-out generalist accuracy lost against the base model (positive: forgotten)."""
    if not base_probe or not t.user_attrs.get("probe"):
        return None
    return float(M.from_bits(base_probe).mean() - M.from_bits(t.user_attrs["probe"]).mean())


def steps_of(t) -> int | None:
    """The optimizer steps a trial trained: recorded by the trial, or (a trial recorded before it was) read from
    its adapter's cache entry; None when neither is at hand (a trial trained on another machine)."""
    if "steps" in t.user_attrs:
        return t.user_attrs["steps"]
    done = Path(t.user_attrs.get("adapter", "")).parent / "metrics.json"
    return json.loads(done.read_text())["steps"] if t.user_attrs.get("adapter") and done.is_file() else None


def completed(study) -> list:
    """The completed trials, one per share (the first trial to measure it), by share."""
    from optuna.trial import TrialState

    by_share = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        by_share.setdefault(t.params["generalist_share"], t)
    return [by_share[s] for s in sorted(by_share)]


def curve(done: list, scorer, resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each share's dev score on all of dev, and on `resamples` resamples of the dev examples (the same
    resample for every share): -> (values (shares,), resampled (resamples, shares))."""
    enc = [scorer.encode(t.user_attrs["dev_predictions"]) for t in done]
    values = np.array([scorer.value(e)[0] for e in enc])
    rng = np.random.default_rng(seed)
    boot = np.empty((resamples, len(done)))
    for b in range(resamples):
        idx = rng.integers(0, scorer.n, scorer.n)
        boot[b] = [scorer.value(e, idx)[0] for e in enc]
    return values, boot


def _interval(x: np.ndarray) -> tuple[float, float]:
    return M.interval(x)


def choose(shares: np.ndarray, values: np.ndarray, boot: np.ndarray, forgetting: list, rule: str,
           max_forgetting: float | None) -> tuple[int, list[int], int | None, float | None]:
    """The choice itself, on a curve measured any way (a search's trials, the study's cells): `values` each
    share's score, `boot` (resamples, shares) on paired resamples, `forgetting` each share's (or None). ->
    (best, the near-optimal range, the recommended share or None when none in the range keeps within
    max_forgetting, the smallest share within max_forgetting), as indices but the last."""
    best = int(np.argmax(values))  # a tie goes to the smaller share (argmax takes the first)
    diff = boot - boot[:, [best]]  # each share against the best, paired
    near = [i for i in range(len(shares)) if i == best or _interval(diff[:, i])[1] >= 0]
    allowed, within = near, None
    if max_forgetting is not None:
        ok = [i for i in range(len(shares)) if forgetting[i] is not None and forgetting[i] <= max_forgetting]
        within = float(shares[ok[0]]) if ok else None
        allowed = [i for i in near if i in ok]
    if rule == "least_forgetting" and all(forgetting[i] is not None for i in allowed):
        pick = min(allowed, key=lambda i: (forgetting[i], shares[i])) if allowed else None
    else:
        pick = min(allowed, key=lambda i: shares[i]) if allowed else None
    return best, near, pick, within


def recommend(study, scorer, cfg, resamples: int) -> dict:
    """One recommended share for one search (one specialist size), the curve and range behind it, its dev
    gain over the pure specialist (paired) and its forgetting."""
    from optuna.trial import TrialState

    size, metric = study.user_attrs["specialist_size"], scorer.metric
    done = completed(study)
    if not done:
        raise MixtuneError(f"search: no trial of search {study.study_name} completed (see its MLflow runs)")
    shares = np.array([t.params["generalist_share"] for t in done])
    if shares[0] != 0.0:
        raise MixtuneError(f"search: the pure specialist (share 0) of search {study.study_name} did not complete; "
                           "run `dvc repro` again to retry it")
    values, boot = curve(done, scorer, resamples, cfg.seed)
    base_probe = study.user_attrs.get("base_probe")
    forgetting = [forgetting_of(t, base_probe) for t in done]
    best, near, pick, within = choose(shares, values, boot, forgetting, cfg.recommend, cfg.max_forgetting)
    best_share_low, best_share_high = _interval(shares[np.argmax(boot, axis=1)])
    rec = pick if pick is not None else 0
    gain = boot[:, rec] - boot[:, 0]
    g_low, g_high = _interval(gain)
    lo, hi = float(shares[near].min()), float(shares[near].max())
    tasks = study.user_attrs.get("tasks", "this task")
    rule = {"fewest_tokens": "the fewest generalist tokens", "least_forgetting": "the least forgetting"}[cfg.recommend]
    head = f"For {tasks} at {size} examples, "
    if pick is None:
        answer = (f"{head}no share within noise of the best (r in [{lo:.2f}, {hi:.2f}]) keeps forgetting within "
                  f"search.max_forgetting={cfg.max_forgetting}: use r=0, the pure specialist")
    elif best == 0:
        answer = f"{head}generalist data does not help here: use r=0, the pure specialist, which scores best"
    elif rec == 0:
        answer = (f"{head}generalist data does not help measurably here: use r=0 (the pure specialist, dev {metric} "
                  f"{values[0]:.3f}), which is within noise of the best share r={shares[best]:.2f} "
                  f"(dev {values[best]:.3f})")
    else:
        answer = (f"{head}use a generalist share of r={shares[rec]:.2f}: {rule} among the shares within noise of the "
                  f"best (near-optimal range r in [{lo:.2f}, {hi:.2f}], {len(near)} of {len(done)} shares); dev "
                  f"{metric} {values[rec] - values[0]:+.3f} [{g_low:+.3f}, {g_high:+.3f}] over the pure specialist")
    answer += (f". Best measured share r={shares[best]:.2f} (dev {metric} {values[best]:.3f}; over resamples of dev "
               f"the best share lies in [{best_share_low:.2f}, {best_share_high:.2f}])")
    if shares[best] >= cfg.max_share and len(done) > 1:
        answer += f"; it is at the top of the searched range (search.max_share={cfg.max_share}): widen it"
    steps = [steps_of(t) for t in done]
    longer = pick is not None and rec > 0 and None not in (steps[0], steps[rec]) and steps[rec] > steps[0]
    if longer:  # train.epochs over each mix: a larger share is also more optimizer steps (README, "The answer")
        answer += (f". r={shares[rec]:.2f} trained {steps[rec]} optimizer steps, the pure specialist {steps[0]}: part "
                   f"of its gain may be the longer training, not the generalist data; compare it with the pure "
                   f"specialist trained as long: dvc exp run --temp -S train.max_steps={steps[rec]} -S search.grid=1 "
                   f"-S search.n_trials=1")
    if forgetting[rec] is not None:
        answer += (f". Held-out generalist accuracy lost against the base model: {forgetting[rec]:+.2f} at "
                   f"r={shares[rec]:.2f}" + (f", {forgetting[0]:+.2f} for the pure specialist" if rec else ""))
    if cfg.max_forgetting is not None:
        answer += (f". Smallest share within search.max_forgetting={cfg.max_forgetting}: "
                   + (f"r={within:.2f}" if within is not None else "none"))
    answer += "."
    band = [_interval(boot[:, i]) for i in range(len(done))]
    return {
        "size": size, "search": study.study_name, "metric": metric, "recommend": cfg.recommend,
        "recommended_share": float(shares[rec]) if pick is not None else 0.0,
        "dev_gain": float(values[rec] - values[0]), "dev_gain_low": g_low, "dev_gain_high": g_high,
        "forgetting": forgetting[rec], "specialist_forgetting": forgetting[0],
        "specialist_trial": done[0].number, "specialist_dev": float(values[0]), "specialist_steps": steps[0],
        "recommended_steps": steps[rec], "longer_than_specialist": longer,
        "specialist_adapter": done[0].user_attrs["adapter"],
        "specialist_adapter_uri": done[0].user_attrs["adapter_uri"],
        "recommended_trial": done[rec].number, "recommended_adapter": done[rec].user_attrs["adapter"],
        "best_trial": done[best].number, "best_trial_share": float(shares[best]), "best_trial_dev": float(values[best]),
        "best_share_low": best_share_low, "best_share_high": best_share_high, "at_top_of_range":
            bool(shares[best] >= cfg.max_share and len(done) > 1),
        "near_optimal": [float(shares[i]) for i in near], "near_optimal_low": lo, "near_optimal_high": hi,
        "smallest_share_within_max_forgetting": within,
        "curve": [{"share": float(shares[i]), "trial": done[i].number, "dev": float(values[i]), "low": band[i][0],
                   "high": band[i][1], "forgetting": forgetting[i],
                   "trained_tokens": done[i].user_attrs.get("trained_tokens"), "steps": steps[i]}
                  for i in range(len(done))],
        "trained_tokens_total": sum(t.user_attrs.get("trained_tokens", 0) for t in study.trials),
        "trials": {s.name.lower(): count(study, (s,)) for s in (TrialState.COMPLETE, TrialState.FAIL)},
        "answer": answer}


def trial_rows(study, summary: dict | None = None) -> list[dict]:
    base_probe = study.user_attrs.get("base_probe")
    near = set(summary["near_optimal"]) if summary else set()
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        rows.append({"trial": t.number, "size": study.user_attrs["specialist_size"], "share": share_of(t),
                     "state": t.state.name, "dev_metric": a.get("dev_metric"), "dev_low": a.get("dev_low"),
                     "dev_high": a.get("dev_high"),
                     "near_optimal": int(share_of(t) in near) if t.state.name == "COMPLETE" else None,
                     "forgetting": forgetting_of(t, base_probe) if a.get("probe") else None,
                     "trained_tokens": a.get("trained_tokens"), "steps": steps_of(t)})
    return rows


def trials_csv(rows: list[dict]) -> str:
    f = io.StringIO()
    w = csv.DictWriter(f, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return f.getvalue()


def figure(best: dict):
    """Two panels a person reads at a glance: the dev score against the share, with its paired 95% band, the
    near-optimal range shaded and the recommended share marked; and each share's forgetting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = best["curve"]
    x, y = np.array([p["share"] for p in c]), np.array([p["dev"] for p in c])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax.axvspan(best["near_optimal_low"], best["near_optimal_high"], color="tab:green", alpha=0.12,
               label="near-optimal range")
    ax.fill_between(x, [p["low"] for p in c], [p["high"] for p in c], color="tab:blue", alpha=0.2,
                    label="95% interval")
    ax.plot(x, y, "o-", color="tab:blue", label="dev score")
    ax.axvline(best["recommended_share"], color="r", ls="--", label=f"recommended r={best['recommended_share']:.2f}")
    ax.set_xlabel("generalist share of the training set")
    ax.set_ylabel(f"dev {best['metric']}")
    ax.set_title(f"{best['size']} specialist examples")
    ax.legend(fontsize=8)
    f = [(p["share"], p["forgetting"]) for p in c if p["forgetting"] is not None]
    if f:
        ax2.plot([a for a, _ in f], [b for _, b in f], "o-", color="tab:orange")
        ax2.axhline(0, color="grey", lw=0.8)
    ax2.set_xlabel("generalist share of the training set")
    ax2.set_ylabel("held-out generalist accuracy lost")
    ax2.set_title("forgetting against the base model (lower is better)")
    fig.tight_layout()
    return fig


def log_summary(study, summary: dict) -> None:
    """Into the search's run (active): the answer as its description, its numbers (they change as the search
    grows), the trials table and the figure."""
    import mlflow

    keys = ("recommended_share", "dev_gain", "dev_gain_low", "dev_gain_high", "forgetting", "specialist_forgetting",
            "near_optimal_low", "near_optimal_high", "best_trial_share", "best_share_low", "best_share_high",
            "smallest_share_within_max_forgetting", "recommended_steps", "specialist_steps")
    mlflow.log_metrics({f"answer.{k}": float(summary[k]) for k in keys if summary.get(k) is not None})
    mlflow.log_metric("trained_tokens_total", summary["trained_tokens_total"])  # the search's compute
    mlflow.log_metrics({f"trials.{k}": v for k, v in summary["trials"].items()})
    mlflow.set_tags({"mlflow.note.content": summary["answer"], "mixtune.metric": summary["metric"]})
    mlflow.log_dict(summary, "best.json")
    mlflow.log_text(trials_csv(trial_rows(study, summary)), "trials.csv")
    mlflow.log_figure(figure(summary), "dev_vs_share.png")
