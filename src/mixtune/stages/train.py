"""train: TRL SFTTrainer + a PEFT LoRA adapter on the mix; loss on the completion only.

Outputs: train/adapter/ (adapter + tokenizer), train/loss.csv (DVC plot), train/metrics.json (DVC metrics: what
was trained, no timings: those go to MLflow, so a re-run that trains the same changes no tracked file). The
stage's MLflow run carries the adapter (artifacts under adapter/) and its sha256 as a tag, by which evaluate
and register find it.
Checkpoints go to .cache/checkpoints/<key of inputs and params>: DVC deletes a stage's outputs before it runs,
so they live outside them, and a re-run after an interruption resumes from the last one.
When a search trial already trained this exact mix with this config and code (mixtune.trial), the stage takes
its adapter, loss curve and metrics instead of training them again, and says so in its log and MLflow run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from mixtune.core.model import adapter_file, load_tokenizer, resolve_base, train_precision
from mixtune.core.tune import FLOP_PER_PARAM_TOKEN, Stop, dataset_tokens, trained_tokens, tuner
from mixtune.plumbing import entry
from mixtune.plumbing.config import ModelConfig, TrainConfig
from mixtune.plumbing.errors import MixtuneError
from mixtune.plumbing.files import read_jsonl, sha256_file
from mixtune.plumbing.tracking import ADAPTER_TAG, REUSED_TAG, Timer, log_dataset, mix_label, stage_run


def checkpoint_key(cfg: TrainConfig, model: ModelConfig, mix_sha: str) -> str:
    blob = json.dumps([cfg.model_dump(), model.model_dump(), mix_sha], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run(cfg: TrainConfig, model_cfg: ModelConfig, mix_dir: Path = Path("mix"), out: Path = Path("train"),
        checkpoints: Path = Path(".cache/checkpoints"), reuse: bool = True) -> dict:
    """`reuse`: take a search trial's outputs when one trained exactly this (mixtune.trial); False retrains."""
    from mixtune.core import trial

    manifest_path = mix_dir / "manifest.json"
    if not manifest_path.is_file():
        raise MixtuneError(f"{manifest_path}: no such file (run the mix stage first)")
    manifest = json.loads(manifest_path.read_text())
    base = resolve_base(model_cfg.base)
    prec = train_precision(cfg.precision)
    timer = Timer()
    params = {"model": model_cfg.model_dump(), "train": cfg.model_dump(),
              "mix": {k: manifest[k] for k in ("specialist_size", "generalist_share", "generalist_size", "seed")},
              "precision_used": prec}
    tags = {"mixtune.mix_sha256": manifest["sha256"]}
    hit = trial.cached(trial.key(cfg, model_cfg, manifest["sha256"], prec)) if reuse else None

    with Stop() as stop, stage_run("train", manifest["specialist_tasks"], params, tags, timer,
                                          label=mix_label(manifest)) as mlrun:
        t0 = time.perf_counter()
        import mlflow

        examples = read_jsonl(mix_dir / "train.jsonl")
        main = mlrun is not None  # rank 0 under `accelerate launch`; the other ranks only train
        if main:
            with timer():
                log_dataset(examples, mix_dir / "train.jsonl", f"mix-{manifest['sha256'][:12]}", "training")
        if hit is not None and main:
            meta = trial.take(hit, out)
            metrics = json.loads((out / "metrics.json").read_text())
            note = (f"reused {meta['by']}: it trained this mix (sha256 {manifest['sha256'][:12]}) with this "
                    "training config and code, so its adapter is this stage's, not retrained")
            print(f"train: {note}")
            with timer():
                mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None})
                mlflow.log_dict(manifest, "mix_manifest.json")
                mlflow.log_artifact(str(out / "loss.csv"))
                mlflow.log_artifacts(str(out / "adapter"), "adapter")
                mlflow.set_tags({ADAPTER_TAG: sha256_file(adapter_file(out / "adapter")),
                                 REUSED_TAG: meta.get("run_id", ""), "mlflow.note.content": note})
            return {**metrics, "reused": meta}
        from transformers.trainer_utils import get_last_checkpoint

        ckpt_dir = checkpoints / checkpoint_key(cfg, model_cfg, manifest["sha256"])
        tokenizer = load_tokenizer(base)
        log_rows: list[dict] = []
        trainer = tuner(cfg, base, examples, ckpt_dir, prec, tokenizer, checkpoints=True, stop=stop, timer=timer,
                        log_rows=log_rows)
        tokens_per_epoch = dataset_tokens(trainer)
        resume = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
        # Read now: save_total_limit deletes the resumed checkpoint once two newer ones are saved.
        resumed = _checkpoint_state(resume) if resume else {}
        if resume:
            print(f"train: resuming from {resume}")
        t_train = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=resume)
        train_seconds = time.perf_counter() - t_train
        stop.in_loop = False
        if stop.requested:
            print(f"train: interrupted at step {trainer.state.global_step}; checkpoint saved, re-run to resume")
            raise KeyboardInterrupt

        new_tokens = trained_tokens(trainer) - round(tokens_per_epoch * float(resumed.get("epoch") or 0.0))
        n_params = sum(p.numel() for p in trainer.model.parameters())
        tps = new_tokens / train_seconds
        # result.training_loss averages only the steps run in this call; a resumed run adds the steps before
        # the checkpoint from its log history (complete up to it: on_step_end logs at every save).
        done = int(resumed.get("global_step") or 0)
        steps = trainer.state.global_step
        train_loss = (_loss_sum(trainer.state.log_history, done) + result.training_loss * (steps - done)) / max(steps, 1)
        metrics = {**trial.tracked(trainer, train_loss, log_rows),
                   "tokens_per_second": tps, "model_tflops_per_second": tps * FLOP_PER_PARAM_TOKEN * n_params / 1e12,
                   "train_seconds": train_seconds, "resumed": bool(resume)}
        if not main:
            return metrics
        trial.save(trainer.model, tokenizer, metrics, log_rows, out)
        with timer():
            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None})
            mlflow.log_dict(manifest, "mix_manifest.json")
            mlflow.log_artifact(str(out / "loss.csv"))
            mlflow.log_artifacts(str(out / "adapter"), "adapter")
            mlflow.set_tags({ADAPTER_TAG: sha256_file(adapter_file(out / "adapter")), "mlflow.note.content": (
                f"{len(examples)} examples ({manifest['specialist_size']} of the task, generalist share "
                f"{manifest['generalist_share']:.2f}), {metrics['steps']} steps: loss {train_loss:.3f} on average"
                + (f", {metrics['final_loss']:.3f} at the end" if metrics["final_loss"] is not None else "")
                + f"; {tps:.0f} tokens/s")})
        metrics["stage_seconds"] = time.perf_counter() - t0
        metrics["mlflow_seconds"] = timer.seconds
        metrics["mlflow_share"] = timer.seconds / metrics["stage_seconds"]
        with timer():
            mlflow.log_metrics({k: metrics[k] for k in ("stage_seconds", "mlflow_seconds", "mlflow_share")})
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # done: the adapter is saved and logged
    return metrics


