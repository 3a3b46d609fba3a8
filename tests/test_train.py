"""train: the completion-only loss, a real run on the tiny model tracked in MLflow, a diverged run, an
interrupted run that resumes to the same result, and one-line errors for missing models."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_params
from workspace import TASK, make_mix, runs, train_config, use_store, write_prepared, write_stage_params

from mixtune.core import tune
from mixtune.plumbing.config import ModelConfig
from mixtune.plumbing.errors import MixtuneError
from mixtune.plumbing.files import sha256_file
from mixtune.stages import train

# --- the loss --------------------------------------------------------------------------------------------------


def _batch(tokenizer, seed: int = 0):
    """Right-padded rows (as TRL collates them) with prompt, completion and padding of different lengths."""
    import torch

    g = torch.Generator().manual_seed(seed)
    # (prompt length, completion length, padding) per row: completions start at different positions
    shapes = [(5, 3, 4), (9, 2, 1), (3, 6, 3), (7, 5, 0)]
    width = max(p + c + pad for p, c, pad in shapes)
    ids, mask, labels = [], [], []
    for p, c, pad in shapes:
        assert p + c + pad == width
        row = torch.randint(3, len(tokenizer), (p + c,), generator=g).tolist()
        ids.append(row + [tokenizer.pad_token_id] * pad)
        mask.append([1] * (p + c) + [0] * pad)
        labels.append([-100] * p + row[p:] + [-100] * pad)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}


def _reference_loss(model, inputs):
    """Plain causal-LM cross-entropy over every position, then masked: the definition, no shortcuts."""
    import torch

    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.float()
    logits, target = logits[:, :-1], inputs["labels"][:, 1:]
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100,
                                                  reduction="none")
    return per_token.sum(), (target != -100).sum()


@pytest.mark.parametrize("peft", [False, True], ids=["plain", "lora"])
def test_completion_loss_equals_masked_cross_entropy(tiny_model, peft):
    import torch

    from mixtune.core.model import load_base, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model))
    model = load_base(str(tiny_model))
    if peft:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 task_type="CAUSAL_LM", init_lora_weights=False))
    model.eval()
    inputs = _batch(tokenizer)
    with torch.no_grad():
        total, count = _reference_loss(model, inputs)
        assert count == 3 + 2 + 6 + 5  # every completion token, predicted from the position before it
        loss = tune.completion_loss(model, inputs)
        assert loss.item() == pytest.approx((total / count).item(), abs=1e-5)
        # With the batch's token count from the Trainer (gradient accumulation, several devices): sum / that.
        n = torch.tensor(37)
        assert tune.completion_loss(model, inputs, num_items_in_batch=n).item() == \
            pytest.approx((total / 37).item(), abs=1e-5)


def test_completion_loss_gradient_matches(tiny_model):
    """The loss trains the same: its gradient equals the reference's."""
    import torch
    from peft import LoraConfig, get_peft_model

    from mixtune.core.model import load_base, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model))
    torch.manual_seed(0)
    model = get_peft_model(load_base(str(tiny_model)), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                  task_type="CAUSAL_LM", init_lora_weights=False))
    inputs = _batch(tokenizer, seed=1)
    params = [p for p in model.parameters() if p.requires_grad]
    total, count = _reference_loss(model, inputs)
    want = torch.autograd.grad(total / count, params)
    got = torch.autograd.grad(tune.completion_loss(model, inputs), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


# --- a run, end to end -----------------------------------------------------------------------------------------


def test_train_run_end_to_end(tmp_path, monkeypatch, tiny_model):
    import numpy as np
    from mlflow import MlflowClient

    uri = use_store(monkeypatch, tmp_path)
    write_prepared(tmp_path)
    manifest = make_mix(tmp_path)
    cfg = train_config(max_steps=8, logging_steps=2, save_steps=4)
    m = train.run(cfg, ModelConfig(base=str(tiny_model)), Path("mix"), Path("train"))

    # The adapter: LoRA config and weights, and the tokenizer (with its chat template) beside them.
    adapter = tmp_path / "train" / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    assert (adapter / "tokenizer.json").is_file() and (adapter / "tokenizer_config.json").is_file()
    adapter_cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(tiny_model.resolve())  # outside the repository: absolute
    # byte-stable (the DVC hash): sorted modules, no model card holding the path
    assert adapter_cfg["target_modules"] == sorted(adapter_cfg["target_modules"])
    assert not (adapter / "README.md").exists()
    assert adapter_cfg["r"] == 4

    # loss.csv: one row per logging step.
    with open(tmp_path / "train" / "loss.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8]
    assert set(rows[0]) == {"step", "loss", "learning_rate", "grad_norm"}  # no timings in a tracked file
    losses = [float(r["loss"]) for r in rows]
    # Pinned: fp32 on a CPU in one thread, the tiny model built from seed 0, the trainer seeded (train.seed 0), so
    # run after run gives these bytes (recorded twice, alone and in the whole file). rel=1e-4 (6e-4 here) leaves
    # room for another CPU's order of summation, not for a change to the loss, the data, the LoRA setup or the
    # optimizer: the loss falls by 0.015-0.055 between logs.
    assert losses == pytest.approx([5.983005, 5.965016, 5.910176, 5.895096], rel=1e-4)

    # metrics.json
    on_disk = json.loads((tmp_path / "train" / "metrics.json").read_text())
    assert on_disk == {k: m[k] for k in ("train_loss", "final_loss", "steps", "trained_tokens")}
    assert m["steps"] == 8 and m["trained_tokens"] > 0 and m["resumed"] is False
    assert m["final_loss"] == pytest.approx(losses[-1])
    assert m["train_loss"] == pytest.approx(np.mean(losses), rel=1e-6)  # every interval is 2 steps
    assert m["tokens_per_second"] > 0 and m["train_seconds"] > 0
    # Done: the checkpoints are gone (the adapter is saved and logged).
    assert not any((tmp_path / ".cache" / "checkpoints").glob("*/checkpoint-*"))

    # The MLflow run.
    client = MlflowClient(tracking_uri=uri)
    [run] = runs(uri)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == f"mixtune/{TASK}"
    p = run.data.params
    assert p["train.lora.r"] == "4" and p["train.max_steps"] == "8" and p["train.lora.target_modules"] == "all-linear"
    assert p["mix.generalist_share"] == "0.2" and p["mix.specialist_size"] == "32" and p["mix.generalist_size"] == "8"
    assert p["model.base"] == str(tiny_model) and p["precision_used"] == "fp32"
    assert run.data.tags["mixtune.stage"] == "train"
    assert run.data.tags["mixtune.mix_sha256"] == manifest["sha256"]
    assert run.info.run_name == "train r=0.20 set, n=32"  # tells runs of other mixes apart in the UI
    assert run.data.tags["mlflow.note.content"] == (
        f"{manifest['total']} examples (32 of the task, generalist share 0.20), 8 steps: loss {m['train_loss']:.3f} "
        f"on average, {m['final_loss']:.3f} at the end; {m['tokens_per_second']:.0f} tokens/s")
    # made by a stage run: MLflow 3 opens it on its runs, not on the GenAI overview (traces, all empty)
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [h.step for h in sorted(history, key=lambda h: h.step)] == [2, 4, 6, 8]
    assert [h.value for h in sorted(history, key=lambda h: h.step)] == pytest.approx(losses)
    assert len(client.get_metric_history(run.info.run_id, "learning_rate")) == 4
    assert run.data.metrics["train_loss"] == pytest.approx(m["train_loss"])
    assert run.data.metrics["steps"] == 8
    [inp] = run.inputs.dataset_inputs
    assert inp.dataset.name == f"mix-{manifest['sha256'][:12]}"
    assert json.loads(inp.dataset.source)["uri"] == str(tmp_path / "mix" / "train.jsonl")
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "training"
    assert json.loads(inp.dataset.profile)["num_rows"] == manifest["total"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"loss.csv", "mix_manifest.json"} <= artifacts
    logged_manifest = json.loads(Path(client.download_artifacts(run.info.run_id, "mix_manifest.json",
                                                                str(tmp_path / "dl"))).read_text())
    assert logged_manifest == manifest

    # The adapter, in the run and named by its sha256 (how evaluate and register find the run).
    assert run.data.tags["mixtune.adapter_sha256"] == sha256_file(adapter / "adapter_model.safetensors")
    logged = Path(client.download_artifacts(run.info.run_id, "adapter", str(tmp_path / "dl")))
    assert sorted(p.name for p in logged.iterdir()) == sorted(p.name for p in adapter.iterdir())
    assert (logged / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()
    assert run.data.metrics["train_seconds"] == pytest.approx(m["train_seconds"])  # timings: MLflow's


def test_micro_batches_fill_the_token_budget_in_order():
    """Consecutive rows while rows x the longest of them fits the budget; a row longer than it goes alone."""
    assert tune.micro_batches([100, 120, 90, 300, 50, 40, 30, 20], 512) == [(0, 3), (3, 4), (4, 8)]
    assert tune.micro_batches([100, 120, 90, 300, 50, 40, 30, 20], 300) == [(0, 2), (2, 3), (3, 4), (4, 8)]
    assert tune.micro_batches([600, 500, 10], 512) == [(0, 1), (1, 2), (2, 3)]
    assert tune.micro_batches([64] * 8, 512) == [(0, 8)]
    assert tune.micro_batches([64] * 8, 511) == [(0, 7), (7, 8)]
    assert tune.micro_batches([], 512) == []
    assert tune.micro_batches([64] * 8, 10**6, max_rows=3) == [(0, 3), (3, 6), (6, 8)]  # scoring's batch size


def test_micro_batches_train_as_one_pass_over_the_batch(tmp_path, monkeypatch, tiny_model):
    """micro_tokens only splits each step's rows into forward/backward passes (each cut to its longest row): the
    same losses and the same adapter as the whole batch in one pass. fp32 on a CPU: only the order of the
    gradient's sums differs. Checked by breaking it: weighting each chunk by its own token count instead of the
    batch's moved the losses by up to 12, cutting one real token per chunk by 0.8."""
    from safetensors.torch import load_file

    use_store(monkeypatch, tmp_path)
    write_prepared(tmp_path)
    make_mix(tmp_path)
    lengths = {len(e["prompt"][-1]["content"]) for e in train.read_jsonl(tmp_path / "mix" / "train.jsonl")}
    assert len(lengths) > 8  # rows of different lengths: the chunks are cut to different widths
    result, spans = {}, {}
    split = tune.micro_batches

    def recorded(lengths, budget):  # the passes each step really ran
        spans.setdefault(budget, []).append(split(lengths, budget))
        return spans[budget][-1]

    monkeypatch.setattr(tune, "micro_batches", recorded)
    for budget in (10**6, 250, 1):  # the whole batch; a few rows a pass; one row a pass
        monkeypatch.chdir(tmp_path)
        cfg = train_config(max_steps=6, batch_size=8, micro_tokens=budget, logging_steps=1, save_steps=100)
        out = tmp_path / f"train-{budget}"
        m = train.run(cfg, ModelConfig(base=str(tiny_model)), Path("mix"), out)
        losses = [float(r["loss"]) for r in csv.DictReader(open(out / "loss.csv"))]
        result[budget] = m, losses, load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(s == [(0, 8)] for s in spans[10**6])
    assert any(1 < len(s) < 8 for s in spans[250])  # some passes of several rows, of different widths
    assert all(s == [(i, i + 1) for i in range(8)] for s in spans[1])
    whole_m, whole_losses, whole_w = result[10**6]
    assert len(whole_losses) == 6 and whole_losses[-1] < whole_losses[0]
    for budget in (250, 1):
        m, losses, w = result[budget]
        assert m["trained_tokens"] == whole_m["trained_tokens"]
        assert losses == pytest.approx(whole_losses, abs=1e-5)
        assert m["train_loss"] == pytest.approx(whole_m["train_loss"], abs=1e-5)
        assert all((w[k] - whole_w[k]).abs().max().item() <= 1e-5 for k in whole_w)


def test_the_heap_is_trimmed_after_every_step_and_that_moves_no_number(tmp_path, monkeypatch, tiny_model):
    """tune trims glibc's heap once a step (memory only): the same losses and adapter, bit for bit, as with
    the trim left out."""
    use_store(monkeypatch, tmp_path)
    write_prepared(tmp_path)
    make_mix(tmp_path)
    monkeypatch.chdir(tmp_path)
    trims, real = [], tune.trim_heap
    out = {}
    for name, trim in (("trimmed", lambda: (trims.append(1), real())), ("untrimmed", lambda: None)):
        monkeypatch.setattr(tune, "trim_heap", trim)
        cfg = train_config(max_steps=5, batch_size=8, logging_steps=1, save_steps=100)
        m = train.run(cfg, ModelConfig(base=str(tiny_model)), Path("mix"), tmp_path / name)
        out[name] = (m["train_loss"], (tmp_path / name / "loss.csv").read_text(),
                     (tmp_path / name / "adapter" / "adapter_model.safetensors").read_bytes())
    assert len(trims) == 5
    assert out["trimmed"] == out["untrimmed"]


def test_the_onednn_kernel_cache_is_bounded_and_a_rebuilt_kernel_trains_bit_for_bit_alike(tmp_path, tiny_model):
    """mixtune bounds oneDNN's per-shape kernel cache (memory only; a user's own setting wins): bf16 training on
    rows of varying lengths, each micro-batch a new shape, gives the same losses and adapter bytes with a cache of
    one kernel (every kernel rebuilt) as with oneDNN's default of 1024 (none rebuilt). In processes of their own:
    oneDNN reads the setting once, at its first kernel."""
    script = (
        "import json, os, sys, torch; from pathlib import Path;"
        "from mixtune.core import tune; from mixtune.core.model import load_tokenizer;"
        "from mixtune.plumbing.files import read_jsonl; sys.path.insert(0, sys.argv[2]); from workspace import train_config;"
        "torch.manual_seed(0); base = sys.argv[1];"
        "cfg = train_config(max_steps=4, batch_size=8, micro_tokens=64, logging_steps=1);"
        "t = tune.tuner(cfg, base, read_jsonl(Path('mix/train.jsonl')), Path('out'), 'bf16', load_tokenizer(base));"
        "t.train(); tune.save_adapter(t.model, t.processing_class, Path('adapter'));"
        "print(json.dumps([os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'],"
        " [e['loss'] for e in t.state.log_history if 'loss' in e]]))")
    write_prepared(tmp_path)
    make_mix(tmp_path)
    tests = str(Path(__file__).parent)
    out = {}
    for capacity in ("1", "1024", None):
        env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
        if capacity:
            env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = capacity
        env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        shutil.rmtree(tmp_path / "adapter", ignore_errors=True)
        done = subprocess.run([sys.executable, "-c", script, str(tiny_model), tests], cwd=tmp_path, env=env,
                              check=True, capture_output=True, text=True)
        seen, losses = json.loads(done.stdout.strip().splitlines()[-1])
        out[capacity] = seen, losses, (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    assert out[None][0] == "64" and out["1"][0] == "1" and out["1024"][0] == "1024"
    assert len(out["1"][1]) == 4
    assert out["1"][1:] == out["1024"][1:] == out[None][1:]


def test_nan_loss_fails_the_run(tmp_path, monkeypatch, tiny_model):
    """A learning rate of 1e30 blows the weights up after the first update: the loss goes NaN for real."""
    uri = use_store(monkeypatch, tmp_path)
    write_prepared(tmp_path)
    make_mix(tmp_path)
    cfg = train_config(learning_rate=1e30, max_steps=8, logging_steps=2, warmup_ratio=0.0)
    with pytest.raises(MixtuneError, match=r"(?i)training loss is (nan|-?inf) at step \d+; lower train.learning_rate"):
        train.run(cfg, ModelConfig(base=str(tiny_model)), Path("mix"), Path("train"))
    [run] = runs(uri)
    assert run.info.status == "FAILED"
    assert not (tmp_path / "train").exists()  # no adapter, loss.csv or metrics from a diverged run


# --- interrupted and resumed -----------------------------------------------------------------------------------


RESUME_STEPS = 40  # ~2 s of training: time enough to interrupt it after its first checkpoint


def _spawn(cwd: Path, uri: str, log: str) -> subprocess.Popen:
    # One thread, as in this process (conftest's tiny_model): the same arithmetic as the in-process runs.
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}
    out, err = open(cwd / f"{log}.out", "w"), open(cwd / f"{log}.err", "w")  # files: no pipe to fill up
    return subprocess.Popen([sys.executable, "-m", "mixtune.cli", "--params", "params.yaml", "train"], cwd=cwd,
                            env=env, stdout=out, stderr=err, text=True)


def _checkpoint_steps(root: Path) -> list[int]:
    return sorted(int(p.name.rsplit("-", 1)[1]) for p in root.glob(".cache/checkpoints/*/checkpoint-*"))


def _interrupted_step(root: Path, out: str) -> int:
    step = int(re.search(r"train: interrupted at step (\d+); checkpoint saved, re-run to resume", out).group(1))
    assert step in _checkpoint_steps(root)  # the step it stopped at was saved
    assert not (root / "train").exists()  # and nothing half-done was written
    return step


def _ctrl_c_after_checkpoint(monkeypatch, newer_than: int) -> None:
    """Make the next in-process run send itself SIGINT (a real signal, through the stage's own handler) when it
    saves a checkpoint beyond step `newer_than`: exactly what Ctrl-C does, with no race against the run's end."""
    from transformers import TrainerCallback

    callbacks = tune._callbacks

    class CtrlC(TrainerCallback):
        sent = False

        def on_save(self, args, state, control, **kw):
            if not self.sent and state.global_step > newer_than:
                self.sent = True
                os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(tune, "_callbacks", lambda *a, **kw: [*callbacks(*a, **kw), CtrlC()])


def test_sigterm_then_sigint_then_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch, cli, tiny_model):
    from mlflow import MlflowClient
    from safetensors.torch import load_file

    cfg = train_config(max_steps=RESUME_STEPS, logging_steps=2, save_steps=2)
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        root.mkdir()
        write_prepared(root)
        make_mix(root)
        write_stage_params(root / "params.yaml", tiny_model, cfg)
    uri = use_store(monkeypatch, tmp_path)
    monkeypatch.chdir(a)

    # SIGTERM (what `dvc exp`, a scheduler or `kill` sends) to `mixtune train` after its first checkpoint:
    # exit 130 with one line, no traceback; the MLflow run KILLED.
    proc = _spawn(a, uri, "term")
    deadline = time.monotonic() + 300
    while not _checkpoint_steps(a):
        assert proc.poll() is None, f"train exited (rc {proc.returncode}) before a checkpoint"
        assert time.monotonic() < deadline, "no checkpoint in 300 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130
    out, err = (a / "term.out").read_text(), (a / "term.err").read_text()
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "mixtune train: interrupted"
    first = _interrupted_step(a, out)
    assert first < RESUME_STEPS

    # Ctrl-C (SIGINT) during the resumed run, after it saves a newer checkpoint: exit 130 again, run KILLED.
    with monkeypatch.context() as mp:
        _ctrl_c_after_checkpoint(mp, newer_than=first)
        rc, out, err = cli("--params", "params.yaml", "train")
    assert rc == 130 and err.strip().splitlines()[-1] == "mixtune train: interrupted"
    assert re.search(r"train: resuming from \S+checkpoint-%d\b" % first, out)
    second = _interrupted_step(a, out)
    assert first < second < RESUME_STEPS

    # The re-run resumes from there and finishes.
    rc, out, err = cli("--params", "params.yaml", "train")
    assert rc == 0, err[-2000:]
    assert re.search(r"train: resuming from \S+checkpoint-%d\b" % second, out)
    assert f"train: {RESUME_STEPS} steps" in out
    assert [r.info.status for r in runs(uri)] == ["KILLED", "KILLED", "FINISHED"]

    # The same config, uninterrupted, in another folder.
    monkeypatch.chdir(b)
    train.run(cfg, ModelConfig(base=str(tiny_model)), Path("mix"), Path("train"))

    ma, mb = (json.loads((r / "train" / "metrics.json").read_text()) for r in (a, b))
    run_a, run_b = runs(uri)[2:]  # the resumed run, then the uninterrupted one
    assert run_a.data.metrics["resumed"] == 1.0 and run_b.data.metrics["resumed"] == 0.0  # MLflow's, not tracked
    assert ma["steps"] == mb["steps"] == RESUME_STEPS
    assert ma["trained_tokens"] == mb["trained_tokens"]
    # fp32 on a CPU, one thread, the same seed, and the checkpoint restores the sampler and RNG states, the
    # optimizer and the scheduler: the resumed run is the same computation, bit for bit in practice (measured:
    # identical). 1e-6 allows only a different reduction order; a resume that replayed or skipped a batch or
    # restarted the schedule moves these by more than 1e-3.
    assert ma["train_loss"] == pytest.approx(mb["train_loss"], abs=1e-6)  # the mean over ALL the steps
    assert ma["final_loss"] == pytest.approx(mb["final_loss"], abs=1e-6)
    wa, wb = (load_file(r / "train" / "adapter" / "adapter_model.safetensors") for r in (a, b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] - wb[k]).abs().max().item() <= 1e-6, k

    # The resumed run's curve and its MLflow history cover the whole training (from the checkpoints' history).
    ra, rb = (list(csv.DictReader(open(r / "train" / "loss.csv"))) for r in (a, b))
    steps_a, steps_b = [int(r["step"]) for r in ra], [int(r["step"]) for r in rb]
    assert set(steps_b) <= set(steps_a) and steps_a == sorted(steps_a) and steps_a[-1] == RESUME_STEPS
    assert {first, second} <= set(steps_a)  # the interrupted steps were logged before their checkpoint
    assert float(ra[-1]["loss"]) == pytest.approx(float(rb[-1]["loss"]), abs=1e-6)
    history = MlflowClient(tracking_uri=uri).get_metric_history(run_a.info.run_id, "loss")
    assert sorted(h.step for h in history) == steps_a


# --- one-line errors -------------------------------------------------------------------------------------------


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("what", ["absent", "not a model"])
def test_missing_base_model_is_one_line(tmp_path, monkeypatch, cli, tiny_model, what):
    use_store(monkeypatch, tmp_path)
    write_prepared(tmp_path)
    make_mix(tmp_path)
    base = tmp_path / "models" / "nowhere"
    if what == "not a model":
        base.mkdir(parents=True)
    write_params(tmp_path / "params.yaml", model={"base": str(base)}, train=train_config().model_dump())
    rc, out, err = cli("--params", tmp_path / "params.yaml", "train")
    assert rc == 1 and out == ""
    line = _one_line(err)
    assert line.startswith("mixtune train: error: ") and str(base) in line
    assert ("no such model folder" if what == "absent" else "not a model folder (no config.json)") in line
    # Checked before a run is opened: nothing to record in MLflow.
    assert not (tmp_path / "mlruns").exists()


def test_missing_adapter_is_one_line(tmp_path, monkeypatch, cli, tiny_model):
    use_store(monkeypatch, tmp_path)
    write_prepared(tmp_path)
    make_mix(tmp_path)
    write_stage_params(tmp_path / "params.yaml", tiny_model, evaluate={"bootstrap": 100}, search={})
    rc, out, err = cli("--params", tmp_path / "params.yaml", "evaluate")
    assert rc == 1 and out == ""
    line = _one_line(err)
    assert line == ("mixtune evaluate: error: train/adapter: not an adapter folder (no adapter_config.json); "
                    "run the train stage")



# --- data parallel: the shipped DDP configuration, on two CPU processes -----------------------------------------


def test_ddp_on_two_cpu_processes_trains_as_one_process_with_the_same_global_batch(tmp_path, monkeypatch, tiny_model):
    """`accelerate launch --config_file configs/accelerate/ddp.yaml` (gloo on a CPU: --mixed_precision no) runs
    the train stage as two ranks of batch 4: one MLflow run, one adapter (rank 0's), and the computation of one
    process with batch 8. Accelerate splits each global batch of the same seeded order across the ranks, and
    the loss is normalised by the global count of completion tokens, so only the all-reduce's summation order
    differs: measured identical to 1e-6 per step; 1e-4 is 100x that."""
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    for root in (ddp, single):
        write_prepared(root)
        make_mix(root, generalist_share=0.2)
    cfg = {"max_steps": -1, "epochs": 2, "logging_steps": 1, "save_steps": 100, "group_by_length": False}
    write_stage_params(ddp / "params.yaml", tiny_model, train_config(batch_size=4, **cfg))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"sqlite:///{ddp}/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
                           str(Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "ddp.yaml"),
                           "--mixed_precision", "no", "--main_process_port", str(port),
                           "-m", "mixtune.stages.train"], cwd=ddp, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("train: 10 steps") == 2  # both ranks trained: 40 examples x 2 epochs / (2 x 4)

    uri_single = use_store(monkeypatch, single)
    one = train.run(train_config(batch_size=8, **cfg), ModelConfig(base=str(tiny_model)), Path("mix"), Path("train"))
    [run] = runs(uri)  # rank 0 alone tracks
    assert run.info.status == "FINISHED" and len(runs(uri_single)) == 1
    md, ms = (json.loads((r / "train" / "metrics.json").read_text()) for r in (ddp, single))
    assert md["steps"] == ms["steps"] == one["steps"] == 10
    assert md["trained_tokens"] == ms["trained_tokens"]  # every example trained on, once per epoch
    assert run.data.metrics["trained_tokens"] == md["trained_tokens"]
    curves = [[float(r["loss"]) for r in csv.DictReader(open(root / "train" / "loss.csv"))] for root in (ddp, single)]
    assert len(curves[0]) == len(curves[1]) == 10 and curves[0] != [curves[0][0]] * 10
    assert curves[0] == pytest.approx(curves[1], abs=1e-4)
    from safetensors.torch import load_file

    wd, ws = (load_file(r / "train" / "adapter" / "adapter_model.safetensors") for r in (ddp, single))
    assert wd.keys() == ws.keys() and all((wd[k] - ws[k]).abs().max().item() <= 1e-4 for k in wd)


def test_a_saved_adapter_is_the_same_bytes_in_any_clone_and_process(tmp_path, tiny_model):
    """Two clones (different absolute paths), each saving the same weights in a process of its own hash seed:
    the same files, so the same DVC hash; the base inside the repository is named relative to it."""
    script = (
        "import sys, torch; from pathlib import Path; from peft import LoraConfig, get_peft_model;"
        "from mixtune.core.model import load_base, load_tokenizer; from mixtune.core.tune import save_adapter;"
        "torch.manual_seed(0); base = str(Path('models/tiny').resolve());"
        "m = get_peft_model(load_base(base), LoraConfig(r=4, lora_alpha=8, target_modules='all-linear',"
        " task_type='CAUSAL_LM', init_lora_weights=False));"
        "save_adapter(m, load_tokenizer(base), Path('adapter'))")
    files = []
    for clone, seed in (("a", "1"), ("b", "2")):
        root = tmp_path / clone
        shutil.copytree(tiny_model, root / "models" / "tiny")
        env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        subprocess.run([sys.executable, "-c", script], cwd=root, env=env, check=True, capture_output=True)
        files.append({p.name: p.read_bytes() for p in sorted((root / "adapter").iterdir())})
    assert files[0] == files[1] and "adapter_model.safetensors" in files[0]
    assert json.loads(files[0]["adapter_config.json"])["base_model_name_or_path"] == "models/tiny"


def test_a_trained_model_is_scored_as_evaluate_scores_its_saved_adapter(tmp_path, monkeypatch, tiny_model):
    """Trained in bf16, the model's forward runs under accelerate's autocast wrapper; `tune.scoring` goes
    around it, so a search trial's or a study cell's scores are those evaluate gives the saved adapter (fp32),
    and training keeps the wrapper."""
    import mlflow
    from conftest import section

    from mixtune.core import score
    from mixtune.core.model import load_adapter, load_base, load_tokenizer
    from mixtune.plumbing.files import read_jsonl

    use_store(monkeypatch, tmp_path)
    write_prepared(tmp_path)
    make_mix(tmp_path)
    examples = read_jsonl(tmp_path / "mix" / "train.jsonl")
    scored = [ex for ex in examples if ex["options"]][:6]
    assert len(scored) == 6
    tokenizer = load_tokenizer(str(tiny_model))
    trainer = tune.tuner(train_config(max_steps=4), str(tiny_model), examples, tmp_path / "out", "bf16", tokenizer)
    with mlflow.start_run():  # the tuner logs its per-step loss into the active run, as a search trial's
        trainer.train()
    cfg = section("evaluate", batch_size=4)
    wrapped = trainer.model.forward
    through_wrapper = score.answer(trainer.model, tokenizer, scored, cfg)[1]
    with tune.scoring(trainer.model) as model:
        around = score.answer(model, tokenizer, scored, cfg)[1]
    assert trainer.model.forward == wrapped  # training goes on under autocast
    tune.save_adapter(trainer.model, tokenizer, tmp_path / "adapter")
    saved = load_adapter(load_base(str(tiny_model)), tmp_path / "adapter").eval()
    as_evaluated = score.answer(saved, tokenizer, scored, cfg)[1]
    for a, e in zip(around, as_evaluated):
        assert a == pytest.approx(e, abs=1e-5)
    # what the search scored before: bf16's log-likelihoods
    assert max(abs(x - y) for w, e in zip(through_wrapper, as_evaluated) for x, y in zip(w, e)) > 1e-4


def test_bf16_training_holds_no_page_of_the_checkpoint(tmp_path, monkeypatch, tiny_model):
    """from_pretrained maps the checkpoint file; with bf16 held weights, no parameter stays in that mapping, so the
    fp32 Linear weights that casting read are not resident through training (the search's peak), and scoring
    maps the file only while it scores. Checked by breaking it: without the clone of the other frozen weights
    the mapping stays."""
    import gc
    import shutil

    from mixtune.core.model import load_tokenizer
    from mixtune.plumbing.files import read_jsonl

    model = shutil.copytree(tiny_model, tmp_path / "model")  # a path no other test's model maps
    checkpoint = str(model / "model.safetensors")

    def mapped() -> bool:
        gc.collect()
        return checkpoint in Path("/proc/self/maps").read_text()

    use_store(monkeypatch, tmp_path)
    write_prepared(tmp_path)
    make_mix(tmp_path)
    trainer = tune.tuner(train_config(max_steps=1), str(model), read_jsonl(tmp_path / "mix" / "train.jsonl"),
                         tmp_path / "out", "bf16", load_tokenizer(str(model)))
    assert not mapped()
    with tune.scoring(trainer.model):
        assert mapped()
    assert not mapped()
    fp32 = tune.tuner(train_config(max_steps=1), str(model), read_jsonl(tmp_path / "mix" / "train.jsonl"),
                      tmp_path / "out32", "fp32", load_tokenizer(str(model)))
    assert mapped()  # the fp32 weights are the file's pages: nothing to hold twice
    del fp32


def test_frozen_weights_held_in_bf16_train_bit_for_bit_like_autocast(tmp_path, monkeypatch, tiny_model):
    """bf16 on a CPU holds the frozen Linear weights in bf16 (autocast's rounding, done once instead of at every
    use): the same losses and the same adapter, bit for bit, as autocast over fp32 weights, and a search trial
    scores in fp32 with the original weights. Exact equality is the justified tolerance: both paths multiply
    the same bf16 numbers. Checked by breaking it: casting the tied embedding too moved the losses."""
    import torch

    from mixtune.core.model import load_base, load_tokenizer
    from mixtune.plumbing.files import read_jsonl

    use_store(monkeypatch, tmp_path)
    write_prepared(tmp_path)
    make_mix(tmp_path)
    examples = read_jsonl(tmp_path / "mix" / "train.jsonl")
    tokenizer = load_tokenizer(str(tiny_model))
    cfg = train_config(max_steps=6, batch_size=8, micro_tokens=128, logging_steps=1)
    original = load_base(str(tiny_model)).state_dict()
    runs_ = {}
    for held in (True, False):
        torch.manual_seed(0)
        trainer = tune.tuner(cfg, str(tiny_model), examples, tmp_path / f"out-{held}", "bf16", tokenizer)
        base, weights = trainer.model.__dict__[tune.BF16_HELD]
        linear = trainer.model.base_model.model.model.layers[0].mlp.down_proj.base_layer.weight
        assert base == str(tiny_model)
        assert len(weights) == 7 * len(trainer.model.base_model.model.model.layers)  # the 7 projections a layer
        assert linear.dtype == torch.bfloat16
        assert all(bf16.dtype == torch.bfloat16 for _, _, bf16 in weights)  # no fp32 copy kept through training
        assert trainer.model.get_input_embeddings().weight.dtype == torch.float32  # tied to the LM head: kept
        if not held:  # autocast over the fp32 weights, as before
            for w, name, _ in weights:
                w.data = original[name]
            trainer.model.__dict__[tune.BF16_HELD] = (base, [])
        trainer.train()
        with tune.scoring(trainer.model) as model:
            scored = model.base_model.model.model.layers[0].mlp.down_proj.base_layer.weight
            assert torch.equal(scored, original["model.layers.0.mlp.down_proj.weight"])  # the base's fp32, read again
        assert linear.dtype == (torch.bfloat16 if held else torch.float32)  # and what training holds after it
        lora = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}
        runs_[held] = [e["loss"] for e in trainer.state.log_history if "loss" in e], lora
    (held_losses, held_lora), (plain_losses, plain_lora) = runs_[True], runs_[False]
    assert len(held_losses) == 6 and held_losses[-1] < held_losses[0]
    assert held_losses == plain_losses
    assert all(torch.equal(held_lora[k], plain_lora[k]) for k in plain_lora)


