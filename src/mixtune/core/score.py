"""score: the one way mixtune scores an adapter, used by evaluate, the search's trials, register and the study.

Predictions: classification and multiple choice answer the option with the highest log-likelihood after the
prompt (the prompt runs once per example, batched; its KV cache is shared by the options); generative tasks
answer by batched greedy generation.

Metrics: each task is judged by its own metric (`auto`: macro-F1 for classification, whose classes are often
imbalanced; accuracy for multiple choice; ROUGE-L for generation), and a scenario of several tasks by the
unweighted mean over its tasks. Intervals: 95% percentile bootstrap over the examples, the same resamples for
every system, so a difference between two systems is paired.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np

from mixtune.core import metrics as M
from mixtune.core.model import micro_batches, release_memory, trim_heap

METRICS = ("accuracy", "macro_f1", "exact_match", "token_f1", "rouge_l")
_PER_EXAMPLE = {"accuracy": M.exact_match, "exact_match": M.exact_match, "token_f1": M.token_f1,
                "rouge_l": M.rouge_l}  # the mean of a per-example score (accuracy: the label, exactly)


# --- predictions --------------------------------------------------------------------------------------------


def score_precision() -> str:
    """What every answer is scored at, whatever train.precision says: fp32 on a CPU. There, bf16 autocast
    makes an example's scores depend on the batch it shares (measured with the tuned BBC adapter: options'
    probabilities moved by up to 0.08 between two batchings of the same articles, and 6 of 211 test labels
    differed from fp32), while batched fp32 costs what unbatched bf16 costs (68 s against 72 s for the 211
    articles, 45 s batched bf16). So evaluate, the search and the served model give each example one answer,
    whatever else is in its batch (fp32: within 6e-6). On a GPU, bf16 (fp16 without it): not measured here."""
    import torch

    from mixtune.core.model import train_precision

    return train_precision("auto") if torch.cuda.is_available() else "fp32"


def _autocast(prec: str):
    import torch

    if prec == "fp32":
        return contextlib.nullcontext()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device, dtype=torch.bfloat16 if prec == "bf16" else torch.float16)


def _prompt_ids(tokenizer, prompt: list[dict]) -> list[int]:
    return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False))


def _option_ids(tokenizer, prompt: list[dict], prompt_ids: list[int], option: str) -> list[int]:
    """The option's tokens exactly as training saw the completion: the chat template's tail after the prompt."""
    full = list(tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": option}], tokenize=True,
                                              return_dict=False))
    if full[: len(prompt_ids)] != prompt_ids:  # a template that merges across the boundary: score the text alone
        return tokenizer(option, add_special_tokens=False)["input_ids"]
    return full[len(prompt_ids):]


# A scoring batch holds at most batch_size x ROW_TOKENS tokens (prompts and options; rows sorted by length): 16
# rows of the default's articles (<= 205 tokens) in one batch, but the probe's longest 16 questions (<= 343
# tokens, with long options) are split: as one batch they took 1.1-1.4 GB above the model for a second (eager
# attention's scores grow with rows x length^2, the kept logits with rows x option tokens x the vocabulary), the
# peak of evaluate (2,414 -> 2,050 MB) and of a trial's scoring. The search's peak is its training's.
ROW_TOKENS = 192


def score_options(model, tokenizer, examples: list[dict], batch_size: int, prec: str) -> list[list[float]]:
    """Log-likelihood of each option of each example, in one forward pass per batch. The batch's common prefix
    (the system prompt and the task's instruction: ~30 of ~140 tokens on the default) runs once, as a cache;
    then each row holds the rest of its prompt (left-padded, so every prompt ends in the same column) followed
    by all its options side by side, and a 4D attention mask lets each option's tokens see the prompt and their
    own earlier tokens only. So the prompt runs once and no KV cache is copied per option (the cache of a
    16-article batch repeated for 5 options held 0.7 GB). Positions are each example's own: the padding between
    the prefix and the rest of a prompt shifts nothing, and every option starts where its prompt ends.
    A batch is `batch_size` rows or fewer: at most `batch_size` x ROW_TOKENS tokens of prompts and options."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    all_prompts = [_prompt_ids(tokenizer, ex["prompt"]) for ex in examples]
    all_options = [[_option_ids(tokenizer, ex["prompt"], p, o) for o in ex["options"]]
                   for ex, p in zip(examples, all_prompts)]
    order = sorted(range(len(examples)), key=lambda i: len(all_prompts[i]))  # similar lengths: little padding
    rows = [len(all_prompts[i]) + sum(map(len, all_options[i])) for i in order]
    scores: list[list[float]] = [[] for _ in examples]
    for start, end in micro_batches(rows, batch_size * ROW_TOKENS, max_rows=batch_size):
        idx = order[start:end]
        prompts = [all_prompts[i] for i in idx]
        options = [all_options[i] for i in idx]
        shared = _common_prefix(prompts, max(0, min(map(len, prompts)) - 1))  # the last prompt token stays
        width = max(map(len, prompts)) - shared
        tail = max(sum(map(len, opts)) for opts in options)
        n, total = len(idx), width + tail
        ids = torch.full((n, total), pad, dtype=torch.long)
        pos = torch.zeros((n, total), dtype=torch.long)
        # span[r, c]: what column c of row r holds: -1 padding, 0 the prompt, j + 1 option j
        span = torch.full((n, total), -1, dtype=torch.long)
        target = torch.full((n, total), -1, dtype=torch.long)  # the token column c's logits must predict
        for r, (p, opts) in enumerate(zip(prompts, options)):
            rest = p[shared:]
            ids[r, width - len(rest) : width] = torch.tensor(rest)
            pos[r, width - len(rest) : width] = torch.arange(shared, len(p))
            span[r, width - len(rest) : width] = 0
            c = width
            for j, o in enumerate(opts):
                ids[r, c : c + len(o)] = torch.tensor(o)
                pos[r, c : c + len(o)] = torch.arange(len(p), len(p) + len(o))
                span[r, c : c + len(o)] = j + 1
                target[r, c : c + len(o) - 1] = torch.tensor(o[1:])  # each option token predicts the next
                c += len(o)
        causal = torch.ones(total, total, dtype=torch.bool).tril()
        q, k = span[:, :, None], span[:, None, :]
        allowed = causal & (k >= 0) & ((k == 0) | (k == q))
        allowed |= torch.eye(total, dtype=torch.bool)  # a padding column sees itself: no empty softmax row
        allowed = torch.cat([torch.ones(n, total, shared, dtype=torch.bool), allowed], 2)  # all see the prefix
        mask = torch.zeros(n, 1, total, shared + total).masked_fill_(~allowed[:, None],
                                                                     torch.finfo(torch.float32).min)
        keep = torch.arange(width - 1, total)  # the last prompt token and the options: the only logits needed
        with torch.inference_mode(), _autocast(prec):
            cache = None
            if shared:
                cache = model(input_ids=torch.tensor([prompts[0][:shared]], device=device), use_cache=True,
                              logits_to_keep=1).past_key_values
                cache.batch_repeat_interleave(n)
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                        past_key_values=cache, use_cache=False, logits_to_keep=keep.to(device))
            logp = torch.log_softmax(out.logits.float(), -1).cpu()  # (n, total - width + 1, vocab)
        for r, opts in enumerate(options):
            row, c = [], width
            for o in opts:
                first = logp[r, 0, o[0]].item()  # predicted by the prompt's last token
                rest = logp[r, c - width + 1 : c - width + len(o)].gather(-1, target[r, c : c + len(o) - 1, None])
                row.append(first + rest.sum().item())
                c += len(o)
            scores[idx[r]] = row
        del out, logp, cache
        trim_heap()  # each batch has other shapes: their freed memory, kept by malloc, piled up batch on batch
    return scores


