"""Answer extraction and matching for generation evaluation: is a model's output the reference answer?

Matchers (`--eval_answer_match`), one entry each in MATCHER_TABLE at the end of this file (a new matcher
is one entry there, an extract and a compare function, plus its test):
    math         the content of the last \\boxed{...}, else the last number in the output; compared
                 numerically with the reference's (tolerant of `1,000`, `1000.0`, `$`, `%`, `3/4`);
                 other answers as text without spaces and `$`, else by math-verify (LaTeX fractions,
                 sets, intervals, equations such as `x=1`).
    exact        the whole output equals the reference after normalising whitespace and case.
    contains     the normalised reference occurs in the normalised output.
    choice       a multiple-choice letter (A-Z): "answer is (B)", a leading "B." / "(B)", else the last
                 standalone capital letter; compared with the reference's letter.
    regex:<pat>  the first group of the first match of <pat> (the whole match without a group),
                 compared with the reference as `exact` does.

Reasoning models: when the output contains `</think>`, only the text after the last one is searched, so
numbers in the reasoning never count as the answer. Pure functions, no torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

THINK_END = "</think>"

# A number as people write it: sign, currency, thousands separators, decimals, percent, simple fraction.
_NUMBER = re.compile(r"-?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s?/\s?\d+(?:\.\d+)?)?%?|-?\.\d+")
_CHOICE_STATED = re.compile(r"answer\s*(?:is|:)?\s*:?\s*\(?\**([A-Z])\b\)?", re.IGNORECASE)
_CHOICE_LEADING = re.compile(r"^\s*\(?([A-Z])(?:[).:]|\s*$)")
_CHOICE_ANY = re.compile(r"(?<![A-Za-z])\(?([A-Z])\)?(?![A-Za-z])")


def answer_region(output: str) -> str:
    """The part of an output that holds the answer: after the last `</think>` when there is one."""
    return output.rsplit(THINK_END, 1)[1] if THINK_END in output else output


def normalize_text(text: str) -> str:
    """Whitespace runs to one space, trimmed, lower case."""
    return " ".join(text.split()).lower()


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}), nested braces included; None if absent."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i].strip()
        i += 1
    return None  # unbalanced: cut off by the token limit


def extract_math(text: str) -> str | None:
    """The boxed answer, else the last number, else None."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(text)
    return numbers[-1].strip() if numbers else None


def math_reference(reference: str) -> str:
    """The answer in a reference: its last \\boxed{}, the text after GSM8K's `####`, else all of it."""
    boxed = last_boxed(reference)
    if boxed is not None:
        return boxed
    return reference.rsplit("####", 1)[1].strip() if "####" in reference else reference.strip()


