"""Every source kind (file, hf, bigbench, evals) and format (alpaca, messages, prompt_completion, classification)
on files the tests write, checked against the exact normalized examples."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import pytest
from conftest import write_jsonl

from mixtune.core.schema import KEYS
from mixtune.core.sources import read_source
from mixtune.plumbing.config import BigbenchSource, FileSource, HFSource
from mixtune.plumbing.errors import MixtuneError

ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hello.", "input": "", "output": "Hello!"},
]
ALPACA_EXPECTED = [
    ([{"role": "user", "content": "Add the numbers.\n\n2 and 3"}], "5"),
    ([{"role": "user", "content": "Say hello."}], "Hello!"),
]


def write_table(path: Path, rows: list[dict]) -> Path:
    """rows -> a jsonl, json, csv or parquet file, by the path's extension."""
    fmt = path.suffix.lstrip(".")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        write_jsonl(path, rows)
    elif fmt == "json":
        path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    elif fmt == "csv":
        buf = io.StringIO(newline="")
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        path.write_text(buf.getvalue(), encoding="utf-8", newline="")
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def file_source(path: str, fmt: str, **extra) -> FileSource:
    return FileSource(name="src", kind="file", path=path, format=fmt, **extra)


def pairs(examples: list[dict]) -> list[tuple]:
    return [(ex["prompt"], ex["completion"]) for ex in examples]


# --- file kind: every file format -----------------------------------------------------------------------------


@pytest.mark.parametrize("ext", ["jsonl", "json", "csv", "parquet"])
def test_file_formats_give_the_same_examples(tmp_path, ext):
    write_table(tmp_path / f"data.{ext}", ALPACA)
    examples = read_source(file_source(f"data.{ext}", "alpaca", keywords=["arithmetic"]), tmp_path)
    assert examples == [
        {"id": "src/0", "source": "src", "task": "src", "keywords": ["arithmetic"], "capability": ["reasoning"],
         "prompt": ALPACA_EXPECTED[0][0], "completion": "5", "options": None},
        {"id": "src/1", "source": "src", "task": "src", "keywords": ["arithmetic"], "capability": ["reasoning"],
         "prompt": ALPACA_EXPECTED[1][0], "completion": "Hello!", "options": None},
    ]
    assert all(tuple(ex) == KEYS for ex in examples)  # key order is part of byte-identical outputs


def test_file_format_override_and_utf8_bom_csv(tmp_path):
    # A .txt name with file_format set; and a CSV saved with a BOM (as Excel does) keeps its first column name.
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=["instruction", "input", "output"])
    writer.writeheader()
    writer.writerows(ALPACA)
    (tmp_path / "data.txt").write_bytes(b"\xef\xbb\xbf" + buf.getvalue().encode())
    examples = read_source(file_source("data.txt", "alpaca", file_format="csv"), tmp_path)
    assert pairs(examples) == ALPACA_EXPECTED


def test_unknown_file_extension_is_an_error(tmp_path):
    (tmp_path / "data.xml").write_text("<a/>")
    with pytest.raises(MixtuneError, match=r"data\.xml: source 'src': unknown file format 'xml'"):
        read_source(file_source("data.xml", "alpaca"), tmp_path)


# --- formats --------------------------------------------------------------------------------------------------


def test_alpaca_columns_task_and_system(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"question": "Capital of France?", "answer": "Paris"}])
    src = file_source("d.jsonl", "alpaca", task="qa", system="Be brief.",
                      columns={"instruction": "question", "output": "answer"}, capability=["knowledge"])
    [ex] = read_source(src, tmp_path)
    assert ex == {"id": "src/0", "source": "src", "task": "qa", "keywords": [], "capability": ["knowledge"],
                  "prompt": [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "Capital of France?"}],
                  "completion": "Paris", "options": None}


