"""Recipes built on the plugin: fine-tuning (Accelerate, PEFT), evaluation (GSM8K, MATH-500, perplexity,
lm-evaluation-harness), sweeps over p with their plots, and the demo. They need the package's extras
(``pip install 'ppa_hf[train]'``, ``'ppa_hf[eval]'``, ``'ppa_hf[lm-eval]'`` or ``'ppa_hf[all]'``); the plugin itself
does not import them."""
