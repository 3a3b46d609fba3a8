"""The `mixtune` command: one subcommand per stage. Heavy libraries are imported inside the commands,
so `mixtune --help` answers at once."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mixtune.errors import MixtuneError


def _fetch(args) -> None:
    from mixtune import fetch

    for what, path in fetch.run(Path(args.root), model=not args.no_model).items():
        print(f"{what}: {path}")


def _prepare(args) -> None:
    from mixtune import prepare
    from mixtune.config import load_section

    cfg, model_cfg = load_section("prepare", args.params), load_section("model", args.params)
    max_length = load_section("train", args.params, keys=prepare.TRAIN_KEYS).max_length
    stats = prepare.run(cfg, model_cfg, max_length, Path(args.root), Path(args.out))
    prepare.log_run(cfg, model_cfg, max_length, stats, Path(args.out))
    print(f"prepared: splits {stats['splits']}, generalist pool {stats['generalist_pool']} "
          f"({stats['decontaminated']} decontaminated)")


def _check(args) -> None:
    """prepare's reading, checks and card, nothing else kept: what training will see, before an hour of it."""
    import tempfile

    from mixtune import prepare
    from mixtune.config import load_section
    from mixtune.files import atomic_file

    with tempfile.TemporaryDirectory() as tmp:
        prepare.run(load_section("prepare", args.params), load_section("model", args.params),
                    load_section("train", args.params, keys=prepare.TRAIN_KEYS).max_length, Path(args.root),
                    Path(tmp))
        card = (Path(tmp) / "card.md").read_bytes()
    with atomic_file(Path(args.out) / "card.md", "wb") as f:
        f.write(card)
    print((Path(args.out) / "card.md").read_text(), end="")


def _mix(args) -> None:
    from mixtune import mix
    from mixtune.config import load_section

    m = mix.run(load_section("mix", args.params), Path(args.prepared), Path(args.out))
    print(f"mix: {m['total']} examples ({m['specialist_size']} specialist + {m['generalist_size']} generalist, "
          f"share {m['generalist_share']:.2f} {'from the search' if m['share_source'] == 'auto' else 'set by hand'}), "
          f"sha256 {m['sha256'][:12]}")


def _train(args) -> None:
    from mixtune import train
    from mixtune.config import load_section

    m = train.run(load_section("train", args.params), load_section("model", args.params), Path(args.mix), Path(args.out))
    speed = f" at {m['tokens_per_second']:.0f} tokens/s" if "tokens_per_second" in m else " (a search trial's)"
    print(f"train: {m['steps']} steps, {m['trained_tokens']} tokens{speed}, loss {m['train_loss']:.4f}; adapter in "
          f"{args.out}/adapter")


def _evaluate(args) -> None:
    from mixtune import evaluate
    from mixtune.config import load_section

    r = evaluate.run(load_section("evaluate", args.params), load_section("model", args.params),
                     load_section("search", args.params, keys=("metric",)).metric)
    c, key = r["comparison"], r["details"]["metric"]

    def show(x):
        return f"{x['value']:.3f} [{x['low']:.3f}, {x['high']:.3f}]"

    print(f"evaluate ({r['details']['split']}, n={r['n']}, share {r['share']:.2f}): {key} tuned {show(c['tuned'])}, "
          f"base {show(c['base'])}, pure specialist {show(c['specialist'])}")
    if "forgetting" in r:
        f = r["forgetting"]
        print(f"evaluate: held-out generalist accuracy lost against the base model ({f['probe_n']} questions): "
              f"tuned {show(f['tuned'])}, pure specialist {show(f['specialist'])}")


def _search(args) -> None:
    from mixtune import search
    from mixtune.config import load_section

    r = search.run(load_section("search", args.params),
                   load_section("mix", args.params, keys=search.MIX_KEYS),
                   load_section("train", args.params), load_section("model", args.params),
                   load_section("evaluate", args.params, keys=search.SCORE_KEYS), worker=args.worker)
    if args.worker:
        for study, trials in r["trials"].items():
            print(f"search --worker: study {study}: ran trials {trials}")
    else:
        print("\n".join(f"search: {a}" for a in r["answers"]))


def _register(args) -> None:
    from mixtune import register
    from mixtune.config import load_section

    r = register.run(load_section("register", args.params),
                     load_section("evaluate", args.params, keys=register.EVALUATE_KEYS),
                     load_section("model", args.params))
    print(f"register: {r['name']} version {r['version']}: {r['reason']}")


def _promote(args) -> None:
    from mixtune import register

    r = register.promote(args.version, args.name or register.model_name(args.params))
    print(f"promote: {r['name']} version {r['version']} is champion (was {r['previous']})")


def _predict(args) -> None:
    from mixtune import predict

    n = predict.run(args.model, Path(args.input), Path(args.output), args.file_format)
    print(f"predict: {n} predictions in {args.output}")