def _checkpoint_state(checkpoint: str) -> dict:
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text())


def _loss_sum(log_history: list[dict], upto: int) -> float:
    """Sum of the per-step losses up to step `upto` (each logged loss is the mean over its interval)."""
    total, prev = 0.0, 0
    for e in log_history:
        if "loss" in e and e["step"] <= upto:
            total += e["loss"] * (e["step"] - prev)
            prev = e["step"]
    return total


# --- the stage's command (`python -m mixtune.stages.train`, `mixtune train`) ---------------------------------------


def command(args) -> None:
    from mixtune.plumbing.config import load_section

    m = run(load_section("train", args.params), load_section("model", args.params), Path(args.mix), Path(args.out))
    speed = f" at {m['tokens_per_second']:.0f} tokens/s" if "tokens_per_second" in m else " (a search trial's)"
    print(f"train: {m['steps']} steps, {m['trained_tokens']} tokens{speed}, loss {m['train_loss']:.4f}; adapter in "
          f"{args.out}/adapter")


def parser():
    p = entry.parser("mixtune train", "tune a LoRA adapter on the mix with TRL's SFTTrainer")
    p.add_argument("--mix", default="mix")
    p.add_argument("--out", default="train")
    return p


if __name__ == "__main__":
    sys.exit(entry.main(parser(), command))
