"""Bad input through the real CLI: one line on stderr naming the file, the line or record and the field;
a non-zero exit; no traceback; nothing written."""

from __future__ import annotations

import re

import pytest

from mixtune import fetch
from mixtune.errors import MixtuneError
from mixtune.files import sha256_file

from conftest import classification_records, files_under, spec_source, write_jsonl, write_params

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
    asset = fetch.Asset("bigbench==1.0.0", "bigbench-1.0.0.tar.gz", fetch.BIGBENCH.sha256)
    cached = tmp_path / "cache" / asset.filename
    cached.parent.mkdir()
    cached.write_bytes(b"these are not the bytes you are looking for")
    with pytest.raises(MixtuneError) as info:
        fetch.download(asset, tmp_path / "cache")  # a cached file is verified, never trusted (and no pip runs)
    msg = str(info.value)
    assert str(cached) in msg and "sha256" in msg and fetch.BIGBENCH.sha256 in msg and sha256_file(cached) in msg
    assert "\n" not in msg
    with pytest.raises(MixtuneError, match=re.escape(f"{cached}: sha256 mismatch")):
        fetch.verify(cached, fetch.BIGBENCH.sha256)


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