def _common_prefix(rows: list[list[int]], limit: int) -> int:
    """The number of leading tokens every row shares, at most `limit`."""
    n = 0
    while n < limit and all(r[n] == rows[0][n] for r in rows):
        n += 1
    return n


# A decoding batch's key/value cache holds at most CACHE_TOKENS tokens: rows x (the longest prompt + the answer
# limit), 46 KB a token for SmolLM2-135M in fp32, so 0.75 GB. A decode step reads every weight once whatever its
# rows (16 rows: 120 ms a step, 48 rows: 200 ms), so more rows decode more tokens a second; the cache is what they
# cost. Measured on bench_eval's 48 free-form questions (128 new tokens): 49.6 s at 24,576 tokens (+1,972 MB above
# the model), 55.2 s at 16,384 (+1,496 MB), 59.4 s at 12,288 (+1,373 MB); evaluate's classification peak is 2.1 GB.
CACHE_TOKENS = 16384


def generate(model, tokenizer, examples: list[dict], batch_size: int, max_new_tokens: int, prec: str) -> list[str]:
    """Batched greedy decoding with a KV cache. Prompts run in order of length, prefilled in passes of at most
    `batch_size` rows and `batch_size` x ROW_TOKENS padded tokens (as scoring's batches), and decoded together,
    as many rows as CACHE_TOKENS holds: the prefill's cost is its padded tokens, a decode step's is nearly the
    same for 16 rows as for 48. Each pass writes its keys and values into the decoding batch's cache in place,
    right-aligned so that every prompt ends in the same column (the columns left of a shorter prompt stay zero
    and masked), and each decoded token is written in place too (HF's DynamicCache concatenates: a copy of the
    whole cache per token). A finished row stops counting at its end token and leaves the batch once a quarter
    of the rows has finished (leaving copies the cache). While decoding, attention is SDPA, which reads the
    cache's 3 key/value heads in place where eager attention first copies them out to SmolLM2's 9."""
    attn = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        return _greedy(model, tokenizer, examples, batch_size, max_new_tokens, prec)
    finally:
        model.set_attn_implementation(attn)  # label scoring's 4D masks and training are measured with eager