def test_messages_openai(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]}])
    [ex] = read_source(file_source("d.jsonl", "messages"), tmp_path)
    assert ex["prompt"] == [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
    assert ex["completion"] == "4"
    assert ex["options"] is None


def test_messages_sharegpt(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [
        {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi there"},
                           {"from": "gpt", "value": "Hello!"}]},
        {"conversations": [{"from": "human", "value": "Name a colour"}, {"from": "gpt", "value": "Blue"}]},
    ])
    examples = read_source(file_source("d.jsonl", "messages"), tmp_path)
    assert pairs(examples) == [
        ([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there"}], "Hello!"),
        ([{"role": "user", "content": "Name a colour"}], "Blue"),
    ]


def test_messages_must_end_with_the_assistant(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}])
    with pytest.raises(MixtuneError, match=r"d\.jsonl:1: field 'messages': must end with an assistant message"):
        read_source(file_source("d.jsonl", "messages"), tmp_path)


def test_messages_unknown_role(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "narrator", "content": "Hi"},
                                                      {"role": "assistant", "content": "Yo"}]}])
    with pytest.raises(MixtuneError, match=r"d\.jsonl:1: field 'messages\[0\]\.role': unknown role 'narrator'"):
        read_source(file_source("d.jsonl", "messages"), tmp_path)


def test_prompt_completion_string_and_message_list(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "2+2=", "completion": "4"},
        {"prompt": [{"role": "system", "content": "Math."}, {"role": "user", "content": "3+3="}],
         "completion": [{"role": "assistant", "content": "6"}]},
    ])
    examples = read_source(file_source("d.jsonl", "prompt_completion"), tmp_path)
    assert pairs(examples) == [
        ([{"role": "user", "content": "2+2="}], "4"),
        ([{"role": "system", "content": "Math."}, {"role": "user", "content": "3+3="}], "6"),
    ]


def test_classification_columns_truncation_and_labels(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [
        {"body": "one two three\nfour five six seven", "topic": " sport "},  # label whitespace is trimmed
        {"body": "short text", "topic": "tech"},
    ])
    src = file_source("d.jsonl", "classification", columns={"text": "body", "label": "topic"},
                      labels=["sport", "tech"], instruction="Topic?", max_input_words=5,
                      keywords=["topic classification"])
    examples = read_source(src, tmp_path)
    assert examples == [
        {"id": "src/0", "source": "src", "task": "src", "keywords": ["topic classification"],
         "capability": ["understanding"],
         "prompt": [{"role": "user", "content": "Topic?\n\none two three\nfour five\n\nAnswer with one of: sport, tech."}],
         "completion": "sport", "options": ["sport", "tech"]},
        {"id": "src/1", "source": "src", "task": "src", "keywords": ["topic classification"],
         "capability": ["understanding"],
         "prompt": [{"role": "user", "content": "Topic?\n\nshort text\n\nAnswer with one of: sport, tech."}],
         "completion": "tech", "options": ["sport", "tech"]},
    ]


def test_classification_label_set_from_the_data(tmp_path):
    # No declared labels: the sorted set of labels seen; numeric labels become text.
    write_jsonl(tmp_path / "d.jsonl", [{"text": "x y", "label": 1}, {"text": "z", "label": 0}])
    examples = read_source(file_source("d.jsonl", "classification"), tmp_path)
    assert [ex["completion"] for ex in examples] == ["1", "0"]
    assert all(ex["options"] == ["0", "1"] for ex in examples)


# --- hf kind (local builder files, offline) ----------------------------------------------------------------------


@pytest.fixture
def hf_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)


@pytest.mark.parametrize("builder", ["json", "parquet"])
def test_hf_builder_on_a_local_file(tmp_path, hf_offline, builder):
    ext = "jsonl" if builder == "json" else "parquet"
    write_table(tmp_path / "data" / f"alpaca.{ext}", ALPACA)
    # data_files relative to the source root, like a file source's path.
    src = HFSource(name="src", kind="hf", dataset=builder, data_files=f"data/alpaca.{ext}", format="alpaca")
    examples = read_source(src, tmp_path)
    assert pairs(examples) == ALPACA_EXPECTED
    assert [ex["id"] for ex in examples] == ["src/0", "src/1"]


