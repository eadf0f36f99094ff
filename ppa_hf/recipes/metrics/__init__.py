"""Local ``evaluate`` metric modules shipped with ppa_hf (they load offline: no Hub access).

``evaluate.load(ppa_hf.recipes.metrics.metric_path("ppa_math_accuracy"), "gsm8k")``, or use :func:`load_metric`.
"""

from __future__ import annotations

import os

METRICS_DIR = os.path.dirname(os.path.abspath(__file__))
CONFIGS = ("gsm8k", "gsm8k_strict", "math")


def metric_path(name: str = "ppa_math_accuracy") -> str:
    return os.path.join(METRICS_DIR, name)


def load_metric(config_name: str):
    """The ``ppa_math_accuracy`` metric of ``config_name`` (gsm8k | gsm8k_strict | math), loaded offline."""
    import evaluate

    if config_name not in CONFIGS:
        raise ValueError(f"metric config {config_name!r} is not known; it must be one of {', '.join(CONFIGS)}")
    return evaluate.load(metric_path(), config_name)
