"""The study's report: reports/study.md, its plots (PNG) and tables (CSV, also DVC plots), and a parent MLflow
run that holds them and nests the study's runs. Every number comes from study/results/*.json and
study/prepared/*/stats.json: `aggregate` computes them, `render` only formats.

Intervals are 95% two-way paired bootstraps: seeds and test examples drawn with replacement, the same draw for
every condition of one target and size (metrics.resample_means). Quantities over several targets or sizes
average their resamples index by index; the draws of different cells are independent, which can only widen an
interval of a difference.
"""

from __future__ import annotations

import csv
import io
import json
import zlib
from pathlib import Path

import numpy as np

from mixtune import metrics as M
from mixtune.config import StudyConfig
from mixtune.errors import MixtuneError
from mixtune.files import atomic_file
from mixtune.study import prepared_dir, results_path, screen_path

CONDITIONS = ("specialist", "fixed", "searched")
LABELS = {"base": "base model (no tuning)", "specialist": "specialist only",
          "fixed": "+ generalist, fixed share", "searched": "+ generalist, searched share"}


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
    # The searched share: the mixing law fitted on DEV picks it; the nearest share run is scored on test.
    dev_fit = M.fit_share(shares, dev, max(shares), resamples, seed)
    chosen = dev_fit["share"] if dev_fit else shares[int(np.argmax(dev.mean(axis=(1, 2))))]
    searched = min(shares, key=lambda s: (abs(s - chosen), s))
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


def _iv(d: dict, signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(d['value'])} [{f.format(d['low'])}, {f.format(d['high'])}]"


def tables(agg: dict) -> dict[str, list[dict]]:
    scores, gains, corruption = [], [], []
    for r in agg["rows"]:
        for cond in CONDITIONS:
            share = {"specialist": 0.0, "fixed": agg["fixed_share"], "searched": r["searched_share"]}[cond]
            scores.append({"target": r["target"], "size": r["size"], "condition": cond, "share": share,
                           "score": r[cond]["value"], "low": r[cond]["low"], "high": r[cond]["high"]})
        for cond in ("fixed", "searched"):
            g = r[f"gain_{cond}"]
            gains.append({"target": r["target"], "size": r["size"], "condition": cond,
                          "capability": r["capability"] or "", "coverage": r["coverage"],
                          "gain": g["value"], "low": g["low"], "high": g["high"]})
        for c in r.get("corruption", []):
            corruption.append({"target": r["target"], "size": r["size"], "rate": c["rate"], "score": c["value"],
                               "low": c["low"], "high": c["high"], "gain": c["gain"]["value"],
                               "gain_low": c["gain"]["low"], "gain_high": c["gain"]["high"]})
    return {"scores": scores, "gains": gains, "corruption": corruption}


def _csv(rows: list[dict]) -> str:
    f = io.StringIO()
    if rows:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return f.getvalue()


