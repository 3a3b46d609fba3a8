"""The study's report: reports/study.md, its plots (PNG) and tables (CSV, also DVC plots), and a parent MLflow
run that holds them and nests the study's runs. Every number comes from study/results/*.json and
study/prepared/*/stats.json: `aggregate` computes them, `render` only formats.

Intervals are 95% two-way paired bootstraps: seeds and test examples drawn with replacement, the same draw for
every condition of one target and size (metrics.resample_means). Quantities over several targets or sizes
average their resamples index by index; the draws of different cells are independent, which can only widen an
interval of a difference.
"""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path

import numpy as np

from mixtune.core import metrics as M
from mixtune.core.search_answer import choose
from mixtune.core.study_render import CONDITIONS, csv_text, figures, render, tables
from mixtune.plumbing import entry
from mixtune.plumbing.errors import MixtuneError
from mixtune.plumbing.files import atomic_file
from mixtune.plumbing.study_config import StudyConfig
from mixtune.stages.study import prepared_dir, results_path, screen_path


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MixtuneError(f"{path}: no such file (run the study's earlier stages: dvc repro study/dvc.yaml)") from None
    except ValueError as e:
        raise MixtuneError(f"{path}: not valid JSON: {e}") from None


def _matrix(cells: list[dict], split: str) -> np.ndarray:
    """(seeds, examples) 0/1 scores of cells sorted by seed."""
    return np.array([M.from_bits(cell[split]["correct"]) for cell in sorted(cells, key=lambda c: c["seed"])])


def _summary(values: np.ndarray, point: float) -> dict:
    low, high = M.interval(values)
    return {"value": float(point), "low": low, "high": high}


def _cell_summary(cfg: StudyConfig, doc: dict, resamples: int) -> tuple[dict, dict]:
    """-> (numbers of one target and size, their bootstrap resamples by name)."""
    cells = doc["cells"]
    base = next(c for c in cells if c.get("base"))
    clean = [c for c in cells if not c.get("base") and not c["corrupt"]]
    shares = sorted({c["share"] for c in clean})
    seed = zlib.crc32(f"{doc['target']}-{doc['size']}".encode())

    def by_share(split: str) -> np.ndarray:
        return np.stack([_matrix([c for c in clean if c["share"] == s], split) for s in shares])

    test, dev = by_share("test"), by_share("dev")
    # The searched share: the search's own choice (search_answer.choose, search.recommend's default rule) on the
    # DEV curve of the shares run, its band paired over seeds and examples; that share is scored on test.
    dev_fit = M.fit_share(shares, dev, max(shares), resamples, seed)
    _, _, pick, _ = choose(np.array(shares), dev.mean(axis=(1, 2)), M.resample_means(dev, resamples, seed + 2),
                           [None] * len(shares), "fewest_tokens", None)
    searched = shares[pick]
    idx = {"specialist": shares.index(0.0), "fixed": shares.index(cfg.fixed_share),
           "searched": shares.index(searched)}
    boot = M.resample_means(test, resamples, seed)
    out = {"target": doc["target"], "size": doc["size"], "seeds": test.shape[1], "test_examples": test.shape[2],
           "base": {"value": base["test"]["score"]}, "shares": shares, "searched_share": searched,
           "dev_fit": dev_fit, "test_fit": M.fit_share(shares, test, max(shares), resamples, seed),
           "by_share": [_summary(boot[:, i], test[i].mean()) for i in range(len(shares))]}
    samples = {}
    for name, i in idx.items():
        out[name] = _summary(boot[:, i], test[i].mean())
        samples[name] = boot[:, i]
    for name in ("fixed", "searched"):
        samples[f"gain_{name}"] = samples[name] - samples["specialist"]
        out[f"gain_{name}"] = _summary(samples[f"gain_{name}"], out[name]["value"] - out["specialist"]["value"])
    corrupt = sorted({c["corrupt"] for c in cells if not c.get("base") and c["corrupt"]})
    if corrupt:
        mats = np.stack([test[idx["specialist"]], test[idx["fixed"]]]
                        + [_matrix([c for c in cells if not c.get("base") and c["corrupt"] == r], "test")
                           for r in corrupt])
        cboot = M.resample_means(mats, resamples, seed + 1)
        rates = [0.0, *corrupt]
        out["corruption"] = [{"rate": r, **_summary(cboot[:, i + 1], mats[i + 1].mean()),
                              "gain": _summary(cboot[:, i + 1] - cboot[:, 0], mats[i + 1].mean() - mats[0].mean())}
                             for i, r in enumerate(rates)]
        samples["corrupt_drop"] = cboot[:, 1] - cboot[:, -1]  # clean generalist minus the most corrupted
        samples["corrupt_hurt"] = cboot[:, 0] - cboot[:, -1]  # specialist only minus the most corrupted
    return out, samples


# A comparison is powered when it would detect a gain of 0.08 with 80% probability (issue 12's bar): then an
# interval that holds 0 and lies below 0.08 says the claimed gain, if any, is smaller than that.
POWERED = 0.08


