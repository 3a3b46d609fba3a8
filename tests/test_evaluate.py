"""evaluate: batched option scoring against the naive definition, and the stage end to end on the tiny model
(classification with a generalist held-out set, a generative split, the dev split) tracked in MLflow."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import section
from workspace import (
    TASK,
    classification,
    make_mix,
    multiple_choice,
    runs,
    train_config,
    use_store,
    write_prepared,
)

from mixtune.core import metrics as M
from mixtune.core import score
from mixtune.plumbing.config import EvaluateConfig, ModelConfig
from mixtune.plumbing.files import read_jsonl, sha256_file
from mixtune.stages import evaluate, train

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

    from mixtune.core.model import load_base, load_tokenizer

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
    prompts = [score._prompt_ids(tokenizer, ex["prompt"]) for ex in examples]
    assert score._common_prefix(prompts, 100) >= 3  # the batches run a shared prefix once, as a cache

    want = _naive_scores(model, tokenizer, examples)
    got = score.score_options(model, tokenizer, examples, batch_size=3, prec="fp32")  # 3 batches, last short
    assert [len(r) for r in got] == [len(ex["options"]) for ex in examples]
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=1e-4)
    one_batch = score.score_options(model, tokenizer, examples, batch_size=16, prec="fp32")
    for g, o in zip(got, one_batch):  # the batch size changes nothing but speed
        assert o == pytest.approx(g, abs=1e-4)
    # predict takes the best-scoring option
    preds = score.predict(model, tokenizer, examples, section("evaluate", batch_size=2))
    assert preds == [ex["options"][int(np.argmax(w))] for ex, w in zip(examples, want)]
    # On a CPU every answer is scored in fp32: an example scores the same alone as in any batch (served = evaluated)
    assert score.score_precision() == "fp32"
    cfg = section("evaluate", batch_size=16)
    together = score.answer(model, tokenizer, examples, cfg)[1]
    for ex, t in zip(examples[:4], together):
        assert score.answer(model, tokenizer, [ex], cfg)[1][0] == pytest.approx(t, abs=1e-5)


def test_long_rows_score_in_smaller_batches(tiny_model, scoring_examples, monkeypatch):
    """A batch holds at most batch_size x ROW_TOKENS tokens of prompts and options (the probe's longest
    questions took 1.1-1.4 GB above the model as one batch of 16): long rows go fewer to a batch, and the
    scores are those of one batch."""
    from mixtune.core.model import load_base, load_tokenizer

    tokenizer, model = load_tokenizer(str(tiny_model)), load_base(str(tiny_model)).eval()
    examples = scoring_examples
    rows = [len(score._prompt_ids(tokenizer, ex["prompt"]))
            + sum(len(score._option_ids(tokenizer, ex["prompt"], score._prompt_ids(tokenizer, ex["prompt"]), o))
                  for o in ex["options"]) for ex in examples]
    seen = []  # the rows of each scoring forward (not the shared prefix's, which runs without a mask)
    hook = model.register_forward_pre_hook(
        lambda m, args, kw: seen.append(kw["input_ids"].shape[0]) if kw.get("attention_mask") is not None else None,
        with_kwargs=True)
    whole = score.score_options(model, tokenizer, examples, batch_size=16, prec="fp32")
    assert seen == [len(examples)]  # short rows: one batch
    seen.clear()
    monkeypatch.setattr(score, "ROW_TOKENS", -(-2 * max(rows) // 16))  # room for two of the longest rows a batch
    split = score.score_options(model, tokenizer, examples, batch_size=16, prec="fp32")
    hook.remove()
    assert sum(seen) == len(examples) and 1 < len(seen) < len(examples)  # some rows went two to a batch
    for s, w in zip(split, whole):
        assert s == pytest.approx(w, abs=1e-5)


# --- the stage -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    """A workspace with prepared/, mix/ (20% generalist), a tiny trained adapter in train/, and the same adapter
    as the search's pure specialist (so the two must answer alike)."""
    root = tmp_path_factory.mktemp("evaluate")
    with pytest.MonkeyPatch.context() as mp:
        uri = use_store(mp, root)
        write_prepared(root)
        make_mix(root)
        metrics = train.run(train_config(max_steps=8), ModelConfig(base=str(tiny_model)), Path("mix"), Path("train"))
    shutil.copytree(root / "train" / "adapter", root / "search" / "specialist_adapter")
    return root, uri, metrics


