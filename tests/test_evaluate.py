"""evaluate: batched option scoring against the naive definition, and the stage end to end on the tiny model
(classification with a generalist held-out set, a generative split, the dev split) tracked in MLflow."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from mixtune import evaluate, train
from mixtune import metrics as M
from mixtune.config import EvaluateConfig, ModelConfig

from conftest import section
from mixtune.files import read_jsonl

from workspace import (TASK, classification, make_mix, multiple_choice, runs, train_config, use_store,
                       write_prepared)


# --- option scoring --------------------------------------------------------------------------------------------


def _naive_scores(model, tokenizer, examples: list[dict]) -> list[list[float]]:
    """One unpadded forward per (example, option) over the whole chat; sum the log-probabilities of the tokens
    after the prompt (the assistant turn as the template writes it: the option and its end-of-turn tokens)."""
    import torch

    scores = []
    for ex in examples:
        prompt = tokenizer.apply_chat_template(ex["prompt"], add_generation_prompt=True, tokenize=True,
                                               return_dict=False)
        row = []
        for option in ex["options"]:
            full = tokenizer.apply_chat_template(ex["prompt"] + [{"role": "assistant", "content": option}],
                                                 tokenize=True, return_dict=False)
            assert full[: len(prompt)] == prompt
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0].float(), -1)
            row.append(sum(logp[t - 1, full[t]].item() for t in range(len(prompt), len(full))))
        scores.append(row)
    return scores


@pytest.fixture(scope="module")
def scoring_examples():
    # Prompts of different lengths (so the batch is left-padded and sorted), options of 1 to ~9 tokens.
    return classification(3, "spec", seed=11) + multiple_choice(4, "gen", seed=12)


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
def test_score_options_equals_naive_log_likelihood(tiny_model, scoring_examples, lora):
    import torch

    from mixtune.model import load_base, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model))
    model = load_base(str(tiny_model))
    if lora:  # through PEFT's forward, with an adapter that changes the scores
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 task_type="CAUSAL_LM", init_lora_weights=False))
    model.eval()
    examples = scoring_examples
    lengths = {len(tokenizer(o, add_special_tokens=False)["input_ids"]) for ex in examples for o in ex["options"]}
    assert len(lengths) >= 3  # options of different token lengths
    assert len({len(ex["prompt"][0]["content"]) for ex in examples}) == len(examples)

    want = _naive_scores(model, tokenizer, examples)
    got = evaluate.score_options(model, tokenizer, examples, batch_size=3, prec="fp32")  # 3 batches, last short
    assert [len(r) for r in got] == [len(ex["options"]) for ex in examples]
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=1e-4)
    one_batch = evaluate.score_options(model, tokenizer, examples, batch_size=16, prec="fp32")
    for g, o in zip(got, one_batch):  # the batch size changes nothing but speed
        assert o == pytest.approx(g, abs=1e-4)
    # predict takes the best-scoring option
    preds = evaluate.predict(model, tokenizer, examples, section("evaluate", batch_size=2), "fp32")
    assert preds == [ex["options"][int(np.argmax(w))] for ex, w in zip(examples, want)]


# --- the stage -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    """A workspace with prepared/, mix/ (20% generalist) and a tiny trained adapter in train/."""
    root = tmp_path_factory.mktemp("evaluate")
    with pytest.MonkeyPatch.context() as mp:
        uri = use_store(mp, root)
        write_prepared(root)
        make_mix(root)
        metrics = train.run(train_config(max_steps=8), ModelConfig(base=str(tiny_model)), Path("mix"), Path("train"))
    return root, uri, metrics


def _eval_cfg(**kw) -> EvaluateConfig:
    return section("evaluate", **{"bootstrap": 200, "batch_size": 4, "generalist_sample": 10, **kw})


def test_evaluate_run_end_to_end(trained, monkeypatch, tiny_model):
    from mlflow import MlflowClient

    root, uri, train_metrics = trained
    use_store(monkeypatch, root)
    result = evaluate.run(_eval_cfg(), ModelConfig(base=str(tiny_model)), out=Path("eval"))

    test = read_jsonl(root / "prepared" / "specialist" / "test.jsonl")
    on_disk = json.loads((root / "eval" / "metrics.json").read_text())
    assert on_disk == result
    assert result["n"] == len(test) == 12 and result["split"] == "test"
    for system in ("tuned", "base", "gain"):
        assert set(result[system]) == {f"{m}{s}" for m in ("accuracy", "macro_f1") for s in ("", "_low", "_high")}
        for m in ("accuracy", "macro_f1"):
            assert result[system][f"{m}_low"] <= result[system][m] <= result[system][f"{m}_high"]
    for m in ("accuracy", "macro_f1"):
        assert result["gain"][m] == pytest.approx(result["tuned"][m] - result["base"][m])
    assert result["seconds_per_example"] > 0

    # predictions.jsonl: one row per example of the split, and the metrics are those of these predictions.
    rows = read_jsonl(root / "eval" / "predictions.jsonl")
    assert len(rows) == len(test)
    assert [r["id"] for r in rows] == [ex["id"] for ex in test]
    assert [r["gold"] for r in rows] == [ex["completion"] for ex in test]
    assert all(r["task"] == TASK and r["tuned"] in ex["options"] and r["base"] in ex["options"]
               for r, ex in zip(rows, test))
    assert result["tuned"]["accuracy"] == pytest.approx(M.accuracy([r["tuned"] for r in rows], [r["gold"] for r in rows]))
    assert result["base"]["accuracy"] == pytest.approx(M.accuracy([r["base"] for r in rows], [r["gold"] for r in rows]))

    # confusion.csv: the DVC confusion plot's input, actual vs the tuned model's prediction.
    with open(root / "eval" / "confusion.csv") as f:
        assert f.readline() == "actual,predicted\n"
        f.seek(0)
        assert [(c["actual"], c["predicted"]) for c in csv.DictReader(f)] == [(r["gold"], r["tuned"]) for r in rows]

    # Held-out generalist questions: sampled from the pool, none of them in the training mix.
    g = result["generalist"]
    assert g["n"] == 10
    assert set(g) == {"n", "tuned_accuracy", "base_accuracy", "forgetting", "forgetting_low", "forgetting_high"}
    assert g["forgetting"] == pytest.approx(g["base_accuracy"] - g["tuned_accuracy"])
    assert g["forgetting_low"] <= g["forgetting"] <= g["forgetting_high"]
    held = evaluate.generalist_sample(root / "prepared", root / "mix", 10, 0)
    mixed = {ex["id"] for ex in read_jsonl(root / "mix" / "train.jsonl")}
    assert len(held) == 10 and all(ex["options"] for ex in held) and not {ex["id"] for ex in held} & mixed
    assert any(ex["source"] == "gen" for ex in read_jsonl(root / "mix" / "train.jsonl"))  # the mix has some

    # The MLflow run, in the same experiment as the train run it evaluated.
    client = MlflowClient(tracking_uri=uri)
    train_run, eval_run = runs(uri)
    assert train_run.info.run_id == train_metrics["run_id"]
    assert eval_run.info.status == "FINISHED" and eval_run.info.run_name == "evaluate"
    assert eval_run.data.tags["mixtune.stage"] == "evaluate"
    assert eval_run.data.tags["mixtune.train_run_id"] == train_metrics["run_id"]
    assert eval_run.data.tags["mixtune.split"] == "test"
    assert eval_run.data.tags["mixtune.mix_sha256"] == train_run.data.tags["mixtune.mix_sha256"]
    metrics = eval_run.data.metrics
    for key in ("tuned.accuracy", "tuned.accuracy_low", "tuned.accuracy_high", "base.accuracy", "gain.accuracy",
                "gain.accuracy_low", "gain.accuracy_high", "tuned.macro_f1", "generalist.forgetting",
                "seconds_per_example"):
        assert key in metrics, key
    assert metrics["tuned.accuracy"] == pytest.approx(result["tuned"]["accuracy"])
    assert metrics["gain.accuracy"] == pytest.approx(result["gain"]["accuracy"])
    assert eval_run.data.params["evaluate.bootstrap"] == "200" and eval_run.data.params["model.base"] == str(tiny_model)
    artifacts = {a.path for a in client.list_artifacts(eval_run.info.run_id)}
    assert {"confusion_matrix.png", "predictions.jsonl"} <= artifacts
    png = Path(client.download_artifacts(eval_run.info.run_id, "confusion_matrix.png", str(root / "dl")))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    [inp] = eval_run.inputs.dataset_inputs
    assert inp.dataset.name == "specialist-test"
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "evaluation"


def test_evaluate_generative_split(trained, monkeypatch, tiny_model):
    root, uri, _ = trained
    use_store(monkeypatch, root)
    write_prepared(root / "gen", generative_test=True)
    calls = {"generate": [], "score_options": 0}
    generate, score_options = evaluate.generate, evaluate.score_options

    def spy_generate(model, tokenizer, examples, *args, **kw):
        calls["generate"].append([ex["id"] for ex in examples])
        return generate(model, tokenizer, examples, *args, **kw)

    def spy_score(*args, **kw):
        calls["score_options"] += 1
        return score_options(*args, **kw)

    monkeypatch.setattr(evaluate, "generate", spy_generate)
    monkeypatch.setattr(evaluate, "score_options", spy_score)
    out = root / "eval_gen"
    result = evaluate.run(_eval_cfg(generalist_sample=0, max_new_tokens=4), ModelConfig(base=str(tiny_model)),
                          prepared=root / "gen" / "prepared", mix=root / "mix", train=root / "train", out=out)

    test = read_jsonl(root / "gen" / "prepared" / "specialist" / "test.jsonl")
    ids = [ex["id"] for ex in test]
    assert all(ex["options"] is None for ex in test)
    assert calls["generate"] == [ids, ids]  # tuned, then base (adapter disabled)
    assert calls["score_options"] == 0
    metrics = {f"{m}{s}" for m in ("exact_match", "token_f1", "rouge_l") for s in ("", "_low", "_high")}
    assert set(result["tuned"]) == set(result["base"]) == set(result["gain"]) == metrics
    assert "generalist" not in result
    rows = read_jsonl(out / "predictions.jsonl")
    assert len(rows) == len(test) == result["n"]
    assert all(isinstance(r["tuned"], str) and isinstance(r["base"], str) for r in rows)
    for system in ("tuned", "base"):
        pred, gold = [r[system] for r in rows], [r["gold"] for r in rows]
        assert result[system]["exact_match"] == pytest.approx(np.mean([M.exact_match(p, g) for p, g in zip(pred, gold)]))
        assert result[system]["token_f1"] == pytest.approx(np.mean([M.token_f1(p, g) for p, g in zip(pred, gold)]))
        assert result[system]["rouge_l"] == pytest.approx(np.mean([M.rouge_l(p, g) for p, g in zip(pred, gold)]))
    assert not (out / "confusion.csv").exists()  # no labels, no confusion matrix
    assert runs(uri)[-1].info.status == "FINISHED"
    assert "tuned.rouge_l" in runs(uri)[-1].data.metrics


def test_evaluate_dev_split_and_max_examples(trained, monkeypatch, tiny_model):
    root, uri, _ = trained
    use_store(monkeypatch, root)
    result = evaluate.run(_eval_cfg(split="dev", max_examples=5, generalist_sample=0), ModelConfig(base=str(tiny_model)),
                          out=Path("eval_dev"))
    assert result["split"] == "dev" and result["n"] == 5
    rows = read_jsonl(root / "eval_dev" / "predictions.jsonl")
    assert [r["id"] for r in rows] == [ex["id"] for ex in read_jsonl(root / "prepared" / "specialist" / "dev.jsonl")[:5]]
    assert runs(uri)[-1].data.tags["mixtune.split"] == "dev"