@functools.cache
def _in_place_layer():
    """A cache layer (transformers' `DynamicLayer` interface) over a slab shared by the passes of one decoding
    batch: {"rows", "cols", "k", "v"}, the tensors (rows, kv heads, cols, head dim) allocated, zeroed, at the
    first write. The layer holds rows `rows` from column `start` on, and `n` of those columns are filled."""
    from transformers.cache_utils import DynamicLayer

    class InPlaceLayer(DynamicLayer):
        def __init__(self, slab: dict, rows: slice = slice(None), start: int = 0, n: int = 0) -> None:
            super().__init__()
            self.slab, self.rows, self.start, self.n = slab, rows, start, n
            if n:
                self._view()

        def lazy_initialization(self, key_states, value_states) -> None:
            if "k" not in self.slab:
                _, heads, _, dim = key_states.shape
                for name, t in (("k", key_states), ("v", value_states)):
                    self.slab[name] = t.new_zeros(self.slab["rows"], heads, self.slab["cols"], dim)
            self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True

        def _view(self) -> None:
            cols = slice(self.start, self.start + self.n)
            self.keys, self.values = self.slab["k"][self.rows, :, cols], self.slab["v"][self.rows, :, cols]
            self.dtype, self.device, self.is_initialized = self.keys.dtype, self.keys.device, True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            cols = slice(self.start + self.n, self.start + self.n + key_states.shape[-2])
            self.slab["k"][self.rows, :, cols] = key_states
            self.slab["v"][self.rows, :, cols] = value_states
            self.n += key_states.shape[-2]
            self._view()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.n

        def batch_select_indices(self, indices) -> None:
            for name in ("k", "v"):
                self.slab[name] = self.slab[name][indices]
            self._view()

    return InPlaceLayer


def _greedy(model, tokenizer, examples: list[dict], batch_size: int, max_new_tokens: int, prec: str) -> list[str]:
    import torch
    from transformers.cache_utils import Cache

    device = next(model.parameters()).device
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    layer, n_layers = _in_place_layer(), model.config.num_hidden_layers
    prompts = [_prompt_ids(tokenizer, ex["prompt"]) for ex in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    lengths = [len(prompts[i]) for i in order]
    answers: list[list[int]] = [[] for _ in examples]
    for start, end in micro_batches([n + max_new_tokens for n in lengths], CACHE_TOKENS):
        idx, width = order[start:end], lengths[end - 1]
        slabs = [{"rows": len(idx), "cols": width + max_new_tokens} for _ in range(n_layers)]
        mask = torch.zeros(len(idx), width, dtype=torch.long, device=device)
        nxt = torch.empty(len(idx), dtype=torch.long, device=device)
        with torch.inference_mode(), _autocast(prec):
            for a, b in micro_batches(lengths[start:end], batch_size * ROW_TOKENS, max_rows=batch_size):
                rows = [prompts[i] for i in idx[a:b]]
                w = max(map(len, rows))
                ids = torch.tensor([[pad] * (w - len(p)) + p for p in rows], device=device)
                part = torch.tensor([[0] * (w - len(p)) + [1] * len(p) for p in rows], device=device)
                cache = Cache(layers=[layer(slab, slice(a, b), width - w) for slab in slabs])
                out = model(input_ids=ids, attention_mask=part, position_ids=(part.cumsum(-1) - 1).clamp(min=0),
                            past_key_values=cache, use_cache=True, logits_to_keep=1)
                nxt[a:b], mask[a:b, width - w:] = out.logits[:, -1].argmax(-1), part
            cache = Cache(layers=[layer(slab, n=width) for slab in slabs])
            live = torch.tensor(idx)  # the examples in the batch, in its row order
            last = mask.sum(-1) - 1  # each row's position: its prompt's own, whatever the padding
            done = torch.zeros(len(idx), dtype=torch.bool, device=device)
            for step in range(max_new_tokens):
                done |= nxt == eos
                for i, t in zip(live[~done.cpu()].tolist(), nxt[~done].tolist()):
                    answers[i].append(t)
                if step == max_new_tokens - 1 or done.all():
                    break
                if 4 * int(done.sum()) >= len(live):  # finished rows leave the batch, and their cache with them
                    keep = (~done).nonzero().squeeze(1)
                    cache.batch_select_indices(keep)
                    live, nxt, mask, last, done = live[keep.cpu()], nxt[keep], mask[keep], last[keep], done[keep]
                mask, last = torch.cat([mask, mask.new_ones(len(live), 1)], 1), last + 1
                out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last[:, None],
                            past_key_values=cache, use_cache=True)
                nxt = out.logits[:, -1].argmax(-1)
        del out, cache, slabs
        trim_heap()  # as in score_options
    return [tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]


