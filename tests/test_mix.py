"""mix: exact counts from the ratio semantics, the manifest, determinism, sampling without replacement."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import pytest
from conftest import prepared_dir

from mixtune.plumbing.config import MixConfig
from mixtune.stages import mix


@pytest.fixture
def prepared(tmp_path):
    # 300 specialist examples in two tasks (a scenario), a generalist pool of 500 in five tasks.
    return prepared_dir(tmp_path, 300, 500, spec_tasks=("topic", "sentiment"))


def run(prepared, out, **cfg) -> tuple[dict, list[dict]]:
    manifest = mix.run(MixConfig(**{"seed": 0, "corrupt_generalist": 0.0, **cfg}), prepared, out)
    lines = (out / "train.jsonl").read_bytes().splitlines()
    return manifest, [json.loads(line) for line in lines]


@pytest.mark.parametrize("n_s, share, n_g", [(300, 0.25, 100), (256, 0.5, 256), (100, 0.2, 25), (10, 0.0, 0),
                                             (3, 0.9, 27), (1, 0.5, 1)])
def test_generalist_count(n_s, share, n_g):
    assert mix.generalist_count(n_s, share) == n_g
    assert n_g / (n_s + n_g) == pytest.approx(share, abs=0.5 / (n_s + n_g))  # share of the FINAL set


def test_share_025_of_300_gives_100_generalist(tmp_path, prepared):
    manifest, examples = run(prepared, tmp_path / "mix", specialist_size=300, generalist_share=0.25, seed=5)
    assert len(examples) == 400
    assert Counter(ex["source"] for ex in examples) == {"spec": 300, "gen": 100}
    assert manifest["specialist_size"] == 300 and manifest["generalist_size"] == 100 and manifest["total"] == 400
    assert manifest["generalist_share"] == 0.25 and manifest["seed"] == 5
    assert manifest["by_source"] == {"gen": 100, "spec": 300}
    assert manifest["by_task"] == dict(sorted(Counter(ex["task"] for ex in examples).items()))
    assert manifest["by_task"]["topic"] + manifest["by_task"]["sentiment"] == 300
    assert sum(manifest["by_task"].values()) == 400
    assert manifest["sha256"] == hashlib.sha256((tmp_path / "mix" / "train.jsonl").read_bytes()).hexdigest()
    assert json.loads((tmp_path / "mix" / "manifest.json").read_text()) == manifest
    # Interleaved, not specialist-then-generalist.
    sources = [ex["source"] for ex in examples]
    assert sources != sorted(sources) and sources != sorted(sources, reverse=True)


def test_share_0_is_pure_specialist(tmp_path, prepared):
    manifest, examples = run(prepared, tmp_path / "mix", specialist_size=120, generalist_share=0.0)
    assert len(examples) == 120 and {ex["source"] for ex in examples} == {"spec"}
    assert manifest["generalist_size"] == 0 and manifest["total"] == 120
    assert manifest["by_source"] == {"spec": 120}


def test_without_replacement(tmp_path, prepared):
    # The whole train split plus the whole pool: every example exactly once.
    _, examples = run(prepared, tmp_path / "mix", specialist_size=300, generalist_share=0.625)
    ids = [ex["id"] for ex in examples]
    assert len(ids) == 800 and len(set(ids)) == 800
    assert set(ids) == {f"spec/{i}" for i in range(300)} | {f"gen/{i}" for i in range(500)}
    _, examples = run(prepared, tmp_path / "mix2", specialist_size=150, generalist_share=0.4)
    ids = [ex["id"] for ex in examples]
    assert len(ids) == 250 and len(set(ids)) == 250


def test_lines_are_copied_verbatim(tmp_path, prepared):
    _, examples = run(prepared, tmp_path / "mix", specialist_size=50, generalist_share=0.5)
    source_lines = set((prepared / "specialist" / "train.jsonl").read_bytes().splitlines())
    source_lines |= set((prepared / "generalist.jsonl").read_bytes().splitlines())
    assert set((tmp_path / "mix" / "train.jsonl").read_bytes().splitlines()) <= source_lines


def test_same_seed_same_bytes_other_seed_other_mix(tmp_path, prepared):
    cfg = {"specialist_size": 200, "generalist_share": 0.3}
    a, _ = run(prepared, tmp_path / "a", seed=1, **cfg)
    b, _ = run(prepared, tmp_path / "b", seed=1, **cfg)
    c, _ = run(prepared, tmp_path / "c", seed=2, **cfg)
    for name in ("train.jsonl", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert a["sha256"] == b["sha256"] != c["sha256"]
    assert (tmp_path / "a/train.jsonl").read_bytes() != (tmp_path / "c/train.jsonl").read_bytes()


def test_rerun_replaces_the_previous_mix(tmp_path, prepared):
    run(prepared, tmp_path / "mix", specialist_size=100, generalist_share=0.5)
    (tmp_path / "mix" / "stale.txt").write_text("left over")
    manifest, examples = run(prepared, tmp_path / "mix", specialist_size=10, generalist_share=0.0)
    assert len(examples) == 10 and manifest["total"] == 10
    assert sorted(p.name for p in (tmp_path / "mix").iterdir()) == ["manifest.json", "train.jsonl"]
