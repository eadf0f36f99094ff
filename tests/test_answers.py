"""Answer extraction and equivalence on hand-written GSM8K and MATH cases."""

import pytest

from ppa_hf.recipes.answers import (extract_gsm8k, extract_math, gsm8k_equal, gsm8k_gold, last_boxed, math_equal,
                            math_gold, normalize_math, truncate_at_stop)


def test_gsm8k_gold():
    assert gsm8k_gold("She pays 3*4=<<3*4=12>>12 dollars.\n#### 12") == "12"
    assert gsm8k_gold("...\n#### 1,000") == "1000"
    assert gsm8k_gold("#### -7") == "-7"
    with pytest.raises(ValueError, match="####"):
        gsm8k_gold("no marker here 5")


@pytest.mark.parametrize("text,flexible,strict", [
    ("He has 3 apples and buys 4 more, so 7.\n#### 7", "7", "7"),
    ("The total is $1,250.00.", "1250", None),
    ("So the answer is 42.\n\nQuestion: Tom has 9 cats", "42", "42"),
    ("First 10, then 20. The answer is 30", "30", "30"),
    ("It costs $.50 each", "0.5", None),
    ("Loss of -15 dollars", "-15", None),
    ("I do not know.", None, None),
    ("#### 18\nQuestion: 99 balloons", "18", "18"),
])
def test_gsm8k_extraction(text, flexible, strict):
    assert extract_gsm8k(text) == flexible
    assert extract_gsm8k(text, strict=True) == strict


def test_gsm8k_equal():
    assert gsm8k_equal("18", "18")
    assert gsm8k_equal("18.0", "18")
    assert not gsm8k_equal("17", "18")
    assert not gsm8k_equal(None, "18")


def test_truncate_at_stop():
    assert truncate_at_stop("a\nQuestion: b\nProblem: c") == "a\n"
    assert truncate_at_stop("no stop") == "no stop"


def test_last_boxed_nested_and_fbox():
    text = r"so $x = \boxed{\frac{1}{2}}$ and then \boxed{\sqrt{2}+\frac{3}{4}}."
    assert last_boxed(text) == r"\boxed{\sqrt{2}+\frac{3}{4}}"
    assert extract_math(text) == r"\sqrt{2}+\frac{3}{4}"
    assert extract_math(r"thus \fbox{7}") == "7"
    assert extract_math(r"\boxed 5$ done") == "5"
    assert extract_math(r"unbalanced \boxed{3") is None
    assert extract_math("Final Answer: The final answer is $12$. I hope it is correct.") == "12"
    assert extract_math(r"stop here \boxed{1}" + "\nProblem: \\boxed{2}") == "1"


@pytest.mark.parametrize("pred,gold", [
    (r"\dfrac{1}{2}", r"\frac12"),
    (r"\tfrac{3}{4}", r"\frac{3}{4}"),
    ("0.5", r"\frac{1}{2}"),
    ("1/2", r"\frac{1}{2}"),
    ("-3/4", r"-\frac{3}{4}"),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
    (r"10\text{ cm}", "10"),
    ("10 cm", "10"),
    (r"90^\circ", "90"),
    (r"90^{\circ}", "90"),
    (r"x = 5", "5"),
    (r"\$18.90", "18.90"),
    ("2.0", "2"),
    (r"50\%", "50"),
    ("1,000", "1000"),
    (r"\sqrt2", r"\sqrt{2}"),
    (r"\text{(C)}", "(C)"),
    (r"\{1, 2\}", "{1,2}"),
    (r"\frac{6}{8}", r"\frac{3}{4}"),
    (r"5\text{ inches}", "5"),
])
def test_math_equivalent(pred, gold):
    assert math_equal(pred, gold), (normalize_math(pred), normalize_math(gold))


@pytest.mark.parametrize("pred,gold", [
    ("3", "4"),
    (r"\frac{1}{3}", "0.33"),
    (r"(1,2)", r"(2,1)"),
    (r"[2,5)", r"[2,5]"),
    ("y = 2x + 3", "2x+4"),
    (None, "1"),
])
def test_math_not_equivalent(pred, gold):
    assert not math_equal(pred, gold)


def test_math_named_value_stripped_equation_kept():
    assert normalize_math("y = 2x + 3") == "2x+3"  # "name = value" -> value (Minerva-style)
    assert normalize_math("x + y = 3") == "x+y=3"


def test_math_gold():
    assert math_gold({"answer": r"\frac{1}{2}", "solution": "..."}) == r"\frac{1}{2}"
    assert math_gold({"answer": "", "solution": r"so \boxed{4}."}) == "4"
    with pytest.raises(ValueError, match="answer"):
        math_gold({"solution": "no box"})
