"""Unit tier: answer extraction and matching (eval/answers.py), pass@k and the generation metrics."""

from __future__ import annotations

import json
import math

import pytest

from dftune.eval.answers import answer_region, extract_choice, extract_math, last_boxed, parse_matcher, parse_number
from dftune.eval.generation import generation_metrics, pass_at_k, pass_at_k_values

pytestmark = pytest.mark.unit  # the file's tier; a test marked integration or distributed belongs to that one


def correct(spec: str, output: str, reference: str) -> bool:
    matcher = parse_matcher(spec)
    return matcher.is_correct(matcher.extract(output), reference)


@pytest.mark.parametrize(
    "output, reference",
    [
        ("3 plus 4 is 7.", "7"),
        ("The total is 1,000.", "1000"),
        ("It costs $1000.00", "1,000"),
        ("So the answer is 1000.0", "$1,000"),
        ("The rate is 25%.", "25"),
        ("x = -3", "-3"),
        ("That leaves 0.5 cups", ".5"),
        ("Half: 3/4", "0.75"),
        ("We get \\boxed{42} and check 43", "42"),  # boxed wins over a later number
        ("\\boxed{\\frac{3}{4}}", "0.75"),
        ("\\boxed{x^{2}+1}", "x^{2} + 1"),  # non-numeric boxed: text without spaces
        ("#### 72", "Natalia sold 48/2 = 24 clips in May.\n#### 72"),  # GSM8K-style reference: its last number
        ("<think>maybe 12? or 13</think>The answer is 14.", "14"),
    ],
)
def test_math_matches(output, reference):
    assert correct("math", output, reference)


@pytest.mark.parametrize(
    "output, reference",
    [
        ("3 plus 4 is 8.", "7"),
        ("The total is 1,000.5", "1000"),
        ("no number here", "7"),
        ("<think>the answer is 14</think>I am not sure.", "14"),  # numbers in the reasoning never count
    ],
)
def test_math_rejects(output, reference):
    assert not correct("math", output, reference)


@pytest.mark.parametrize(
    "output, reference",
    [
        ("\\boxed{\\frac{1}{2}}", "\\dfrac{2}{4}"),  # boxed fractions, both sides LaTeX
        ("\\boxed{\\{1, 2\\}}", "\\{2,1\\}"),  # sets in any order
        ("\\boxed{(1,2]}", "(1, 2]"),  # intervals
        ("\\boxed{x=1}", "1"),  # an equation's value
        ("\\boxed{\\sqrt{2}}", "2^{1/2}"),
        ("The rate is \\boxed{50\\%}.", "50"),  # percent at face value (the numeric rule)
    ],
)
def test_math_uses_math_verify_beyond_plain_numbers(output, reference):
    assert correct("math", output, reference)


def test_math_keeps_the_numeric_rule_where_math_verify_differs():
    """`50%` against 0.5: math-verify says equal, the numeric rule (percent at face value) decides: not equal."""
    from dftune.eval.answers import math_verify_equal

    assert math_verify_equal("50\\%", "0.5")
    assert not correct("math", "\\boxed{50\\%}", "0.5")
    assert not correct("math", "\\boxed{\\{1, 3\\}}", "\\{2,1\\}") and not correct("math", "\\boxed{\\pi}", "3.14159")


def test_math_verify_runs_outside_the_main_thread():
    """Its timeouts use SIGALRM (main thread only): in another thread it still answers instead of raising."""
    import threading

    results = []
    worker = threading.Thread(target=lambda: results.append(correct("math", "\\boxed{\\{1, 2\\}}", "\\{2,1\\}")))
    worker.start()
    worker.join(60)
    assert results == [True]


def test_math_extraction_details():
    assert extract_math("a 1,234,567 b") == "1,234,567"
    assert last_boxed("\\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{12") is None
    assert extract_math("\\boxed{12") == "12"  # unbalanced box: the last number
    assert parse_number("50%") == 50 and parse_number("$3.50") == 3.5 and parse_number("abc") is None
    assert parse_number("1/0") is None
    assert answer_region("a</think>b</think>c") == "c" and answer_region("plain") == "plain"