def label_from_text(text: str, options: list[str]) -> str:
    """Map a generated answer to an option: exact (normalized) match first, else the first option it names."""
    if not text.strip():  # no answer names no option (an option "a" normalizes to "" like the empty text)
        return ""
    norm = M.normalize_answer(text)
    for o in options:
        if M.normalize_answer(o) == norm:
            return o
    for o in options:  # whole words only: "tech" is not named by "biotechnology"
        if M.normalize_answer(o) and f" {M.normalize_answer(o)} " in f" {norm} ":
            return o
    return ""


def answer(model, tokenizer, examples: list[dict], cfg) -> tuple[list[str], list[list[float] | None]]:
    """Each example's answer, the way it is scored: the most likely option (classification, multiple choice),
    else the greedy text; and the options' log-likelihoods (None for a generated answer). `cfg`: batch_size
    and max_new_tokens (of evaluate). At `score_precision()`. The model's mode is restored."""
    prec = score_precision()
    training = model.training
    model.eval()
    choice = [i for i, ex in enumerate(examples) if ex["options"]]
    free = [i for i, ex in enumerate(examples) if not ex["options"]]
    preds, scores = [""] * len(examples), [None] * len(examples)
    if choice:
        for i, s in zip(choice, score_options(model, tokenizer, [examples[i] for i in choice], cfg.batch_size, prec)):
            preds[i], scores[i] = examples[i]["options"][int(np.argmax(s))], s
    if free:
        for i, t in zip(free, generate(model, tokenizer, [examples[i] for i in free], cfg.batch_size,
                                       cfg.max_new_tokens, prec)):
            preds[i] = t
    model.train(training)
    release_memory()
    return preds, scores


def predict(model, tokenizer, examples: list[dict], cfg) -> list[str]:
    """Each example's answer (see `answer`): what evaluate, the search and the served model score."""
    return answer(model, tokenizer, examples, cfg)[0]


def correct(model, tokenizer, examples: list[dict], cfg) -> list[float]:
    """Each example's exact match (the chosen label, for classification and multiple choice): the study's
    per-example score."""
    return [M.exact_match(p, ex["completion"]) for p, ex in zip(predict(model, tokenizer, examples, cfg),
                                                               examples)]


# --- metrics ------------------------------------------------------------------------------------------------


def task_kind(examples: list[dict]) -> str:
    """classification (every example of a task has the same options: its labels), multiple_choice (options
    vary), or generation (no options)."""
    if not all(ex["options"] for ex in examples):
        return "generation"
    labels: dict[str, set] = {}
    for ex in examples:
        labels.setdefault(ex["task"], set()).add(tuple(ex["options"]))
    return "classification" if all(len(v) == 1 for v in labels.values()) else "multiple_choice"


def metric_name(setting: str, examples: list[dict]) -> str:
    """`auto` -> the task's own metric; any other setting is checked against what the examples allow."""
    kind = task_kind(examples)
    if setting == "auto":
        return {"classification": "macro_f1", "multiple_choice": "accuracy", "generation": "rouge_l"}[kind]
    if setting in ("accuracy", "macro_f1") and kind == "generation":
        from mixtune.plumbing.errors import MixtuneError

        raise MixtuneError(f"search.metric={setting}: needs options (classification or multiple choice); "
                           "these examples are generative (use exact_match, token_f1 or rouge_l)")
    return setting


