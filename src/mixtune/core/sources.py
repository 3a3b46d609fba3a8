"""Sources: each kind (local file, Hugging Face dataset: mixtune.core.readers; BIG-bench: mixtune.core.bigbench;
the OpenAI Evals registry: mixtune.core.evals)
into normalized examples, and the prompt recipe the registered model builds a request's prompt with.

Every problem is one line naming the file, the line or record, and the field.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from mixtune.core import bigbench, evals, readers
from mixtune.core.schema import make_example
from mixtune.plumbing.config import FileSource, HFSource
from mixtune.plumbing.errors import MixtuneError

ROLES = {"system": "system", "user": "user", "assistant": "assistant",
         "human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}

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
    return list(readers.file_source(src, root) if src.kind == "file" else readers.hf_source(src, root))


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
    if src.kind in ("bigbench", "evals") or not src.splits:
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


def where_of(src) -> str:
    """How errors name a source's data: its file, or its hub dataset and split."""
    return getattr(src, "path", None) or f"hf:{getattr(src, 'dataset', '')}[{getattr(src, 'split', '')}]"


# --- entry point ----------------------------------------------------------------------------------------------


def read_source(src, root: Path, seed: int = 0, recipes: dict | None = None, fit: Fit | None = None,
                left_out: Counter | None = None) -> list[dict]:
    """The source's examples. `recipes`, if given, gets each of its tasks' recipe (see `prompter`); `fit` cuts
    the prompts of a file or hub source that are over its budget; `left_out` counts a pool's records that are
    not examples, by reason."""
    examples = list(bigbench.examples(src, root, seed, recipes) if src.kind == "bigbench"
                    else evals.examples(src, root, seed, left_out) if src.kind == "evals"
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
            text, _, options = bigbench.example(entry, ex)
            return [{"role": "user", "content": text}], options
        return build

    from pydantic import TypeAdapter

    from mixtune.plumbing.config import Source

    src, labels = TypeAdapter(Source).validate_python(entry["source"]), entry["labels"]

    fit = Fit(prompt_tokens, entry["prompt_budget"]) if prompt_tokens and entry.get("prompt_budget") else None

    def build(row: dict, where: str) -> tuple[list[dict], list[str] | None]:
        if fit is None:
            return _prompt(src, where, row, labels, answered=False), labels
        return fit(lambda words: _prompt(src, where, row, labels, answered=False, max_words=words), where), labels
    return build
