"""The package's import graph, read statically (ast): what each module imports from dpoflow, and the closure of a
stage script. Used by the layering test and the dvc.yaml dependency test."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "dpoflow"
# Lowest first: a module may import only from its own layer's other modules or from layers below it.
LAYERS = ("runtime", "core", "modeling", "data", "eval", "training", "reporting", "pipeline")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_path(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def library_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "lm_eval_tasks" not in p.parts)


@cache
def imports_of(path: Path) -> tuple[tuple[str, int, bool], ...]:
    """(module imported, line, inside a function) for every dpoflow import of the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nested = {
        id(n)
        for f in ast.walk(tree)
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
        for n in ast.walk(f)
        if n is not f
    }
    out = []
    for node in ast.walk(tree):
        inside = id(node) in nested
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, inside) for a in node.names if a.name.startswith("dpoflow")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dpoflow"):
            for a in node.names:  # `from dpoflow.data import tasks` imports the module dpoflow.data.tasks
                full = f"{node.module}.{a.name}"
                out.append((full if module_path(full) else node.module, node.lineno, inside))
    return tuple(out)


def closure(path: Path) -> set[Path]:
    """Every dpoflow module file `path` imports, directly or not (package __init__ files included)."""
    seen: set[Path] = set()
    todo = [path]
    while todo:
        for name, _, _ in imports_of(todo.pop()):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                found = module_path(".".join(parts[:i]))
                if found is not None and found not in seen:
                    seen.add(found)
                    todo.append(found)
    return seen


def layer_of(path: Path) -> str | None:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 and parts[0] in LAYERS else None
