"""Task metrics and their 95% bootstrap intervals. Pure functions over predictions, so each is testable by hand."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(pred: str, gold: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(gold))


def token_f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def rouge_l(pred: str, gold: str) -> float:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"]).score(gold, pred)["rougeL"].fmeasure


def accuracy(pred: Sequence[str], gold: Sequence[str]) -> float:
    return float(np.mean([p == g for p, g in zip(pred, gold, strict=True)])) if gold else 0.0


def macro_f1(pred: Sequence[str], gold: Sequence[str], labels: Sequence[str] | None = None) -> float:
    """Mean over the labels of per-label F1 (a label never predicted nor present scores 0 and is skipped)."""
    labels = sorted(set(gold) | set(pred)) if labels is None else list(labels)
    scores = []
    for label in labels:
        tp = sum(p == label and g == label for p, g in zip(pred, gold, strict=True))
        fp = sum(p == label and g != label for p, g in zip(pred, gold, strict=True))
        fn = sum(p != label and g == label for p, g in zip(pred, gold, strict=True))
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def bootstrap(metric: Callable[[np.ndarray], float], n: int, resamples: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of metric(indices) over resamples of the n examples (paired when the metric
    compares two systems on the same indices)."""
    rng = np.random.default_rng(seed)
    return interval(np.array([metric(rng.integers(0, n, n)) for _ in range(resamples)]))


def to_bits(correct: Sequence[float]) -> str:
    """Per-example 0/1 scores as a string ("1101"): kept with a result so paired intervals can be recomputed."""
    return "".join("1" if c else "0" for c in correct)


def from_bits(bits: str) -> np.ndarray:
    return np.array([float(c) for c in bits])


def resample_means(scores: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """scores: (conditions, seeds, examples), every condition on the same seeds and examples. -> (resamples,
    conditions): each condition's mean over one two-way resample (seeds and examples drawn with replacement,
    the same draw for every condition, so differences between conditions stay paired)."""
    _, s, n = scores.shape
    rng = np.random.default_rng(seed)
    out = np.empty((resamples, scores.shape[0]))
    for i in range(resamples):
        rows, cols = rng.integers(0, s, s), rng.integers(0, n, n)
        out[i] = scores[:, rows][:, :, cols].mean(axis=(1, 2))
    return out


def interval(values: np.ndarray) -> tuple[float, float]:
    """The 95% percentile interval of bootstrap values."""
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def min_detectable_effect(values: np.ndarray, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true difference that a comparison with these bootstrap values would detect (its 1 - alpha
    interval above 0) with probability `power`: (z(1 - alpha/2) + z(power)) standard errors, the standard error
    being the bootstrap's standard deviation; 2.80 of them at 95% and 80%."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf
    return float((z(1 - alpha / 2) + z(power)) * np.std(values, ddof=1))


def _quadratic_best(shares: np.ndarray, means: np.ndarray, max_share: float) -> tuple[float, float, np.ndarray]:
    coef = np.polyfit(shares, means, 2)  # c r^2 + b r + a
    candidates = [0.0, max_share]
    if coef[0] < 0 and 0 < -coef[1] / (2 * coef[0]) < max_share:
        candidates.append(-coef[1] / (2 * coef[0]))
    values = np.polyval(coef, candidates)
    i = int(np.argmax(values))
    return float(candidates[i]), float(values[i]), coef


def fit_share(shares: Sequence[float], scores: np.ndarray, max_share: float, resamples: int, seed: int) -> dict | None:
    """A mixing law: the metric as a quadratic in the generalist share, fitted by least squares to the mean score
    at each share; the predicted best share r_hat is its maximum on [0, max_share], and its 95% interval comes
    from refitting on two-way resamples (seeds x examples, see resample_means).

    Why a quadratic: Data Mixing Laws (Ye et al., 2024) fit loss = c + k exp(t r) per domain; that family is
    monotone in r, so its optimum is always an endpoint, while the accuracy curves of the paper (and of our
    searches) rise and then fall. A concave quadratic is the smallest family with an interior optimum, and
    3 shares identify it. scores: (shares, seeds, examples). None with fewer than 3 distinct shares."""
    x = np.asarray(shares, dtype=float)
    if len(set(x.tolist())) < 3:
        return None
    means = scores.mean(axis=(1, 2))
    best, value, coef = _quadratic_best(x, means, max_share)
    boot = [_quadratic_best(x, m, max_share)[:2] for m in resample_means(scores, resamples, seed)]
    r_low, r_high = interval(np.array([b[0] for b in boot]))
    v_low, v_high = interval(np.array([b[1] for b in boot]))
    return {"share": best, "share_low": r_low, "share_high": r_high, "value": value, "value_low": v_low,
            "value_high": v_high, "coef": [float(c) for c in coef[::-1]]}  # a, b, c


def fit_curve(shares: Sequence[float], values: Callable[[np.ndarray], np.ndarray], n: int, max_share: float,
              resamples: int, seed: int, reference: Callable[[np.ndarray], float] | None = None) -> dict:
    """The search's mixing law: the same quadratic as fit_share, fitted to one score per share, where
    `values(idx)` scores every share on the examples `idx` (so any metric fits, macro-F1 included). Its 95%
    intervals refit on resamples of the n examples, the same resample for every share; `reference(idx)` (the
    pure specialist's score) gives the fitted gain at the best share, paired. `concave`: the curve has a maximum
    strictly inside (0, max_share), so the law says more than "the more (or the less), the better"."""
    x = np.asarray(shares, dtype=float)
    everything = np.arange(n)
    best, value, coef = _quadratic_best(x, values(everything), max_share)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        b, v, _ = _quadratic_best(x, values(idx), max_share)
        boot.append((b, v, v - reference(idx) if reference else 0.0))
    boot = np.array(boot)
    out = {"share": best, "value": value, "coef": [float(c) for c in coef[::-1]],  # a, b, c
           "concave": bool(coef[0] < 0 and 0 < best < max_share)}
    for i, key in enumerate(("share", "value", "gain")):
        out[f"{key}_low"], out[f"{key}_high"] = interval(boot[:, i])
    if reference:
        out["gain"] = value - reference(everything)
    else:
        del out["gain_low"], out["gain_high"]
    return out