def test_hf_where_keeps_one_task_of_a_dataset_of_many(tmp_path, hf_offline):
    # The shape of Super-NaturalInstructions on the hub: every task in one table, named by a column.
    rows = [{"task_name": f"task{i % 3}", "definition": "Add.", "inputs": f"{i} + 1", "targets": str(i + 1)}
            for i in range(9)]
    write_jsonl(tmp_path / "ni.jsonl", rows)
    src = HFSource(name="t1", kind="hf", dataset="json", data_files=str(tmp_path / "ni.jsonl"), format="alpaca",
                   columns={"instruction": "definition", "input": "inputs", "output": "targets"},
                   where={"task_name": "task1"})
    assert [ex["completion"] for ex in read_source(src, tmp_path)] == ["2", "5", "8"]


def test_hf_missing_field_names_the_record(tmp_path, hf_offline):
    write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": ""}])
    src = HFSource(name="src", kind="hf", dataset="json", data_files=str(tmp_path / "d.jsonl"), format="alpaca")
    with pytest.raises(MixtuneError, match=r"hf:json\[train\] record 2: field 'output': empty"):
        read_source(src, tmp_path)


# --- bigbench kind ------------------------------------------------------------------------------------------------

PREFIX = "bigbench-1.0.0/bigbench/benchmark_tasks/"
MC_TASK = {
    "name": "riddles", "keywords": ["logical reasoning", "multiple choice"], "task_prefix": "Answer the riddle. ",
    "examples": [
        {"input": "What has keys but no locks?", "target_scores": {"A door": 0, "A piano": 1, "A map": 0}},
        {"input": "What has hands but cannot clap?", "target_scores": {"A clock": 1, "A tree": 0}},
        {"input": "What gets wetter as it dries?", "target_scores": {"A towel": 1, "The sun": 0}},
    ],
}
GEN_TASK = {
    "name": "adding", "keywords": ["arithmetic", "mathematics"],
    "example_input_prefix": "\nQ: ", "example_output_prefix": "\nA: ",
    "examples": [
        {"input": "2 + 2 =", "target": "4"},
        {"input": "3 + 4 =", "target": ["7", "seven"]},   # several accepted answers: the first is the completion
        {"input": "1 + 1 =", "target": ""},               # no usable answer: skipped
        {"input": "5 + 5 =", "target": "10"},
    ],
}
# Subtasks come before their parent in the sdist (as in the real archive); only the parent has keywords.
SUB_A = {"name": "sub_a", "examples": [{"input": f"Passage {i}. Who?", "target": f"person {i}"} for i in range(6)]}
SUB_B = {"name": "sub_b", "examples": [{"input": f"Fact {i}?", "target": f"answer {i}"} for i in range(2)]}
PARENT = {"name": "family", "keywords": ["reading comprehension", "context-free question answering"]}


