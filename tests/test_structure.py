"""The code stays readable in pieces: no function in ddp_train/ over MAX_LINES lines or taking more than
MAX_PARAMS parameters, and the training entry point (trainer.py) defines no functions inside functions (no
closures over the run's names)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ddp_train"
MAX_LINES = 80  # from the def line to the body's last line, docstring included
MAX_PARAMS = 7  # a longer list means an object is being taken apart at the call: pass the object instead

FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


def long_functions(limit: int = MAX_LINES) -> list[str]:
    """``path:line name (N lines)`` for every function or method longer than ``limit`` lines."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, FUNCTIONS):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if lines > limit:
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def parameter_count(node: ast.FunctionDef | ast.AsyncFunctionDef, is_method: bool) -> int:
    """Parameters of ``node``: positional, keyword-only, ``*args`` and ``**kwargs`` each count as one; the
    ``self``/``cls`` of a method (any function defined directly in a class body, not a staticmethod) does not."""
    args = node.args
    count = len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs)
    count += (args.vararg is not None) + (args.kwarg is not None)
    static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in node.decorator_list)
    if is_method and not static and (args.posonlyargs or args.args):
        count -= 1
    return count


def wide_functions(limit: int = MAX_PARAMS) -> list[str]:
    """``path:line name (N parameters)`` for every function or method taking more than ``limit`` parameters."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        methods = {id(item) for cls in ast.walk(tree) if isinstance(cls, ast.ClassDef)
                   for item in cls.body if isinstance(item, FUNCTIONS)}
        for node in ast.walk(tree):
            if isinstance(node, FUNCTIONS):
                count = parameter_count(node, id(node) in methods)
                if count > limit:
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({count} parameters)")
    return found


def nested_functions(source: str) -> list[str]:
    """``inner in outer`` for every function defined inside another function of ``source``."""
    found = []
    for outer in ast.walk(ast.parse(source)):
        if isinstance(outer, FUNCTIONS):
            found += [f"{inner.name} in {outer.name}" for inner in ast.walk(outer)
                      if inner is not outer and isinstance(inner, FUNCTIONS)]
    return found


def test_no_function_is_longer_than_the_limit():
    assert long_functions() == []


def test_the_length_check_finds_long_functions():
    # The same check at a limit some functions exceed: it does look at them (not a vacuous pass).
    assert long_functions(limit=30)


def test_no_function_takes_more_than_the_parameter_limit():
    assert wide_functions() == []


def test_the_parameter_check_finds_wide_functions():
    # The same check at a limit some functions exceed: it does look at them (not a vacuous pass).
    assert wide_functions(limit=3)
    # self is not counted, cls neither; *args and **kwargs count one each.
    source = ("class C:\n    def m(self, a, *, b): pass\n    @classmethod\n    def k(cls, a): pass\n"
              "def f(a, /, b, *rest, c, **extra): pass\n")
    tree = ast.parse(source)
    counts = {n.name: parameter_count(n, n.name != "f") for n in ast.walk(tree) if isinstance(n, FUNCTIONS)}
    assert counts == {"m": 2, "k": 1, "f": 5}


def test_the_training_entry_point_has_no_nested_functions():
    assert nested_functions((PACKAGE / "training" / "trainer.py").read_text()) == []
    assert nested_functions("def run():\n    def on_step():\n        pass\n") == ["on_step in run"]
