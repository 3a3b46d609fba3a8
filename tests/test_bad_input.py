"""Bad input through the real CLI: one line on stderr naming the file, the line or record and the field;
a non-zero exit; no traceback; nothing written."""

from __future__ import annotations

import json
import re

import pytest
from conftest import classification_records, files_under, spec_source, write_jsonl, write_params

from mixtune.plumbing import fetch
from mixtune.plumbing.errors import MixtuneError
from mixtune.plumbing.files import sha256_file

GOOD = classification_records({"a": 20, "b": 20, "c": 20})


def one_line(err: str, *fragments: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    for f in fragments:
        assert f in lines[0], f"{f!r} not in {lines[0]!r}"
    return lines[0]


def prepare_fails(tmp_path, cli, spec: dict | None = None, generalist: list | None = None, *fragments,
                  prepare: dict | None = None) -> str:
    params = write_params(tmp_path / "params.yaml", prepare={"specialist": [spec or spec_source()],
                                                             "generalist": generalist or [], **(prepare or {})})
    out = tmp_path / "prepared"
    rc, stdout, err = cli("--params", params, "prepare", "--root", tmp_path, "--out", out)
    assert rc != 0
    assert stdout == ""
    assert files_under(out) == []
    return one_line(err, "mixtune prepare: error: ", *fragments)


# --- records ------------------------------------------------------------------------------------------------------


def test_line_not_json(tmp_path, cli):
    write_jsonl(tmp_path / "spec.jsonl", GOOD[:3])
    with open(tmp_path / "spec.jsonl", "a") as f:
        f.write('{"text": "cut off", "label": \n')
    prepare_fails(tmp_path, cli, None, None, "spec.jsonl:4:", "not valid JSON")


def test_missing_required_field(tmp_path, cli):
    write_jsonl(tmp_path / "spec.jsonl", [*GOOD[:2], {"text": "no label here"}, *GOOD[2:]])
    prepare_fails(tmp_path, cli, None, None, "spec.jsonl:3:", "field 'label'", "missing")


def test_missing_renamed_field_names_the_files_column(tmp_path, cli):
    write_jsonl(tmp_path / "spec.jsonl", [{"body": "x y", "topic": "a"}, {"body": "z", "label": "a"}])
    spec = spec_source(columns={"text": "body", "label": "topic"})
    prepare_fails(tmp_path, cli, spec, None, "spec.jsonl:2:", "field 'topic'", "missing")


def test_empty_required_field(tmp_path, cli):
    write_jsonl(tmp_path / "spec.jsonl", [*GOOD[:4], {"text": "", "label": "a"}])
    prepare_fails(tmp_path, cli, None, None, "spec.jsonl:5:", "field 'text'", "empty")


def test_whitespace_only_required_field(tmp_path, cli):
    write_jsonl(tmp_path / "spec.jsonl", [*GOOD[:4], {"text": " \n\t ", "label": "a"}])
    prepare_fails(tmp_path, cli, None, None, "spec.jsonl:5:", "field 'text': only whitespace")


def test_empty_field_in_a_csv_record(tmp_path, cli):
    (tmp_path / "spec.csv").write_text("text,label\nhello world,a\n,b\n")
    prepare_fails(tmp_path, cli, spec_source("spec.csv"), None, "spec.csv:3:", "field 'text'", "empty")


def test_label_outside_the_label_set(tmp_path, cli):
    write_jsonl(tmp_path / "spec.jsonl", [*GOOD[:6], {"text": "some words", "label": "sports"}])
    prepare_fails(tmp_path, cli, None, None, "spec.jsonl:7:", "field 'label'", "'sports'", "label set")


def test_examples_over_max_length_stop_with_what_to_change(tmp_path, cli):
    """Training would truncate them at train.max_length (512), cut off their answer and drop them: a user with
    long documents would train on a fraction of what the mix says, without a word."""
    records = [dict(r) for r in GOOD]
    records[1]["text"] = " ".join(["word"] * 600)  # about 600 tokens with the chat template
    records[4]["text"] = " ".join(["word"] * 900)  # the longest
    write_jsonl(tmp_path / "spec.jsonl", records)
    line = prepare_fails(tmp_path, cli, None, None, "spec.jsonl: source 'spec': 2 of 60 examples exceed "
                         "train.max_length=512 tokens with the chat template, and training would drop them "
                         "(the longest: record 5, ")
    assert line.endswith("set max_input_words on the source, raise train.max_length, or set prepare.too_long: "
                         "truncate_input")


def test_a_split_too_small_to_measure_anything(tmp_path, cli):
    write_jsonl(tmp_path / "spec.jsonl", GOOD[:45])  # 10% of each label's records, rounded: 5 dev examples
    prepare_fails(tmp_path, cli, None, None, "spec.jsonl: the dev split holds 5 examples (0.1 of 45), fewer than "
                  "prepare.min_eval_examples=20", "raise prepare.dev_fraction", prepare={"min_eval_examples": 20})


def test_a_record_over_the_size_limit(tmp_path, cli):
    write_jsonl(tmp_path / "spec.jsonl", [*GOOD[:3], {"text": "x" * 5000, "label": "a"}, *GOOD[3:]])
    prepare_fails(tmp_path, cli, None, None, "spec.jsonl: record 4: ", "characters, over prepare.max_record_chars=1000",
                  prepare={"max_record_chars": 1000})


def test_a_classification_task_with_a_single_label(tmp_path, cli):
    write_jsonl(tmp_path / "spec.jsonl", [r for r in GOOD if r["label"] == "b"])
    prepare_fails(tmp_path, cli, None, None, "spec.jsonl: source 'spec': field 'label': every record has the label "
                  "'b': a classifier needs at least two labels")


def test_empty_source(tmp_path, cli):
    (tmp_path / "spec.jsonl").write_text("\n")
    prepare_fails(tmp_path, cli, None, None, "spec.jsonl", "source 'spec'", "no examples")


def test_not_utf8(tmp_path, cli):
    write_jsonl(tmp_path / "spec.jsonl", GOOD[:2])
    with open(tmp_path / "spec.jsonl", "ab") as f:
        f.write(b'{"text": "caf\xe9 au lait", "label": "a"}\n')  # Latin-1
    prepare_fails(tmp_path, cli, None, None, "spec.jsonl:3:", "not UTF-8")


def test_missing_file(tmp_path, cli):
    prepare_fails(tmp_path, cli, None, None, "spec.jsonl", "source 'spec'", "no such file")


def test_bad_generalist_record_writes_nothing_either(tmp_path, cli):
    # The specialist source is fine; the generalist one fails after it: still nothing is written.
    write_jsonl(tmp_path / "spec.jsonl", GOOD)
    write_jsonl(tmp_path / "gen.jsonl", [{"instruction": "Do it.", "output": "ok"}, {"instruction": "Do it."}])
    gen = {"name": "gen", "kind": "file", "path": "gen.jsonl", "format": "alpaca"}
    prepare_fails(tmp_path, cli, None, [gen], "gen.jsonl:2:", "field 'output'", "missing")



# --- records as they really come: CSV field counts and quotes, invisible text, data outside DVC -------------------

CSV_LINES = [f"{r['text']},{r['label']}\n" for r in GOOD[:30]]  # 30 records, no commas or quotes in them
CSV_GOOD = "".join(CSV_LINES)


def test_csv_row_with_unquoted_commas(tmp_path, cli):
    """More fields than the header: the text would be cut at its first comma, the rest shifted or dropped."""
    (tmp_path / "spec.csv").write_text('text,label\n"two\nlines, quoted",a\n' + "".join(CSV_LINES[:5])
                                       + "Hello, world, and more,b\n")
    lines = (tmp_path / "spec.csv").read_text().splitlines()
    assert lines[-1] == "Hello, world, and more,b"
    prepare_fails(tmp_path, cli, spec_source("spec.csv"), None,
                  f"mixtune prepare: error: spec.csv:{len(lines)}: 4 fields, but the header has 2 (text, label): "
                  "quote a field that holds a comma")


def test_csv_row_with_fewer_fields_than_the_header(tmp_path, cli):
    (tmp_path / "spec.csv").write_text("text,label\n" + CSV_GOOD + "no label here\n")
    prepare_fails(tmp_path, cli, spec_source("spec.csv"), None,
                  "mixtune prepare: error: spec.csv:32: 1 field, but the header has 2 (text, label): give every "
                  "column a value (an empty one still takes its comma)")


def test_csv_quote_never_closed(tmp_path, cli):
    """A stray quote at the start of a field swallowed the rest of the file into one field, silently."""
    (tmp_path / "spec.csv").write_text("text,label\n" + "".join(CSV_LINES[:7]) + '"stray start,b\n'
                                       + "".join(CSV_LINES[7:]))
    prepare_fails(tmp_path, cli, spec_source("spec.csv"), None,
                  "mixtune prepare: error: spec.csv:9: a quoted field opens here and is never closed (it "
                  'runs to the end of the file): close its quote, or double a quote inside a quoted field ("")')


def test_csv_stray_quote_closed_by_a_later_field(tmp_path, cli):
    """The stray quote ends at the next quoted field, 3 records later: csv would return one record of three."""
    (tmp_path / "spec.csv").write_text('text,label\n"stray start,b\nplain text,a\nmore text,c\n"quoted, text",c\n'
                                       + CSV_GOOD)
    prepare_fails(tmp_path, cli, spec_source("spec.csv"), None,
                  "mixtune prepare: error: spec.csv:2: a quoted field opens here and has more text after its closing "
                  'quote: close its quote, or double a quote inside a quoted field ("")')


def test_csv_quoted_field_over_the_line_limit(tmp_path, cli, monkeypatch):
    """A stray quote closed cleanly many lines later (`..."`, then a comma): a field over MAX_FIELD_LINES lines."""
    from mixtune.core import readers

    monkeypatch.setattr(readers, "MAX_FIELD_LINES", 5)
    body = "\n".join(f"line {i} of one record" for i in range(5))  # lines 2-6: 5 lines, at the limit
    (tmp_path / "spec.csv").write_text(f'text,label\n"{body}",a\n' + "".join(CSV_LINES[:10]) + '"stray,b\n'
                                       + "".join(CSV_LINES[10:20]) + 'the end",a\n' + "".join(CSV_LINES[20:]))
    prepare_fails(tmp_path, cli, spec_source("spec.csv"), None,
                  "mixtune prepare: error: spec.csv:17: a quoted field opens here and runs over 5 lines: "
                  'close its quote, or double a quote inside a quoted field ("")')


def test_unknown_key_in_columns(tmp_path, cli):
    write_jsonl(tmp_path / "spec.jsonl", GOOD)
    prepare_fails(tmp_path, cli, spec_source(columns={"txt": "body", "label": "topic"}), None,
                  "mixtune prepare: error: ", "params.yaml: prepare.specialist.0.columns: unknown key 'txt' "
                  "(the classification format's columns: text, label)")


def test_text_of_only_invisible_characters(tmp_path, cli):
    write_jsonl(tmp_path / "spec.jsonl", [*GOOD[:4], {"text": "\u200b \ufeff\u200b\n", "label": "a"}, *GOOD[4:]])
    prepare_fails(tmp_path, cli, None, None, "mixtune prepare: error: spec.jsonl:5: field 'text': only whitespace "
                  "and invisible format characters (U+200B, U+FEFF)")


UNVERSIONED = ("source 'spec': not versioned: outside data/ and every path a .dvc file tracks, so `dvc repro` "
               "would not rerun when it changes and a clone could not reproduce the result: copy it under data/ "
               "(cp {p} data/) and run `dvc add data`, or give it a .dvc file of its own (`dvc add {p}`, inside "
               "the repository), or set prepare.allow_unversioned: true")


@pytest.mark.parametrize("path", ["spec.jsonl", "../elsewhere/spec.jsonl", "data/../spec.jsonl"])
def test_a_source_outside_the_data_dvc_versions(tmp_path, cli, path):
    root = tmp_path / "project"
    (root / ".dvc").mkdir(parents=True)  # a DVC project: its data is data/ and what a .dvc file tracks
    (root / "data.dvc").write_text("outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  path: data\n")
    write_jsonl(root / path, GOOD)
    params = write_params(root / "params.yaml", prepare={"specialist": [spec_source(path)]})
    rc, stdout, err = cli("--params", params, "prepare", "--root", root, "--out", root / "prepared")
    assert (rc, stdout, files_under(root / "prepared")) == (1, "", [])
    assert one_line(err) == f"mixtune prepare: error: {path}: " + UNVERSIONED.format(p=path)


def test_a_source_dvc_versions_is_read(tmp_path, cli):
    """Under data/, or tracked by a .dvc file of its own (here: a folder beside data/)."""
    (tmp_path / ".dvc").mkdir()
    write_jsonl(tmp_path / "data" / "spec.jsonl", GOOD)
    write_jsonl(tmp_path / "extra" / "gen" / "gen.jsonl", [{"instruction": f"Task {i}.", "output": "ok"}
                                                           for i in range(5)])
    (tmp_path / "extra" / "gen.dvc").write_text("outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  path: gen\n")
    gen = {"name": "gen", "kind": "file", "path": "extra/gen/gen.jsonl", "format": "alpaca"}
    params = write_params(tmp_path / "params.yaml", prepare={"specialist": [spec_source("data/spec.jsonl")],
                                                            "generalist": [gen]})
    rc, _, err = cli("--params", params, "prepare", "--root", tmp_path, "--out", tmp_path / "prepared")
    assert rc == 0, err
    stats = json.loads((tmp_path / "prepared" / "stats.json").read_text())
    assert "not_versioned" not in stats and stats["generalist"]["gen"]["read"] == 5


# --- predict --------------------------------------------------------------------------------------------------------


def test_predict_request_with_a_lone_surrogate(tmp_path, cli):
    """json.loads accepts "\\ud83d" alone; no tokenizer or UTF-8 file can take it. Checked before the model loads."""
    (tmp_path / "requests.jsonl").write_text('{"id": 1, "text": "fine"}\n{"id": 2, "text": "smile \\ud83d!"}\n')
    out = tmp_path / "out.jsonl"
    rc, stdout, err = cli("predict", "--model", "models:/nothing@champion", "--input", tmp_path / "requests.jsonl",
                          "--output", out)
    assert (rc, stdout, files_under(tmp_path)) == (1, "", [tmp_path / "requests.jsonl"])
    assert one_line(err) == (f"mixtune predict: error: {tmp_path / 'requests.jsonl'}:2: field 'text': a lone "
                             "surrogate \\ud83d at character 7, half of a UTF-16 pair and not a character: remove it "
                             "or give the whole pair")


def test_predict_output_is_a_directory(tmp_path, cli):
    write_jsonl(tmp_path / "requests.jsonl", [{"text": "fine"}])
    (tmp_path / "out").mkdir()
    rc, stdout, err = cli("predict", "--model", "models:/nothing@champion", "--input", tmp_path / "requests.jsonl",
                          "--output", tmp_path / "out")
    assert (rc, stdout, files_under(tmp_path)) == (1, "", [tmp_path / "requests.jsonl"])
    assert one_line(err) == (f"mixtune predict: error: {tmp_path / 'out'}: --output: is a directory; name the file "
                             f"to write, e.g. {tmp_path / 'out' / 'predictions.jsonl'}")


def test_predict_output_unwritable_when_the_answers_are_written(tmp_path, cli, monkeypatch):
    """The output turns into a directory while the model answers: one line, and no temp file beside it."""
    import mlflow

    from mixtune.plumbing import predict

    source = {**spec_source(), "columns": {}, "kind": "file", "format": "classification"}
    recipe = {"tasks": {"spec": {"kind": "record", "source": source, "labels": ["a", "b", "c"], "example": {}}}}
    out = tmp_path / "answers" / "out.jsonl"

    class Model:
        def predict(self, frame):
            out.mkdir(parents=True)
            return [{"task": "spec", "prediction": "a", "probabilities": None}] * len(frame)

    monkeypatch.setattr(predict, "download", lambda uri: tmp_path)
    monkeypatch.setattr(predict, "recipe_of", lambda model_dir, uri: recipe)
    monkeypatch.setattr(mlflow.pyfunc, "load_model", lambda path: Model())
    write_jsonl(tmp_path / "requests.jsonl", [{"text": "fine"}])
    rc, stdout, err = cli("predict", "--model", "models:/x@champion", "--input", tmp_path / "requests.jsonl",
                          "--output", out)
    assert (rc, stdout) == (1, "")
    assert one_line(err) == f"mixtune predict: error: {out}: --output: cannot write: Is a directory"
    assert list((tmp_path / "answers").iterdir()) == [out] and list(out.iterdir()) == []


# --- params -------------------------------------------------------------------------------------------------------


def test_unknown_format(tmp_path, cli):
    write_jsonl(tmp_path / "spec.jsonl", GOOD)
    line = prepare_fails(tmp_path, cli, spec_source(format="tsv"), None,
                         "params.yaml", "prepare.specialist.0.format", "'tsv'")
    assert "classification" in line  # says what is allowed


def test_unknown_source_kind(tmp_path, cli):
    write_jsonl(tmp_path / "spec.jsonl", GOOD)
    prepare_fails(tmp_path, cli, spec_source(kind="s3"), None,
                  "params.yaml", "prepare.specialist.0.kind", "'s3'", "bigbench")


def test_unknown_key_is_a_typo(tmp_path, cli):
    write_jsonl(tmp_path / "spec.jsonl", GOOD)
    prepare_fails(tmp_path, cli, spec_source(max_input_word=10), None,
                  "params.yaml", "prepare.specialist.0.max_input_word")


# --- fetch: checksums -----------------------------------------------------------------------------------------------


def test_checksum_mismatch_on_a_cached_download(tmp_path):
    asset = fetch.Asset("evals==3.0.1.post1", "evals-3.0.1.post1-py3-none-any.whl", fetch.EVALS.sha256)
    cached = tmp_path / "cache" / asset.filename
    cached.parent.mkdir()
    cached.write_bytes(b"these are not the bytes you are looking for")
    with pytest.raises(MixtuneError) as info:
        fetch.download(asset, tmp_path / "cache")  # a cached file is verified, never trusted (and no pip runs)
    msg = str(info.value)
    assert str(cached) in msg and "sha256" in msg and fetch.EVALS.sha256 in msg and sha256_file(cached) in msg
    assert "\n" not in msg
    with pytest.raises(MixtuneError, match=re.escape(f"{cached}: sha256 mismatch")):
        fetch.verify(cached, fetch.EVALS.sha256)


# --- mix ------------------------------------------------------------------------------------------------------------


@pytest.fixture
def prepared(tmp_path, cli):
    """A real prepared/ folder: 60 specialist (48 train) and 30 generalist examples."""
    write_jsonl(tmp_path / "spec.jsonl", GOOD)
    write_jsonl(tmp_path / "gen.jsonl", [{"instruction": f"Task number {i}.", "output": f"done {i}"}
                                         for i in range(30)])
    gen = {"name": "gen", "kind": "file", "path": "gen.jsonl", "format": "alpaca"}
    params = write_params(tmp_path / "prep.yaml", prepare={"specialist": [spec_source()], "generalist": [gen]})
    rc, _, err = cli("--params", params, "prepare", "--root", tmp_path, "--out", tmp_path / "prepared")
    assert rc == 0, err
    return tmp_path / "prepared"


def mix_fails(tmp_path, cli, prepared, mix: dict, *fragments) -> str:
    params = write_params(tmp_path / "params.yaml", mix=mix)
    out = tmp_path / "mix"
    rc, stdout, err = cli("--params", params, "mix", "--prepared", prepared, "--out", out)
    assert rc != 0
    assert stdout == ""
    assert not out.exists()
    return one_line(err, "mixtune mix: error: ", *fragments)


@pytest.mark.parametrize("share", [1.0, -0.1])
def test_generalist_share_outside_0_1(tmp_path, cli, prepared, share):
    mix_fails(tmp_path, cli, prepared, {"specialist_size": 10, "generalist_share": share},
              "params.yaml", "mix.generalist_share", f"(got {share})")


def test_specialist_size_larger_than_the_train_split(tmp_path, cli, prepared):
    mix_fails(tmp_path, cli, prepared, {"specialist_size": 49, "generalist_share": 0.0},
              "train.jsonl", "mix.specialist_size", "needs 49", "only 48")


def test_more_generalist_than_the_pool_holds(tmp_path, cli, prepared):
    # 40 specialist at share 0.5 needs 40 generalist; the pool holds 30: an error, never oversampling.
    mix_fails(tmp_path, cli, prepared, {"specialist_size": 40, "generalist_share": 0.5},
              "generalist.jsonl", "mix.generalist_share=0.5", "needs 40", "only 30")


def test_mix_without_prepare(tmp_path, cli):
    mix_fails(tmp_path, cli, tmp_path / "nowhere", {"specialist_size": 10, "generalist_share": 0.0},
              "train.jsonl", "no such file")


def test_mix_section_missing(tmp_path, cli, prepared):
    params = write_params(tmp_path / "params.yaml", prepare={"specialist": [spec_source()]})
    rc, _, err = cli("--params", params, "mix", "--prepared", prepared, "--out", tmp_path / "mix")
    assert rc != 0 and not (tmp_path / "mix").exists()
    one_line(err, "params.yaml", "mix", "missing section")
