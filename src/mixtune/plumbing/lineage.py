"""What a stage's code is: the project source files a command can import, found by a static walk of the
`import mixtune...` / `from mixtune... import` statements (function-level imports included), and their hash.

Two users: the test that checks every stage of dvc.yaml declares the files its command can import, and the
caches of our own (the search's Optuna study, the study's cells, trained adapters), whose keys include
`fingerprint(...)` so that edited code never replays a result the old code measured. Deliberately coarse: a module
counts whole once anything in it is imported. What counts is the code (its syntax tree), not its comments or
docstrings: a comment starts no new search. DVC, which hashes the files, still reruns a stage whose file changed;
when the change provably moves no output, `dvc commit` records it.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

PACKAGE = "mixtune"
ROOT = Path(__file__).resolve().parents[1]  # src/mixtune


def module_file(module: str) -> Path:
    """`mixtune.stages.search` -> src/mixtune/stages/search.py (a package -> its __init__.py). A name outside the
    package is refused: a stage run as `python -m` is `__main__` to itself, a name that resolved to the package's
    __init__ alone, so the search's study was keyed by no code at all (fixed 2026-12-07)."""
    if module != PACKAGE and not module.startswith(PACKAGE + "."):
        raise ValueError(f"{module}: not a module of {PACKAGE} (pass a stage's dotted name, not __name__)")
    parts = module.split(".")[1:]
    path = ROOT.joinpath(*parts)
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _is_module(module: str) -> bool:
    return module_file(module).is_file()


def imported(node: ast.AST) -> set[str]:
    """The project modules the statements under `node` import, wherever they stand (in a function too)."""
    out: set[str] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names if a.name == PACKAGE or a.name.startswith(PACKAGE + ".")}
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0 and \
                (n.module == PACKAGE or n.module.startswith(PACKAGE + ".")):
            out.add(n.module)
            # `from mixtune import metrics`: metrics is a module; `from mixtune.config import X`: X is a name
            out |= {f"{n.module}.{a.name}" for a in n.names if _is_module(f"{n.module}.{a.name}")}
    return {m for m in out if _is_module(m)}


@functools.cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def closure(modules: set[str] | list[str]) -> set[str]:
    """`modules`, every project module they can import, transitively, and the packages holding them (whose
    __init__ runs first)."""
    seen: set[str] = set()
    todo = [PACKAGE, *modules]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        parents = {".".join(m.split(".")[:i]) for i in range(1, m.count(".") + 1)}
        todo += (imported(_tree(module_file(m))) | parents) - seen
    return seen


def files(modules: set[str]) -> list[Path]:
    return sorted(module_file(m) for m in modules)


def code_of(path: Path) -> str:
    """What a module computes: its syntax tree without docstrings (comments never reach the tree) and without
    line numbers, so a comment, a docstring or a blank line changes no cache key, and any change of code does."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and body and \
                isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and \
                isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, annotate_fields=False)


def fingerprint(modules: list[str]) -> str:
    """sha256 over the code (`code_of`) of `modules` and all they can import (paths relative to the package),
    each named by its dotted name (`module_file`)."""
    h = hashlib.sha256()
    for path in files(closure(modules)):
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + code_of(path).encode() + b"\0")
    return h.hexdigest()


# --- what reruns when: derived from the dvc.yaml files, for docs/pipeline.md -------------------------------


def _stages(repo: Path, dvc_files: tuple[str, ...]) -> dict[str, dict]:
    import yaml

    out = {}
    for f in dvc_files:
        for name, stage in yaml.safe_load((repo / f).read_text())["stages"].items():
            outs = [o if isinstance(o, str) else next(iter(o)) for kind in ("outs", "metrics", "plots")
                    for o in stage.get(kind, [])]
            params = []
            for p in stage.get("params", []):
                params += [p] if isinstance(p, str) else [k for keys in p.values() for k in keys]
            out[name] = {"deps": stage.get("deps", []), "outs": outs, "params": params}
    return out


def reruns(repo: Path, dvc_files: tuple[str, ...] = ("dvc.yaml", "study/dvc.yaml")) -> dict[str, list[str]]:
    """What reruns when a params key or a source file changes: the stages that declare it and every stage
    downstream of them (one that depends on another's output). Keys with the same stages share a row."""
    import yaml

    stages = _stages(repo, dvc_files)
    order = list(stages)

    def linked(dep: str, out: str) -> bool:  # matrix items stand for any value
        dep, out = (x.replace("${item.target}", "*").replace("${item.size}", "*").rstrip("/") for x in (dep, out))
        return dep == out or out.startswith(dep + "/") or dep.startswith(out + "/")

    def rerun(direct: set[str]) -> tuple[str, ...]:
        todo, seen = list(direct), set(direct)
        while todo:
            outs = stages[todo.pop()]["outs"]
            for name, s in stages.items():
                if name not in seen and any(linked(d, o) for d in s["deps"] for o in outs):
                    seen.add(name)
                    todo.append(name)
        return tuple(sorted(seen, key=order.index))

    keys = [f"{sec}.{k}" for sec, values in yaml.safe_load((repo / "params.yaml").read_text()).items()
            for k in values]
    keys += [f"study.{k}" for k in yaml.safe_load((repo / "study" / "params.yaml").read_text())["study"]]
    rows: dict[tuple[str, ...], list[str]] = {}
    for key in keys:
        direct = {n for n, s in stages.items() if any(key == p or key.startswith(p + ".") for p in s["params"])}
        rows.setdefault(rerun(direct), []).append(f"`{key}`")
    for src in sorted({d for s in stages.values() for d in s["deps"] if d.startswith("src/")}):
        shown = Path(src).relative_to("src/mixtune")
        rows.setdefault(rerun({n for n, s in stages.items() if src in s["deps"]}), []).append(f"`{shown}`")
    return {", ".join(what): list(names) for names, what in rows.items()}


def rerun_table(repo: Path) -> str:
    rows = ["| when this changes | these stages rerun |", "|---|---|"]
    rows += [f"| {what} | {', '.join(names) or 'none'} |" for what, names in reruns(repo).items()]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # python -m mixtune.plumbing.lineage: the table in docs/pipeline.md
    print(rerun_table(Path.cwd()), end="")
