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


# report.plot returns only the file's path (the figure is closed), so the panels are read from
# the PNG itself: matplotlib draws each panel's frame in black (axes.edgecolor) and grid lines
# light grey, so the left frame line is the image's most-dark column, broken once per gap
# between stacked panels; each panel's curve is recognised by its colour.
LOSS_BLUE, SPEED_GREEN, STALL_RED = (0x1F, 0x77, 0xB4), (0x2C, 0xA0, 0x2C), (0xD6, 0x27, 0x28)  # tab: colours


def _panel_frames(image):
    """(top, bottom, left, right) pixel bounds of each framed panel, top to bottom."""
    import numpy as np

    dark = image[..., :3].mean(axis=2) < 0.5
    height, width = dark.shape
    counts = dark.sum(axis=0)
    left = int(np.argmax(counts[: width // 2]))
    right = width // 2 + int(np.argmax(counts[width // 2:]))
    spine = dark[:, max(0, left - 1):left + 2].any(axis=1)
    frames, top = [], None
    for y, on in enumerate([*spine, False]):
        if on and top is None:
            top = y
        elif not on and top is not None:
            if y - top > height // 10:  # a frame line, not a tick mark or a letter
                frames.append((top, y - 1, left, right))
            top = None
    return frames


def _pixels_of(image, colour, box):
    import numpy as np

    top, bottom, left, right = box
    inside = image[top + 2:bottom - 1, left + 2:right - 1, :3]
    return int((np.abs(inside - np.array(colour) / 255).max(axis=2) < 0.06).sum())


def test_the_report_is_one_png_with_three_panels_loss_tokens_per_s_and_checkpoint_stalls(tmp_path):
    import matplotlib.image

    records = [{"step": s, "loss": 6.0 / s, "tokens_per_s": 1000.0 + s, "mfu": (1000.0 + s) * 1e-4,
                "checkpoint_blocked_s": 0.5 if s % 10 == 0 else 0.0} for s in range(5, 105, 5)]
    records[3]["mfu"] = None  # unknown peak for a while: skipped, not a crash
    out = plot(records, tmp_path / "r" / "report.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(out)
    height, width, _ = image.shape
    assert width >= 900 and height >= 900
    frames = _panel_frames(image)
    assert len(frames) == 3, f"panel frames found at rows {[(f[0], f[1]) for f in frames]}"
    assert all(a[1] < b[0] for a, b in zip(frames, frames[1:]))  # stacked, not overlapping
    assert all(f[1] - f[0] > height // 5 for f in frames), frames  # each a readable share of the image
    # Each curve is drawn in its own panel, and only there: loss, then tokens/s, then stalls.
    for panel, colour in enumerate((LOSS_BLUE, SPEED_GREEN, STALL_RED)):
        found = [_pixels_of(image, colour, frame) for frame in frames]
        assert found[panel] > 100 and sum(found) == found[panel], (colour, found)


def test_the_report_command_writes_the_image_and_refuses_a_missing_file(tmp_path, capsys):
    metrics = _write(tmp_path / "m.jsonl", [{"step": 1, "loss": 2.0, "tokens_per_s": 10.0}])
    assert main(["report", str(metrics), "--out", str(tmp_path / "x.png")]) == 0
    assert (tmp_path / "x.png").exists() and "report: " in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err


EVAL_ORANGE = (255, 127, 14)  # matplotlib's tab:orange


def test_eval_rows_draw_the_held_out_loss_in_the_loss_panel_and_leave_the_training_curves_whole(tmp_path):
    import matplotlib.image

    train = [{"step": s, "loss": 6.0 / s, "tokens_per_s": 1000.0 + s, "checkpoint_blocked_s": 0.5 if s % 10 == 0 else 0.0}
             for s in range(5, 105, 5)]
    evals = [{"step": s, "eval_loss": 7.0 / s, "eval_ppl": 1.0} for s in range(10, 105, 10)]  # same steps as train rows
    image = matplotlib.image.imread(plot(train + evals, tmp_path / "report.png"))
    frames = _panel_frames(image)
    assert len(frames) == 3
    for panel, colour in enumerate((LOSS_BLUE, SPEED_GREEN, STALL_RED)):  # an eval row replaced no training row
        found = [_pixels_of(image, colour, frame) for frame in frames]
        assert found[panel] > 100 and sum(found) == found[panel], (colour, found)
    found = [_pixels_of(image, EVAL_ORANGE, frame) for frame in frames]
    assert found[0] > 100 and sum(found) == found[0], found
