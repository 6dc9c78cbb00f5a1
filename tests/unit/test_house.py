"""The shape of the code base, enforced: module and function sizes, and one owner per fact.

Later changes keep to these (issue 13): no module over 400 lines, no function over 60 lines,
SageMaker's paths known only to paths.py, the launcher-to-worker variables only to workerenv.py.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "llm_runtime"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _name(path: Path) -> str:
    return path.relative_to(PACKAGE.parent).as_posix()


def _strings(path: Path) -> list[str]:
    """Every string constant of a module that is code, not documentation (docstrings are left out)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def _owners(fact: str) -> set[str]:
    return {_name(path) for path in MODULES if any(fact in text for text in _strings(path))}


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_no_module_is_longer_than_400_lines(path):
    lines = path.read_text().count("\n")
    assert lines <= MAX_MODULE_LINES, f"{_name(path)} has {lines} lines; split it (ARCHITECTURE.md)"


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_no_function_is_longer_than_60_lines(path):
    tree = ast.parse(path.read_text())
    long = [(node.name, node.lineno, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{_name(path)}: functions over {MAX_FUNCTION_LINES} lines (name, line, length): {long}"


@pytest.mark.parametrize("fact, owner", [
    ("/opt/ml", "llm_runtime/paths.py"),
    ("SM_OUTPUT_DIR", "llm_runtime/paths.py"),
    ("SM_MODEL_DIR", "llm_runtime/paths.py"),
    ("SM_OUTPUT_DATA_DIR", "llm_runtime/paths.py"),
    ("SM_CHANNEL_", "llm_runtime/paths.py"),
    ("SAGEMAKER_BASE_DIR", "llm_runtime/paths.py"),
    ("TORCHELASTIC_RESTART_COUNT", "llm_runtime/workerenv.py"),
    ("LLM_RUNTIME_STOP_FILE", "llm_runtime/workerenv.py"),
])
def test_each_fact_about_the_job_has_one_owner(fact, owner):
    assert _owners(fact) == {owner}


def test_the_size_check_sees_an_oversized_function():
    """The check itself can fail: a 61-line function is caught."""
    body = "\n".join(f"    x{i} = {i}" for i in range(60))
    tree = ast.parse(f"def long():\n{body}\n")
    node = tree.body[0]
    assert node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