def test_training_recomputes_attention_scores_and_that_moves_no_number(tmp_path, monkeypatch, tiny_model):
    """On a CPU a training pass keeps no attention probabilities (rows x heads x length^2, the largest part of a
    long row's pass): its backward recomputes them. The same losses and adapter, bit for bit, as eager attention
    that keeps them; scoring (no gradients) is eager attention's. Checked by breaking it: keeping the
    probabilities saves the (length x length) tensors this test counts."""
    import torch

    from mixtune.core.model import EAGER_RECOMPUTED, load_base, load_tokenizer
    from mixtune.plumbing.files import read_jsonl

    use_store(monkeypatch, tmp_path)
    write_prepared(tmp_path)
    make_mix(tmp_path)
    examples = read_jsonl(tmp_path / "mix" / "train.jsonl")
    tokenizer = load_tokenizer(str(tiny_model))
    model = load_base(str(tiny_model))
    assert model.config._attn_implementation == EAGER_RECOMPUTED
    layers, length = model.config.num_hidden_layers, 24
    ids = torch.randint(0, model.config.vocab_size, (2, length))

    def square_saved(m) -> int:  # tensors kept for backward shaped (rows, heads, length, length): not the mask
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
            m(input_ids=ids, labels=ids).loss.backward()
        return sum(1 for s in saved if s == (2, model.config.num_attention_heads, length, length))

    model.train()
    assert square_saved(model) == 0
    model.set_attn_implementation("eager")
    assert square_saved(model) >= layers  # the probabilities, a tensor or more a layer
    model.set_attn_implementation(EAGER_RECOMPUTED)
    model.eval()
    with torch.no_grad():
        recomputed = model(input_ids=ids).logits
        model.set_attn_implementation("eager")
        assert torch.equal(recomputed, model(input_ids=ids).logits)

    cfg = train_config(max_steps=6, batch_size=8, micro_tokens=128, logging_steps=1)
    runs_ = {}
    for attn in (EAGER_RECOMPUTED, "eager"):
        torch.manual_seed(0)
        trainer = tune.tuner(cfg, str(tiny_model), examples, tmp_path / f"out-{attn}", "bf16", tokenizer)
        trainer.model.set_attn_implementation(attn)
        trainer.train()
        lora = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}
        runs_[attn] = [e["loss"] for e in trainer.state.log_history if "loss" in e], lora
    (losses, lora), (eager_losses, eager_lora) = runs_[EAGER_RECOMPUTED], runs_["eager"]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert losses == eager_losses
    assert all(torch.equal(lora[k], eager_lora[k]) for k in eager_lora)