def _eval_cfg(**kw) -> EvaluateConfig:
    return section("evaluate", **{"bootstrap": 200, "batch_size": 4, **kw})


def test_evaluate_run_end_to_end(trained, monkeypatch, tiny_model):
    from mlflow import MlflowClient

    root, uri, train_metrics = trained
    use_store(monkeypatch, root)
    result = evaluate.run(_eval_cfg(), ModelConfig(base=str(tiny_model)), "auto", out=Path("eval"))

    test = read_jsonl(root / "prepared" / "specialist" / "test.jsonl")
    on_disk = json.loads((root / "eval" / "metrics.json").read_text())
    assert on_disk == {k: v for k, v in result.items() if k not in ("details", "comparison", "forgetting_comparison")}
    details = json.loads((root / "eval" / "details.json").read_text())
    # what was measured; no run ids or timings (they would change a tracked file on every run)
    assert details == {"metric": "macro_f1", "split": "test", "tasks": [TASK], "share_source": "manual",
                       "specialist_size": 32}  # auto: classification -> macro-F1
    assert result["share"] == 0.2
    assert result["n"] == len(test) == 12
    m = result["macro_f1"]
    assert set(m) == {"tuned", "base", "specialist", "gain", "gain_vs_specialist"}
    for system in m.values():
        assert system["low"] <= system["value"] <= system["high"]
    assert m["gain"]["value"] == pytest.approx(m["tuned"]["value"] - m["base"]["value"])
    # the pure specialist here is the very same adapter: the same answers, no gain either way
    assert m["specialist"] == m["tuned"] and m["gain_vs_specialist"] == {"value": 0.0, "low": 0.0, "high": 0.0}

    # predictions.jsonl: one row per example, every system; the metrics are those of these predictions.
    rows = read_jsonl(root / "eval" / "predictions.jsonl")
    assert [r["id"] for r in rows] == [ex["id"] for ex in test]
    assert [r["gold"] for r in rows] == [ex["completion"] for ex in test]
    assert all(r["task"] == TASK and {r["tuned"], r["base"], r["specialist"]} <= set(ex["options"])
               for r, ex in zip(rows, test))
    assert [r["tuned"] for r in rows] == [r["specialist"] for r in rows]
    gold = [r["gold"] for r in rows]
    for system in ("tuned", "base"):
        want = M.macro_f1([r[system] for r in rows], gold, sorted(test[0]["options"]))
        assert m[system]["value"] == pytest.approx(want)

    # confusion.csv: the DVC confusion plot's input, actual vs the tuned model's prediction.
    with open(root / "eval" / "confusion.csv") as f:
        assert f.readline() == "actual,predicted\n"
        f.seek(0)
        assert [(c["actual"], c["predicted"]) for c in csv.DictReader(f)] == [(r["gold"], r["tuned"]) for r in rows]

    # Forgetting: on the held-out generalist probe, which the mix never holds.
    probe = read_jsonl(root / "prepared" / "generalist_probe.jsonl")
    f = result["forgetting"]
    assert f["probe_n"] == len(probe) == 10
    assert f["tuned"] == f["specialist"] and f["tuned"]["low"] <= f["tuned"]["value"] <= f["tuned"]["high"]
    assert not {ex["id"] for ex in probe} & {ex["id"] for ex in read_jsonl(root / "mix" / "train.jsonl")}
    from mixtune.core.model import load_base, load_tokenizer

    base_answers = score.predict(load_base(str(tiny_model)), load_tokenizer(str(tiny_model)), probe,
                                 _eval_cfg())  # as evaluate scores
    # plain accuracy over the questions (as each search trial scores the probe), not a mean over their 3 tasks
    assert f["base_accuracy"] == pytest.approx(np.mean([a == ex["completion"] for a, ex in zip(base_answers, probe)]))

    # The MLflow run, in the same experiment as the train run it evaluated.
    client = MlflowClient(tracking_uri=uri)
    train_run, eval_run = runs(uri)
    assert eval_run.info.status == "FINISHED" and eval_run.info.run_name == "evaluate r=0.20 set, n=32"
    assert train_run.info.run_name == "train r=0.20 set, n=32"  # the share and the size tell runs apart
    tags = eval_run.data.tags
    # linked by content: the train run that wrote this adapter; the predictions' sha256, by which register finds it
    assert tags["mixtune.stage"] == "evaluate" and tags["mixtune.train_run_id"] == train_run.info.run_id
    assert tags["mixtune.adapter_sha256"] == train_run.data.tags["mixtune.adapter_sha256"]
    assert tags["mixtune.predictions_sha256"] == sha256_file(root / "eval" / "predictions.jsonl")
    assert tags["mixtune.split"] == "test" and tags["mixtune.metric"] == "macro_f1"
    assert tags["mixtune.mix_sha256"] == train_run.data.tags["mixtune.mix_sha256"]
    assert tags["mlflow.note.content"].startswith(f"test macro_f1 {m['tuned']['value']:.3f} [")
    metrics = eval_run.data.metrics
    for key in ("test.tuned.macro_f1", "test.tuned.macro_f1_low", "test.base.macro_f1", "test.specialist.macro_f1",
                "test.gain.macro_f1", "test.gain_vs_specialist.macro_f1", f"test.tuned.macro_f1.{TASK}",
                "forgetting.tuned", "forgetting.specialist", "seconds_per_example", "stage_seconds"):
        assert key in metrics, key
    assert metrics["test.tuned.macro_f1"] == pytest.approx(m["tuned"]["value"])
    assert metrics["forgetting.tuned"] == pytest.approx(f["tuned"]["value"])
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
    write_prepared(root / "gen", generative_test=True, n_probe=0)
    calls = {"generate": [], "score_options": 0}
    generate, score_options = score.generate, score.score_options

    def spy_generate(model, tokenizer, examples, *args, **kw):
        calls["generate"].append([ex["id"] for ex in examples])
        return generate(model, tokenizer, examples, *args, **kw)

    def spy_score(*args, **kw):
        calls["score_options"] += 1
        return score_options(*args, **kw)

    monkeypatch.setattr(score, "generate", spy_generate)
    monkeypatch.setattr(score, "score_options", spy_score)
    out = root / "eval_gen"
    result = evaluate.run(_eval_cfg(max_new_tokens=4), ModelConfig(base=str(tiny_model)), "auto",
                          prepared=root / "gen" / "prepared", mix=root / "mix", train=root / "train", out=out)

    test = read_jsonl(root / "gen" / "prepared" / "specialist" / "test.jsonl")
    ids = [ex["id"] for ex in test]
    assert all(ex["options"] is None for ex in test)
    # tuned, base; the pure specialist is the same adapter here (same sha256): its answers come from the cache
    assert calls["generate"] == [ids, ids]
    assert calls["score_options"] == 0
    assert result["details"]["metric"] == "rouge_l" and "forgetting" not in result  # auto: generation -> ROUGE-L
    rows = read_jsonl(out / "predictions.jsonl")
    assert len(rows) == len(test) == result["n"]
    for system in ("tuned", "base"):
        pred, gold = [r[system] for r in rows], [r["gold"] for r in rows]
        want = np.mean([M.rouge_l(p, g) for p, g in zip(pred, gold)])
        assert result["rouge_l"][system]["value"] == pytest.approx(want)
    assert not (out / "confusion.csv").exists()  # no labels, no confusion matrix
    assert runs(uri)[-1].info.status == "FINISHED"
    assert "test.tuned.rouge_l" in runs(uri)[-1].data.metrics

    # Another metric asked for by name: the same predictions, judged by exact match.
    em = evaluate.run(_eval_cfg(max_new_tokens=4), ModelConfig(base=str(tiny_model)), "exact_match",
                      prepared=root / "gen" / "prepared", mix=root / "mix", train=root / "train", out=root / "em")
    pred = [r["tuned"] for r in read_jsonl(root / "em" / "predictions.jsonl")]
    assert em["exact_match"]["tuned"]["value"] == pytest.approx(np.mean([M.exact_match(p, ex["completion"])
                                                                         for p, ex in zip(pred, test)]))


