"""Accuracy of math generations (GSM8K, MATH) against gold answers: an ``evaluate`` metric that works offline.

Configs: ``gsm8k`` (last number of the generation), ``gsm8k_strict`` (only ``#### N`` / "The answer is N"),
``math`` (last ``\\boxed{}``, normalised, equivalent forms accepted). ``predictions`` are raw generations,
``references`` gold final answers (GSM8K: the number after ``####`` or the full solution; MATH: the answer).
"""

import datasets
import evaluate

from ppa_hf.recipes.answers import extract_gsm8k, extract_math, gsm8k_equal, gsm8k_gold, math_equal

_DESCRIPTION = __doc__
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated texts.
    references: list of gold answers.
Returns:
    accuracy: fraction of predictions whose extracted answer equals the gold answer.
    correct: number of correct predictions.  total: number of predictions.
    extracted: fraction of predictions from which an answer could be extracted.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PpaMathAccuracy(evaluate.Metric):
    def _info(self):
        if self.config_name not in ("gsm8k", "gsm8k_strict", "math"):
            raise ValueError(f"config_name={self.config_name!r}; it must be gsm8k, gsm8k_strict or math")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _score(self, prediction, reference):
        if self.config_name == "math":
            answer = extract_math(prediction)
            return answer is not None, math_equal(answer, reference)
        answer = extract_gsm8k(prediction, strict=self.config_name == "gsm8k_strict")
        gold = gsm8k_gold(reference) if "####" in reference else reference
        return answer is not None, gsm8k_equal(answer, gold)

    def _compute(self, predictions, references):
        scores = [self._score(p, r) for p, r in zip(predictions, references)]
        total = len(scores)
        correct = sum(ok for _, ok in scores)
        return {"accuracy": correct / total if total else 0.0, "correct": correct, "total": total,
                "extracted": sum(found for found, _ in scores) / total if total else 0.0}
