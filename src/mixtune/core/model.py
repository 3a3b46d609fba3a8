"""Loading the base model, the tokenizer and an adapter; the device and precision they run at."""

from __future__ import annotations

import os
from pathlib import Path

from mixtune.plumbing.errors import MixtuneError, first_line

# oneDNN (bf16 matmuls on a CPU) compiles and caches a kernel, with its buffers, per input shape, and evicts one
# only past 1024 of them by default; training rows of varying lengths make a new shape nearly every micro-batch. The
# r=0.9 mix, 40 steps: 1,956 MB resident after a step and 3,466 MB peak with the default, 1,637 and 2,946 MB
# with 64, at the same speed (a kernel compiles in about a millisecond) and the same losses; a kernel rebuilt is
# the same kernel (test_train). Read by oneDNN at its first kernel, so set here, before any model loads; a
# user's own setting wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")


def resolve_base(base: str) -> str:
    """A local folder becomes absolute (PEFT and MLflow store the path as given); anything else is a hub id."""
    from mixtune.plumbing.tracking import repo_root

    path = Path(base)
    if not path.is_absolute() and not path.exists() and (repo_root() / path).exists():
        path = repo_root() / path  # `dvc exp run --temp` runs in a copy without the (git-ignored) model folder
    if path.exists():
        if not (path / "config.json").is_file():
            raise MixtuneError(f"{base}: model.base: not a model folder (no config.json)")
        return str(path.resolve())
    if base.startswith((".", "/")) or base.count("/") != 1 or base.startswith("models/"):
        raise MixtuneError(f"{base}: model.base: no such model folder (run `mixtune fetch` for the default)")
    return base


def cpu_has_bf16() -> bool:
    """bf16 autocast is ~1.5x faster than fp32 on CPUs with native bf16 (AVX512-BF16 or AMX); slower elsewhere."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def train_precision(choice: str) -> str:
    """What training computes in (train.precision): 'bf16', 'fp16' or 'fp32' for this machine; 'auto' takes
    bf16 where the hardware has it."""
    import torch

    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise MixtuneError(f"{path}: cannot load tokenizer: {first_line(e)}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def chat_tokens(tokenizer, conversations: list[list[dict]], *, add_generation_prompt: bool = False) -> list[int]:
    """The length in tokens of each conversation through the tokenizer's chat template: with the answer, what
    TRL's SFTTrainer tokenizes and truncates at train.max_length (test_prepare checks it against the trainer);
    with `add_generation_prompt`, a prompt as scoring and serving feed it."""
    out: list[int] = []
    for i in range(0, len(conversations), 1024):  # in chunks: the pool's token ids at once took 1.3 GB
        texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=add_generation_prompt)
                 for c in conversations[i : i + 1024]]
        out += [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return out


def with_answer(example: dict) -> list[dict]:
    return [*example["prompt"], {"role": "assistant", "content": example["completion"]}]


EAGER_RECOMPUTED = "mixtune_eager"  # the model's eager attention; in training, its scores recomputed in backward


def _eager_recomputed(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """The model's own eager attention, whose scores a training pass recomputes in its backward instead of
    keeping them: eager attention keeps each layer's probabilities for its backward, in fp32 and in bf16 (rows x
    heads x length^2: 14 MB a layer for a 512-token row, 0.4 GB over SmolLM2's 30), the largest part of a long
    row's pass. Recomputed, they live one layer at a time. The same kernels on the same shapes: the losses and the
    adapter are bit for bit the same (test_train). Its price is time: r=0.9, 25 steps, two alternating pairs
    (bench_memory --attention-only), peak 2,700 -> 2,352 MB and 162 -> 181 s, 12% slower (docs/performance.md).
    Without gradients (scoring, serving) it is eager attention."""
    import sys

    import torch
    from torch.utils.checkpoint import checkpoint

    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise MixtuneError(f"{type(module).__name__}: no eager attention in {type(module).__module__}; "
                           "mixtune trains on a CPU with the model's own eager attention")
    if not (torch.is_grad_enabled() and module.training):
        return eager(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    out = checkpoint(lambda q, k, v, m: eager(module, q, k, v, m, scaling, dropout, **kwargs)[0],
                     query, key, value, attention_mask, use_reentrant=False)
    return out, None  # no probabilities to return: they are what is not kept


def _registered(name: str) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(name, _eager_recomputed)
    AttentionMaskInterface.register(name, eager_mask)  # the masks eager attention gets
    return name


def load_base(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    # On a CPU, eager attention: SDPA's flash kernel took 16% of a training step in its backward alone, and
    # steps ran 2.1-2.2 s eager against 2.55 s (default task, micro-batch 2); scoring costs the same either way.
    # One implementation for training, the search's scoring, evaluate and serving: their scores agree.
    # In training, its scores are recomputed in backward rather than kept (`_eager_recomputed`).
    attn = {} if torch.cuda.is_available() else {"attn_implementation": _registered(EAGER_RECOMPUTED)}
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **attn)
    except (OSError, ValueError) as e:
        raise MixtuneError(f"{path}: cannot load base model: {first_line(e)}") from None


def adapter_file(adapter_dir: Path) -> Path:
    """The adapter's weights: their sha256 names the adapter (register's versions, the runs that made it)."""
    return adapter_dir / "adapter_model.safetensors"


def require_adapter(adapter_dir: Path) -> None:
    if not (adapter_dir / "adapter_config.json").is_file():
        raise MixtuneError(f"{adapter_dir}: not an adapter folder (no adapter_config.json); run the train stage")


def load_adapter(base_model, adapter_dir: Path):
    from peft import PeftModel

    require_adapter(adapter_dir)
    try:
        return PeftModel.from_pretrained(base_model, str(adapter_dir))
    except Exception as e:  # corrupt weights or a mismatched base model
        raise MixtuneError(f"{adapter_dir}: cannot load adapter: {first_line(e)}") from None


def release_memory() -> None:
    """Hand the heap that training or scoring freed back to the system. PyTorch's CPU tensors come from glibc's
    malloc, which keeps freed chunks under its (dynamic, up to 32 MB) mmap threshold for reuse: measured on the
    default, a search trial's process held 6.5 GB after training and 3.9 GB after scoring 48 dev articles while
    1.5 GB was live (`malloc_trim` brought it back each time, in 0.3 s). Elsewhere than glibc: nothing to do."""
    import gc

    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """glibc's free pages back to the system (`malloc_trim`), without a garbage collection."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass



def micro_batches(lengths: list[int], budget: int, max_rows: int | None = None) -> list[tuple[int, int]]:
    """Consecutive spans [i, j) of rows, each as many rows as fit `budget` padded tokens (rows x the longest of
    them) and at most `max_rows`, at least one row each: a forward pass's activations scale with its padded
    tokens, so a budget in tokens bounds memory whatever the rows' lengths (training's passes, scoring's
    batches)."""
    spans, i = [], 0
    while i < len(lengths):
        j, longest = i + 1, lengths[i]
        while (j < len(lengths) and (max_rows is None or j - i < max_rows)
               and (j + 1 - i) * max(longest, lengths[j]) <= budget):
            longest = max(longest, lengths[j])
            j += 1
        spans.append((i, j))
        i = j
    return spans
