"""Task metrics against values computed by hand; bootstrap intervals; the paired gain; answer-to-label mapping."""

from __future__ import annotations

import numpy as np
import pytest

from mixtune.core import metrics as M
from mixtune.core import score
from mixtune.core.score import label_from_text
from mixtune.plumbing.errors import MixtuneError

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
    return [{"id": f"t/{i}", "task": "t", "completion": g, "options": list(options) if options else None}
            for i, g in enumerate(gold)]


def _cmp(examples, systems, metric, resamples=500, gains=()):
    return score.compare(score.Scorer(examples, metric), systems, resamples, 0, gains=gains)


def test_compare_paired_gain_classification():
    gold = ["x", "y"] * 10  # 20 examples
    # tuned is right on the first 16, base on the first 6 only (a subset of tuned's): gain = 10/20 on every
    # example pair, so the paired interval never goes below 0.
    flip = {"x": "y", "y": "x"}
    tuned = [g if i < 16 else flip[g] for i, g in enumerate(gold)]
    base = [g if i < 6 else flip[g] for i, g in enumerate(gold)]
    for metric in ("accuracy", "macro_f1"):
        out = _cmp(_examples(gold), {"tuned": tuned, "base": base}, metric, gains=(("tuned", "base"),))
        assert out["n"] == 20 and out["metric"] == metric
        # accuracy 0.8 / 0.3; macro F1 by hand: tuned x tp 8, fn 2, fp 2 -> 16/20, y the same -> 0.8; base 0.3
        assert out["tuned"]["value"] == pytest.approx(0.8) and out["base"]["value"] == pytest.approx(0.3)
        assert out["tuned-base"]["value"] == pytest.approx(0.5)
        for system in ("tuned", "base", "tuned-base"):
            assert out[system]["low"] <= out[system]["value"] <= out[system]["high"]
        assert 0.0 <= out["tuned-base"]["low"] < 0.5 < out["tuned-base"]["high"] <= 1.0
        # deterministic for a seed
        assert _cmp(_examples(gold), {"tuned": tuned, "base": base}, metric, gains=(("tuned", "base"),)) == out


def test_equal_systems_have_zero_gain():
    gold = ["x", "y", "x", "x", "y"]
    pred = ["x", "x", "x", "y", "y"]
    out = _cmp(_examples(gold), {"a": pred, "b": list(pred)}, "macro_f1", 100, gains=(("a", "b"),))
    assert out["a-b"] == {"value": 0.0, "low": 0.0, "high": 0.0}


def test_generative_metrics():
    gold = ["the quick fox", "red apple", "blue sky", "big cat"]
    tuned = ["Quick fox!", "red apple", "blue", "dog"]  # EM 1,1,0,0; F1 1,1,2/3,0
    base = ["slow fox", "green", "sky blue", "big"]       # EM 0,0,0,0; F1 1/2,0,1,2/3
    ex = _examples(gold, options=None)
    em = _cmp(ex, {"tuned": tuned, "base": base}, "exact_match", 200, gains=(("tuned", "base"),))
    assert (em["tuned"]["value"], em["base"]["value"], em["tuned-base"]["value"]) == (0.5, 0.0, 0.5)
    f1 = _cmp(ex, {"tuned": tuned, "base": base}, "token_f1", 200)
    assert f1["tuned"]["value"] == pytest.approx((1 + 1 + 2 / 3 + 0) / 4)
    assert f1["base"]["value"] == pytest.approx((1 / 2 + 0 + 1 + 2 / 3) / 4)
    rl = _cmp(ex, {"tuned": tuned}, "rouge_l", 200)
    assert rl["tuned"]["value"] == pytest.approx(np.mean([M.rouge_l(p, g) for p, g in zip(tuned, gold)]))


def test_the_fast_macro_f1_is_metrics_macro_f1():
    rng = np.random.default_rng(0)
    labels = ["a", "b", "c", "d"]
    gold = list(rng.choice(labels, 300, p=[0.6, 0.2, 0.15, 0.05]))
    pred = list(rng.choice(labels + ["not a label"], 300))
    scorer = score.Scorer(_examples(gold, options=labels), "macro_f1")
    for idx in (np.arange(300), rng.integers(0, 300, 300)):
        want = M.macro_f1([pred[i] for i in idx], [gold[i] for i in idx], labels)
        assert scorer.value(scorer.encode(pred), idx)[0] == pytest.approx(want)


def test_auto_metric_is_the_tasks_own():
    assert score.metric_name("auto", _examples(["x", "y"], options=("x", "y"))) == "macro_f1"
    mc = [{**e, "options": o} for e, o in zip(_examples(["x", "p"]), (["x", "y"], ["p", "q", "r"]))]
    assert score.metric_name("auto", mc) == "accuracy"
    assert score.metric_name("auto", _examples(["free text"], options=None)) == "rouge_l"
    assert score.metric_name("token_f1", _examples(["x"], options=("x", "y"))) == "token_f1"
    with pytest.raises(MixtuneError, match="search.metric=macro_f1: needs options"):
        score.metric_name("macro_f1", _examples(["free text"], options=None))


