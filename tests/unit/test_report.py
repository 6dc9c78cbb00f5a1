"""llm-runtime report: one readable image from a metrics file; bad files named with their line."""
import json

import pytest

from llm_runtime.cli import main
from llm_runtime.report import ReportError, latest_per_step, load_metrics, plot


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_a_restarted_runs_replayed_steps_keep_their_last_record():
    records = [{"step": s, "loss": 5.0 - s} for s in (2, 4, 6)] + [{"step": s, "loss": 9.0} for s in (6, 8)]
    assert [(r["step"], r["loss"]) for r in latest_per_step(records)] == [(2, 3.0), (4, 1.0), (6, 9.0), (8, 9.0)]


@pytest.mark.parametrize("text,needle", [
    ("", "no metrics records"),
    ('{"step": 1}\nnot json\n', ":2: not a JSON line"),
    ('{"loss": 1.0}\n', ":1: a metrics record needs an integer 'step'"),
])
def test_a_bad_metrics_file_is_named_with_its_line(tmp_path, text, needle):
    (tmp_path / "m.jsonl").write_text(text)
    with pytest.raises(ReportError, match=needle):
        load_metrics(tmp_path / "m.jsonl")


def test_the_report_is_one_png_with_three_panels(tmp_path):
    import matplotlib.image

    records = [{"step": s, "loss": 6.0 / s, "tokens_per_s": 1000.0 + s, "mfu": (1000.0 + s) * 1e-4,
                "checkpoint_blocked_s": 0.5 if s % 10 == 0 else 0.0} for s in range(5, 105, 5)]
    records[3]["mfu"] = None  # unknown peak for a while: skipped, not a crash
    out = plot(records, tmp_path / "r" / "report.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(out).shape
    assert width >= 900 and height >= 900


def test_the_report_command_writes_the_image_and_refuses_a_missing_file(tmp_path, capsys):
    metrics = _write(tmp_path / "m.jsonl", [{"step": 1, "loss": 2.0, "tokens_per_s": 10.0}])
    assert main(["report", str(metrics), "--out", str(tmp_path / "x.png")]) == 0
    assert (tmp_path / "x.png").exists() and "report: " in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err