def _part(name: str, claim: str, values: np.ndarray, point: float) -> dict:
    """One comparison: its interval, its minimum detectable effect and its status. confirmed: the interval lies
    above 0. contradicted: it lies below 0, or the comparison is powered and its interval rules out a gain of
    POWERED. inconclusive otherwise: the design could detect only gains above its minimum detectable effect."""
    low, high = M.interval(values)
    mde = M.min_detectable_effect(values)
    if low > 0:
        status = "confirmed"
    elif high < 0 or (mde <= POWERED and high < POWERED):
        status = "contradicted"
    else:
        status = "inconclusive"
    return {"name": name, "claim": claim, "value": float(point), "low": low, "high": high, "mde": mde,
            "status": status}


def _verdict(parts: list[dict]) -> str:
    """The claim's: confirmed or contradicted when every comparison is; inconclusive when none is either, with
    the smallest gain any of them could detect; mixed otherwise, with the counts."""
    statuses = [p["status"] for p in parts]
    if not parts:
        return "not tested"
    if len(set(statuses)) == 1 and statuses[0] != "inconclusive":
        return statuses[0]
    if set(statuses) == {"inconclusive"}:
        return f"inconclusive: could detect only gains above {min(p['mde'] for p in parts):.3f}"
    return "mixed: " + ", ".join(f"{statuses.count(s)} {s}" for s in ("confirmed", "contradicted", "inconclusive")
                                 if s in statuses)


def aggregate(cfg: StudyConfig, root: Path = Path(".")) -> dict:
    """Every number of the report, from the study's own results."""
    resamples = cfg.evaluate.bootstrap
    targets, rows, samples, seconds = {}, [], {}, {}
    for name, target in cfg.targets.items():
        stats = _load(root / prepared_dir(name) / "stats.json")
        screen = _load(root / screen_path(name))
        targets[name] = {"capability": target.capability, "coverage": stats["coverage"],
                         "splits": stats["splits"], "pool": stats["generalist_pool"], "screen": screen}
        if not screen["kept"]:
            continue  # the model does not learn it: listed with its screen, in no claim
        for size in cfg.sizes:
            doc = _load(root / results_path(name, size))
            row, s = _cell_summary(cfg, doc, resamples)
            row.update(capability=target.capability, coverage=stats["coverage"]["coverage"], run_id=doc["run_id"])
            seconds.update((c["run_id"], c["seconds"]) for c in doc["cells"])  # a cached cell counts once
            rows.append(row)
            samples[(name, size)] = s
    small, large = min(cfg.sizes), max(cfg.sizes)
    kept = {n: t for n, t in cfg.targets.items() if targets[n]["screen"]["kept"]}

    def mean_of(keys: list[tuple[str, int]], what: str) -> tuple[np.ndarray, float]:
        """The mean of `what` over (target, size) cells: its resamples and its point value."""
        by_key = {(r["target"], r["size"]): r for r in rows}
        return (np.mean([samples[k][what] for k in keys], axis=0),
                float(np.mean([by_key[k][what]["value"] for k in keys])))

    claims = {}
    # Claim 1: coverage (the controlled pair: the same target with and without its related tasks in the pool)
    # and scarcity (the gain at the smallest size against the largest, over all targets).
    parts = []
    pairs = [(n, t.pool_exclude_keywords) for n, t in kept.items() if t.pool_exclude_keywords]
    for low_name, _ in pairs:
        high_name = next((n for n, t in kept.items() if not t.pool_exclude_keywords
                          and t.source == kept[low_name].source), None)
        if high_name is None:
            continue
        hi, hp = mean_of([(high_name, s) for s in cfg.sizes], "gain_fixed")
        lo, lp = mean_of([(low_name, s) for s in cfg.sizes], "gain_fixed")
        parts.append(_part(f"coverage: {high_name} against {low_name}",
                           f"the gain is larger with the related tasks in the pool (coverage "
                           f"{targets[high_name]['coverage']['coverage']:.3f} against "
                           f"{targets[low_name]['coverage']['coverage']:.3f})", hi - lo, hp - lp))
    names = list(kept)
    if small != large and names:
        sv, sp = mean_of([(n, small) for n in names], "gain_fixed")
        lv, lp2 = mean_of([(n, large) for n in names], "gain_fixed")
        parts.append(_part(f"scarcity: {small} against {large} examples",
                           f"the gain is larger with {small} task examples than with {large} (mean over targets)",
                           sv - lv, sp - lp2))
    claims["coverage"] = {"parts": parts, "verdict": _verdict(parts)}
    # Claim 2: generalist data helps understanding and reasoning targets (gain at the fixed share, all sizes).
    parts = []
    for cap in ("understanding", "reasoning"):
        keys = [(n, s) for n, t in kept.items() if t.capability == cap and not t.pool_exclude_keywords
                for s in cfg.sizes]
        if keys:
            v, p = mean_of(keys, "gain_fixed")
            parts.append(_part(f"{cap}: {', '.join(sorted({k[0] for k in keys}))}",
                               f"generalist data raises the {cap} target's score", v, p))
    claims["capability"] = {"parts": parts, "verdict": _verdict(parts)}
    # Claim 3: for knowledge targets, corrupted generalist data lowers the score, below the specialist's.
    parts = []
    for key in [(name, size) for name in cfg.corrupt_targets for size in cfg.sizes]:
        if "corrupt_drop" not in samples.get(key, {}):  # dropped by its screen, or no corruption cells
            continue
        row = next(r for r in rows if (r["target"], r["size"]) == key)
        c, name = row["corruption"], f"{key[0]} at {key[1]} examples"
        parts.append(_part(f"corruption lowers {name}", f"the score falls from corruption 0 to {c[-1]['rate']:g}",
                           samples[key]["corrupt_drop"], c[0]["value"] - c[-1]["value"]))
        parts.append(_part(f"corrupted data hurts {name}", f"with a share {c[-1]['rate']:g} of the generalist "
                           f"answers wrong, it scores below the specialist alone", samples[key]["corrupt_hurt"],
                           -c[-1]["gain"]["value"]))
    claims["knowledge"] = {"parts": parts, "verdict": _verdict(parts)}
    # A target whose every tuned score holds the base model's score in its interval learned nothing measurable:
    # its gains cannot speak for or against a claim.
    floor = [n for n in kept if all(r[c]["low"] <= r["base"]["value"] <= r[c]["high"]
                                           for r in rows if r["target"] == n for c in CONDITIONS)]
    return {"preset": cfg.preset, "note": cfg.note, "floor": floor, "powered": POWERED, "model": cfg.model.base, "sizes": cfg.sizes,
            "shares": cfg.shares, "fixed_share": cfg.fixed_share, "seeds": cfg.seeds,
            "corrupt_rates": cfg.corrupt_generalist, "targets": targets, "rows": rows, "claims": claims,
            "cell_seconds": sum(seconds.values())}


