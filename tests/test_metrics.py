"""Task metrics against values computed by hand; bootstrap intervals; the paired gain; answer-to-label mapping."""

from __future__ import annotations

import numpy as np
import pytest

from mixtune import metrics as M
from conftest import section
from mixtune.evaluate import label_from_text, summarize


# --- classification -------------------------------------------------------------------------------------------


def test_accuracy():
    assert M.accuracy(["a", "b", "c", "a"], ["a", "b", "b", "c"]) == 0.5
    assert M.accuracy(["a"], ["a"]) == 1.0
    assert M.accuracy([], []) == 0.0
    with pytest.raises(ValueError):  # a prediction per gold answer, or it is a bug
        M.accuracy(["a", "b"], ["a"])


# gold a a a b b c / pred a a b b c c:
#   a: tp 2, fp 0, fn 1 -> F1 = 2*2 / (2*2 + 0 + 1) = 4/5
#   b: tp 1, fp 1, fn 1 -> F1 = 2 / (2 + 1 + 1)     = 1/2
#   c: tp 1, fp 1, fn 0 -> F1 = 2 / (2 + 1 + 0)     = 2/3
GOLD = ["a", "a", "a", "b", "b", "c"]
PRED = ["a", "a", "b", "b", "c", "c"]
MACRO = (4 / 5 + 1 / 2 + 2 / 3) / 3


def test_macro_f1_by_hand():
    assert M.macro_f1(PRED, GOLD) == pytest.approx(MACRO)
    assert M.macro_f1(PRED, GOLD, ["a", "b", "c"]) == pytest.approx(MACRO)
    # A label in the label set that is neither gold nor predicted is skipped, not scored 0.
    assert M.macro_f1(PRED, GOLD, ["a", "b", "c", "d"]) == pytest.approx(MACRO)
    # A label predicted but never gold scores 0 (tp 0, fp 1) and counts: it lowers the mean.
    pred = ["a", "a", "d", "b", "c", "c"]  # a 4/5; b: tp 1, fn 1 -> 2/3; c: 2/3; d: 0
    assert M.macro_f1(pred, GOLD) == pytest.approx((4 / 5 + 2 / 3 + 2 / 3 + 0) / 4)
    assert M.macro_f1(GOLD, GOLD) == 1.0
    assert M.macro_f1([], []) == 0.0


def test_macro_f1_differs_from_accuracy_on_imbalance():
    gold = ["a"] * 8 + ["b"] * 2
    pred = ["a"] * 10  # always the majority class: accuracy 0.8, but b is never found
    assert M.accuracy(pred, gold) == 0.8
    # a: tp 8, fp 2 -> 16/18; b: fn 2 -> 0
    assert M.macro_f1(pred, gold) == pytest.approx((16 / 18 + 0) / 2)


# --- generative ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, normalized", [
    ("The Cat!", "cat"),
    ("  a   quick, brown fox. ", "quick brown fox"),
    ("An apple and THE pear", "apple and pear"),
    ("theme another", "theme another"),  # articles are whole words only
    ("", ""),
])
def test_normalize_answer(text, normalized):
    assert M.normalize_answer(text) == normalized


def test_exact_match():
    assert M.exact_match("The Cat!", "cat") == 1.0
    assert M.exact_match("a cat", "the cat") == 1.0
    assert M.exact_match("Hello, world.", "hello world") == 1.0
    assert M.exact_match("cats", "cat") == 0.0
    assert M.exact_match("cat sat", "cat") == 0.0


def test_token_f1():
    # quick brown fox vs quick fox jumps (articles dropped): 2 in common, P = R = 2/3
    assert M.token_f1("the quick brown fox", "a quick fox jumps") == pytest.approx(2 / 3)
    # overlap counts multiplicity: {x:2, y:1} & {x:1, y:2} = 2 tokens; P = R = 2/3
    assert M.token_f1("x x y", "x y y") == pytest.approx(2 / 3)
    # P = 1/1, R = 1/4 -> F1 = 2 * 1 * 1/4 / (5/4) = 2/5
    assert M.token_f1("fox", "quick brown fox jumps") == pytest.approx(2 / 5)
    assert M.token_f1("Hello, World!", "hello world") == 1.0
    assert M.token_f1("dog", "cat") == 0.0
    assert M.token_f1("", "") == 1.0  # both empty after normalization: they agree
    assert M.token_f1("the", "cat") == 0.0


def test_rouge_l():
    # LCS(one two three four, one three five) = "one three" = 2: P = 2/4, R = 2/3, F = 2PR/(P+R) = 4/7
    assert M.rouge_l("one two three four", "one three five") == pytest.approx(4 / 7)
    # the cat sat on the mat / the cat lay on the mat: LCS 5 of 6 both ways
    assert M.rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    # A subsequence, not a substring: gaps are allowed. LCS(a x b y c, a b c) = 3: P = 3/5, R = 1 -> 3/4
    assert M.rouge_l("alpha xray bravo yankee charlie", "alpha bravo charlie") == pytest.approx(3 / 4)
    assert M.rouge_l("same words here", "same words here") == 1.0
    assert M.rouge_l("nothing shared", "entirely different") == 0.0


# --- bootstrap -----------------------------------------------------------------------------------------------


def _mean_of(values: np.ndarray):
    return lambda idx: float(values[idx].mean())


def test_bootstrap_contains_point_estimate_and_is_deterministic():
    rng = np.random.default_rng(0)
    values = (rng.random(200) < 0.7).astype(float)
    low, high = M.bootstrap(_mean_of(values), len(values), 1000, seed=3)
    assert low < values.mean() < high
    assert 0.0 <= low and high <= 1.0
    assert M.bootstrap(_mean_of(values), len(values), 1000, seed=3) == (low, high)  # same seed, same interval
    assert M.bootstrap(_mean_of(values), len(values), 1000, seed=4) != (low, high)


