"""Sources: read each kind (local file, Hugging Face dataset, BIG-bench archive) into normalized examples.

Every problem is one line naming the file, the line or record, and the field.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
import tarfile
import unicodedata
from collections.abc import Iterator
from pathlib import Path

from mixtune.config import BigbenchSource, FileSource, HFSource
from mixtune.errors import MixtuneError, first_line
from mixtune.schema import make_example

ROLES = {"system": "system", "user": "user", "assistant": "assistant",
         "human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}

# --- raw records ----------------------------------------------------------------------------------------------


def _decode(data: bytes, path: Path) -> str:
    data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM (Excel's CSVs) would rename the first column
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise MixtuneError(f"{path}:{line}: not UTF-8 (byte {data[e.start]:#x}); re-save the file as UTF-8") from None


def _file_records(src: FileSource, root: Path) -> Iterator[tuple[str, object]]:
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


def _hf_records(src: HFSource, root: Path) -> Iterator[tuple[str, object]]:
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


# --- formats --------------------------------------------------------------------------------------------------


def _invisible(text: str) -> str | None:
    """Text with nothing to read: None if it has a character that is neither whitespace nor a format character
    (Unicode category Cf: U+200B zero width space, U+FEFF, U+200D...), else why, for an error."""
    if any(not ch.isspace() and unicodedata.category(ch) != "Cf" for ch in text):
        return None
    if not text:
        return "empty"
    if not text.strip():
        return "only whitespace"
    shown = ", ".join(f"U+{ord(ch):04X}" for ch in sorted({ch for ch in text if not ch.isspace()}))
    return f"only whitespace and invisible format characters ({shown})"


def _field(where: str, row: object, src, name: str, *, required: bool = True, col: str | None = None) -> object:
    """Schema field `name` of a record: its column `col`, by default the one the source's `columns` maps it to."""
    if not isinstance(row, dict):
        raise MixtuneError(f"{where}: expected an object with fields, got {type(row).__name__}")
    col = col or src.columns.get(name, name)
    value = row.get(col)
    if required and (value is None or (isinstance(value, list) and len(value) == 0)
                     or (isinstance(value, str) and _invisible(value))):
        state = "missing" if col not in row else "empty" if not value else _invisible(value)
        raise MixtuneError(f"{where}: field '{col}': {state}")
    return value


def _text(where: str, value: object, col: str) -> str:
    if not isinstance(value, str):
        raise MixtuneError(f"{where}: field '{col}': expected text, got {type(value).__name__}")
    return value


def _messages(where: str, value: object, col: str) -> list[dict]:
    if not isinstance(value, list):
        raise MixtuneError(f"{where}: field '{col}': expected a list of messages")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise MixtuneError(f"{where}: field '{col}[{j}]': expected a message object")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if role not in ROLES:
            raise MixtuneError(f"{where}: field '{col}[{j}].role': unknown role {role!r}")
        if not isinstance(content, str) or not content.strip():
            raise MixtuneError(f"{where}: field '{col}[{j}].content': missing or empty")
        if why := _invisible(content):
            raise MixtuneError(f"{where}: field '{col}[{j}].content': {why}")
        out.append({"role": ROLES[role], "content": content})
    return out