def test_macro_f1_prefers_the_system_that_sees_the_minority_classes():
    """A planted majority-class answerer (the base model's habit on an imbalanced task) wins on accuracy and
    loses on macro-F1: the metric decides which adapter the search picks."""
    gold = ["joy"] * 6 + ["anger"] * 2 + ["fear"] * 2
    majority = ["joy"] * 10                                           # accuracy 0.6
    balanced = ["joy"] * 3 + ["anger"] * 3 + ["anger", "fear", "fear", "joy"]  # accuracy 0.5
    ex = _examples(gold, options=("joy", "anger", "fear"))
    acc = _cmp(ex, {"majority": majority, "balanced": balanced}, "accuracy", 100)
    f1 = _cmp(ex, {"majority": majority, "balanced": balanced}, "macro_f1", 100)
    assert (acc["majority"]["value"], acc["balanced"]["value"]) == (pytest.approx(0.6), pytest.approx(0.5))
    assert f1["majority"]["value"] == pytest.approx(0.75 / 3)  # joy 2*6/(12+4)=0.75, anger 0, fear 0
    # balanced: joy tp 3 fp 1 fn 3 -> 6/10; anger tp 1 fp 3 fn 1 -> 2/6; fear tp 1 fp 1 fn 1 -> 2/4
    assert f1["balanced"]["value"] == pytest.approx((0.6 + 2 / 6 + 0.5) / 3)
    assert f1["balanced"]["value"] > f1["majority"]["value"]


def test_a_scenario_is_the_mean_of_its_tasks():
    """Two tasks of different sizes: the scenario score is the unweighted mean of each task's own score."""
    ex = [{**e, "task": "short"} for e in _examples(["a", "b", "a", "b"], options=("a", "b"))]
    ex += [{**e, "id": f"u/{i}", "task": "long"} for i, e in enumerate(_examples(["c"] * 8 + ["d"] * 4,
                                                                                options=("c", "d")))]
    pred = ["a", "b", "a", "a"] + ["c"] * 12     # short: 3/4 right; long: 8/12 right
    out = _cmp(ex, {"tuned": pred}, "accuracy", 100)
    assert out["tuned"]["per_task"] == {"short": 0.75, "long": pytest.approx(8 / 12)}
    assert out["tuned"]["value"] == pytest.approx((0.75 + 8 / 12) / 2)  # not 11/16, the pooled accuracy
    assert out["tasks"] == ["long", "short"]


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


def test_a_generative_scenario_scores_each_task_by_rouge_l_and_averages():
    """Two generative tasks (a writing-assistant scenario in small): `auto` is ROUGE-L, each task's own score is
    kept, and the scenario's score is their unweighted mean, exactly."""
    ex = [{"id": "s/0", "task": "summarize", "completion": "the cat sat", "options": None},
          {"id": "s/1", "task": "summarize", "completion": "a red door", "options": None},
          {"id": "t/0", "task": "title", "completion": "rain in spain", "options": None}]
    pred = ["the cat sat down", "a door", "spain"]
    assert score.metric_name("auto", ex) == "rouge_l"
    out = _cmp(ex, {"tuned": pred}, "rouge_l", 100)
    # ROUGE-L F: LCS 3 of 4 and 3 -> 6/7; "a door" vs "a red door": LCS 2 -> 2*(1*2/3)/(1+2/3) = 0.8;
    # "spain" vs "rain in spain": LCS 1 -> 2*(1*1/3)/(1+1/3) = 0.5
    assert out["tuned"]["per_task"] == {"summarize": pytest.approx((6 / 7 + 0.8) / 2), "title": pytest.approx(0.5)}
    assert out["tuned"]["value"] == pytest.approx(((6 / 7 + 0.8) / 2 + 0.5) / 2)


def test_the_probe_is_scored_question_by_question_after_normalisation():
    # One task whatever the questions' own tasks; "yes" answers "Yes" (a probe question offers both).
    probe = [{"task": "t1", "completion": "Yes", "options": ["Yes", "yes"]},
             {"task": "t1", "completion": "4", "options": ["3", "4"]},
             {"task": "t2", "completion": "B", "options": ["A", "B"]}]
    scorer = score.probe_scorer(probe)
    assert scorer.tasks == ["probe"]
    enc = scorer.encode(["yes", "3", "B"])
    assert enc.tolist() == [1.0, 0.0, 1.0] and scorer.value(enc)[0] == pytest.approx(2 / 3)
