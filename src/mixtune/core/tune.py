"""The one way mixtune tunes an adapter: TRL's SFTTrainer with a PEFT LoRA adapter, the loss on the completion
only, per-step loss into the active MLflow run, a non-finite loss stops it; the adapter saved byte-stable. The
train stage (mixtune.stages.train), a search trial and a study cell all tune through `tuner` (mixtune.core.trial
stores what they trained)."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from pathlib import Path

from mixtune.core.model import load_base, load_tokenizer, micro_batches, trim_heap
from mixtune.plumbing.config import TrainConfig
from mixtune.plumbing.errors import MixtuneError
from mixtune.plumbing.files import atomic_dir
from mixtune.plumbing.tracking import Timer, repo_root

BF16_HELD = "_mixtune_bf16_weights"  # on the model: (base, [(parameter, its name in base, its bf16 tensor)])


# LoRA training costs about 4 FLOP per parameter per token: forward 2, backward through activations 2 (the
# frozen base weights get no gradient).
FLOP_PER_PARAM_TOKEN = 4



def to_conversational(example: dict) -> dict:
    """Our schema -> TRL's conversational prompt-completion form (completion-only loss by default)."""
    return {"prompt": example["prompt"], "completion": [{"role": "assistant", "content": example["completion"]}]}



class Stop:
    """SIGINT/SIGTERM during training: finish the step, save a checkpoint, stop; before it: stop at once."""

    def __init__(self) -> None:
        self.requested = False
        self.in_loop = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum, frame):
        if not self.in_loop:
            raise KeyboardInterrupt
        self.requested = True



def completion_loss(model, inputs: dict, num_items_in_batch=None):
    """Cross-entropy on the completion tokens, projecting through the LM head only where a label exists.

    TRL's fused head tiles the LM head over every position on a CPU (its compact path needs Triton), in fp32,
    and computes entropy too: about a third of a step here. A classification completion is a few tokens out of
    ~150, so `logits_to_keep` with the union of labelled positions cuts that to a few percent, through the
    model's own forward (PEFT, DDP and FSDP wrappers included).
    """
    import torch

    labels = inputs["labels"]
    shifted = labels[:, 1:]
    keep = (shifted != -100).any(dim=0).nonzero().squeeze(-1)  # positions whose next token is labelled
    batch = {k: v for k, v in inputs.items() if k != "labels"}
    out = model(**batch, use_cache=False, logits_to_keep=keep)
    target = shifted[:, keep]
    loss = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), target.flatten(),
                                             ignore_index=-100, reduction="sum")
    n = num_items_in_batch if num_items_in_batch is not None else (target != -100).sum().clamp(min=1)
    return loss / n



