"""The demo's figure: redrawn from its CSV, log axis labelled up to its top."""

import math
import shutil

from conftest import REPO_ROOT

from ppa_hf.recipes.plots import log_ticks


def test_log_ticks_label_both_ends_of_the_axis():
    for low, high in [(10.7, 59.2), (0.5, 100.0), (1e-3, 1e6), (1.0, 1.1)]:
        ticks = log_ticks(low, high)
        assert 1 <= len(ticks) <= 8 and all(low <= t <= high for t in ticks)
        if high / low > 4:  # a tick in the top and in the bottom quarter of the log range
            span = math.log(high / low)
            assert math.log(ticks[-1] / low) >= 0.75 * span and math.log(ticks[0] / low) <= 0.25 * span, ticks


def test_demo_replot_from_csv(tmp_path):
    from ppa_hf.recipes.demo import main

    csv_path = tmp_path / "perplexity_vs_p.csv"
    shutil.copy(REPO_ROOT / "docs" / "demo" / "perplexity_vs_p.csv", csv_path)
    assert main(["--replot", str(csv_path)]) == 0
    assert (tmp_path / "perplexity_vs_p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