def _study_prepare(args) -> None:
    from mixtune import study
    from mixtune.config import load_section

    cfg = load_section("study", args.study_params, keys=study.PREPARE_KEYS)
    for target in [args.target] if args.target else list(cfg.targets):
        stats = study.prepare_target(cfg, target)
        c = stats["coverage"]
        print(f"study prepare {target}: splits {stats['splits']}, pool {stats['generalist_pool']}, "
              f"coverage {c['coverage']:.3f} ({c['tasks']} of {c['pool_tasks']} pool tasks)")


def _study_screen(args) -> None:
    from mixtune import study
    from mixtune.config import load_section

    if not args.target:
        raise MixtuneError("study screen: needs --target (one stage of study/dvc.yaml's matrix)")
    cfg = load_section("study", args.study_params, keys=study.SCREEN_KEYS)
    doc = study.screen_target(cfg, args.target)
    print(f"study screen {args.target}: {'kept' if doc['kept'] else 'dropped'}: {doc['why']}")


def _study_run(args) -> None:
    from mixtune import study
    from mixtune.config import load_section

    if not args.target or not args.size:
        raise MixtuneError("study run: needs --target and --size (one stage of study/dvc.yaml's matrix)")
    cfg = load_section("study", args.study_params, keys=study.RUN_KEYS)
    doc = study.run_target(cfg, args.target, args.size)
    if doc.get("dropped"):
        print(f"study run {args.target} n={args.size}: dropped by its screen, nothing to run")
        return
    print(f"study run {args.target} n={args.size}: {len(doc['cells'])} cells in {study.results_path(args.target, args.size)}")


def _study_report(args) -> None:
    from mixtune import study_report
    from mixtune.config import load_section

    agg = study_report.run(load_section("study", args.study_params))
    for key, c in agg["claims"].items():
        print(f"study report: {key}: {c['verdict']}")
    print("study report: reports/study.md")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixtune", description="Specialist or generalist? Tune a language model for one task and find how much generalist instruction data to mix in.")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("fetch", help="download and verify the default data and base model (set-up, not a stage)")
    p.add_argument("--root", default=".")
    p.add_argument("--no-model", action="store_true", help="skip the base model")
    p.set_defaults(func=_fetch)

    p = sub.add_parser("prepare", help="normalize, dedupe, decontaminate and split the sources")
    p.add_argument("--root", default=".", help="folder the source paths are relative to")
    p.add_argument("--out", default="prepared")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("check", help="what training will see, in seconds: writes and prints prepared/card.md")
    p.add_argument("--root", default=".", help="folder the source paths are relative to")
    p.add_argument("--out", default="prepared", help="the card goes to OUT/card.md")
    p.set_defaults(func=_check)

    p = sub.add_parser("mix", help="sample the training set at mix.generalist_share")
    p.add_argument("--prepared", default="prepared")
    p.add_argument("--out", default="mix")
    p.set_defaults(func=_mix)

    p = sub.add_parser("train", help="tune a LoRA adapter on the mix with TRL's SFTTrainer")
    p.add_argument("--mix", default="mix")
    p.add_argument("--out", default="train")
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="score the adapter and the base model on the specialist split")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("search", help="search the generalist share with Optuna (dev split), one study per size")
    p.add_argument("--worker", action="store_true",
                   help="only run trials of the shared study (search.storage); write no outputs")
    p.set_defaults(func=_search)

    p = sub.add_parser("register", help="register the final adapter as evaluated; champion moves if it wins")
    p.set_defaults(func=_register)

    p = sub.add_parser("promote", help="make a registered version the champion by hand (a rollback too)")
    p.add_argument("--version", required=True, type=int)
    p.add_argument("--name", help="registered model (default: register.name, else from search/best.json)")
    p.set_defaults(func=_promote)

    p = sub.add_parser("predict", help="answer a file of raw task records with a registered model")
    p.add_argument("--model", required=True, help="a model URI, e.g. models:/mixtune-bbc_news@champion")
    p.add_argument("--input", required=True,
                   help="jsonl, json, csv or parquet with the source's input columns (e.g. text), `task` for a "
                        "scenario, and an optional `id`")
    p.add_argument("--file-format", choices=("jsonl", "json", "csv", "parquet"), help="default: from the extension")
    p.add_argument("--output", required=True, help="JSONL: one {id, task, prediction, probabilities} per record")
    p.set_defaults(func=_predict)

    p = sub.add_parser("study", help="the paper's experiments: study/dvc.yaml runs prepare, screen, run and report")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, func, help_ in (("prepare", _study_prepare, "a target's splits and generalist pool"),
                                ("screen", _study_screen, "keep a target only if the model learns it"),
                                ("run", _study_run, "every cell of one target and size"),
                                ("report", _study_report, "reports/study.md from the results")):
        a = actions.add_parser(action, help=help_)
        a.add_argument("--target", help="a key of study.targets (prepare: default all)")
        a.add_argument("--size", type=int, help="a value of study.sizes (run)")
        a.add_argument("--study-params", default="study/params.yaml", help="default: study/params.yaml")
        a.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MixtuneError as e:
        print(f"mixtune {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"mixtune {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