class Scorer:
    """One metric over one fixed list of examples (a split of one task or a scenario of several).

    `encode(preds)` turns a system's predictions into numbers once; `value(enc, idx)` gives the scenario score
    (the unweighted mean over tasks) and each task's, on the examples `idx` (a bootstrap resample)."""

    def __init__(self, examples: list[dict], metric: str) -> None:
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}")
        self.metric, self.n = metric, len(examples)
        self.tasks = sorted({ex["task"] for ex in examples})
        self.task_of = np.array([self.tasks.index(ex["task"]) for ex in examples])
        self.golds = [ex["completion"] for ex in examples]
        if metric == "macro_f1":  # labels per task: the options of its examples
            self.labels = {t: sorted({o for ex in examples if ex["task"] == t for o in ex["options"] or [ex["completion"]]})
                           for t in self.tasks}
            self.gold_codes = np.array([self._code(ex["task"], ex["completion"]) for ex in examples])

    def _code(self, task: str, label: str) -> int:
        labels = self.labels[task]
        return labels.index(label) if label in labels else -1

    def encode(self, preds: list[str]) -> np.ndarray:
        if len(preds) != self.n:
            raise ValueError(f"{len(preds)} predictions for {self.n} examples")
        if self.metric == "macro_f1":
            return np.array([self._code(self.tasks[t], p) for t, p in zip(self.task_of, preds)])
        fn = _PER_EXAMPLE[self.metric]
        return np.array([fn(p, g) for p, g in zip(preds, self.golds)], dtype=float)

    def value(self, enc: np.ndarray, idx: np.ndarray | None = None) -> tuple[float, dict[str, float]]:
        idx = np.arange(self.n) if idx is None else idx
        per_task = {}
        for t, task in enumerate(self.tasks):
            sel = idx[self.task_of[idx] == t]
            if len(sel):
                per_task[task] = self._macro_f1(enc[sel], self.gold_codes[sel], len(self.labels[task])) \
                    if self.metric == "macro_f1" else float(enc[sel].mean())
        return float(np.mean(list(per_task.values()))), per_task

    @staticmethod
    def _macro_f1(pred: np.ndarray, gold: np.ndarray, n_labels: int) -> float:
        """metrics.macro_f1 on label codes (-1: an answer that is no label), fast enough to bootstrap."""
        hit = pred == gold
        tp = np.bincount(gold[hit], minlength=n_labels)
        fp = np.bincount(pred[~hit & (pred >= 0)], minlength=n_labels)
        fn = np.bincount(gold[~hit], minlength=n_labels)
        seen = (tp + fp + fn) > 0
        return float((2 * tp[seen] / (2 * tp + fp + fn)[seen]).mean()) if seen.any() else 0.0


def probe_scorer(probe: list[dict]) -> Scorer:
    """The forgetting probe's one scorer, the search's and evaluate's: accuracy question by question (exact match
    after normalisation: a probe question may offer both "Yes" and "yes"), one task, whatever tasks its
    questions came from, so a task with ten questions weighs ten times one with one."""
    return Scorer([{**ex, "task": "probe"} for ex in probe], "accuracy")


def compare(scorer: Scorer, systems: dict[str, list[str]], resamples: int, seed: int,
            gains: tuple[tuple[str, str], ...] = ()) -> dict:
    """Each system's score with its 95% interval and per-task scores, and each (a, b) gain a - b with its paired
    interval: every system is scored on the same resamples of the examples."""
    enc = {name: scorer.encode(p) for name, p in systems.items()}
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, scorer.n, scorer.n) for _ in range(resamples)]
    boot = {name: np.array([scorer.value(e, idx)[0] for idx in draws]) for name, e in enc.items()}
    out: dict = {"metric": scorer.metric, "n": scorer.n, "tasks": scorer.tasks}
    for name, e in enc.items():
        value, per_task = scorer.value(e)
        low, high = M.interval(boot[name])
        out[name] = {"value": value, "low": low, "high": high, "per_task": per_task}
    for a, b in gains:
        low, high = M.interval(boot[a] - boot[b])
        out[f"{a}-{b}"] = {"value": out[a]["value"] - out[b]["value"], "low": low, "high": high}
    return out
