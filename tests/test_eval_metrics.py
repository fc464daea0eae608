"""Answer metrics against cases worked out by hand from each benchmark's published definition, gold parsing,
prediction matching, and properties every metric must have."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptp_cli.errors import UsageError
from ptp_cli.eval import metrics as M
from ptp_cli.eval.gold import Gold, parse_gold, read_gold
from ptp_cli.eval.score import match_rows, score_answer, score_run

# ---------------------------------------------------------------------------------------------------------
# The VQA normalisation (official VQA evaluation script)


@pytest.mark.parametrize(("text", "normal"), [
    ("Two dogs.", "2 dogs"),  # number word -> digit; a period not before a digit goes
    ("The Cat", "cat"),  # lower case; articles dropped
    ("an apple", "apple"),
    ("Yes!", "yes"),
    ("none", "0"),  # the official table maps "none" to 0
    ("ten", "10"),
    ("eleven", "eleven"),  # the table stops at ten
    ("dont", "don't"),  # contractions restored
    ("couldnt've", "couldn't've"),
    ("it's", "it's"),  # the apostrophe is not punctuation
    ("12:30", "12:30"),  # nor is the colon
    ("3.5", "3.5"),  # a period before a digit stays
    ("1,000", "1000"),  # digit,digit: every punctuation mark is deleted
    ("x-ray", "x ray"),  # a mark inside a word becomes a space
    ("hello , world", "hello world"),  # a mark next to a space is deleted
    ("  red\tcar\n", "red car"),
])
def test_vqa_normalisation(text: str, normal: str) -> None:
    assert M.normalize_answer(text) == normal


def test_exact_match_after_normalisation() -> None:
    assert M.exact_match("Two.", ["2"]) == 1.0
    assert M.exact_match("two cats", ["2 dogs", "2 cats"]) == 1.0  # any gold answer
    assert M.exact_match("3", ["2"]) == 0.0


@pytest.mark.parametrize(("agree", "accuracy"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_over_leave_one_out_subsets(agree: int, accuracy: float) -> None:
    # 10 humans, `agree` of them said "2". Leaving out one who agreed: min((agree - 1) / 3, 1); leaving out one
    # who did not: min(agree / 3, 1). E.g. agree = 3: (3 * 2/3 + 7 * 1) / 10 = 0.9.
    answers = ["2"] * agree + ["3"] * (10 - agree)
    assert M.vqa_accuracy("two", answers) == pytest.approx(accuracy)


def test_vqa_with_one_answer_is_exact_match() -> None:
    assert M.vqa_accuracy("Two", ["2"]) == 1.0


# ---------------------------------------------------------------------------------------------------------
# ANLS (DocVQA)


@pytest.mark.parametrize(("prediction", "golds", "value"), [
    ("abce", ["abcd"], 0.75),  # 1 edit / 4 characters
    (" ABCD ", ["abcd"], 1.0),  # compared lower-cased and stripped
    ("abxy", ["abcd"], 0.5),  # similarity exactly 0.5: counts, as the official script has it
    ("abcdefghij", ["abcdexxxxx"], 0.5),  # 5 edits / 10
    ("abcdefghij", ["abcdxxxxxx"], 0.0),  # 6 edits / 10: 0.4 is below the threshold
    ("abcxyzw", ["abcdefg"], 0.0),  # 4 / 7
    ("abcd", ["zzzz", "abce"], 0.75),  # the best gold answer
    ("ab   c", ["ab"], 1 - 2 / 6),  # distance on "ab c", length of the answer as given (6)
])
def test_anls(prediction: str, golds: list[str], value: float) -> None:
    assert M.anls(prediction, golds) == pytest.approx(value)


def test_levenshtein() -> None:
    assert M.levenshtein("kitten", "sitting") == 3
    assert M.levenshtein("", "abc") == 3
    assert M.levenshtein("flaw", "lawn") == 2


# ---------------------------------------------------------------------------------------------------------
# Relaxed accuracy (ChartQA)


@pytest.mark.parametrize(("prediction", "gold", "value"), [
    ("105", "100", 1.0),  # exactly 5% above
    ("95", "100", 1.0),  # exactly 5% below
    ("105.01", "100", 0.0),
    ("94.99", "100", 0.0),
    ("1.05", "1", 1.0),  # exactly 5% in decimal arithmetic
    ("45%", "0.45", 1.0),  # a percent sign divides by 100
    ("45", "45%", 0.0),
    ("0.0", "0", 0.0),  # a zero gold needs the exact string
    ("0", "0", 1.0),
    ("April", "april", 1.0),  # not numbers: case-insensitive exact match
    ("Apr.", "april", 0.0),
])
def test_relaxed_accuracy(prediction: str, gold: str, value: float) -> None:
    assert M.relaxed_accuracy(prediction, [gold]) == value


# ---------------------------------------------------------------------------------------------------------
# Option extraction (MMBench)

OPTIONS = M.option_letters(["cat", "dog", "bird"])


@pytest.mark.parametrize(("answer", "letter"), [
    ("The answer is (B).", "B"),
    ("B", "B"),
    ("C. bird", "C"),
    ("[A]", "A"),
    ("I think it is the dog", "B"),  # no letter: the one option text in the answer
    ("b) dog", "B"),  # a lower-case b is no option letter; the text decides
    ("A or B", None),  # two letters and no option text: no answer
    ("cat or dog", None),  # two option texts: no answer
    ("a fish", None),
])
def test_option_extraction(answer: str, letter: str | None) -> None:
    assert M.extract_option(answer, OPTIONS) == letter


# ---------------------------------------------------------------------------------------------------------
# Yes/no (POPE)


@pytest.mark.parametrize(("answer", "label"), [
    ("Yes, there is a dog.", "yes"),
    ("No, there is not.", "no"),
    ("There is no dog in the image.", "no"),
    ("I do not see one", "no"),
    ("Yes. No.", "yes"),  # only the first sentence counts
    ("Not at all", "yes"),  # POPE looks for "No", "no" and "not" only
])
def test_pope_label(answer: str, label: str) -> None:
    assert M.pope_label(answer) == label


def test_pope_summary() -> None:
    # TP (yes/yes), FN (no/yes), FP (yes/no), TN (no/no), and a missing answer to a yes question (FN).
    s = M.yesno_summary([("Yes", "yes"), ("No", "yes"), ("Yes", "no"), ("No", "no"), (None, "yes")])
    assert s.accuracy == pytest.approx(2 / 5)
    assert s.precision == pytest.approx(1 / 2)
    assert s.recall == pytest.approx(1 / 3)
    assert s.f1 == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    assert s.yes_ratio == pytest.approx(2 / 5)


# ---------------------------------------------------------------------------------------------------------
# Gold records


@pytest.mark.parametrize(("obj", "metric"), [
    ({"answers": ["a", "b"]}, "vqa"),
    ({"answer": "B", "choices": ["x", "y"]}, "mc"),
    ({"answer": "Yes."}, "yesno"),
    ({"answer": "7"}, "exact"),
    ({"answer": "7", "metric": "relaxed"}, "relaxed"),
])
def test_metric_inference(obj: dict, metric: str) -> None:
    assert parse_gold(obj, line=1).metric == metric


def test_gold_details() -> None:
    assert parse_gold({"answer": "yes"}, line=1, metric="exact").metric == "exact"  # the file's metric
    assert parse_gold({"answer": "yes", "metric": "anls"}, line=1, metric="exact").metric == "anls"  # record wins
    assert parse_gold({"answer": "dog", "choices": ["cat", "dog"]}, line=1).answers == ("B",)  # text -> letter
    assert parse_gold({"answer": "(b)", "choices": {"A": "cat", "B": "dog"}}, line=1).answers == ("B",)
    assert parse_gold({"answers": [{"answer": "x"}, {"answer": "y"}]}, line=1).answers == ("x", "y")  # VQAv2
    assert parse_gold({"answer": 42}, line=3).answers == ("42",)
    g = parse_gold({"answer": "x", "type": "ocr", "image": "a.png"}, line=3)
    assert (g.id, g.fields) == (3, {"type": "ocr", "image": "a.png"})


@pytest.mark.parametrize(("line", "message"), [
    ('{"question": "q"}', "line 2: no gold answer"),
    ('{"answer": "x", "metric": "mc"}', "line 2: metric mc needs 'choices'"),
    ('{"answer": "E", "choices": ["a", "b"]}', "line 2: the gold answer 'E' is neither"),
    ('{"answer": "maybe", "metric": "yesno"}', "line 2: metric yesno needs a yes or no answer"),
    ('{"answer": "x", "metric": "bleu"}', "line 2: unknown metric 'bleu'"),
    ("{not json", "line 2: not valid JSON"),
])
def test_bad_gold_lines_are_usage_errors_naming_the_line(tmp_path, line: str, message: str) -> None:
    path = tmp_path / "gold.jsonl"
    path.write_text('{"answer": "ok"}\n' + line + "\n")
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        read_gold(path)


# ---------------------------------------------------------------------------------------------------------
# Matching and run scores


def _gold(line: int, id: object, answer: str = "x") -> Gold:
    return Gold(line=line, id=id, answers=(answer,), metric="exact")


def test_rows_match_by_line_then_by_unique_id() -> None:
    golds = [_gold(1, "a"), _gold(2, "b"), _gold(3, "c"), _gold(4, "d")]
    rows = [
        {"id": "a", "line": 1, "answer": "x"},  # same line, same id
        {"id": "c", "line": 7, "answer": "x"},  # another file's line: matched by id
        {"id": "zz", "line": 2, "answer": "x"},  # line 2 of another file: not gold b
        {"id": "d", "line": 4, "error": {"type": "image_error", "message": "gone"}},
    ]
    matched, unmatched = match_rows(golds, rows)
    assert [m["id"] if m else None for m in matched] == ["a", None, "c", "d"]
    assert unmatched == 1
    run = score_run(golds, rows, name="r")
    assert [i.score for i in run.items] == [1.0, 0.0, 1.0, 0.0]
    assert (run.n, run.n_errors, run.n_missing) == (4, 2, 1)
    assert run.scores() == {"exact": 0.5}


def test_ids_compare_as_json_values() -> None:
    matched, _ = match_rows([_gold(5, 1)], [{"id": "1", "line": 9, "answer": "x"}])
    assert matched == [None]


# ---------------------------------------------------------------------------------------------------------
# Properties

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
gold_texts = st.lists(text, min_size=1, max_size=5)


@settings(max_examples=150, deadline=None)
@given(prediction=text, golds=gold_texts, metric=st.sampled_from(["exact", "vqa", "anls", "relaxed", "yesno"]))
def test_every_score_is_in_0_1(prediction: str, golds: list[str], metric: str) -> None:
    gold = Gold(line=1, id=1, answers=tuple(golds) if metric != "yesno" else ("yes",), metric=metric)
    value = score_answer(gold, prediction)
    assert 0.0 <= value <= 1.0 and not math.isnan(value)


@settings(max_examples=150, deadline=None)
@given(answer=text, options=st.lists(text, min_size=1, max_size=6))
def test_option_extraction_returns_an_option_or_nothing(answer: str, options: list[str]) -> None:
    letters = M.option_letters(options)
    assert M.extract_option(answer, letters) in (*letters, None)


@settings(max_examples=150, deadline=None)
@given(gold=text)
def test_gold_scores_1_against_itself(gold: str) -> None:
    assert M.exact_match(gold, [gold]) == 1.0
    assert M.anls(gold, [gold]) == 1.0
    assert M.relaxed_accuracy(gold, [gold]) == 1.0
    assert M.vqa_accuracy(gold, [gold] * 10) == 1.0
