"""The package's structure rules (docs/architecture.md), checked on the code as it is:

- layers import downward only (runtime < core < modeling < data < eval < training < reporting < pipeline);
- one stage's pipeline module never imports another's, and no dpoflow import hides inside a function;
- the library names no DVC path (models/, data/, metrics/, ...): paths live in stages/*.py and dvc.yaml;
- no library module is over 450 lines;
- every library module a stage script reads is a dependency of that stage in dvc.yaml.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tests.import_graph import LAYERS, ROOT, closure, imports_of, layer_of, library_modules, module_path

MAX_LINES = 450
DVC_PREFIXES = ("models/", "data/", "metrics/", "reports/", "dvclive/", "checkpoints/", "gates/")


def test_layers_import_downward_only():
    upward = []
    for path in library_modules():
        own = layer_of(path)
        if own is None:
            continue
        for name, line, _ in imports_of(path):
            target = module_path(name)
            other = layer_of(target) if target is not None else None
            if other is not None and LAYERS.index(other) > LAYERS.index(own):
                upward.append(f"{path.relative_to(ROOT)}:{line}: {own} imports {name} ({other})")
    assert not upward, "\n".join(upward)


def test_no_pipeline_module_imports_another_and_no_function_local_imports():
    found = []
    for path in library_modules():
        for name, line, inside in imports_of(path):
            where = f"{path.relative_to(ROOT)}:{line}: {name}"
            if inside:
                found.append(f"{where} imported inside a function")
            if layer_of(path) == "pipeline" and name.startswith("dpoflow.pipeline."):
                found.append(f"{where}: a pipeline module imports another")
    assert not found, "\n".join(found)


def _string_constants(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_the_library_names_no_dvc_path():
    found = [
        f"{path.relative_to(ROOT)}:{line}: {text!r}"
        for path in library_modules()
        if path.name != "__main__.py"  # the command line's defaults name the project's layout, as stages do
        for line, text in _string_constants(path)
        if text.startswith(DVC_PREFIXES)
    ]
    assert not found, "paths belong in stages/*.py:\n" + "\n".join(found)


def test_library_modules_stay_small():
    big = {str(p.relative_to(ROOT)): n for p in library_modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"over {MAX_LINES} lines: {big}"


def _stages():
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(_stages()))
def test_every_module_a_stage_reads_is_a_dvc_dependency(stage):
    spec = _stages()[stage]
    script = ROOT / spec["cmd"].split()[1]
    deps = [d if isinstance(d, str) else next(iter(d)) for d in spec["deps"]]
    assert str(script.relative_to(ROOT)) in deps
    for dep in deps:
        if dep.startswith(("dpoflow", "stages")):
            assert (ROOT / dep).exists(), f"{stage}: dependency {dep} does not exist"
    reads = closure(script)
    for local in ast.walk(ast.parse(script.read_text())):  # stage helpers next to the script (stages/live_logger.py)
        if isinstance(local, ast.ImportFrom) and local.module and (ROOT / "stages" / f"{local.module}.py").exists():
            helper = ROOT / "stages" / f"{local.module}.py"
            assert str(helper.relative_to(ROOT)) in deps, f"{stage}: {helper.name} is not a dependency"
            reads |= closure(helper)
    missing = [
        str(p.relative_to(ROOT))
        for p in sorted(reads)
        if p.name != "__init__.py" and not any(p.relative_to(ROOT).as_posix().startswith(d) for d in deps)
    ]
    assert not missing, f"{stage} reads {missing} but dvc.yaml does not list them"
