"""The study report's formatting: tables (CSV, also DVC plots), figures (PNG) and reports/study.md, from the
aggregate that mixtune.stages.study_report computes. Nothing here computes a number."""

from __future__ import annotations

import csv
import io

import numpy as np

CONDITIONS = ("specialist", "fixed", "searched")
LABELS = {"base": "base model (no tuning)", "specialist": "specialist only",
          "fixed": "+ generalist, fixed share", "searched": "+ generalist, searched share"}


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



def csv_text(rows: list[dict]) -> str:
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