def test_exact_and_contains():
    assert correct("exact", "  Paris \n", "paris")
    assert correct("exact", "New   York", "new york")
    assert not correct("exact", "Paris.", "Paris")  # exact means exact (only whitespace and case)
    assert correct("contains", "The capital of France is Paris.", "paris")
    assert not correct("contains", "The capital is Lyon.", "Paris")
    assert correct("exact", "<think>Lyon?</think> Paris", "Paris")


@pytest.mark.parametrize(
    "output, letter",
    [
        ("The answer is (B).", "B"),
        ("Answer: c", "C"),
        ("D. Because the others are wrong.", "D"),
        ("(A) is right", "A"),
        ("I think it is B", "B"),  # standalone "I" is a word, not a choice
        ("<think>A or C</think>The answer is C", "C"),
    ],
)
def test_choice(output, letter):
    assert extract_choice(answer_region(output)) == letter
    assert correct("choice", output, letter)
    assert correct("choice", output, f"({letter})")


def test_choice_rejects_wrong_letter():
    assert not correct("choice", "The answer is (B).", "C")
    assert not correct("choice", "no letter here", "C")


def test_regex_first_group_and_errors():
    assert correct("regex:ANSWER: (\\w+)", "blah ANSWER: Paris", "paris")
    assert correct("regex:\\d+", "got 17 apples", "17")  # no group: the whole match
    assert not correct("regex:ANSWER: (\\w+)", "no marker", "Paris")
    with pytest.raises(ValueError, match="--eval_answer_match regex:\\(: the pattern does not compile"):
        parse_matcher("regex:(")
    with pytest.raises(ValueError, match="--eval_answer_match fuzzy: unknown"):
        parse_matcher("fuzzy")


def test_pass_at_k_matches_a_hand_computation():
    # n = 5 samples, c = 2 correct. pass@1 = 2/5. pass@2 = 1 - C(3,2)/C(5,2) = 1 - 3/10. pass@5 = 1.
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 2, 4) == 1.0  # fewer than 4 wrong samples: any 4 contain a correct one
    assert pass_at_k(5, 0, 5) == 0.0
    # Enumerating every 2-subset of [1, 1, 0, 0, 0]: 7 of the 10 contain a correct sample.
    assert pass_at_k(5, 2, 2) == pytest.approx(7 / 10)
    assert pass_at_k_values(1) == [1] and pass_at_k_values(4) == [1, 2, 4] and pass_at_k_values(6) == [1, 2, 4, 6]


def test_generation_metrics_are_sums_divided_once():
    def rec(index, sample, ok, file="a", finished=True, tokens=4):
        return {"index": index, "sample": sample, "correct": ok, "file": file, "finished": finished, "tokens": tokens}

    # Two prompts x 3 samples: prompt 0 has 1 correct, prompt 1 has 3. File b has only prompt 1.
    records = [rec(0, 0, True), rec(0, 1, False, finished=False, tokens=10), rec(0, 2, False)]
    records += [rec(1, k, True, file="b") for k in range(3)]
    metrics = generation_metrics(records, samples=3)
    assert metrics["eval_gen_accuracy"] == pytest.approx(4 / 6)
    assert metrics["eval_gen_finished"] == pytest.approx(5 / 6)
    assert metrics["eval_gen_mean_tokens"] == pytest.approx((5 * 4 + 10) / 6)
    assert metrics["eval_gen_a_accuracy"] == pytest.approx(1 / 3) and metrics["eval_gen_b_accuracy"] == 1.0
    assert metrics["eval_gen_pass@1"] == pytest.approx((1 / 3 + 1) / 2)
    # pass@2 for prompt 0 (n=3, c=1): 1 - C(2,2)/C(3,2) = 2/3.
    assert metrics["eval_gen_pass@2"] == pytest.approx((2 / 3 + 1) / 2)
    assert metrics["eval_gen_pass@3"] == 1.0
    assert "eval_gen_pass@1" not in generation_metrics(records[:1], samples=1)
    assert math.isclose(generation_metrics(records, 3, prefix="test")["test_gen_accuracy"], 4 / 6)