def test_evaluate_dev_split_and_max_examples(trained, monkeypatch, tiny_model):
    root, uri, _ = trained
    use_store(monkeypatch, root)
    result = evaluate.run(_eval_cfg(split="dev", max_examples=5), ModelConfig(base=str(tiny_model)), "accuracy",
                          out=Path("eval_dev"))
    assert result["details"]["split"] == "dev" and result["n"] == 5 and "accuracy" in result
    rows = read_jsonl(root / "eval_dev" / "predictions.jsonl")
    assert [r["id"] for r in rows] == [ex["id"] for ex in read_jsonl(root / "prepared" / "specialist" / "dev.jsonl")[:5]]
    assert runs(uri)[-1].data.tags["mixtune.split"] == "dev"


def test_answers_no_share_changes_are_computed_once(trained, monkeypatch, tiny_model):
    """A second evaluate of the same models on the same examples with the same settings and code takes every
    answer from .cache/answers (a `dvc exp run` that changes the share reruns only the tuned adapter's); a
    changed scoring setting computes them again."""
    root, uri, _ = trained
    use_store(monkeypatch, root)
    evaluate.run(_eval_cfg(), ModelConfig(base=str(tiny_model)), "auto", out=Path("eval_a"))
    calls = []
    predict = score.predict

    def spy(model, tokenizer, examples, cfg):
        calls.append(len(examples))
        return predict(model, tokenizer, examples, cfg)

    monkeypatch.setattr(score, "predict", spy)
    evaluate.run(_eval_cfg(bootstrap=300), ModelConfig(base=str(tiny_model)), "auto", out=Path("eval_b"))
    assert calls == []
    assert (root / "eval_a" / "predictions.jsonl").read_bytes() == (root / "eval_b" / "predictions.jsonl").read_bytes()
    evaluate.run(_eval_cfg(batch_size=2), ModelConfig(base=str(tiny_model)), "auto", out=Path("eval_c"))
    # tuned and base, each on the 12 test examples and the 10-question probe; the pure specialist is the tuned
    # adapter again (same sha256), answered from the cache
    assert calls == [12, 10, 12, 10]
    assert (root / "eval_a" / "predictions.jsonl").read_bytes() == (root / "eval_c" / "predictions.jsonl").read_bytes()


