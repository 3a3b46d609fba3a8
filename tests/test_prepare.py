"""prepare: exact counts for dedupe, the stratified split, the target-task rule and decontamination;
determinism down to the bytes."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
from conftest import classification_records, section, sentence, spec_source, write_jsonl

from mixtune.core import tune
from mixtune.plumbing.files import read_jsonl
from mixtune.stages import prepare

OUTPUTS = ("specialist/train.jsonl", "specialist/dev.jsonl", "specialist/test.jsonl", "generalist.jsonl",
           "stats.json")


def run(root: Path, out: str = "prepared", *, generalist: list | None = None, specialist: list | None = None,
        **cfg) -> dict:
    # Splits of a few examples are fine for counting: min_eval_examples has its own test.
    config = section("prepare", **{"specialist": specialist or [spec_source()], "generalist": generalist or [],
                                   "min_eval_examples": 0, **cfg})
    return prepare_run(config, root, root / out)


def prepare_run(config, root: Path, out: Path) -> dict:
    """prepare.run with the repository's base model (its tokenizer measures the examples) and max_length."""
    return prepare.run(config, section("model"), section("train").max_length, root, out)


def splits(out: Path) -> dict[str, list[dict]]:
    return {name: read_jsonl(out / "specialist" / f"{name}.jsonl") for name in ("train", "dev", "test")}


def alpaca_source(name: str, path: str, **extra) -> dict:
    return {"name": name, "kind": "file", "path": path, "format": "alpaca", **extra}


def test_stratified_split_exact_sizes(tmp_path):
    write_jsonl(tmp_path / "spec.jsonl", classification_records({"a": 20, "b": 30, "c": 40}))
    stats = run(tmp_path, dev_fraction=0.1, test_fraction=0.1)
    parts = splits(tmp_path / "prepared")
    per_label = {name: Counter(ex["completion"] for ex in part) for name, part in parts.items()}
    # Each (task, label) stratum: round(n * 0.1) to test, round(n * 0.1) to dev, the rest to train.
    assert per_label == {"train": {"a": 16, "b": 24, "c": 32}, "dev": {"a": 2, "b": 3, "c": 4},
                         "test": {"a": 2, "b": 3, "c": 4}}
    assert stats["splits"] == {"train": 72, "dev": 9, "test": 9}
    ids = [ex["id"] for part in parts.values() for ex in part]
    assert len(ids) == len(set(ids)) == 90  # a partition: no example in two splits, none lost
    # File order carries no label signal: the train split is not sorted by label.
    train_labels = [ex["completion"] for ex in parts["train"]]
    assert train_labels != sorted(train_labels)


def test_every_label_in_every_split_even_when_rare(tmp_path):
    write_jsonl(tmp_path / "spec.jsonl", classification_records({"a": 100, "b": 10, "c": 5}))
    run(tmp_path, dev_fraction=0.2, test_fraction=0.2)
    for name, part in splits(tmp_path / "prepared").items():
        assert {ex["completion"] for ex in part} == {"a", "b", "c"}, name


def test_split_stratified_by_task_for_a_scenario(tmp_path):
    # Two specialist tasks (a scenario): each task gets its share of every split.
    write_jsonl(tmp_path / "spec.jsonl", classification_records({"a": 10, "b": 10}, seed=1))
    write_jsonl(tmp_path / "qa.jsonl", [{"instruction": sentence(random.Random(i), 15), "output": "yes"}
                                        for i in range(30)])
    config = section("prepare", specialist=[spec_source(), alpaca_source("qa", "qa.jsonl")], generalist=[],
                     dev_fraction=0.1, test_fraction=0.2, min_eval_examples=0)
    stats = prepare_run(config, tmp_path, tmp_path / "prepared")
    by_task = {name: Counter(ex["task"] for ex in part) for name, part in splits(tmp_path / "prepared").items()}
    assert by_task == {"train": {"spec": 14, "qa": 21}, "dev": {"spec": 2, "qa": 3}, "test": {"spec": 4, "qa": 6}}
    assert stats["specialist_tasks"] == {"qa": 30, "spec": 20}


