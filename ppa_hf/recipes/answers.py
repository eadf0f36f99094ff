"""Answer extraction and comparison for GSM8K and MATH(-500).

GSM8K: the gold answer is the number after ``#### ``; a generation's answer is the last number in it
(flexible mode), or the number after ``#### `` / "The answer is" (strict mode). Numbers compare as values
(``1,000`` = ``1000`` = ``1000.00``).

MATH: the answer is the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``); without one, the text after
"final answer is" / "The answer is". Both sides go through the usual normalisation (Hendrycks et al.'s
``strip_string`` steps plus the Minerva final-answer clean-up: ``\\left``/``\\right``, spaces, units and
``\\text{...}``, ``\\dfrac``/``\\tfrac``, ``\\frac12`` -> ``\\frac{1}{2}``, ``a/b`` -> ``\\frac{a}{b}``,
``0.5`` -> ``.5``...), then compare as strings, and as numbers where both sides are plain numbers or
fractions (so ``\\frac{1}{2}``, ``1/2`` and ``0.5`` are all equal).
"""

from __future__ import annotations

import re
from fractions import Fraction

STOP_MARKERS = ("Question:", "Problem:", "\n\n\n")

# ----------------------------------------------------------------------------------------------- GSM8K

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")
_STRICT = [re.compile(r"####\s*(-?\$?[\d,]*\.?\d+)"),
           re.compile(r"[Tt]he (?:final )?answer is[:\s]*\$?\s*(-?[\d,]*\.?\d+)")]


def truncate_at_stop(text: str, stops=STOP_MARKERS) -> str:
    """``text`` up to the first stop marker (the next few-shot question), markers excluded."""
    cut = len(text)
    for stop in stops:
        idx = text.find(stop)
        if idx != -1:
            cut = min(cut, idx)
    return text[:cut]


def normalize_number(text: str | None) -> str | None:
    """``"$1,000.00"`` -> ``"1000"``, ``"-3.50"`` -> ``"-3.5"``; ``None`` when ``text`` holds no number."""
    if text is None:
        return None
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None
    if value.denominator == 1:
        return str(value.numerator)
    return format(float(value), "g") if len(cleaned) < 20 else cleaned


def gsm8k_gold(answer: str) -> str:
    """The gold answer of a GSM8K record: the number after ``####``."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer has no '####' final-answer marker: {answer[-80:]!r}")
    value = normalize_number(answer.split("####")[-1])
    if value is None:
        raise ValueError(f"GSM8K answer after '####' is not a number: {answer.split('####')[-1]!r}")
    return value


def extract_gsm8k(generation: str, strict: bool = False) -> str | None:
    """The predicted number of a GSM8K generation (already cut at the next question), or ``None``.

    ``strict``: only an explicit ``#### N`` or "The answer is N"; otherwise the last number in the text.
    """
    text = truncate_at_stop(generation)
    if strict:
        for pattern in _STRICT:
            found = pattern.findall(text)
            if found:
                return normalize_number(found[-1])
        return None
    found = _NUMBER.findall(text)
    for candidate in reversed(found):
        value = normalize_number(candidate)
        if value is not None:
            return value
    return None


def gsm8k_equal(prediction: str | None, gold: str | None) -> bool:
    if prediction is None or gold is None:
        return False
    try:
        return Fraction(prediction) == Fraction(gold)
    except (ValueError, ZeroDivisionError):
        return prediction == gold


# ------------------------------------------------------------------------------------------------ MATH


def last_boxed(text: str) -> str | None:
    """The last ``\\boxed{...}`` / ``\\fbox{...}`` (or ``\\boxed x``) of ``text``, braces balanced, or ``None``."""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    if text.startswith("\\boxed ", idx):
        return "\\boxed " + re.split(r"[$\n]", text[idx + len("\\boxed "):])[0].strip()
    depth, start = 0, None
    for pos in range(idx, len(text)):
        if text[pos] == "{":
            depth += 1
            if start is None:
                start = pos
        elif text[pos] == "}":
            depth -= 1
            if depth == 0 and start is not None:
                return text[idx: pos + 1]
    return None


def remove_boxed(boxed: str | None) -> str | None:
    if boxed is None:
        return None
    if boxed.startswith("\\boxed "):
        return boxed[len("\\boxed "):]
    for head in ("\\boxed{", "\\fbox{"):
        if boxed.startswith(head) and boxed.endswith("}"):
            return boxed[len(head):-1]
    return None


_FINAL_ANSWER = [
    re.compile(r"[Ff]inal [Aa]nswer:?\s*(?:[Tt]he final answer is)?\s*\$(.+?)\$", re.S),
    re.compile(r"[Tt]he (?:final )?answer is:?\s*\$(.+?)\$", re.S),
    re.compile(r"[Tt]he (?:final )?answer is:?\s*([^\n]+?)\.?\s*(?:\n|$)"),
]


def extract_math(generation: str) -> str | None:
    """The (un-normalised) answer of a MATH generation: last ``\\boxed{}``, else "final answer is $X$"."""
    text = truncate_at_stop(generation)
    boxed = remove_boxed(last_boxed(text))
    if boxed is not None:
        return boxed
    for pattern in _FINAL_ANSWER:
        found = pattern.findall(text)
        if found:
            return found[-1].strip()
    return None


def math_gold(record: dict) -> str:
    """Gold answer of a MATH record: its ``answer`` field, else the last box of its ``solution``."""
    if record.get("answer") not in (None, ""):
        return str(record["answer"])
    boxed = remove_boxed(last_boxed(record.get("solution", "")))
    if boxed is None:
        raise ValueError("MATH record has neither an 'answer' field nor a \\boxed{} answer in its 'solution'")
    return boxed


_UNIT_WORDS = [
    "degrees", "degree", "cm", "centimeters", "meters", "meter", "inches", "inch", "feet", "foot", "units",
    "unit", "square", "sq", "cents", "cent", "dollars", "dollar", "mph", "hours", "hour", "minutes", "minute",
    "seconds", "second", "miles", "mile", "ft", "km", "kg", "grams", "gram", "pounds", "pound", "days", "day",
    "years", "year", "points", "point", "students", "people", "ways", "mm",
]
_SUBSTITUTIONS = [("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), (r"\ ", ""), (" ", ""), ("mbox", "text"),
                  (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}")]


def _fix_fracs(string: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{72}`` -> ``\\frac{1}{72}``."""
    parts = string.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if part.startswith("{"):
            out += part
            continue
        if len(part) < 2:
            return string
        a, b, rest = part[0], part[1], part[2:]
        if b == "{":
            out += "{" + a + "}" + b + rest
        else:
            out += "{" + a + "}{" + b + "}" + rest
    return out