# --- tables and plots ---------------------------------------------------------------------------------------


# --- markdown -----------------------------------------------------------------------------------------------


def run(cfg: StudyConfig, out: Path = Path("reports"), root: Path = Path(".")) -> dict:
    agg = aggregate(cfg, root)
    folder = out / "study"
    folder.mkdir(parents=True, exist_ok=True)
    images = {}
    for name, fig in figures(agg).items():
        tmp = folder / f".{name}.png.tmp"
        fig.savefig(tmp, dpi=110, format="png")
        tmp.replace(folder / f"{name}.png")
        images[name] = f"study/{name}.png"
    for name, rows in tables(agg).items():
        with atomic_file(folder / f"{name}.csv") as f:
            f.write(csv_text(rows))
    with atomic_file(folder / "aggregate.json") as f:
        json.dump(agg, f, indent=1)
    text = render(agg, images)
    with atomic_file(out / "study.md") as f:
        f.write(text)
    _log(cfg, agg, out)
    return agg


def _log(cfg: StudyConfig, agg: dict, out: Path) -> None:
    """A parent run holding the report; the study's per-target runs are nested under it (MLflow's nesting is
    the mlflow.parentRunId tag)."""
    import mlflow

    from mixtune.plumbing.tracking import stage_run

    with stage_run("study report", ["study"], {"preset": cfg.preset, "sizes": cfg.sizes, "shares": cfg.shares,
                                                "seeds": cfg.seeds}, {"mixtune.study.preset": cfg.preset}) as run:
        if run is None:
            return
        verdicts = "; ".join(f"{k}: {c['verdict']}" for k, c in agg["claims"].items())
        mlflow.set_tag("mlflow.note.content", f"Study ({cfg.preset}): {verdicts}. See study.md.")
        mlflow.log_metrics({f"{r['target']}.n{r['size']}.gain_fixed": r["gain_fixed"]["value"] for r in agg["rows"]})
        mlflow.log_artifact(str(out / "study.md"))
        mlflow.log_artifacts(str(out / "study"), "study")
        from mlflow.exceptions import MlflowException

        client = mlflow.MlflowClient()
        children = [r["run_id"] for r in agg["rows"] if r["run_id"]]
        elsewhere = 0
        for child in children:
            try:
                client.set_tag(child, "mlflow.parentRunId", run.info.run_id)
            except MlflowException as e:  # the results are git's; their runs are in the store that ran them
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                elsewhere += 1
        if elsewhere:
            print(f"study report: {elsewhere} of {len(children)} result files' runs are not in this MLflow store "
                  "(they ran in another clone's); the report run is logged without them nested under it")


# --- the stage's command (`python -m mixtune.stages.study_report`, `mixtune study report`) -------------------------


def command(args) -> None:
    from mixtune.plumbing.config import load_section

    agg = run(load_section("study", args.study_params))
    for key, c in agg["claims"].items():
        print(f"study report: {key}: {c['verdict']}")
    print("study report: reports/study.md")


def parser():
    p = entry.parser("mixtune study", "reports/study.md from the study's results", params=False)
    p.add_argument("--study-params", default="study/params.yaml", help="default: study/params.yaml")
    return p


if __name__ == "__main__":
    sys.exit(entry.main(parser(), command))