def test_bootstrap_narrows_with_n_like_the_standard_error():
    widths = {}
    for n in (50, 200, 800):
        values = np.array([1.0, 0.0] * (n // 2))  # p = 0.5 exactly
        low, high = M.bootstrap(_mean_of(values), n, 1000, seed=0)
        widths[n] = high - low
        # a 95% interval of a proportion is about 2 * 1.96 * sqrt(p (1-p) / n)
        assert widths[n] == pytest.approx(2 * 1.96 * np.sqrt(0.25 / n), rel=0.25)
    assert widths[50] > widths[200] > widths[800]


def test_bootstrap_of_a_constant_is_a_point():
    assert M.bootstrap(_mean_of(np.ones(30)), 30, 200, seed=0) == (1.0, 1.0)


# --- the paired gain -----------------------------------------------------------------------------------------


def _examples(gold: list[str], options=("x", "y")) -> list[dict]:
    return [{"id": f"t/{i}", "completion": g, "options": list(options) if options else None}
            for i, g in enumerate(gold)]


def test_summarize_paired_gain_classification():
    gold = ["x", "y"] * 10  # 20 examples
    # tuned is right on the first 16, base on the first 6 only (a subset of tuned's): gain = 10/20 on every
    # example pair, so the paired interval never goes below 0.
    flip = {"x": "y", "y": "x"}
    tuned = [g if i < 16 else flip[g] for i, g in enumerate(gold)]
    base = [g if i < 6 else flip[g] for i, g in enumerate(gold)]
    cfg = section("evaluate", bootstrap=500, seed=0)
    out = summarize(_examples(gold), tuned, base, cfg)
    assert out["n"] == 20
    assert out["tuned"]["accuracy"] == pytest.approx(0.8)
    assert out["base"]["accuracy"] == pytest.approx(0.3)
    assert out["gain"]["accuracy"] == pytest.approx(0.5)
    # macro F1 by hand. tuned: x tp 8, fn 2, fp 2 -> 16/20; y the same -> 0.8
    assert out["tuned"]["macro_f1"] == pytest.approx(0.8)
    # base: x tp 3, fn 7, fp 7 -> 6/20; y the same -> 0.3
    assert out["base"]["macro_f1"] == pytest.approx(0.3)
    assert out["gain"]["macro_f1"] == pytest.approx(0.5)
    for system in ("tuned", "base", "gain"):
        for name in ("accuracy", "macro_f1"):
            assert out[system][f"{name}_low"] <= out[system][name] <= out[system][f"{name}_high"]
    assert 0.0 <= out["gain"]["accuracy_low"] < 0.5 < out["gain"]["accuracy_high"] <= 1.0
    # deterministic for a seed
    assert summarize(_examples(gold), tuned, base, cfg) == out


def test_summarize_equal_systems_have_zero_gain():
    gold = ["x", "y", "x", "x", "y"]
    pred = ["x", "x", "x", "y", "y"]
    out = summarize(_examples(gold), pred, pred, section("evaluate", bootstrap=100))
    assert out["gain"] == {"accuracy": 0.0, "accuracy_low": 0.0, "accuracy_high": 0.0,
                           "macro_f1": 0.0, "macro_f1_low": 0.0, "macro_f1_high": 0.0}


def test_summarize_generative():
    gold = ["the quick fox", "red apple", "blue sky", "big cat"]
    tuned = ["Quick fox!", "red apple", "blue", "dog"]  # EM 1,1,0,0; F1 1,1,2/3,0
    base = ["slow fox", "green", "sky blue", "big"]       # EM 0,0,0,0; F1 1/2,0,1,2/3
    out = summarize(_examples(gold, options=None), tuned, base, section("evaluate", bootstrap=200))
    assert set(out["tuned"]) == {f"{m}{s}" for m in ("exact_match", "token_f1", "rouge_l") for s in ("", "_low", "_high")}
    assert out["tuned"]["exact_match"] == pytest.approx(0.5)
    assert out["base"]["exact_match"] == 0.0
    assert out["gain"]["exact_match"] == pytest.approx(0.5)
    assert out["tuned"]["token_f1"] == pytest.approx((1 + 1 + 2 / 3 + 0) / 4)
    assert out["base"]["token_f1"] == pytest.approx((1 / 2 + 0 + 1 + 2 / 3) / 4)
    assert out["gain"]["token_f1"] == pytest.approx(out["tuned"]["token_f1"] - out["base"]["token_f1"])
    assert out["tuned"]["rouge_l"] == pytest.approx(np.mean([M.rouge_l(p, g) for p, g in zip(tuned, gold)]))


# --- generated text to a label -------------------------------------------------------------------------------


@pytest.mark.parametrize("text, label", [
    ("sport", "sport"),
    ("Sport.", "sport"),                       # normalized exact match
    ("  The Politics ", "politics"),
    ("I think it is politics.", "politics"),   # names one option
    ("business news", "business"),
    ("biotechnology", ""),                     # whole words only: does not name "tech"
    ("none of them", ""),
    ("", ""),
])
def test_label_from_text(text, label):
    assert label_from_text(text, ["business", "politics", "sport", "tech"]) == label


def test_label_from_text_multiword_and_article_options():
    assert label_from_text("It is science fiction, clearly", ["science fiction", "fiction"]) == "science fiction"
    assert label_from_text("A", ["a", "b", "c"]) == "a"  # "a" normalizes to "" like the text: exact match
    assert label_from_text("b", ["a", "b", "c"]) == "b"
    assert label_from_text("", ["a", "b", "c"]) == ""  # an empty answer is no answer, not the option "a"