def figures(agg: dict) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in agg["targets"] if any(r["target"] == n for r in agg["rows"])]  # the screen's kept ones
    figs = {}
    # Score against specialist size, one panel per target, with and without generalist data.
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = sorted((r for r in agg["rows"] if r["target"] == name), key=lambda r: r["size"])
        x = [r["size"] for r in rows]
        ax.axhline(rows[0]["base"]["value"], color="grey", ls=":", label=LABELS["base"])
        for cond in CONDITIONS:
            y = [r[cond]["value"] for r in rows]
            ax.plot(x, y, "o-", label=LABELS[cond])
            ax.fill_between(x, [r[cond]["low"] for r in rows], [r[cond]["high"] for r in rows], alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
        ax.set_title(f"{name} ({agg['targets'][name]['capability'] or 'narrow task'})", fontsize=9)
        ax.set_xlabel("specialist examples")
    axes[0][0].set_ylabel("test score")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    figs["score_vs_size"] = fig
    # Gain against coverage, one marker per size.
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for size in agg["sizes"]:
        rows = [r for r in agg["rows"] if r["size"] == size]
        g = [r["gain_fixed"] for r in rows]
        ax.errorbar([r["coverage"] for r in rows], [v["value"] for v in g],
                    yerr=[[v["value"] - v["low"] for v in g], [v["high"] - v["value"] for v in g]],
                    fmt="o", capsize=3, label=f"{size} examples")
        for r in rows:
            ax.annotate(r["target"], (r["coverage"], r["gain_fixed"]["value"]), fontsize=7)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("coverage: share of the pool with the target's skill keywords")
    ax.set_ylabel(f"gain at share {agg['fixed_share']:g} (test)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    figs["gain_vs_coverage"] = fig
    # Gain by capability.
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    labelled = [n for n in names if agg["targets"][n]["capability"]]
    width = 0.8 / len(agg["sizes"])
    for j, size in enumerate(agg["sizes"]):
        g = [next(r for r in agg["rows"] if r["target"] == n and r["size"] == size)["gain_fixed"] for n in labelled]
        ax.bar(np.arange(len(labelled)) + j * width, [v["value"] for v in g], width,
               yerr=[[v["value"] - v["low"] for v in g], [v["high"] - v["value"] for v in g]], capsize=3,
               label=f"{size} examples")
    ax.set_xticks(np.arange(len(labelled)) + width * (len(agg["sizes"]) - 1) / 2,
                  [f"{n}\n({agg['targets'][n]['capability']})" for n in labelled], fontsize=7)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_ylabel(f"gain at share {agg['fixed_share']:g} (test)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    figs["gain_by_capability"] = fig
    # Gain against the corruption rate.
    corr = [r for r in agg["rows"] if r.get("corruption")]
    if corr:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for r in corr:
            c = r["corruption"]
            ax.plot([p["rate"] for p in c], [p["gain"]["value"] for p in c], "o-",
                    label=f"{r['target']}, {r['size']} examples")
            ax.fill_between([p["rate"] for p in c], [p["gain"]["low"] for p in c], [p["gain"]["high"] for p in c],
                            alpha=0.2)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("corrupted share of the generalist answers")
        ax.set_ylabel("gain over the specialist alone (test)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        figs["gain_vs_corruption"] = fig
    # The mixing law: the fitted curve over the shares run, largest size.
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.0), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        r = next(r for r in agg["rows"] if r["target"] == name and r["size"] == max(agg["sizes"]))
        ax.errorbar(r["shares"], [b["value"] for b in r["by_share"]],
                    yerr=[[b["value"] - b["low"] for b in r["by_share"]], [b["high"] - b["value"] for b in r["by_share"]]],
                    fmt="o", capsize=3)
        if r["test_fit"]:
            xs = np.linspace(0, max(r["shares"]), 50)
            a, b, c = r["test_fit"]["coef"]
            ax.plot(xs, a + b * xs + c * xs**2, "-")
            ax.axvspan(r["test_fit"]["share_low"], r["test_fit"]["share_high"], alpha=0.15)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("generalist share")
    axes[0][0].set_ylabel(f"test score, {max(agg['sizes'])} examples")
    fig.tight_layout()
    figs["mixing_law"] = fig
    return figs


# --- markdown -----------------------------------------------------------------------------------------------


def render(agg: dict, images: dict[str, str]) -> str:
    claims_text = {
        "coverage": "Adding generalist data helps when the target's coverage by the generalist data is broad, "
                    "and most when task data is scarce.",
        "capability": "Generalist data helps tasks that need understanding and reasoning.",
        "knowledge": "For tasks that need factual knowledge, generalist data with hallucinated content can hurt.",
    }
    out = [f"# The study: specialist or generalist? (preset `{agg['preset']}`)", ""]
    out += [f"Base model `{agg['model']}`; specialist sizes {agg['sizes']}; generalist shares {agg['shares']} "
            f"(fixed share {agg['fixed_share']:g}); seeds {agg['seeds']}. Cells took "
            f"{agg['cell_seconds'] / 60:.1f} minutes of compute.", ""]
    if agg["note"]:
        out += [f"What this preset cuts: {agg['note']}", ""]
    out += ["Intervals are 95% two-way paired bootstraps over seeds and test examples. A comparison's minimum "
            "detectable effect is the gain it would detect with 80% probability (from the bootstrap's standard "
            "error). A comparison is confirmed when its interval lies above zero; contradicted when it lies below "
            f"zero, or when the comparison could detect a gain of {agg['powered']} and its interval rules one out; "
            "inconclusive otherwise.", "", "## Verdicts", ""]
    for i, (key, text) in enumerate(claims_text.items(), 1):
        c = agg["claims"][key]
        out.append(f"{i}. **{text}** Verdict at this scale: **{c['verdict']}**.")
        for p in c["parts"]:
            out.append(f"   - {p['name']}: {p['claim']}: {p['value']:+.3f} [{p['low']:+.3f}, {p['high']:+.3f}], "
                       f"minimum detectable effect {p['mde']:.3f} ({p['status']})")
    if agg["floor"]:
        out += ["", f"At this scale the model learned nothing measurable on {', '.join(agg['floor'])}: every tuned "
                "score's interval holds the base model's score. Parts that rest on these targets are floor effects, "
                "not evidence for or against a claim."]
    out += ["", "## Screen: does the model learn each target?", "",
            "Every candidate target, tuned as the pure specialist at the largest size (first seed) against the base "
            "model, on dev. Only a target the model learns (the gain's interval above zero) can speak for or "
            "against a claim; the others are dropped before the grid runs.", "",
            "| target | capability | base | specialist | gain | kept? |", "|---|---|---|---|---|---|"]
    for name, t in agg["targets"].items():
        sc = t["screen"]
        out.append(f"| {name} | {t['capability'] or 'narrow task'} | {sc['base']:.3f} | {sc['specialist']:.3f} | "
                   f"{_iv(sc['gain'], True)} | {'kept' if sc['kept'] else 'dropped'} |")
    out += ["", "## Targets", "", "| target | capability | train / dev / test | pool | coverage | pool tasks "
            "covered |", "|---|---|---|---|---|---|"]
    for name, t in agg["targets"].items():
        s, c = t["splits"], t["coverage"]
        out.append(f"| {name} | {t['capability'] or 'narrow task'} | {s['train']} / {s['dev']} / {s['test']} | "
                   f"{t['pool']} | {c['coverage']:.3f} | {c['tasks']} of {c['pool_tasks']} |")
    out += ["", "Coverage is the share of the generalist pool whose task shares one of the target's skill keywords "
            "(BIG-bench keywords, format keywords such as 'multiple choice' left out).", "",
            "## Scores", "", "| target | size | base | specialist only | + generalist, fixed | + generalist, "
            "searched (share) | gain, fixed | gain, searched |", "|---|---|---|---|---|---|---|---|"]
    for r in agg["rows"]:
        out.append(f"| {r['target']} | {r['size']} | {r['base']['value']:.3f} | {_iv(r['specialist'])} | "
                   f"{_iv(r['fixed'])} | {_iv(r['searched'])} ({r['searched_share']:g}) | "
                   f"{_iv(r['gain_fixed'], True)} | {_iv(r['gain_searched'], True)} |")
    if len(agg["shares"]) < 3:  # a quadratic needs three shares (metrics.fit_share)
        out += ["", "The searched share is the share run with the higher dev score (two shares fit no mixing law); "
                "test never chooses it."]
    else:
        out += ["", "The searched share is the one the mixing law fitted on the dev split predicts (the nearest "
                "share run); test never chooses it.", "", "## Mixing law", "",
                "score(r) = a + b r + c r², fitted to the mean score at each share; r̂ is its maximum on the "
                "shares' range, with a 95% interval from refitting on bootstrap resamples.", "",
                "| target | size | r̂ on dev | r̂ on test | predicted best test score |", "|---|---|---|---|---|"]
    for r in agg["rows"]:
        d, t = r["dev_fit"], r["test_fit"]
        if d and t:
            out.append(f"| {r['target']} | {r['size']} | {d['share']:.2f} [{d['share_low']:.2f}, "
                       f"{d['share_high']:.2f}] | {t['share']:.2f} [{t['share_low']:.2f}, {t['share_high']:.2f}] | "
                       f"{t['value']:.3f} [{t['value_low']:.3f}, {t['value_high']:.3f}] |")
    corr = [r for r in agg["rows"] if r.get("corruption")]
    if corr:
        out += ["", "## Corruption", "", "| target | size | corrupted share | score | gain over specialist |",
                "|---|---|---|---|---|"]
        for r in corr:
            for c in r["corruption"]:
                out.append(f"| {r['target']} | {r['size']} | {c['rate']:g} | {_iv(c)} | {_iv(c['gain'], True)} |")
    out += ["", "## Plots", ""]
    out += [f"![{name}]({path})" for name, path in images.items()]
    return "\n".join(out) + "\n"


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
            f.write(_csv(rows))
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

    from mixtune.tracking import stage_run

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