def test_generation_files_are_read_with_file_line_errors(tmp_path):
    from dftune.eval.generation import GenerationFileError, metric_stem, read_generation_files

    array = tmp_path / "Math-Set.v2.json"
    records = [{"prompt": "1+1?", "answer": 2}, {"messages": [{"role": "user", "content": "2+2?"}], "answer": "4"}]
    array.write_text("[\n" + ",\n".join(map(json.dumps, records)) + "\n]\n")
    prompts = read_generation_files([str(array)])
    # Named by the line each record starts on, as the data report names training records.
    assert [p.reference for p in prompts] == ["2", "4"] and prompts[1].location == f"{array}:3"
    assert prompts[0].messages == [{"role": "user", "content": "1+1?"}] and prompts[0].file == metric_stem(str(array)) == "math_set"
    assert len(read_generation_files([str(array)], max_prompts=1)) == 1

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "answer": 1}\n\n{"prompt": "b", "answer": \n')
    with pytest.raises(GenerationFileError, match=f"^{broken}:3: not valid JSON"):
        read_generation_files([str(broken)])
    with pytest.raises(GenerationFileError, match="generation file not found; check --eval_generation_files"):
        read_generation_files([str(tmp_path / "missing.jsonl")])
    bad_turns = tmp_path / "turns.jsonl"
    bad_turns.write_text(json.dumps({"messages": [{"role": "user"}], "answer": 1}) + "\n")
    with pytest.raises(GenerationFileError, match=":1: field `messages` must be a non-empty list of"):
        read_generation_files([str(bad_turns)])


def test_generation_files_get_distinct_metric_names_without_a_doubled_gen(tmp_path):
    """Two files named test.jsonl in different folders were merged into one metric name (and, being "one file",
    got no per-file accuracy at all); gen_held.jsonl gave eval_gen_gen_held_accuracy."""
    from dftune.eval.generation import metric_stem, read_generation_files

    paths = []
    for folder, name in (("gsm8k", "test.jsonl"), ("math", "test.jsonl"), ("sets", "gen_held.jsonl"), ("sets", "gen.jsonl")):
        (tmp_path / folder).mkdir(exist_ok=True)
        path = tmp_path / folder / name
        path.write_text('{"prompt": "1+1?", "answer": 2}\n')
        paths.append(str(path))
    prompts = read_generation_files(paths)
    assert [p.file for p in prompts] == ["gsm8k_test", "math_test", "held", "gen"]
    assert metric_stem("gen-Held.v2.jsonl") == "held" and metric_stem("general.jsonl") == "general"
    assert [p.file for p in read_generation_files([paths[0], paths[0]])] == ["gsm8k_test_1", "gsm8k_test_2"]
    records = [{"index": i, "sample": 0, "file": p.file, "correct": i == 0, "finished": True, "tokens": 1} for i, p in enumerate(prompts)]
    metrics = generation_metrics(records, samples=1)
    assert metrics["eval_gen_gsm8k_test_accuracy"] == 1.0 and metrics["eval_gen_math_test_accuracy"] == 0.0
    assert "eval_gen_held_accuracy" in metrics


def test_a_new_matcher_is_one_table_entry(monkeypatch):
    """MATCHER_TABLE is the one place a matcher is defined: an entry gives its parsing, extraction and check."""
    from dftune.eval.answers import MATCHER_TABLE, MatcherKind

    entry = MatcherKind("lastword", "the last word", lambda text, _: text.split()[-1].strip(".") if text.split() else None,
                        lambda got, ref: got.lower() == ref.strip().lower())
    monkeypatch.setitem(MATCHER_TABLE, "lastword", entry)
    matcher = parse_matcher("lastword")
    assert matcher.extract("<think>Rome?</think> The capital is Paris.") == "Paris"
    assert matcher.is_correct("Paris", "paris") and not matcher.is_correct(None, "paris")
    with pytest.raises(ValueError, match="unknown; use one of math, exact"):
        parse_matcher("lastword:x")  # takes no pattern
