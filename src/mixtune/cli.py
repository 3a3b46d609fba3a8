"""The `mixtune` command: the user's commands (fetch, check, promote, predict) and one per stage, handed to
the stage's own module (mixtune.stages). Heavy libraries are imported inside the commands, so `mixtune --help`
answers at once."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _fetch(args) -> None:
    from mixtune.plumbing import fetch

    for what, path in fetch.run(Path(args.root), model=not args.no_model).items():
        print(f"{what}: {path}")


def _check(args) -> None:
    """prepare's reading, checks and card, nothing else kept: what training will see, before an hour of it."""
    import tempfile

    from mixtune.plumbing.config import load_section
    from mixtune.plumbing.files import atomic_file
    from mixtune.stages import prepare

    with tempfile.TemporaryDirectory() as tmp:
        prepare.run(load_section("prepare", args.params), load_section("model", args.params),
                    load_section("train", args.params, keys=prepare.TRAIN_KEYS).max_length, Path(args.root),
                    Path(tmp))
        card = (Path(tmp) / "card.md").read_bytes()
    with atomic_file(Path(args.out) / "card.md", "wb") as f:
        f.write(card)
    print((Path(args.out) / "card.md").read_text(), end="")


def _promote(args) -> None:
    from mixtune.stages import register

    r = register.promote(args.version, args.name or register.model_name(args.params))
    print(f"promote: {r['name']} version {r['version']} is champion (was {r['previous']})")


def _predict(args) -> None:
    from mixtune.plumbing import predict

    n = predict.run(args.model, Path(args.input), Path(args.output), args.file_format)
    print(f"predict: {n} predictions in {args.output}")


# A stage's command is its own module's (mixtune.stages.<name>: what dvc.yaml runs, so that editing this file
# reruns no stage); `mixtune <stage> ...` hands the rest of the line to it.
STAGES = {"prepare": ("mixtune.stages.prepare", "normalize, dedupe, decontaminate and split the sources"),
          "mix": ("mixtune.stages.mix", "sample the training set at mix.generalist_share"),
          "search": ("mixtune.stages.search", "search the generalist share with Optuna (dev split)"),
          "train": ("mixtune.stages.train", "tune a LoRA adapter on the mix with TRL's SFTTrainer"),
          "evaluate": ("mixtune.stages.evaluate", "score the tuned adapter, the base model and the pure specialist"),
          "register": ("mixtune.stages.register", "register the tuned adapter as evaluated; champion moves if it wins"),
          "study": ("mixtune.stages.study", "the paper's experiments: study prepare|screen|run|report (study/dvc.yaml)")}


def build_parser() -> argparse.ArgumentParser:
    from mixtune.plumbing import entry

    parser = entry.parser("mixtune", "Specialist or generalist? Tune a language model for one task and find how much "
                                     "generalist instruction data to mix in.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("fetch", help="download and verify the default data and base model (set-up, not a stage)")
    p.add_argument("--root", default=".")
    p.add_argument("--no-model", action="store_true", help="skip the base model")
    p.set_defaults(func=_fetch)

    p = sub.add_parser("check", help="what training will see, in seconds: writes and prints prepared/card.md")
    p.add_argument("--root", default=".", help="folder the source paths are relative to")
    p.add_argument("--out", default="prepared", help="the card goes to OUT/card.md")
    p.set_defaults(func=_check)

    for name, (_, help_) in STAGES.items():
        sub.add_parser(name, help=help_, add_help=False).set_defaults(func=None)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    import importlib

    from mixtune.plumbing import entry

    args, rest = build_parser().parse_known_args(argv)
    if args.func is None:  # a stage: its module parses the rest of the line
        module = STAGES[args.command][0]
        if args.command == "study" and rest[:1] == ["report"]:
            module, rest = "mixtune.stages.study_report", rest[1:]
        params = [] if args.command == "study" else ["--params", args.params]
        stage = importlib.import_module(module)
        return entry.main(stage.parser(), stage.command, [*params, *rest])
    if rest:
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
    return entry.run(f"mixtune {args.command}", args.func, args)


if __name__ == "__main__":
    sys.exit(main())