def test_dedupe_exact_counts(tmp_path):
    records = classification_records({"a": 20, "b": 20})
    dupes = [dict(records[0]), dict(records[1]), {"text": records[2]["text"], "label": "c"}]  # same input = dupe
    write_jsonl(tmp_path / "spec.jsonl", records + dupes)
    gen = [{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(10)]
    gen += [gen[0], gen[1], {"instruction": "Say 2.", "output": "two"}]  # the last one differs in its answer
    write_jsonl(tmp_path / "gen.jsonl", gen)
    stats = run(tmp_path, generalist=[alpaca_source("gen", "gen.jsonl")])
    assert stats["specialist"] == {"spec": {"read": 43, "too_long": 0, "truncated": 0}}
    assert stats["specialist_duplicates_removed"] == 3
    assert sum(stats["splits"].values()) == 40
    assert stats["generalist"] == {"gen": {"read": 13, "target_task_removed": 0, "too_long_removed": 0}}
    assert stats["generalist_duplicates_removed"] == 2
    pool = read_jsonl(tmp_path / "prepared" / "generalist.jsonl")
    assert stats["generalist_pool"] == len(pool) == 11
    assert [ex["id"] for ex in pool] == [f"gen/{i}" for i in range(10)] + ["gen/12"]  # the first copy kept
    specialist_ids = {ex["id"] for part in splits(tmp_path / "prepared").values() for ex in part}
    assert specialist_ids == {f"spec/{i}" for i in range(40)}


def test_same_seed_same_bytes_other_seed_other_split(tmp_path):
    write_jsonl(tmp_path / "spec.jsonl", classification_records({"a": 30, "b": 30, "c": 30}))
    write_jsonl(tmp_path / "gen.jsonl", [{"instruction": sentence(random.Random(i), 10), "output": "x"}
                                         for i in range(50)])
    gen = [alpaca_source("gen", "gen.jsonl")]
    run(tmp_path, "one", generalist=gen, seed=3)
    run(tmp_path, "two", generalist=gen, seed=3)
    run(tmp_path, "other", generalist=gen, seed=4)
    for name in OUTPUTS:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert (tmp_path / "one/specialist/test.jsonl").read_bytes() != (tmp_path / "other/specialist/test.jsonl").read_bytes()
    # Another seed is another partition of the same examples.
    assert ({ex["id"] for p in splits(tmp_path / "one").values() for ex in p}
            == {ex["id"] for p in splits(tmp_path / "other").values() for ex in p})


def test_target_task_never_in_the_generalist_pool(tmp_path):
    write_jsonl(tmp_path / "spec.jsonl", classification_records({"a": 20, "b": 20}))
    write_jsonl(tmp_path / "same.jsonl", [{"instruction": f"Classify item {i}.", "output": "a"} for i in range(7)])
    write_jsonl(tmp_path / "other.jsonl", [{"instruction": f"Write item {i}.", "output": "ok"} for i in range(5)])
    generalist = [alpaca_source("same_task", "same.jsonl", task="spec"),  # same task as the specialist source
                  alpaca_source("other", "other.jsonl")]
    stats = run(tmp_path, generalist=generalist)
    assert stats["generalist"] == {"same_task": {"read": 7, "target_task_removed": 7, "too_long_removed": 0},
                                   "other": {"read": 5, "target_task_removed": 0, "too_long_removed": 0}}
    pool = read_jsonl(tmp_path / "prepared" / "generalist.jsonl")
    assert {ex["task"] for ex in pool} == {"other"}
    assert stats["generalist_pool"] == 5 and stats["generalist_tasks"] == 1


def test_generalist_examples_longer_than_the_limit_are_left_out(tmp_path):
    write_jsonl(tmp_path / "spec.jsonl", classification_records({"a": 20, "b": 20}))
    # prompt + answer lengths 10+2, 99+1, 100+1, 150+50 characters: the limit is 100
    rows = [{"instruction": "x" * 10, "output": "ok"}, {"instruction": "y" * 99, "output": "k"},
            {"instruction": "z" * 100, "output": "k"}, {"instruction": "w" * 150, "output": "v" * 50}]
    write_jsonl(tmp_path / "gen.jsonl", rows)
    stats = run(tmp_path, generalist=[alpaca_source("gen", "gen.jsonl")], generalist_max_chars=100)
    assert stats["generalist"]["gen"] == {"read": 4, "target_task_removed": 0, "too_long_removed": 2}
    pool = read_jsonl(tmp_path / "prepared" / "generalist.jsonl")
    assert [ex["completion"] for ex in pool] == ["ok", "k"]


def test_decontamination_removes_a_planted_overlap(tmp_path):
    write_jsonl(tmp_path / "spec.jsonl", classification_records({"a": 20, "b": 20}))
    run(tmp_path, "first")  # the split does not depend on the generalist pool: learn which inputs are protected
    parts = splits(tmp_path / "first")

    def words_of(ex: dict) -> list[str]:  # the article's words, without the instruction around them
        return ex["prompt"][-1]["content"].split("\n\n")[1].split()

    test_words, dev_words, train_words = (words_of(parts[p][0]) for p in ("test", "dev", "train"))
    rng = random.Random(99)
    gen = [
        {"instruction": "Continue: " + " ".join(test_words[5:18]) + " and so on.", "output": "ok"},   # 13 from test
        {"instruction": "Summarize this.", "output": "It said " + " ".join(dev_words[0:13]).upper()},  # answer, dev
        {"instruction": "Continue: " + " ".join(test_words[5:17]), "output": "ok"},                    # only 12
        {"instruction": "Continue: " + " ".join(train_words[0:20]), "output": "ok"},                   # train: fine
        *({"instruction": sentence(rng, 20), "output": sentence(rng, 3)} for _ in range(6)),
    ]
    write_jsonl(tmp_path / "gen.jsonl", gen)
    stats = run(tmp_path, "second", generalist=[alpaca_source("gen", "gen.jsonl")], decontaminate_ngram=13)
    assert stats["decontaminated"] == 2
    kept = [ex["id"] for ex in read_jsonl(tmp_path / "second" / "generalist.jsonl")]
    assert kept == ["gen/2", "gen/3", *(f"gen/{i}" for i in range(4, 10))]
    assert stats["generalist_pool"] == 8
    saved = json.loads((tmp_path / "second" / "stats.json").read_text())
    assert saved["decontaminated"] == 2 and saved == json.loads(json.dumps(stats))
    # The specialist splits are the same with or without a pool.
    for name in ("train", "dev", "test"):
        assert ((tmp_path / "first/specialist" / f"{name}.jsonl").read_bytes()
                == (tmp_path / "second/specialist" / f"{name}.jsonl").read_bytes())


def test_decontamination_window_is_configurable(tmp_path):
    write_jsonl(tmp_path / "spec.jsonl", classification_records({"a": 20, "b": 20}))
    run(tmp_path, "first")
    test_words = splits(tmp_path / "first")["test"][0]["prompt"][-1]["content"].split("\n\n")[1].split()
    write_jsonl(tmp_path / "gen.jsonl", [{"instruction": " ".join(test_words[3:8]), "output": "ok"}])  # 5 words
    gen = [alpaca_source("gen", "gen.jsonl")]
    assert run(tmp_path, "n13", generalist=gen, decontaminate_ngram=13)["decontaminated"] == 0
    assert run(tmp_path, "n5", generalist=gen, decontaminate_ngram=5)["decontaminated"] == 1


def test_truncate_input_fits_every_example_whole_and_training_keeps_them_all(tmp_path, tiny_model):
    """prepare.too_long: truncate_input cuts the input of each example over train.max_length (never its label);
    the trainer then tokenizes exactly what prepare measured and trains on every example the mix holds; the
    registered model's requests are cut the same way."""
    from workspace import train_config

    from mixtune.core.model import chat_tokens, load_tokenizer, with_answer
    from mixtune.core.serve import Requests
    from mixtune.plumbing.config import ModelConfig
    from mixtune.plumbing.errors import MixtuneError

    rng = random.Random(5)
    records = classification_records({"a": 6, "b": 6}, words=12)
    for i in (0, 3, 7):
        records[i] = {**records[i], "text": sentence(rng, 300)}  # about 850 tokens
    write_jsonl(tmp_path / "spec.jsonl", records)
    cfg = section("prepare", specialist=[spec_source()], generalist=[], min_eval_examples=0, dev_fraction=0.0,
                  test_fraction=0.25, too_long="truncate_input")
    model = ModelConfig(base=str(tiny_model))
    tokenizer = load_tokenizer(str(tiny_model))
    long = chat_tokens(tokenizer, [[{"role": "user", "content": records[i]["text"]}] for i in (0, 3, 7)])
    assert min(long) > 200

    with pytest.raises(MixtuneError, match=r"3 of 12 examples exceed train.max_length=160 tokens"):
        prepare.run(cfg.model_copy(update={"too_long": "error"}), model, 160, tmp_path, tmp_path / "err")
    stats = prepare.run(cfg, model, 160, tmp_path, tmp_path / "prepared")
    assert stats["specialist"]["spec"] == {"read": 12, "too_long": 3, "truncated": 3}
    parts = splits(tmp_path / "prepared")
    examples = parts["train"] + parts["test"]
    assert len(examples) == 12  # none lost
    lengths = chat_tokens(tokenizer, [with_answer(ex) for ex in examples])
    assert max(lengths) <= 160
    by_record = {int(ex["id"].split("/")[1]): ex for ex in examples}
    for i, ex in by_record.items():
        assert ex["completion"] == records[i]["label"]  # the answer is whole
        text = ex["prompt"][-1]["content"].split("\n\n")[1]
        if i in (0, 3, 7):  # cut to a prefix of its words that fits, and no shorter than it must be
            assert records[i]["text"].startswith(text) and len(text) < len(records[i]["text"])
        else:
            assert text == records[i]["text"]
    recipe = json.loads((tmp_path / "prepared" / "specialist" / "recipe.json").read_text())
    budget = recipe["tasks"]["spec"]["prompt_budget"]
    assert max(chat_tokens(tokenizer, [ex["prompt"] for ex in examples], add_generation_prompt=True)) <= budget

    # The trainer tokenizes what prepare measured, and keeps every example.
    trainer = tune.build_trainer(train_config(max_length=160), str(tiny_model), parts["train"], tmp_path / "out",
                                  "fp32", tokenizer)
    assert len(trainer.train_dataset) == len(parts["train"]) == 8
    assert [len(ids) for ids in trainer.train_dataset["input_ids"]] == \
        chat_tokens(tokenizer, [with_answer(ex) for ex in parts["train"]])

    # A served request for a raw record is cut as its test example was.
    raw = [{"text": records[i]["text"]} for i in sorted(by_record)]
    served = Requests(recipe, tokenizer)(raw, lambda n: f"row {n + 1}")
    assert [s["prompt"] for s in served] == [by_record[i]["prompt"] for i in sorted(by_record)]


def test_mixtune_check_shows_what_training_sees(tmp_path, cli, tiny_model):
    from conftest import files_under, write_params
    from workspace import train_config

    from mixtune.core.model import load_tokenizer

    write_jsonl(tmp_path / "spec.jsonl", classification_records({"a": 20, "b": 10, "c": 10}))
    params = write_params(tmp_path / "params.yaml", prepare={"specialist": [spec_source()]},
                          model={"base": str(tiny_model)})
    rc, out, err = cli("--params", params, "check", "--root", tmp_path, "--out", tmp_path / "prepared")
    assert rc == 0, err
    card = (tmp_path / "prepared" / "card.md").read_text()
    assert out == card and files_under(tmp_path / "prepared") == [tmp_path / "prepared" / "card.md"]  # only the card
    # label counts per split: round(10% of each label) to dev and to test, the rest to train
    assert "| train | 32 | 16 | 8 | 8 |\n| dev | 4 | 2 | 1 | 1 |\n| test | 4 | 2 | 1 | 1 |" in card
    assert "- source `spec`: 40 records read, 0 over max_length, 0 inputs truncated" in card
    assert "Every dev/test label is in the train split." in card
    # the first training example, rendered exactly as the trainer tokenizes it
    prepare.run(section("prepare", specialist=[spec_source()], generalist=[], min_eval_examples=0),
                section("model", base=str(tiny_model)), 512, tmp_path, tmp_path / "full")
    assert (tmp_path / "full" / "card.md").read_text() == card  # prepare writes the same card
    first = read_jsonl(tmp_path / "full" / "specialist" / "train.jsonl")[:1]
    tokenizer = load_tokenizer(str(tiny_model))
    trainer = tune.build_trainer(train_config(), str(tiny_model), first, tmp_path / "out", "fp32", tokenizer)
    rendered = tokenizer.decode(trainer.train_dataset[0]["input_ids"])
    assert f"```text\n{rendered.rstrip()}\n```" in card


# --- the data's own splits ------------------------------------------------------------------------------------


def three_files(root: Path) -> dict[str, list[dict]]:
    """A dataset that comes split: train, dev and test files; one test record repeats a train record, and one
    test label ("d") is in no training record. No label set is given: it comes from all three files."""
    data = {"train": classification_records({"a": 30, "b": 30}, seed=1),
            "dev": classification_records({"a": 11, "b": 11}, seed=2),
            "test": classification_records({"a": 10, "b": 10, "d": 1}, seed=3)}
    data["test"][4] = dict(data["train"][7])
    for name, rows in data.items():
        write_jsonl(root / f"{name}.jsonl", rows)
    return data


def test_given_dev_and_test_files_are_kept_as_they_are(tmp_path):
    data = three_files(tmp_path)
    source = spec_source("train.jsonl", labels=None, splits={"dev": "dev.jsonl", "test": "test.jsonl"})
    stats = run(tmp_path, specialist=[source], min_eval_examples=20)
    parts = splits(tmp_path / "prepared")
    # dev and test: every record, in the file's order (no re-split, no shuffle, no deduplication)
    for name in ("dev", "test"):
        assert [ex["completion"] for ex in parts[name]] == [r["label"] for r in data[name]]
        assert [ex["prompt"][-1]["content"].split("\n\n")[1] for ex in parts[name]] == [r["text"] for r in data[name]]
        assert [ex["id"] for ex in parts[name]] == [f"spec:{name}/{i}" for i in range(len(data[name]))]
    # train: the train file, less the record the test split repeats (it would leak the test into training)
    assert len(parts["train"]) == 59 and stats["specialist_duplicates_removed"] == 1
    assert data["train"][7]["text"] not in {ex["prompt"][-1]["content"].split("\n\n")[1] for ex in parts["train"]}
    assert stats["splits"] == {"train": 59, "dev": 22, "test": 21}
    assert stats["specialist"]["spec"] == {"read": 103, "too_long": 0, "truncated": 0,
                                           "given_splits": {"dev": 22, "test": 21}}
    # one label set for the whole source, so every prompt offers the same options
    assert {tuple(ex["options"]) for part in parts.values() for ex in part} == {("a", "b", "d")}
    card = (tmp_path / "prepared" / "card.md").read_text()
    assert "**Warning:** labels in dev/test that the train split never has: d" in card
    # and byte for byte the same on a second run
    run(tmp_path, "again", specialist=[source], min_eval_examples=20)
    for name in ("train", "dev", "test"):
        f = f"specialist/{name}.jsonl"
        assert (tmp_path / "prepared" / f).read_bytes() == (tmp_path / "again" / f).read_bytes()


def test_a_given_test_split_only_dev_comes_from_train(tmp_path):
    data = three_files(tmp_path)
    source = spec_source("train.jsonl", labels=["a", "b", "d"], splits={"test": "test.jsonl"})
    stats = run(tmp_path, specialist=[source], dev_fraction=0.2, test_fraction=0.1)
    assert stats["splits"] == {"train": 47, "dev": 12, "test": 21}  # 59 deduplicated: round(20%) of 29 and 30
    assert [ex["completion"] for ex in splits(tmp_path / "prepared")["test"]] == [r["label"] for r in data["test"]]


def test_a_split_column_places_each_record(tmp_path, cli):
    rows = [{**r, "part": part} for part, r in
            zip(["train"] * 30 + ["validation"] * 5 + ["test"] * 5, classification_records({"a": 20, "b": 20}))]
    (tmp_path / "spec.csv").write_text("text,label,part\n" + "".join(f"{r['text']},{r['label']},{r['part']}\n"
                                                                     for r in rows))
    run(tmp_path, specialist=[spec_source("spec.csv", split_column="part")])
    parts = splits(tmp_path / "prepared")
    for name, want in (("dev", "validation"), ("test", "test")):  # in the file's order
        assert [ex["id"] for ex in parts[name]] == [f"spec/{i}" for i, r in enumerate(rows) if r["part"] == want]
    assert sorted(int(ex["id"].split("/")[1]) for ex in parts["train"]) == list(range(30))  # all, none re-split
    rows[3]["part"] = "holdout"
    (tmp_path / "spec.csv").write_text("text,label,part\n" + "".join(f"{r['text']},{r['label']},{r['part']}\n"
                                                                     for r in rows))
    from mixtune.plumbing.errors import MixtuneError

    with pytest.raises(MixtuneError, match=r"^spec.csv:5: field 'part': 'holdout' is not a split"):
        run(tmp_path, specialist=[spec_source("spec.csv", split_column="part")])


def test_a_hub_dataset_keeps_its_validation_and_test_splits(tmp_path):
    """An hf source (here the `json` builder over local files, as a hub dataset with three splits loads)."""
    data = three_files(tmp_path)
    source = {"name": "spec", "kind": "hf", "dataset": "json", "format": "classification",
              "data_files": {"train": "train.jsonl", "validation": "dev.jsonl", "test": "test.jsonl"},
              "split": "train", "splits": {"dev": "validation", "test": "test"}, "instruction": "Which class?"}
    stats = run(tmp_path, specialist=[source])
    parts = splits(tmp_path / "prepared")
    assert stats["splits"] == {"train": 59, "dev": 22, "test": 21}
    assert [ex["completion"] for ex in parts["test"]] == [r["label"] for r in data["test"]]
    assert [ex["completion"] for ex in parts["dev"]] == [r["label"] for r in data["dev"]]


def test_the_prepare_stage_logs_its_counts_and_data_card_to_mlflow(tmp_path, cli, monkeypatch, tiny_model):
    from conftest import prepare_small_task
    from mlflow import MlflowClient
    from workspace import use_store

    uri = use_store(monkeypatch, tmp_path)
    prepare_small_task(tmp_path, cli, tiny_model)
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("mixtune/spec").experiment_id])
    assert run.info.run_name == "prepare 32 train examples" and run.data.tags["mixtune.stage"] == "prepare"
    m = run.data.metrics
    assert m["data.splits.train"] == 32 and m["data.splits.dev"] == 4 and m["data.specialist.spec.read"] == 40
    assert run.data.params["train.max_length"] == "512" and run.data.params["model.base"] == str(tiny_model)
    assert run.data.tags["mlflow.note.content"].startswith("splits train 32, dev 4, test 4; 0 inputs truncated")
    card = client.download_artifacts(run.info.run_id, "card.md", str(tmp_path / "dl"))
    assert Path(card).read_text() == (tmp_path / "prepared" / "card.md").read_text()
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"card.md", "stats.json", "sources.json"}
    # `mixtune check` is a look, not a stage: no run
    rc, _, err = cli("--params", tmp_path / "params.yaml", "check", "--root", tmp_path, "--out", tmp_path / "checked")
    assert rc == 0, err
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_trec_a_real_dataset_keeps_its_own_test_split(tmp_path):
    """The README's example (examples/trec): TREC question classification with its own train and test files.
    The test file is the test split, record for record in its order; dev is 10% of train, per label."""
    import csv
    import shutil

    import yaml
    from conftest import REPO

    shutil.copytree(REPO / "examples" / "trec", tmp_path / "data" / "specialist" / "trec")
    source = yaml.safe_load((REPO / "examples" / "trec" / "source.yaml").read_text())
    stats = run(tmp_path, specialist=[source], min_eval_examples=20)
    given = {name: list(csv.DictReader(open(REPO / "examples" / "trec" / f"{name}.csv"))) for name in ("train", "test")}
    parts = splits(tmp_path / "prepared")
    assert len(parts["test"]) == len(given["test"]) == 499
    assert [ex["completion"] for ex in parts["test"]] == [r["label"] for r in given["test"]]
    assert [ex["prompt"][-1]["content"].split("\n\n")[1] for ex in parts["test"]] == \
        [r["question"] for r in given["test"]]
    assert stats["specialist"]["trec"]["given_splits"] == {"test": 499}
    # Every training question is trained on, in dev, or counted as a duplicate: 5,444 questions, 5,373 distinct,
    # 10 of them also test questions (they would leak the test into training).
    distinct = {r["question"] for r in given["train"]} - {r["question"] for r in given["test"]}
    assert len(distinct) == 5363 and stats["specialist_duplicates_removed"] == 5444 - 5363
    assert stats["splits"] == {"train": 4827, "dev": 536, "test": 499}
    assert {ex["prompt"][-1]["content"].split("\n\n")[1] for ex in parts["train"] + parts["dev"]} == distinct
    dev = Counter(ex["completion"] for ex in parts["dev"])
    train = Counter(ex["completion"] for ex in parts["train"])
    assert all(dev[label] == round(0.1 * (dev[label] + train[label])) for label in train)


