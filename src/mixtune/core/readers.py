"""Raw records: a local file (JSONL, JSON, CSV, parquet) or a Hugging Face dataset, read into (where, record)
pairs, where `where` names the file and line or record for an error. JSONL is split on \\n only; a CSV row with
more or fewer fields than its header, or a quote that never closes, is an error naming the file and line."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

from mixtune.plumbing.config import FileSource, HFSource
from mixtune.plumbing.errors import MixtuneError, first_line


def _decode(data: bytes, path: Path) -> str:
    data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM (Excel's CSVs) would rename the first column
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise MixtuneError(f"{path}:{line}: not UTF-8 (byte {data[e.start]:#x}); re-save the file as UTF-8") from None


def file_source(src: FileSource, root: Path) -> Iterator[tuple[str, object]]:
    return file_records(root / src.path, src.path, src.file_format, f"source '{src.name}'")


def file_records(path: Path, shown: str, file_format: str | None, what: str) -> Iterator[tuple[str, object]]:
    """(where, record) of a jsonl, json, csv or parquet file; `shown`: the path as errors name it, `what`: the
    file's role (a source, a command's input)."""
    fmt = file_format or path.suffix.lstrip(".").lower()
    if not path.is_file():
        raise MixtuneError(f"{shown}: {what}: no such file")
    if fmt not in ("jsonl", "json", "csv", "parquet"):
        raise MixtuneError(f"{shown}: {what}: unknown file format '{fmt}' "
                           "(use jsonl, json, csv or parquet, or set file_format)")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a bad file
            raise MixtuneError(f"{shown}: not a readable parquet file: {first_line(e)}") from None
        for i, row in enumerate(rows, 1):
            yield f"{shown}: record {i}", row
        return
    text = _decode(path.read_bytes(), Path(shown))
    if fmt == "jsonl":
        # Lines end at \n (or \r\n) only: str.splitlines() also splits at U+2028, U+2029, U+0085 and others,
        # which JSON allows unescaped inside a string (scraped text has them).
        for i, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.removesuffix("\r"))
            except json.JSONDecodeError as e:
                raise MixtuneError(f"{shown}:{i}: not valid JSON: {e.msg} at column {e.colno}") from None
            if _SURROGATE_ESCAPE.search(line):
                check_surrogates(f"{shown}:{i}", row)
            yield f"{shown}:{i}", row
    elif fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise MixtuneError(f"{shown}:{e.lineno}: not valid JSON: {e.msg}") from None
        if not isinstance(data, list):
            raise MixtuneError(f"{shown}: expected a JSON array of records")
        check = _SURROGATE_ESCAPE.search(text)
        for i, row in enumerate(data, 1):
            if check:
                check_surrogates(f"{shown}: record {i}", row)
            yield f"{shown}: record {i}", row
    else:
        yield from _csv_records(text, shown)


# A \uD800-\uDFFF escape: json.loads accepts one alone, but it is half of a UTF-16 pair, not a character, and
# nothing can encode it (the tokenizer, a UTF-8 file).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_surrogates(where: str, value: object, field: str = "") -> None:
    """A lone surrogate anywhere in a record (a key or a value, nested): one line naming the field."""
    if isinstance(value, str):
        if m := _SURROGATE.search(value):
            raise MixtuneError(f"{where}: field '{field}': a lone surrogate \\u{ord(m.group()):04x} at character "
                               f"{m.start() + 1}, half of a UTF-16 pair and not a character: remove it or give "
                               "the whole pair")
    elif isinstance(value, dict):
        for k, v in value.items():
            name = str(k).encode("utf-8", "backslashreplace").decode()  # a key can hold one too
            check_surrogates(where, k, f"{field}.{name}" if field else name)
            check_surrogates(where, v, f"{field}.{name}" if field else name)
    elif isinstance(value, list):
        for j, v in enumerate(value):
            check_surrogates(where, v, f"{field}[{j}]")


# A quoted field longer than this many lines is taken for a quote that was never closed (a stray `"` at the
# start of a field swallows the lines after it, records and all).
MAX_FIELD_LINES = 1000


def _quote_opened(lines: list[str], start: int, max_chars: int) -> int | None:
    """The line (`lines` numbered from `start`, a record's first line, to the end of the file) where the quoted
    field that breaks the record opened: the first to run over MAX_FIELD_LINES lines or `max_chars` characters,
    or whose closing quote a character other than a comma, a quote or a line end follows, or that is still open
    at the end of the file (csv's rules: a quote opens a field only at the field's start)."""
    state, opened, size = "start", None, 0
    for n, line in enumerate(lines, start):
        for ch in line.rstrip("\r\n") + "\n":
            if state == "quoted":
                size += 1
                if ch == '"':
                    state = "quote"
                elif n - opened >= MAX_FIELD_LINES or size > max_chars:
                    return opened
            elif state == "quote":  # a quote inside a quoted field: a doubled quote, or the field's end
                if ch not in '",\n':
                    return opened
                state = "quoted" if ch == '"' else "start"
            elif state == "start" and ch == '"':
                state, opened, size = "quoted", n, 0
            else:
                state = "start" if ch in ",\n" else "field"
    return opened if state == "quoted" else None


def _csv_records(text: str, shown: str) -> Iterator[tuple[str, dict]]:
    """A CSV's records: every record has its header's number of fields, and every quote it opens is closed
    within MAX_FIELD_LINES lines. Lines are csv's own, counted through quoted line breaks."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header, end = None, 0

    def unclosed(start: int, why: str) -> MixtuneError:
        lines = io.StringIO(text, newline="").readlines()  # as the reader counts them
        line = _quote_opened(lines[start - 1 :], start, csv.field_size_limit()) or start
        return MixtuneError(f"{shown}:{line}: a quoted field opens here and {why}: close its quote, or double "
                            'a quote inside a quoted field ("")')

    while True:
        start = end + 1
        try:
            row = next(reader, None)
        except csv.Error as e:
            if "field larger than field limit" in str(e):
                raise unclosed(start, f"runs over {csv.field_size_limit()} characters") from None
            if "unexpected end of data" in str(e):
                raise unclosed(start, "is never closed (it runs to the end of the file)") from None
            if "expected after" in str(e):
                raise unclosed(start, "has more text after its closing quote") from None
            raise MixtuneError(f"{shown}:{start}: not valid CSV: {first_line(e)}") from None
        if row is None:
            return
        end = reader.line_num
        if end - start >= MAX_FIELD_LINES:
            raise unclosed(start, f"runs over {MAX_FIELD_LINES} lines")
        if not row:  # a blank line
            continue
        if header is None:
            header = row
            continue
        if len(row) != len(header):
            fix = ("quote a field that holds a comma" if len(row) > len(header)
                   else "give every column a value (an empty one still takes its comma)")
            raise MixtuneError(f"{shown}:{end}: {len(row)} field{'s' * (len(row) != 1)}, but the header has "
                               f"{len(header)} ({', '.join(header)}): {fix}")
        yield f"{shown}:{end}", dict(zip(header, row))


def _local(root: Path, f: str) -> str:
    """A data_files entry that names a file under `root` (like a file source's path) -> that file."""
    return str(root / f) if (root / f).exists() else f


def hf_source(src: HFSource, root: Path) -> Iterator[tuple[str, object]]:
    import datasets

    data_files = src.data_files
    def local(files: str | list[str]) -> str | list[str]:
        return _local(root, files) if isinstance(files, str) else [_local(root, f) for f in files]

    if data_files is not None:
        data_files = ({k: local(v) for k, v in data_files.items()} if isinstance(data_files, dict)
                      else local(data_files))
    try:
        ds = datasets.load_dataset(src.dataset, src.config, split=src.split,
                                   data_files=data_files, revision=src.revision)
    except Exception as e:  # hub, network and builder errors all land here
        raise MixtuneError(f"hf:{src.dataset}: source '{src.name}': cannot load: {first_line(e)}") from None
    if src.where:  # e.g. one Super-NaturalInstructions task out of the dataset of all of them
        ds = ds.filter(lambda row: all(str(row.get(k)) == v for k, v in src.where.items()))
    for i, row in enumerate(ds, 1):
        yield f"hf:{src.dataset}[{src.split}] record {i}", row
