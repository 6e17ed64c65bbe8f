"""The layout's promises, checked: training and prediction do not pull in the report stack,
and no package reaches into another package's private helpers."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cxr_fast"
# What a training or prediction process must never load: plotting, and the report it feeds.
REPORT_STACK = ("matplotlib", "cxr_fast.analyze.report", "cxr_fast.analyze.figures")


def test_training_and_prediction_do_not_load_the_report_stack():
    # A fresh interpreter: this test process may already have imported anything.
    code = ("import json, sys, cxr_fast.train, cxr_fast.predict; "
            "print(json.dumps(sorted(sys.modules)))")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    heavy = [name for name in loaded if any(name == top or name.startswith(top + ".") for top in REPORT_STACK)]
    assert heavy == []
    assert not any(name.startswith("cxr_fast.analyze") for name in loaded)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str, *, is_package: bool) -> str:
    return module if is_package else module.rpartition(".")[0]


def private_imports_across_packages(source: str, module: str, *, is_package: bool = False) -> list[str]:
    """`from cxr_fast.x import _name` where cxr_fast.x lives in another package than `module`."""
    own_package = package_of(module, is_package=is_package)
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cxr_fast")):
            continue
        target_is_package = (ROOT / node.module.replace(".", "/") / "__init__.py").is_file()
        if package_of(node.module, is_package=target_is_package) == own_package:
            continue
        found += [f"{module}: from {node.module} import {alias.name}"
                  for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")]
    return found


def test_no_module_imports_private_helpers_of_another_package():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += private_imports_across_packages(path.read_text(), module_name(path),
                                                 is_package=path.name == "__init__.py")
    assert found == []


def test_the_private_import_check_sees_one():
    source = "from cxr_fast.analyze.stats import _helper, public\nfrom cxr_fast.train import _local\n"
    assert private_imports_across_packages(source, "cxr_fast.predict") == [
        "cxr_fast.predict: from cxr_fast.analyze.stats import _helper"]
    assert private_imports_across_packages(source, "cxr_fast.analyze.report") == [
        "cxr_fast.analyze.report: from cxr_fast.train import _local"]


def project_imports(source: str, modules: set[str]) -> set[str]:
    """The project modules `source` imports anywhere (also inside functions: a deferred import
    is still a dependency, and a circle of them is one module's job split in two)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cxr_fast"):
            found |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                      for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
    return found & modules


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every group of modules that import one another round a circle (Tarjan's components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return circles


def test_no_two_modules_import_each_other_round_a_circle():
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {module: project_imports(path.read_text(), set(paths)) - {module} for module, path in paths.items()}
    assert import_circles(graph) == []


def test_the_circle_check_sees_one_through_a_deferred_import():
    modules = {"cxr_fast.a", "cxr_fast.b", "cxr_fast.c"}
    graph = {"cxr_fast.a": project_imports("from cxr_fast.b import x\n", modules),
             "cxr_fast.b": project_imports("def f():\n    from cxr_fast.c import y\n", modules),
             "cxr_fast.c": project_imports("import cxr_fast.a\n", modules)}
    assert import_circles(graph) == [["cxr_fast.a", "cxr_fast.b", "cxr_fast.c"]]


def test_every_module_is_at_most_600_lines():
    long = {str(path.relative_to(ROOT)): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    assert {path: lines for path, lines in long.items() if lines > 600} == {}
