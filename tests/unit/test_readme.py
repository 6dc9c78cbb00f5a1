"""The README says what the code does: counts, option lists and field lists read from the code itself.

Each of these once drifted (issue 13): "13 layouts" where the test had 16, a prepare-data usage text
without --tokenizer, and metric fields described in another order than the line prints them.
"""
import re
from pathlib import Path

from llm_runtime import cli
from llm_runtime.cli_tools import prepare_data_parser
from llm_runtime.metrics import FIELDS

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(title)
    end = README.find("\n#", start + len(title))
    return README[start:end if end > 0 else None]


def test_the_readme_counts_the_layouts_the_equivalence_test_runs():
    from tests.distributed.test_parallel_equivalence import LAYOUTS

    (count,) = re.findall(r"checked for (\d+) layouts", README)
    assert int(count) == len(LAYOUTS)


def test_every_prepare_data_option_is_in_the_readme_and_the_usage_text():
    options = {option for action in prepare_data_parser()._actions for option in action.option_strings
               if option.startswith("--") and option != "--help"}
    readme = _section("### Preparing data")
    usage = cli.USAGE[cli.USAGE.index("prepare-data"):cli.USAGE.index("checkpoints (list")]
    assert options - set(re.findall(r"--[a-z][a-z-]*", readme)) == set()
    assert options - set(re.findall(r"--[a-z][a-z-]*", usage)) == set()


def test_the_metric_fields_are_described_in_the_order_the_line_prints_them():
    described = re.findall(r"`([a-z_]+)`", _section("### Metrics").split("Rank 0 also appends")[0])
    names = [name for name, *_ in FIELDS]
    first_mentions = list(dict.fromkeys(name for name in described if name in names))
    assert first_mentions == names
