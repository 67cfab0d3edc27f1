"""The console progress line."""

from __future__ import annotations

import io

from segtrain.progress import Progress, format_duration


def test_line_has_step_values_rate_and_eta():
    out = io.StringIO()
    progress = Progress("train", 100, stream=out, min_interval=0.0)
    progress.t0 -= 10.0  # ten seconds for 20 steps -> 40 s left
    line = progress.update(20, 123.4, loss=0.56789)
    assert line.startswith("train step 20/100")
    assert "loss 0.5679" in line and "123.4 img/s" in line and "ETA 40s" in line
    assert out.getvalue() == line + "\n"
    done = progress.update(100, 100.0)
    assert "done in" in done and "ETA" not in done


def test_not_a_terminal_prints_at_most_every_interval():
    out = io.StringIO()
    progress = Progress("eval", 10, unit="batch", stream=out, min_interval=3600)
    for i in range(1, 10):
        progress.update(i)
    progress.update(10)  # the last one is always printed
    assert out.getvalue().count("\n") == 2
    assert out.getvalue().splitlines()[-1].startswith("eval batch 10/10")


def test_format_duration():
    assert format_duration(5) == "5s"
    assert format_duration(125) == "2m05s"
    assert format_duration(3725) == "1h02m05s"
