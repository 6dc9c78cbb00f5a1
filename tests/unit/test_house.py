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


def _long_functions(source: str) -> list[tuple[str, int, int]]:
    """(name, first line, length) of every function over the limit."""
    return [(node.name, node.lineno, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


def _imports(source: str) -> set[str]:
    """The top-level packages a module imports (anywhere in it, lazily inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def _owners(fact: str) -> set[str]:
    return {_name(path) for path in MODULES if any(fact in text for text in _strings(path))}


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_no_module_is_longer_than_400_lines(path):
    lines = path.read_text().count("\n")
    assert lines <= MAX_MODULE_LINES, f"{_name(path)} has {lines} lines; split it (ARCHITECTURE.md)"


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_no_function_is_longer_than_60_lines(path):
    long = _long_functions(path.read_text())
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


def test_only_the_storage_layer_talks_to_s3_through_boto3():
    users = {_name(path) for path in MODULES if _imports(path.read_text()) & {"boto3", "botocore", "s3transfer"}}
    assert users and all(name.startswith("llm_runtime/storage/") for name in users), sorted(users)


def test_the_checks_themselves_can_fail(tmp_path):
    """A 61-line function (a method, too) is caught and a 60-line one is not; a string in code is a fact,
    the same string in a docstring is not."""
    def source(lines: int, indent: str = "") -> str:
        body = "\n".join(f"{indent}    x{i} = {i}" for i in range(lines - 1))
        return f"{indent}def f():\n{body}\n"

    assert _long_functions(source(61)) == [("f", 1, 61)]
    assert _long_functions("class C:\n" + source(61, "    ")) == [("f", 2, 61)]
    assert _long_functions(source(60)) == []
    module = tmp_path / "probe.py"
    module.write_text('"""/opt/ml in a docstring"""\nROOT = "/opt/ml"\n')
    assert _strings(module) == ["/opt/ml"]
    assert _imports("def f():\n    import boto3.session\n    from botocore.config import Config\n") == \
        {"boto3", "botocore"}