def build_bigbench(path: Path, members: dict[str, object]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, content in members.items():
            data = content if isinstance(content, bytes) else json.dumps(content).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def bigbench_archive(tmp_path) -> Path:
    return build_bigbench(tmp_path / "bb.tar.gz", {
        "bigbench-1.0.0/PKG-INFO": b"Name: bigbench\n",
        PREFIX + "family/sub_a/task.json": SUB_A,
        PREFIX + "family/sub_b/task.json": SUB_B,
        PREFIX + "family/task.json": PARENT,
        PREFIX + "riddles/task.json": MC_TASK,
        PREFIX + "adding/task.json": GEN_TASK,
        PREFIX + "riddles/README.md": b"# not a task\n",
        "bigbench-1.0.0/bigbench/api/task.json": {"examples": [{"input": "not a task", "target": "x"}]},
    })


def bb(**kw) -> BigbenchSource:
    return BigbenchSource(name="bb", kind="bigbench", path="bb.tar.gz", **kw)


def tasks_of(examples: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for ex in examples:
        counts[ex["task"]] = counts.get(ex["task"], 0) + 1
    return counts


def test_bigbench_exact_normalized_examples(tmp_path, bigbench_archive):
    examples = {ex["id"]: ex for ex in read_source(bb(), tmp_path)}
    assert examples["bb/riddles/0"] == {
        "id": "bb/riddles/0", "source": "bb", "task": "riddles",
        "keywords": ["logical reasoning", "multiple choice"], "capability": ["reasoning"],
        "prompt": [{"role": "user", "content": "Answer the riddle. What has keys but no locks?"
                                               "\n\nOptions:\n- A door\n- A piano\n- A map"}],
        "completion": "A piano", "options": ["A door", "A piano", "A map"],
    }
    # The task's own input/output prefixes are part of the question.
    assert examples["bb/adding/0"] == {
        "id": "bb/adding/0", "source": "bb", "task": "adding", "keywords": ["arithmetic", "mathematics"],
        "capability": ["reasoning"], "prompt": [{"role": "user", "content": "Q: 2 + 2 =\nA:"}],
        "completion": "4", "options": None,
    }
    assert examples["bb/adding/1"]["completion"] == "7"
    assert "bb/adding/2" not in examples  # empty target
    # Subtasks inherit the parent's keywords (and so its capabilities); the parent itself has no examples.
    assert examples["bb/family/sub_a/3"] == {
        "id": "bb/family/sub_a/3", "source": "bb", "task": "family/sub_a",
        "keywords": ["reading comprehension", "context-free question answering"],
        "capability": ["understanding", "knowledge"],
        "prompt": [{"role": "user", "content": "Passage 3. Who?"}], "completion": "person 3", "options": None,
    }
    assert tasks_of(list(examples.values())) == {"family/sub_a": 6, "family/sub_b": 2, "riddles": 3, "adding": 3}


@pytest.mark.parametrize("kw, expected", [
    ({"tasks": ["family"]}, {"family/sub_a", "family/sub_b"}),               # a parent name selects its subtasks
    ({"tasks": ["family/sub_b", "riddles"]}, {"family/sub_b", "riddles"}),
    ({"exclude_tasks": ["family"]}, {"riddles", "adding"}),
    ({"tasks": ["family"], "exclude_tasks": ["family/sub_a"]}, {"family/sub_b"}),
    ({"include_keywords": ["arithmetic"]}, {"adding"}),
    ({"include_keywords": ["Reading Comprehension"]}, {"family/sub_a", "family/sub_b"}),  # inherited, any case
    ({"include_keywords": ["arithmetic", "multiple choice"]}, {"riddles", "adding"}),   # any of them
    ({"exclude_keywords": ["logical reasoning"]}, {"adding", "family/sub_a", "family/sub_b"}),
    ({"exclude_keywords": ["context-free question answering"]}, {"riddles", "adding"}),
])
def test_bigbench_task_and_keyword_filters(tmp_path, bigbench_archive, kw, expected):
    assert set(tasks_of(read_source(bb(**kw), tmp_path))) == expected


def test_bigbench_name_prefix_is_not_a_parent(tmp_path, bigbench_archive):
    with pytest.raises(MixtuneError, match=r"bb\.tar\.gz: source 'bb': no examples"):
        read_source(bb(tasks=["fam"]), tmp_path)


def test_bigbench_max_per_task_is_a_seeded_cap(tmp_path, bigbench_archive):
    capped = read_source(bb(max_per_task=2), tmp_path, seed=0)
    # riddles 3 -> 2, adding 3 usable of 4 -> 2 sampled of 4, minus an empty target if drawn; sub_a 6 -> 2.
    counts = tasks_of(capped)
    assert counts["riddles"] == 2 and counts["family/sub_a"] == 2 and counts["family/sub_b"] == 2
    assert counts["adding"] <= 2
    assert read_source(bb(max_per_task=2), tmp_path, seed=0) == capped  # same seed, same sample
    samples = {tuple(ex["id"] for ex in read_source(bb(max_per_task=2, tasks=["family/sub_a"]), tmp_path, seed=s))
               for s in range(10)}
    assert len(samples) > 1  # the seed picks the sample
    ids = [ex["id"] for ex in capped if ex["task"] == "family/sub_a"]
    assert ids == sorted(ids, key=lambda i: int(i.rsplit("/", 1)[1]))  # original order kept


def test_bigbench_missing_and_unreadable_archives(tmp_path):
    with pytest.raises(MixtuneError, match=r"bb\.tar\.gz: source 'bb': no such file \(place a copy of the BIG-bench sdist"):
        read_source(bb(), tmp_path)
    (tmp_path / "bb.tar.gz").write_bytes(b"not gzip at all")
    with pytest.raises(MixtuneError, match=r"bb\.tar\.gz: not a readable \.tar\.gz archive"):
        read_source(bb(), tmp_path)


def test_bigbench_bad_task_json_names_the_member(tmp_path):
    build_bigbench(tmp_path / "bb.tar.gz", {PREFIX + "broken/task.json": b'{"examples": ['})
    with pytest.raises(MixtuneError, match=r"bb\.tar\.gz: .*benchmark_tasks/broken/task\.json: not valid JSON"):
        read_source(bb(), tmp_path)


# --- evals kind: the OpenAI Evals registry in its wheel -----------------------------------------------------------

DATA = "evals/registry/data/"
FEW_SHOT = [{"role": "system", "content": "Answer with Yes or No."},
            {"role": "system", "name": "example_user", "content": "Is ice cold?"},
            {"role": "system", "name": "example_assistant", "content": "Yes"}]
YES_NO = [{"input": [*FEW_SHOT, {"role": "user", "content": f"Is {n} even?"}], "ideal": "Yes" if n % 2 == 0 else "No"}
          for n in range(10)]
OPEN = [{"input": "Capital of France?", "ideal": ["Paris", "paris"]},   # several ideals: the first is the answer
        {"input": [{"role": "user", "content": "2+2?"}], "ideal": "4"},
        {"input": "Rate the poem.", "choice_strings": ["1", "2"]},       # model-graded: no ideal, counted
        {"input": [{"role": "user", "content": [{"type": "image_url"}]}], "ideal": "a cat"},  # not text: counted
        {"input": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "ideal": "x"}]


def build_wheel(path: Path, members: dict[str, list | bytes]) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        for name, rows in members.items():
            zf.writestr(name, rows if isinstance(rows, bytes) else "\n".join(json.dumps(r) for r in rows) + "\n\n")
    return path


@pytest.fixture
def evals_wheel(tmp_path) -> Path:
    return build_wheel(tmp_path / "ev.whl", {DATA + "parity/samples.jsonl": YES_NO, DATA + "open.jsonl": OPEN,
                                             "evals/registry/evals/parity.yaml": b"parity: {}\n",
                                             DATA + "grid/moves.jsonl": [{"game_idx": 1, "previous_moves": []}]})


def ev(**kw):
    from mixtune.plumbing.config import EvalsSource

    return EvalsSource(name="ev", kind="evals", path="ev.whl", **kw)


def test_evals_exact_normalized_examples_and_what_is_left_out(tmp_path, evals_wheel):
    from collections import Counter

    left_out: Counter = Counter()
    examples = {ex["id"]: ex for ex in read_source(ev(), tmp_path, left_out=left_out)}
    # Few-shot turns (system messages named example_user / example_assistant) become the turns they stand for;
    # a closed answer set (Yes / No, 5 examples per answer) makes the task multiple choice over it.
    assert examples["ev/parity/samples/3"] == {
        "id": "ev/parity/samples/3", "source": "ev", "task": "parity/samples", "keywords": [], "capability": [],
        "prompt": [{"role": "system", "content": "Answer with Yes or No."},
                   {"role": "user", "content": "Is ice cold?"}, {"role": "assistant", "content": "Yes"},
                   {"role": "user", "content": "Is 3 even?"}],
        "completion": "No", "options": ["No", "Yes"]}
    assert examples["ev/open/0"] == {
        "id": "ev/open/0", "source": "ev", "task": "open", "keywords": [], "capability": [],
        "prompt": [{"role": "user", "content": "Capital of France?"}], "completion": "Paris", "options": None}
    assert examples["ev/open/1"]["prompt"] == [{"role": "user", "content": "2+2?"}]
    assert tasks_of(list(examples.values())) == {"parity/samples": 10, "open": 2}
    # model-graded, an image, a prompt ending on the assistant's turn, a game state: counted, never silent
    assert left_out == {"other_format_removed": 4}


def test_evals_task_filters_and_seeded_cap(tmp_path, evals_wheel):
    assert set(tasks_of(read_source(ev(tasks=["parity"]), tmp_path))) == {"parity/samples"}  # a folder
    assert set(tasks_of(read_source(ev(exclude_tasks=["parity"]), tmp_path))) == {"open"}
    capped = read_source(ev(max_per_task=4, tasks=["parity"]), tmp_path, seed=0)
    assert len(capped) == 4 and read_source(ev(max_per_task=4, tasks=["parity"]), tmp_path, seed=0) == capped
    assert len({tuple(ex["id"] for ex in read_source(ev(max_per_task=4, tasks=["parity"]), tmp_path, seed=s))
                for s in range(10)}) > 1
    # 4 answers of 2 values are too few (5 per value) to call the set closed: open questions
    assert all(ex["options"] is None for ex in capped)


def test_evals_bad_files_are_named(tmp_path):
    with pytest.raises(MixtuneError, match=r"^ev\.whl: source 'ev': no such file \(run `mixtune fetch`\)$"):
        read_source(ev(), tmp_path)
    (tmp_path / "ev.whl").write_bytes(b"not a zip")
    with pytest.raises(MixtuneError, match=r"^ev\.whl: not a readable wheel \(zip\) archive"):
        read_source(ev(), tmp_path)
    # the file's own line number, blank lines and a CR-only line end counted
    raw = b'{"input": "a", "ideal": "b"}\r\n\n{"input": "c", "ideal": "d"}\r{"input": \n'
    build_wheel(tmp_path / "ev.whl", {DATA + "t.jsonl": raw})
    with pytest.raises(MixtuneError, match=r"^ev\.whl: evals/registry/data/t\.jsonl: line 4: not valid JSON"):
        read_source(ev(), tmp_path)


def test_an_evals_source_is_a_pool_only(tmp_path):
    from mixtune.plumbing.config import load_section

    params = {"prepare": {"seed": 0, "dev_fraction": 0.1, "test_fraction": 0.1, "decontaminate_ngram": 13,
                          "generalist_max_chars": 2000, "generalist_probe": 0, "too_long": "error",
                          "min_eval_examples": 0, "max_record_chars": 1000, "allow_unversioned": False,
                          "specialist": [{"name": "ev", "kind": "evals", "path": "ev.whl"}], "generalist": []}}
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    with pytest.raises(MixtuneError, match="an evals source is a generalist pool only, not a specialist task"):
        load_section("prepare", tmp_path / "params.yaml")


# --- requests: the registered model's input is prompted as prepare prompted the data ---------------------------

REQUEST_CASES = [  # (format, extra source settings, a record as the user's file holds it, the request's input)
    ("alpaca", {"system": "Be brief."}, {"instruction": "Add.", "input": "2 and 3", "output": "5"},
     {"instruction": "Add.", "input": "2 and 3"}),
    ("alpaca", {}, {"instruction": "Say hello.", "output": "Hi"}, {"instruction": "Say hello."}),
    ("messages", {}, {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
     {"messages": [{"role": "user", "content": "Hi"}]}),
    ("prompt_completion", {"columns": {"prompt": "q", "completion": "a"}}, {"q": "2+2?", "a": "4"}, {"q": "2+2?"}),
    ("classification", {"labels": ["x", "y"], "instruction": "Which?", "max_input_words": 3,
                        "columns": {"text": "body", "label": "y"}},
     {"body": "one two  three four five", "y": "y"}, {"body": "one two  three four five"}),
]


@pytest.mark.parametrize("fmt, extra, record, request_row", REQUEST_CASES)
def test_a_request_is_prompted_exactly_as_prepare_prompted_its_record(tmp_path, fmt, extra, record, request_row):
    from mixtune.core.sources import prompter, request_fields

    write_jsonl(tmp_path / "d.jsonl", [record])
    recipes: dict = {}
    [ex] = read_source(file_source("d.jsonl", fmt, **extra), tmp_path, recipes=recipes)
    entry = recipes["src"]
    assert prompter(entry)(request_row, "row 1") == (ex["prompt"], ex["options"])
    # the input example is the record's input columns (its answer left out); the signature names them
    assert entry["example"] == {c: v for c, v in record.items() if c in request_row or c == "input" and c in record}
    assert {c for c, _, _ in request_fields(entry)} >= set(request_row)


def test_a_request_to_a_bigbench_task_is_prompted_with_the_tasks_own_prefixes(tmp_path, bigbench_archive):
    from mixtune.core.sources import prompter

    recipes: dict = {}
    examples = {ex["id"]: ex for ex in read_source(bb(), tmp_path, recipes=recipes)}
    riddle, adding = examples["bb/riddles/0"], examples["bb/adding/0"]
    assert recipes["riddles"]["example"] == {"input": "What has keys but no locks?",
                                             "options": ["A door", "A piano", "A map"]}
    assert prompter(recipes["riddles"])({"input": "What has keys but no locks?", "options": riddle["options"]},
                                        "row 1") == (riddle["prompt"], riddle["options"])
    assert prompter(recipes["adding"])({"input": "2 + 2 ="}, "row 1") == (adding["prompt"], None)
    with pytest.raises(MixtuneError, match=r"^row 2: field 'options': expected a non-empty list of text$"):
        prompter(recipes["riddles"])({"input": "Q", "options": "A door"}, "row 2")


@pytest.mark.parametrize("fmt, row, message", [
    ("classification", {"text": " \n "}, "row 1: field 'text': only whitespace"),
    ("classification", {"body": "x"}, "row 1: field 'text': missing"),
    ("alpaca", {"input": "x"}, "row 1: field 'instruction': missing"),
    ("messages", {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
     "row 1: field 'messages': must end with the message to answer, not an assistant's"),
])
def test_a_bad_request_is_one_line_naming_the_field(fmt, row, message):
    from mixtune.core.sources import prompter

    entry = {"kind": "record", "source": file_source("d.jsonl", fmt, labels=["x"]).model_dump(mode="json"),
             "labels": ["x"] if fmt == "classification" else None}
    with pytest.raises(MixtuneError) as e:
        prompter(entry)(row, "row 1")
    assert str(e.value).startswith(message)


def test_a_scenario_model_takes_each_tasks_own_columns_and_the_request_names_its_task(tmp_path):
    from mixtune.core.serve import Requests, signature

    write_jsonl(tmp_path / "topic.jsonl", [{"body": "one two", "y": "x"}])
    write_jsonl(tmp_path / "qa.jsonl", [{"instruction": "Add.", "input": "2 and 3", "output": "5"}])
    recipes: dict = {}
    [topic] = read_source(FileSource(name="topic", kind="file", path="topic.jsonl", format="classification",
                                     labels=["x", "y"], columns={"text": "body", "label": "y"}), tmp_path,
                          recipes=recipes)
    [qa] = read_source(FileSource(name="qa", kind="file", path="qa.jsonl", format="alpaca"), tmp_path, recipes=recipes)
    requests = Requests({"tasks": recipes})
    got = requests([{"task": "qa", "instruction": "Add.", "input": "2 and 3"}, {"task": "topic", "body": "one two"}],
                   lambda i: f"row {i + 1}")
    assert [(e["task"], e["prompt"], e["options"]) for e in got] == [
        ("qa", qa["prompt"], None), ("topic", topic["prompt"], ["x", "y"])]
    with pytest.raises(MixtuneError, match=r"^row 1: field 'task': missing \(one of qa, topic\)$"):
        requests([{"body": "one two"}], lambda i: f"row {i + 1}")
    # the signature: every task's columns, none required but `task`
    assert signature({"tasks": recipes}).inputs.to_dict() == [
        {"type": "string", "name": "body", "required": False},
        {"type": "string", "name": "instruction", "required": False},
        {"type": "string", "name": "input", "required": False},
        {"type": "string", "name": "task", "required": True}]


# --- records as they really come ------------------------------------------------------------------------------


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    """JSON allows U+2028, U+2029 and U+0085 unescaped in a string (scraped text has them); lines end at \\n only
    (and \\r\\n), so each record is read whole and its text kept as it is."""
    texts = ["first\u2028line separator", "para\u2029graph separator", "next\x85line", "form\x0cfeed\x1cand more"]
    (tmp_path / "d.jsonl").write_bytes("".join(json.dumps({"text": t, "label": "x"}, ensure_ascii=False) + "\r\n"
                                               for t in texts).encode())
    examples = read_source(file_source("d.jsonl", "classification", labels=["x"], instruction="Which?"), tmp_path)
    assert [ex["prompt"][0]["content"] for ex in examples] == [
        f"Which?\n\n{t}\n\nAnswer with one of: x." for t in texts]
    with pytest.raises(MixtuneError, match=r"^d\.jsonl:3: field 'label': missing$"):  # lines counted by \n
        (tmp_path / "d.jsonl").write_text('{"text": "a\u2028b", "label": "x"}\n\n{"text": "c\u2029d"}\n')
        read_source(file_source("d.jsonl", "classification", labels=["x"]), tmp_path)


def test_csv_line_numbers_count_quoted_line_breaks(tmp_path):
    (tmp_path / "d.csv").write_text('text,label\n"one\ntwo\nthree",x\n\nfour,\n', newline="")
    with pytest.raises(MixtuneError, match=r"^d\.csv:6: field 'label': empty$"):
        read_source(file_source("d.csv", "classification", labels=["x"]), tmp_path)


def test_unknown_columns_key_names_the_allowed_ones():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"unknown key 'answer' \(the alpaca format's columns: instruction, "
                                              r"input, output\)"):
        file_source("d.jsonl", "alpaca", columns={"instruction": "q", "answer": "a"})
    assert file_source("d.jsonl", "messages", columns={"messages": "turns"}).columns == {"messages": "turns"}


@pytest.mark.parametrize("content, message", [
    ("\u200b", "field 'messages[0].content': only whitespace and invisible format characters (U+200B)"),
    ("\ufeff \u2060", "field 'messages[0].content': only whitespace and invisible format characters (U+2060, U+FEFF)"),
])
def test_invisible_message_content_is_refused(tmp_path, content, message):
    write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": content},
                                                     {"role": "assistant", "content": "ok"}]}])
    with pytest.raises(MixtuneError) as e:
        read_source(file_source("d.jsonl", "messages"), tmp_path)
    assert str(e.value) == f"d.jsonl:1: {message}"


def test_a_request_with_a_lone_surrogate_or_invisible_text_is_one_line():
    from mixtune.core.serve import Requests

    entry = {"kind": "record", "source": file_source("d.jsonl", "classification", labels=["x"]).model_dump(mode="json"),
             "labels": ["x"], "example": {}}
    requests = Requests({"tasks": {"src": entry}})
    with pytest.raises(MixtuneError) as e:
        requests([{"text": "fine"}, {"text": "ok", "meta": {"note": ["a", "x\ud83d"]}}], lambda i: f"row {i + 1}")
    assert str(e.value) == ("row 2: field 'meta.note[1]': a lone surrogate \\ud83d at character 2, half of a UTF-16 "
                            "pair and not a character: remove it or give the whole pair")
    with pytest.raises(MixtuneError) as e:
        requests([{"text": "\u200b\u200b"}], lambda i: f"row {i + 1}")
    assert str(e.value) == "row 1: field 'text': only whitespace and invisible format characters (U+200B)"