def test_generation_is_hf_greedy_example_by_example_with_rows_ending_at_different_steps(tiny_model, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    from mixtune.core.model import load_tokenizer, micro_batches

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_model).eval(), load_tokenizer(tiny_model)
    torch.manual_seed(0)
    with torch.no_grad():  # weights spread wide: at 0.02 every prompt's greedy answer is one token repeated
        for name, w in model.named_parameters():
            if "norm" not in name:
                w.normal_(0, 0.5)
    examples = [{"prompt": [{"role": "user", "content": " ".join(["word", "class"][i % 2] for i in range(n))}]}
                for n in (1, 9, 3, 14, 5, 2)]

    def greedy(ex, steps=8):  # HF generate on the example alone: no padding, no batch; -> its new tokens
        ids = torch.tensor([score._prompt_ids(tok, ex["prompt"])])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                             do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        return out[0, ids.shape[1]:].tolist()

    # Make a token one answer produces early and another never the end token, so rows end at different steps.
    free = [greedy(ex) for ex in examples]
    end = next(t for s in free for t in s[1:4] if any(t not in other for other in free))
    tok.eos_token = tok.convert_ids_to_tokens(end)
    # the answer ends before its end token (a real one is a special token, which decoding skips; this one is not)
    want = [tok.decode([t for t in greedy(ex) if t != end], skip_special_tokens=True).strip() for ex in examples]
    lengths = [len(greedy(ex)) for ex in examples]
    assert min(lengths) < 8 and max(lengths) == 8  # some rows stopped early, some ran to max_new_tokens
    layer, left = score._in_place_layer(), []  # rows leaving a decoding batch: each time, the rows kept
    select = layer.batch_select_indices
    monkeypatch.setattr(layer, "batch_select_indices", lambda self, keep: left.append(len(keep)) or select(self, keep))
    # one decoding batch of 6: the row that ends early decodes on (under a quarter finished), its tokens dropped
    assert score.generate(model, tok, examples, 6, 8, "fp32") == want and left == []
    # two prefill passes of different widths, right-aligned in one decoding batch's cache (zero columns masked)
    assert score.generate(model, tok, examples, 4, 8, "fp32") == want
    widths = sorted(len(score._prompt_ids(tok, ex["prompt"])) + 8 for ex in examples)
    monkeypatch.setattr(score, "CACHE_TOKENS", 2 * widths[1])  # decoding batches of 2 rows, then 1 or 2
    assert len(micro_batches(widths, score.CACHE_TOKENS)) >= 3
    assert score.generate(model, tok, examples, 6, 8, "fp32") == want
    assert left  # there, a row that ended left its batch (a half of it), its cache with it