def _fix_a_slash_b(string: str) -> str:
    match = re.fullmatch(r"(-?\d+)/(\d+)", string)
    if match:
        return f"\\frac{{{match.group(1)}}}{{{match.group(2)}}}"
    return string


def _fix_sqrt(string: str) -> str:
    return re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", string)


def normalize_math(answer: str | None) -> str | None:
    """Canonical string form of a MATH answer (``None`` stays ``None``)."""
    if answer is None:
        return None
    s = str(answer).strip()
    s = s.replace("\n", "").replace("\\!", "")
    s = re.sub(r"\\(?:d|t)frac", r"\\frac", s)
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("\\{", "{").replace("\\}", "}")  # set braces
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("°", "")
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\text\{\s*([^{}]*?)\s*\}", r"\1", s)  # \text{cm} -> cm (units removed below)
    s = re.sub(r"\\(?:mbox|textbf|mathrm|mathbf)\{([^{}]*)\}", r"\1", s)
    # a leading "x =" / "k=" (a single variable being named), not an equation like "y = 2x + 3"
    match = re.fullmatch(r"\s*[a-zA-Z]\s*=\s*(.+)", s)
    if match and "=" not in match.group(1):
        s = match.group(1)
    for before, after in _SUBSTITUTIONS:
        s = s.replace(before, after)
    # trailing units after a number: "10 cm" / "10cm" / "5\text{ inches}"
    unit_pattern = "|".join(sorted(_UNIT_WORDS, key=len, reverse=True))
    s = re.sub(rf"(\d)\s*(?:{unit_pattern})(?:\^\{{?\d\}}?|\^\d)?\s*$", r"\1", s)
    s = re.sub(rf"^(?:{unit_pattern})$", "", s)
    s = s.replace("\\,", "").replace("\\;", "").replace("\\:", "")
    s = s.rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):  # 1,000 -> 1000 (a thousands separator, not a list)
        s = s.replace(",", "")
    s = s.replace(" ", "")
    if s.startswith("."):
        s = "0" + s
    s = s.replace("{.", "{0.")
    s = _fix_sqrt(s)
    s = _fix_fracs(s)
    s = _fix_a_slash_b(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    # 2.0 -> 2, 3.50 -> 3.5
    if re.fullmatch(r"-?\d+\.\d*", s):
        s = s.rstrip("0").rstrip(".") or "0"
    return s


def _as_number(s: str) -> Fraction | None:
    """A plain number, ``a/b`` or ``\\frac{a}{b}`` (optionally negated) as an exact fraction, else ``None``."""
    match = re.fullmatch(r"(-?)\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", s)
    try:
        if match:
            value = Fraction(match.group(2)) / Fraction(match.group(3))
            return -value if match.group(1) else value
        if re.fullmatch(r"-?\d+(\.\d+)?|-?\d+/\d+", s):
            return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def math_equal(prediction: str | None, gold: str | None) -> bool:
    """Do two MATH answers agree after normalisation (as strings, or as numbers)?"""
    if prediction is None or gold is None:
        return False
    a, b = normalize_math(prediction), normalize_math(gold)
    if a == b:
        return True
    x, y = _as_number(a), _as_number(b)
    if x is not None and y is not None:
        return x == y
    return False