# --- records as they really come: the count read, data DVC does not version -----------------------------------


def test_card_counts_the_records_read_through_quoted_line_breaks(tmp_path, cli, tiny_model):
    """A CSV whose texts span lines: every record read, and the card says how many (a stray quote that swallowed
    records would show here, if nothing else caught it)."""
    from conftest import write_params

    rows = classification_records({"a": 20, "b": 20})
    (tmp_path / "spec.csv").write_text("text,label\n" + "".join(
        f'"{r["text"].replace(" ", chr(10), 2)}",{r["label"]}\n' for r in rows))  # 3 lines per record
    params = write_params(tmp_path / "params.yaml", prepare={"specialist": [spec_source("spec.csv")]},
                          model={"base": str(tiny_model)})
    rc, out, err = cli("--params", params, "check", "--root", tmp_path, "--out", tmp_path / "prepared")
    assert rc == 0, err
    assert "- source `spec`: 40 records read, 0 over max_length, 0 inputs truncated" in out


def test_unversioned_data_read_when_allowed_and_recorded(tmp_path, cli, tiny_model, monkeypatch):
    """prepare.allow_unversioned: true reads a source outside the data DVC versions; stats.json, the card and the
    prepare stage's MLflow run say so. Under data/ (or without a DVC project) nothing is recorded."""
    from conftest import write_params
    from mlflow import MlflowClient

    root = tmp_path / "project"
    (root / ".dvc").mkdir(parents=True)
    write_jsonl(tmp_path / "elsewhere" / "spec.jsonl", classification_records({"a": 20, "b": 20}))
    write_jsonl(root / "data" / "gen.jsonl", [{"instruction": f"Task {i}.", "output": "ok"} for i in range(5)])
    gen = alpaca_source("gen", "data/gen.jsonl")
    params = write_params(root / "params.yaml", prepare={"specialist": [spec_source("../elsewhere/spec.jsonl")],
                                                         "generalist": [gen], "allow_unversioned": True},
                          model={"base": str(tiny_model)})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    rc, _, err = cli("--params", params, "prepare", "--root", root, "--out", root / "prepared")
    assert rc == 0, err
    stats = json.loads((root / "prepared" / "stats.json").read_text())
    assert stats["not_versioned"] == {"spec": ["../elsewhere/spec.jsonl"]}
    card = (root / "prepared" / "card.md").read_text()
    assert ("\n**Not versioned** (prepare.allow_unversioned: true): source `spec`: `../elsewhere/spec.jsonl`: "
            "outside the data DVC tracks, so `dvc repro` does not rerun when it changes and a clone cannot "
            "reproduce this data.\n") in card
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("mixtune/spec").experiment_id])
    assert run.data.tags["mixtune.not_versioned"] == "source `spec`: `../elsewhere/spec.jsonl`"
    assert run.data.params["prepare.allow_unversioned"] == "True"
    assert run.data.tags["mlflow.note.content"].endswith(
        "; not versioned (prepare.allow_unversioned): source `spec`: `../elsewhere/spec.jsonl`")
    # the same data under data/: nothing to record
    write_jsonl(root / "data" / "spec.jsonl", classification_records({"a": 20, "b": 20}))
    cfg = section("prepare", specialist=[spec_source("data/spec.jsonl")], generalist=[gen], min_eval_examples=0,
                  allow_unversioned=True)
    stats = prepare.run(cfg, section("model", base=str(tiny_model)), 512, root, root / "again")
    assert "not_versioned" not in stats and "Not versioned" not in (root / "again" / "card.md").read_text()