def _with_system(src, prompt: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": src.system}] if src.system else []) + prompt


def classification_prompt(instruction: str, text: str, labels: list[str]) -> str:
    return f"{instruction}\n\n{text}\n\nAnswer with one of: {', '.join(labels)}."


def _cut(text: str, words: int | None) -> str:
    """The text up to its Nth word, keeping its own line breaks."""
    if words is None:
        return text
    found = list(re.finditer(r"\S+", text))
    return text[: found[words - 1].end()] if len(found) > words else text


def _cut_last_user(msgs: list[dict], words: int | None) -> list[dict]:
    if words is None:
        return msgs
    i = max((j for j, m in enumerate(msgs) if m["role"] == "user"), default=len(msgs) - 1)
    return [*msgs[:i], {**msgs[i], "content": _cut(msgs[i]["content"], words)}, *msgs[i + 1 :]]


def _prompt(src, where: str, row: object, labels: list[str] | None, *, answered: bool,
            max_words: int | None = None) -> list[dict]:
    """A record's prompt messages, from its input fields only. prepare builds every training and test example
    with it (`answered`: the record carries its answer), and the registered model builds each request's prompt
    with it (serve.py), so what is served is prompted exactly as it was trained and evaluated.
    `max_words` cuts the input (Fit): the text to classify, an alpaca input (else its instruction), the prompt,
    or the last user message; never the instruction around it or the answer."""
    def text(name: str) -> str:
        return _text(where, _field(where, row, src, name), src.columns.get(name, name))

    if src.format == "alpaca":
        instruction, extra = text("instruction"), _field(where, row, src, "input", required=False)
        user = f"{instruction}\n\n{_cut(extra, max_words)}" if extra else _cut(instruction, max_words)
        prompt = [{"role": "user", "content": user}]
    elif src.format == "messages":
        col = _messages_column(src, row)
        prompt = _messages(where, _field(where, row, src, "messages", col=col), col)
        if answered:
            if prompt[-1]["role"] != "assistant" or len(prompt) < 2:
                raise MixtuneError(f"{where}: field '{col}': must end with an assistant message after a prompt")
            prompt = prompt[:-1]
        elif prompt[-1]["role"] == "assistant":
            raise MixtuneError(f"{where}: field '{col}': must end with the message to answer, not an assistant's")
        prompt = _cut_last_user(prompt, max_words)
    elif src.format == "prompt_completion":
        p, pcol = _field(where, row, src, "prompt"), src.columns.get("prompt", "prompt")
        prompt = (_cut_last_user(_messages(where, p, pcol), max_words) if isinstance(p, list)
                  else [{"role": "user", "content": _cut(_text(where, p, pcol), max_words)}])
    else:  # classification: the text, cut to the tighter of the source's and the caller's word limit
        words = min((w for w in (src.max_input_words, max_words) if w is not None), default=None)
        prompt = [{"role": "user", "content": classification_prompt(src.instruction, _cut(text("text"), words),
                                                                    labels)}]
    return _with_system(src, prompt)


class Fit:
    """Prompts cut to fit `budget` tokens (prepare.too_long: truncate_input): a prompt over it keeps the most
    words of its input that fit (a binary search over `_prompt`'s max_words), so its answer is never cut.
    prepare fits every example; the registered model fits every request the same way (the budget is in the
    recipe). `prompt_tokens(prompt)`: its length through the chat template, as training tokenizes it."""

    def __init__(self, prompt_tokens, budget: int) -> None:
        self.prompt_tokens, self.budget, self.cut = prompt_tokens, budget, 0

    def __call__(self, build, where: str) -> list[dict]:
        prompt = build(None)
        if self.prompt_tokens(prompt) <= self.budget:
            return prompt
        lo, hi = 0, len(re.findall(r"\S+", "\n".join(m["content"] for m in prompt)))
        while hi - lo > 1:  # build(lo) fits (or lo == 0), build(hi) does not
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.prompt_tokens(build(mid)) <= self.budget else (lo, mid)
        if lo == 0:
            raise MixtuneError(f"{where}: even one word of the input leaves no room in {self.budget} prompt tokens "
                               "(train.max_length less the answer): raise train.max_length")
        self.cut += 1
        return build(lo)


def _messages_column(src, row: object) -> str:
    col = src.columns.get("messages", "messages")
    if isinstance(row, dict) and col not in row and "conversations" in row:  # ShareGPT
        col = "conversations"
    return col


def _normalize(src, where: str, row: object, labels: list[str] | None) -> tuple[list[dict], str, list | None]:
    """-> (prompt messages, completion, options) for one record of a file or hf source."""
    prompt, fmt = _prompt(src, where, row, labels, answered=True), src.format
    if fmt == "classification":
        label = str(_field(where, row, src, "label")).strip()
        if label not in labels:
            raise MixtuneError(f"{where}: field '{src.columns.get('label', 'label')}': label {label!r} is not in the "
                               f"label set {labels}")
        return prompt, label, labels
    if fmt == "alpaca":
        return prompt, _text(where, _field(where, row, src, "output"), src.columns.get("output", "output")), None
    if fmt == "messages":
        last = row[_messages_column(src, row)][-1]  # checked by _prompt: an assistant message
        return prompt, last.get("content", last.get("value")), None
    ccol = src.columns.get("completion", "completion")
    c = _field(where, row, src, "completion")
    return prompt, _text(where, _messages(where, c, ccol)[-1]["content"] if isinstance(c, list) else c, ccol), None


def _rows(src: FileSource | HFSource, root: Path) -> list[tuple[str, object]]:
    return list(_file_records(src, root) if src.kind == "file" else _hf_records(src, root))


def _record_examples(src: FileSource | HFSource, root: Path, recipes: dict | None, fit: Fit | None) -> Iterator[dict]:
    rows = _rows(src, root)
    labels = None
    if src.format == "classification":
        lcol = src.columns.get("label", "label")
        labels = src.labels or sorted({str(r.get(lcol)).strip() for _, r in rows if isinstance(r, dict) and r.get(lcol) is not None})
    if recipes is not None:
        entry = {"kind": "record", "source": src.model_dump(mode="json"), "labels": labels}
        first = rows[0][1] if rows and isinstance(rows[0][1], dict) else {}
        recipes.setdefault(src.task_name, {**entry, "example": {c: first[c] for c, _, _ in request_fields(entry)
                                                                 if c in first}})
    for n, (where, row) in enumerate(rows):
        given = _given_split(src, where, row)
        prompt, completion, options = _normalize(src, where, row, labels)
        if fit is not None:
            prompt = fit(lambda words, where=where, row=row: _prompt(src, where, row, labels, answered=True,
                                                                      max_words=words), where)
        ex = make_example(id=f"{src.name}/{n}", source=src.name, task=src.task_name, keywords=src.keywords,
                          capability=src.capability, prompt=prompt, completion=completion, options=options)
        yield {**ex, GIVEN: given} if given else ex


GIVEN = "given_split"  # an example's split as the data gives it; prepare places the example and drops the key
SPLIT_NAMES = {"train": "train", "dev": "dev", "validation": "dev", "valid": "dev", "val": "dev", "test": "test"}


def _given_split(src, where: str, row: object) -> str | None:
    if getattr(src, "split_column", None) is None:
        return None
    value = _field(where, row, src, "split", col=src.split_column)
    if str(value).strip().lower() not in SPLIT_NAMES:
        raise MixtuneError(f"{where}: field '{src.split_column}': {value!r} is not a split "
                           "(train, dev, validation or test)")
    return SPLIT_NAMES[str(value).strip().lower()]


def parts(src, root: Path) -> list[tuple[str | None, object]]:
    """A source with its own split files or hub splits (`splits`) -> (given split, source) per part: the main
    one (`path` or `split`: no given split, unless `split_column` says) and one per given split, its records
    named `<source>:<split>/<n>`. Every part shares the label set of the whole source, so a prompt lists the
    same labels in every split."""
    if src.kind == "bigbench" or not src.splits:
        return [(None, src)]
    out = [(None, src.model_copy(update={"splits": {}}))]
    for name, value in src.splits.items():
        where = {"path": value} if src.kind == "file" else {"split": value}
        out.append((name, src.model_copy(update={**where, "name": f"{src.name}:{name}", "task": src.task_name,
                                                 "splits": {}, "split_column": None})))
    if src.format == "classification" and not src.labels:
        lcol = src.columns.get("label", "label")
        labels = sorted({str(r.get(lcol)).strip() for _, part in out for _, r in _rows(part, root)
                         if isinstance(r, dict) and r.get(lcol) is not None})
        out = [(name, part.model_copy(update={"labels": labels})) for name, part in out]
    return out


# --- BIG-bench ------------------------------------------------------------------------------------------------

_TASKS_DIR = "/bigbench/benchmark_tasks/"
_PREFIXES = ("task_prefix", "example_input_prefix", "example_output_prefix")  # of a task.json: its prompt


def _selected(src: BigbenchSource, task: str, keywords: list[str]) -> bool:
    def named(names: list[str]) -> bool:  # a task name also selects its subtasks
        return any(task == n or task.startswith(n + "/") for n in names)

    kw = {k.lower() for k in keywords}
    return ((not src.tasks or named(src.tasks)) and not named(src.exclude_tasks)
            and (not src.include_keywords or bool(kw & {k.lower() for k in src.include_keywords}))
            and not kw & {k.lower() for k in src.exclude_keywords})


def _bigbench_example(task_json: dict, ex: dict) -> tuple[str, str, list[str] | None] | None:
    """-> (user text, completion, options), or None for an example with no usable answer.

    The task's own example_input_prefix / example_output_prefix are part of the question (e.g. anachronisms
    asks "Does the preceding sentence contain non-contemporaneous (anachronistic) elements?" only there)."""
    question = ((task_json.get("task_prefix") or "") + (task_json.get("example_input_prefix") or "")
                + str(ex.get("input", "")))
    answer_cue = task_json.get("example_output_prefix") or ""  # e.g. "\nA: ", after the options
    scores = ex.get("target_scores")
    if isinstance(scores, dict) and scores:
        options = [str(k) for k in scores]
        best = max(scores, key=lambda k: scores[k])
        text = question + "\n\nOptions:\n" + "\n".join(f"- {o}" for o in options) + answer_cue
        return text.strip(), str(best), options
    target = ex.get("target")
    if isinstance(target, list):
        target = target[0] if target else None
    if not isinstance(target, str) or not target.strip() or not question.strip():
        return None
    return (question + answer_cue).strip(), target, None


def bigbench_tasks(path: Path) -> Iterator[tuple[str, dict]]:
    """Stream (task name, task.json) from the sdist without extracting it (1.7 GB of JSON unpacked)."""
    with tarfile.open(path, "r|gz") as tf:
        for m in tf:
            if not m.name.endswith("/task.json") or _TASKS_DIR not in m.name:
                continue
            name = m.name.split(_TASKS_DIR, 1)[1].rsplit("/task.json", 1)[0]
            try:
                tj = json.load(tf.extractfile(m))
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                raise MixtuneError(f"{path}: {m.name}: not valid JSON: {first_line(e)}") from None
            if not isinstance(tj, dict):
                raise MixtuneError(f"{path}: {m.name}: expected a JSON object")
            yield name, tj


def _bigbench_examples(src: BigbenchSource, root: Path, seed: int, recipes: dict | None) -> Iterator[dict]:
    path = root / src.path
    if not path.is_file():
        raise MixtuneError(f"{src.path}: source '{src.name}': no such file (run `mixtune fetch`)")
    parent_keywords: dict[str, list[str]] = {}
    pending: list[tuple[str, dict]] = []  # subtasks seen before their parent's keywords
    try:
        for name, tj in bigbench_tasks(path):
            parent_keywords.setdefault(name, tj.get("keywords") or [])
            if not tj.get("examples"):
                continue
            # Keep only the capped sample of each task in memory, never the whole archive.
            pending.append((name, {**tj, "examples": _cap(tj["examples"], src.max_per_task, seed, name)}))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise MixtuneError(f"{src.path}: not a readable .tar.gz archive: {e}") from None
    for name, tj in pending:
        keywords = tj.get("keywords") or parent_keywords.get(name.split("/")[0], [])
        if not _selected(src, name, keywords):
            continue
        if recipes is not None:
            _, first = tj["examples"][0]
            scores = first.get("target_scores")
            recipes.setdefault(name, {"kind": "bigbench", **{k: tj.get(k) for k in _PREFIXES}, "example": {
                "input": str(first.get("input", "")), **({"options": list(scores)} if isinstance(scores, dict) else {})}})
        for i, ex in tj["examples"]:
            parsed = _bigbench_example(tj, ex)
            if parsed is None:
                continue
            text, completion, options = parsed
            yield make_example(id=f"{src.name}/{name}/{i}", source=src.name, task=name,
                               keywords=keywords, capability=src.capability or None,
                               prompt=[{"role": "user", "content": text}], completion=completion, options=options)


def _cap(examples: list, k: int, seed: int, task: str) -> list[tuple[int, dict]]:
    idx = range(len(examples))
    if len(examples) > k:  # seeded per task, so the sample does not depend on archive order
        idx = sorted(random.Random(f"{seed}:{task}").sample(range(len(examples)), k))
    return [(i, examples[i]) for i in idx]


def where_of(src) -> str:
    """How errors name a source's data: its file, or its hub dataset and split."""
    return getattr(src, "path", None) or f"hf:{getattr(src, 'dataset', '')}[{getattr(src, 'split', '')}]"


# --- entry point ----------------------------------------------------------------------------------------------


def read_source(src, root: Path, seed: int = 0, recipes: dict | None = None, fit: Fit | None = None) -> list[dict]:
    """The source's examples. `recipes`, if given, gets each of its tasks' recipe (see `prompter`); `fit` cuts
    the prompts of a file or hub source that are over its budget."""
    examples = list(_bigbench_examples(src, root, seed, recipes) if src.kind == "bigbench"
                    else _record_examples(src, root, recipes, fit))
    if not examples:
        raise MixtuneError(f"{where_of(src)}: source '{src.name}': no examples")
    return examples


# --- requests: the registered model's input -------------------------------------------------------------------
# A recipe entry holds what builds one task's prompt from a raw record as prepare built it: a file or hub
# source's settings with its label set resolved, or a BIG-bench task's prefixes; and one record's input fields,
# the model's input example. prepare writes them (prepared/specialist/recipe.json); register logs them with
# the model.


def request_fields(entry: dict) -> list[tuple[str, str, bool]]:
    """(column, type, required) of a request for this task: the source's own input columns. Types: string,
    strings (a list of text), messages (chat messages)."""
    if entry["kind"] == "bigbench":
        return [("input", "string", True), ("options", "strings", False)]
    src = entry["source"]
    col = src["columns"].get
    return {"alpaca": [(col("instruction", "instruction"), "string", True), (col("input", "input"), "string", False)],
            "messages": [(col("messages", "messages"), "messages", True)],
            "prompt_completion": [(col("prompt", "prompt"), "string", True)],
            "classification": [(col("text", "text"), "string", True)]}[src["format"]]


def prompter(entry: dict, prompt_tokens=None):
    """A request row (a dict of the source's input columns) and where it is -> (prompt messages, options).
    `prompt_tokens` (the served model's tokenizer through the chat template) cuts the input as prepare did
    when the recipe has a token budget (prepare.too_long: truncate_input); without it, prompts are not cut."""
    if entry["kind"] == "bigbench":
        def build(row: dict, where: str) -> tuple[list[dict], list[str] | None]:
            text = row.get("input")
            if not isinstance(text, str) or not text.strip():
                raise MixtuneError(f"{where}: field 'input': missing or empty")
            if why := _invisible(text):
                raise MixtuneError(f"{where}: field 'input': {why}")
            options = row.get("options")
            if options is not None and (not isinstance(options, list) or not options
                                        or not all(isinstance(o, str) for o in options)):
                raise MixtuneError(f"{where}: field 'options': expected a non-empty list of text")
            ex = {"input": text, **({"target_scores": {o: 0 for o in options}} if options else {"target": "-"})}
            text, _, options = _bigbench_example(entry, ex)
            return [{"role": "user", "content": text}], options
        return build

    from pydantic import TypeAdapter

    from mixtune.config import Source

    src, labels = TypeAdapter(Source).validate_python(entry["source"]), entry["labels"]

    fit = Fit(prompt_tokens, entry["prompt_budget"]) if prompt_tokens and entry.get("prompt_budget") else None

    def build(row: dict, where: str) -> tuple[list[dict], list[str] | None]:
        if fit is None:
            return _prompt(src, where, row, labels, answered=False), labels
        return fit(lambda words: _prompt(src, where, row, labels, answered=False, max_words=words), where), labels
    return build