def _trainer_class():
    from trl import SFTTrainer

    class CompletionTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = completion_loss(model, inputs, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as Trainer does: DDP averages the gradients
            return (loss, None) if return_outputs else loss

        def training_step(self, model, inputs, num_items_in_batch=None):
            """The step's rows in micro-batches of at most `micro_tokens` padded tokens (`micro_batches`), each
            forward and backward on its own, each cut to its longest row (the collator pads on the right, so the
            cut columns are padding no real token attends to). The gradient is the whole batch's: every chunk's
            loss is summed over its completion tokens and divided by the batch's count. Activations scale with a
            chunk's tokens (eager attention's with its rows x length^2), so a budget in tokens bounds memory
            whatever the rows' lengths: long rows go one by one, short ones together. Not the Trainer's gradient
            accumulation, whose resume of a checkpoint changed the training (test_train): the Trainer still sees
            one batch per step."""
            if "attention_mask" not in inputs:  # packed: one row, no mask
                return super().training_step(model, inputs, num_items_in_batch)
            lengths = inputs["attention_mask"].sum(dim=1).tolist()
            spans = micro_batches(lengths, self.micro_tokens)
            if len(spans) == 1:
                return super().training_step(model, inputs, num_items_in_batch)
            if num_items_in_batch is None:
                num_items_in_batch = (inputs["labels"][:, 1:] != -100).sum()
            width = inputs["input_ids"].shape[1]
            loss = 0.0
            for i, j in spans:
                keep = max(lengths[i:j])
                chunk = {k: v[i:j, :keep] if v.dim() > 1 and v.shape[1] == width else v[i:j]
                         for k, v in inputs.items()}
                loss = loss + super().training_step(model, chunk, num_items_in_batch)
            return loss

    return CompletionTrainer



def _log_step(row: dict, step: int, state, timer: Timer) -> None:
    """A logged step into the active MLflow run, if there is one (rank 0 only): logging with none active would
    start a run of its own and leave it open."""
    import mlflow

    if state.is_world_process_zero and mlflow.active_run() is not None:
        with timer():
            mlflow.log_metrics({k: float(v) for k, v in row.items() if k != "step"}, step=step)



def _callbacks(stop: Stop, tokens_per_step: float, timer: Timer, log_rows: list, save_steps: int):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            stop.in_loop = True
            self.t, self.step = time.perf_counter(), state.global_step
            # Resumed: the curve so far comes from the checkpoint's log history, so loss.csv and this run's
            # per-step metrics cover the whole training, not only the steps after the resume.
            for e in state.log_history:
                if "loss" in e and e["step"] <= state.global_step:
                    row = {"step": e["step"], "loss": e["loss"], "learning_rate": e.get("learning_rate", 0.0),
                           "grad_norm": e.get("grad_norm", 0.0), "tokens_per_second": e.get("tokens_per_second", 0.0)}
                    log_rows.append(row)
                    _log_step(row, row["step"], state, timer)

        def on_step_end(self, args, state, control, **kw):
            # The step's freed activations back to the system: rows of varying lengths leave glibc's heap with
            # chunks no later tensor fits, and it grew step by step (r=0.9, 40 steps: 3.0 -> 4.0 GB peak RSS;
            # trimmed: 3.75 GB, no slower; docs/performance.md). Allocation moves no number (test_train).
            trim_heap()
            if stop.requested:
                control.should_save = True
                control.should_training_stop = True
            # Log whenever a checkpoint is (or would be) saved, so its log history holds every step's loss up to
            # it (the Trainer keeps the not-yet-logged losses only in memory): a resumed run's train_loss and
            # loss.csv then cover the whole training. At every save_steps even without checkpoints (a search
            # trial), so a trial's loss curve is the train stage's row for row (logging moves no weight).
            if control.should_save or state.global_step % save_steps == 0:
                control.should_log = True

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            # train_loss (the end-of-training summary) too: a run shorter than logging_steps logs no other loss.
            for key in ("loss", "train_loss"):
                if key in logs and not math.isfinite(logs[key]):
                    raise MixtuneError(f"training loss is {logs[key]} at step {state.global_step}; "
                                       "lower train.learning_rate or check the data")
            if "loss" not in logs:
                return
            now = time.perf_counter()
            steps = state.global_step - self.step
            tps = tokens_per_step * steps / (now - self.t) if steps else 0.0
            self.t, self.step = now, state.global_step
            row = {"step": state.global_step, "loss": logs["loss"], "learning_rate": logs.get("learning_rate", 0.0),
                   "grad_norm": logs.get("grad_norm", 0.0), "tokens_per_second": tps}
            log_rows.append(row)
            state.log_history[-1]["tokens_per_second"] = tps  # saved with the checkpoint, for a resumed curve
            _log_step(row, state.global_step, state, timer)

    return [Progress()]



def add_progress(trainer, cfg: TrainConfig, timer: Timer, log_rows: list, stop: Stop | None = None) -> None:
    """Per-step loss, learning rate and throughput into `log_rows` and the active MLflow run; a non-finite loss
    raises MixtuneError; `stop` (SIGINT/SIGTERM) ends training at a saved checkpoint."""
    steps_per_epoch = math.ceil(len(trainer.train_dataset) / (cfg.batch_size * cfg.grad_accum))
    for cb in _callbacks(stop or Stop(), dataset_tokens(trainer) / steps_per_epoch, timer, log_rows, cfg.save_steps):
        trainer.add_callback(cb)



def build_trainer(cfg: TrainConfig, base: str, examples: list[dict], output_dir: Path, prec: str, tokenizer=None):
    """The SFTTrainer exactly as the stage runs it (the training benchmark builds it through here too)."""
    import datasets
    from peft import LoraConfig
    from trl import SFTConfig

    tokenizer = tokenizer or load_tokenizer(base)
    sft = SFTConfig(
        output_dir=str(output_dir),
        use_cpu=not _cuda(),
        bf16=prec == "bf16", fp16=prec == "fp16",
        activation_checkpointing=False,  # recomputing activations costs 7-60% here; LoRA is not memory-bound
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float below 1 is a fraction of the steps
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
        max_length=cfg.max_length, packing=cfg.packing,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        logging_steps=cfg.logging_steps, save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=2,
        seed=cfg.seed, data_seed=cfg.seed, report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        # The Trainer's default replaces a NaN/inf step loss by the running mean (0.0 right after a log), so a
        # diverged run would log finite losses and the non-finite check in on_log would never fire.
        logging_nan_inf_filter=False,
    )
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    dataset = datasets.Dataset.from_list([to_conversational(e) for e in examples])
    trainer = _trainer_class()(model=load_base(base), args=sft, train_dataset=dataset, processing_class=tokenizer,
                               peft_config=lora)
    trainer.micro_tokens = cfg.micro_tokens
    if prec == "bf16" and not _cuda():
        hold_frozen_bf16(trainer.model, base)
    return trainer



def hold_frozen_bf16(model, base: str) -> int:
    """Hold the frozen Linear weights in bf16 for training: bf16 autocast casts each of them at every use, forward
    and backward, and caches nothing (it caches only weights that require grad), so 106M weights were cast
    several times a step (`copy_`/`_to_copy`, 17% of a default step in the profile). The cast is autocast's own
    rounding, done once: the losses and the adapter are bit for bit those of autocast on fp32 weights (test_train).
    Only Linear weights, the ones autocast would cast: the embedding (tied to the LM head here) and the norms stay
    fp32, as does the residual stream; casting them too changed the losses by up to 0.018. The fp32 Linear
    weights are not kept (424 MB through every step of training, the search's peak): `scoring`, which runs in
    fp32 as evaluate does, reads them again from `base`. Returns the number of weights held in bf16."""
    import torch

    tied = model.get_input_embeddings().weight
    held = []
    for name, module in model.get_base_model().named_modules():
        w = getattr(module, "weight", None)
        if not isinstance(module, torch.nn.Linear) or w.requires_grad or w is tied or w.dtype != torch.float32:
            continue
        w.data = w.data.to(torch.bfloat16)
        held.append((w, f"{name}.weight".replace(".base_layer.", "."), w.data))  # its name in the checkpoint
    # The other frozen weights (the embedding, the norms) out of the checkpoint's memory map, where from_pretrained
    # leaves them: while one of them is in it the mapping stays, and with it every page of the file that casting
    # read, the fp32 Linear weights included (resident: 990 -> 693 MB for the default model).
    for w in model.parameters():
        if not w.requires_grad and w.dtype == torch.float32:
            w.data = w.data.clone()
    model.__dict__[BF16_HELD] = (base, held)
    return sum(w.numel() for w, _, _ in held)



def tuner(cfg: TrainConfig, base: str, examples: list[dict], workdir: Path, prec: str, tokenizer, *,
          callbacks=(), checkpoints: bool = False, stop: Stop | None = None, timer: Timer | None = None,
          log_rows: list | None = None):
    """The one way mixtune tunes an adapter (the train stage, the search's trials, the study's cells): the
    SFTTrainer with LoRA on `examples`, per-step loss into the active MLflow run, a non-finite loss stops it.
    `trainer.train()` is the caller's, so a trial that is pruned mid-way still counts its compute."""
    trainer = build_trainer(cfg, base, examples, workdir, prec, tokenizer)
    if not checkpoints:
        trainer.args.set_save(strategy="no")
    add_progress(trainer, cfg, timer or Timer(), [] if log_rows is None else log_rows, stop)
    for cb in callbacks:
        trainer.add_callback(cb)
    return trainer



@contextlib.contextmanager
def scoring(model):
    """The model being (or done being) trained, for the time it is scored, as evaluate and the served model
    score it: with bf16 or fp16, accelerate wraps the model's forward in autocast (kept as `_original_forward`);
    through that wrapper a search trial's dev answers and probe were bf16's (on the default, 4 of 50 probe
    answers differed from the saved adapter's, scored in fp32 by evaluate). Frozen weights held in bf16 for
    training (`hold_frozen_bf16`) are their fp32 originals, read again from the base model, while scoring (0.15 s
    for the default, its file in the page cache). Training resumes as it was."""
    original, wrapped = model.__dict__.get("_original_forward"), model.__dict__.get("forward")
    base, held = model.__dict__.get(BF16_HELD, (None, ()))
    if held:
        fp32 = load_base(base).state_dict()
        for w, name, _ in held:
            w.data = fp32[name]
        del fp32  # what is not held (the embedding, the norms) goes with it
    if original is not None:
        model.forward = original
    try:
        yield model
    finally:
        if original is not None:
            model.forward = wrapped
        for w, _, bf16 in held:
            w.data = bf16



def trained_tokens(trainer) -> int:
    """Tokens trained on so far (epochs done x tokens per epoch): the compute a run spent."""
    return round(dataset_tokens(trainer) * (trainer.state.epoch or 0.0))



def dataset_tokens(trainer) -> int:
    """Tokens in one epoch of the trainer's (tokenized) dataset: the unit of the training compute budget."""
    return sum(len(ids) for ids in trainer.train_dataset["input_ids"])



def save_adapter(peft_model, tokenizer, path: Path) -> None:
    """The adapter and its tokenizer, byte for byte the same for the same weights wherever and whenever they are
    trained: PEFT writes `target_modules` from a set (its order follows the process's hash seed) and the base
    model's absolute path (this clone's), in adapter_config.json and in a model card; either would change the
    adapter's DVC hash, and dvc.lock, on every run. The modules are sorted, a base inside the repository is
    written relative to it, and the card (nothing but that path) is left out. mixtune's loaders pass the base
    model themselves."""
    with atomic_dir(path) as tmp:
        peft_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        config = json.loads((tmp / "adapter_config.json").read_text())
        if isinstance(config.get("target_modules"), list):
            config["target_modules"] = sorted(config["target_modules"])
        base = Path(config.get("base_model_name_or_path") or "")
        if base.is_absolute() and base.is_relative_to(repo_root()):
            config["base_model_name_or_path"] = str(base.relative_to(repo_root()))
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").unlink(missing_ok=True)



def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