def parse_number(text: str) -> float | None:
    """`1,000`, `$1000.00`, `50%`, `-3/4`, `\\frac{3}{4}` -> float; None when it is not a number.

    A percent keeps its face value (`50%` is 50), as answers are written either way.
    """
    cleaned = text.strip().rstrip(".").replace("\\%", "").replace("\\!", "")  # LaTeX's percent sign before the plain one
    cleaned = cleaned.replace("$", "").replace(",", "").replace("%", "").replace(" ", "")
    frac = re.fullmatch(r"(-?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}", cleaned)
    if frac:
        cleaned = f"{frac.group(1)}{frac.group(2)}/{frac.group(3)}"
    try:
        if "/" in cleaned:
            numerator, denominator = cleaned.split("/", 1)
            return float(numerator) / float(denominator)
        return float(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


MATH_VERIFY_TIMEOUT = 5  # seconds per parse and per comparison (math-verify's own default)


def math_verify_equal(extracted: str, reference: str) -> bool:
    """Equivalent by math-verify (HF's checker, used by lighteval and open-r1): LaTeX fractions, roots, sets,
    intervals, equations such as `x=1`, percentages. Both sides are read as LaTeX math, else as expressions.

    Its timeouts use SIGALRM, which only the main thread may set: there (every rank of a run, dft-eval) each
    parse and comparison is bounded by MATH_VERIFY_TIMEOUT; in any other thread it runs without the alarm
    instead of failing. An unparsable side, a timeout or any error in the checker is "not equal"."""
    import threading

    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    seconds = MATH_VERIFY_TIMEOUT if threading.current_thread() is threading.main_thread() else None
    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    try:
        gold = parse(f"${reference}$", extraction_config=config, parsing_timeout=seconds)
        answer = parse(f"${extracted}$", extraction_config=config, parsing_timeout=seconds)
        return bool(gold) and bool(answer) and bool(verify(gold, answer, timeout_seconds=seconds))
    except Exception:  # the checker's TimeoutException, sympy errors on odd input
        return False


def math_equal(extracted: str, reference: str) -> bool:
    """Numerically equal (relative 1e-6) when both parse as plain numbers (`1,000`, `$5`, `50%` at face value,
    `3/4`, `\\frac{3}{4}`), else equal as text without spaces/$, else equivalent by math-verify (sets,
    intervals, `x=1`, roots, ...). Where the two differ, the numeric rule decides: `50%` equals 50 only,
    while math-verify also takes 0.5 (see docs/evaluation.md)."""
    a, b = parse_number(extracted), parse_number(reference)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    strip = lambda s: re.sub(r"\s|\$|\\left|\\right|\\!", "", s)  # noqa: E731
    return strip(extracted) == strip(reference) or math_verify_equal(extracted, reference)


def extract_choice(text: str) -> str | None:
    """A multiple-choice letter: stated ("the answer is (C)"), leading ("C. ..."), else the last standalone one."""
    stated = _CHOICE_STATED.findall(text)
    if stated:
        return stated[-1].upper()
    leading = _CHOICE_LEADING.match(text)
    if leading:
        return leading.group(1)
    # Standalone capitals; "I" and "A" as words are too common to count unless parenthesised.
    candidates = [m for m in _CHOICE_ANY.finditer(text) if m.group(0).startswith("(") or m.group(1) not in "IA"]
    return candidates[-1].group(1) if candidates else None


# ---- the matchers ------------------------------------------------------------------------------------------
def _regex_extract(text: str, pattern: re.Pattern | None) -> str | None:
    found = pattern.search(text)
    if found is None:
        return None
    return found.group(1) if pattern.groups else found.group(0)


@dataclass(frozen=True)
class MatcherKind:
    """One kind of `--eval_answer_match`: how the answer is read from an output and compared with a reference."""

    name: str
    help: str
    extract: Callable[[str, re.Pattern | None], str | None]  # (answer region, pattern) -> answer or None
    is_correct: Callable[[str, str], bool]  # (extracted, reference) -> correct
    takes_pattern: bool = False  # written `name:<pattern>`


def _same_text(extracted: str, reference: str) -> bool:
    return normalize_text(extracted) == normalize_text(reference)


MATCHER_TABLE: dict[str, MatcherKind] = {kind.name: kind for kind in (
    MatcherKind("math", "last number or \\boxed{}, compared numerically",
                lambda text, _: extract_math(text), lambda got, ref: math_equal(got, math_reference(ref))),
    MatcherKind("exact", "whitespace/case-normalised", lambda text, _: normalize_text(text), _same_text),
    MatcherKind("contains", "the reference occurs in the output",
                lambda text, _: normalize_text(text), lambda got, ref: normalize_text(ref) in got),
    MatcherKind("choice", "a multiple-choice letter", lambda text, _: extract_choice(text),
                lambda got, ref: got == (extract_choice(ref) or ref.strip().upper())),
    MatcherKind("regex", "its first group", _regex_extract, _same_text, takes_pattern=True),
)}
MATCHERS = tuple(f"{name}:<pattern>" if kind.takes_pattern else name for name, kind in MATCHER_TABLE.items())


def matcher_help() -> str:
    """--eval_answer_match's list of choices, from the table."""
    return ", ".join(f"{name} ({kind.help})" for name, kind in zip(MATCHERS, MATCHER_TABLE.values()))


@dataclass(frozen=True)
class AnswerMatcher:
    """One parsed `--eval_answer_match` value: its kind and, for one that takes a pattern, the compiled pattern."""

    kind: str
    pattern: re.Pattern | None = None

    def extract(self, output: str) -> str | None:
        """The answer this matcher reads from a model output (None when there is none)."""
        return MATCHER_TABLE[self.kind].extract(answer_region(output), self.pattern)

    def is_correct(self, extracted: str | None, reference: str) -> bool:
        return extracted is not None and MATCHER_TABLE[self.kind].is_correct(extracted, reference)


def parse_matcher(spec: str) -> AnswerMatcher:
    """A name of MATCHER_TABLE, or `name:<pattern>` for one that takes a pattern (`regex:<pattern>`).

    Raises:
        ValueError: an unknown matcher, or a pattern that does not compile (the message names the flag).
    """
    name, has_pattern, pattern = spec.partition(":")
    kind = MATCHER_TABLE.get(name)
    if kind is not None and kind.takes_pattern and has_pattern:
        try:
            return AnswerMatcher(name, re.compile(pattern))
        except re.error as err:
            raise ValueError(f"--eval_answer_match {spec}: the pattern does not compile ({err}).") from None
    if kind is not None and not kind.takes_pattern and not has_pattern:
        return AnswerMatcher(name)
    raise ValueError(f"--eval_answer_match {spec}: unknown; use one of {', '.join(MATCHERS)}.")
