"""The demo's figure: redrawn from its CSV, log axis labelled up to its top."""

import shutil

from conftest import REPO_ROOT

from ppa_hf.recipes.plots import log_ticks


def test_log_ticks_label_both_ends_of_the_data():
    for low, high in [(11.9969, 52.8457), (17.2, 33.9), (0.5, 100.0), (1e-3, 1e6), (1.0, 1.1), (12.0, 12.0)]:
        ticks = log_ticks(low, high)
        assert len(ticks) <= 10 and ticks == sorted(ticks), ticks
        assert ticks[0] <= low and ticks[-1] >= high, (low, high, ticks)
        assert ticks[0] * 3 > low and ticks[-1] < high * 3, (low, high, ticks)  # and close to the data
    assert log_ticks(11.9969, 52.8457) == [10, 12, 15, 20, 25, 30, 40, 50, 60]


def test_demo_replot_from_csv(tmp_path):
    from ppa_hf.recipes.demo import main

    csv_path = tmp_path / "perplexity_vs_p.csv"
    shutil.copy(REPO_ROOT / "docs" / "demo" / "perplexity_vs_p.csv", csv_path)
    assert main(["--replot", str(csv_path)]) == 0
    assert (tmp_path / "perplexity_vs_p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
