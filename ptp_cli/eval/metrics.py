"""Answer metrics, as the benchmarks define them. Each per-answer function returns a score in [0, 1].

- ``exact``: equality after the VQA answer normalisation (``normalize_answer``), against any gold answer.
- ``vqa``: VQAv2 accuracy: for each of the n human answers, min(#other humans who gave the prediction / 3, 1),
  averaged over the n leave-one-out subsets.
- ``anls``: DocVQA's average normalised Levenshtein similarity, threshold 0.5, best gold answer.
- ``relaxed``: ChartQA's relaxed accuracy: a number within 5% relative error of the gold number, else an
  exact (case-insensitive) string match.
- ``mc``: the option letter MMBench's answer extraction finds in the answer (a lone letter, else a unique
  option text), compared with the gold letter.
- ``yesno``: POPE's yes/no reading of the answer, compared with the gold; ``yesno_summary`` adds precision,
  recall, F1 and the yes-ratio over a set of answers.

Where the reference scripts differ from their papers, the scripts are followed (they produce the published
numbers); every such choice is named where it is made.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction

METRICS = ("exact", "vqa", "anls", "relaxed", "mc", "yesno")

# ---------------------------------------------------------------------------------------------------------
# The VQA answer normalisation (the official VQA evaluation script's processPunctuation and processDigitArticle)

# Removed, or turned into a space, by the punctuation step. Not ' (contractions) nor : (times) nor . (below).
_PUNCT = ";/[]\"{}()=+\\_->`<@,?!"
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit ("3.5" keeps its point)
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
    "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
# The official table maps each of these written without one of its apostrophes back to it ("dont" -> "don't",
# "couldnt've" -> "couldn't've"). Its capitalised I-forms ("Im") never match lowercased text, so are left out.
_CONTRACTED = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't",
    "hadn't", "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's",
    "isn't", "it'd", "it'd've", "it'll", "ma'am", "mightn't", "mightn't've", "might've", "mustn't",
    "must've", "needn't", "not've", "o'clock", "oughtn't", "'ow's'at", "shan't", "she'd've", "should've",
    "shouldn't", "shouldn't've", "somebody'd", "somebody'd've", "somebody'll", "somebody's", "someone'd",
    "someone'd've", "someone'll", "someone's", "something'd", "something'd've", "something'll", "that's",
    "there'd", "there'd've", "there're", "there's", "they'd", "they'd've", "they'll", "they're", "they've",
    "'twas", "wasn't", "we'd've", "we've", "weren't", "what'll", "what're", "what's", "what've", "when's",
    "where'd", "where's", "where've", "who'd", "who'd've", "who'll", "who's", "who've", "why'll", "why're",
    "why's", "won't", "would've", "wouldn't", "wouldn't've", "y'all", "y'all'll", "y'all'd've", "you'd",
    "you'd've", "you'll", "you're", "you've",
)
_CONTRACTIONS = {
    word[:i] + word[i + 1 :]: word for word in _CONTRACTED for i, ch in enumerate(word) if ch == "'"
}


def _punctuation(text: str) -> str:
    # A mark next to a space (or any text with a digit,digit comma) is deleted; otherwise it separates words.
    # Both tests look at the original text, as the official script does.
    joined = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in _PUNCT:
        delete = joined or p + " " in text or " " + p in text
        out = out.replace(p, "" if delete else " ")
    return _PERIOD.sub("", out)


def _digits_articles(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(text: str) -> str:
    """The VQA evaluation's answer normalisation: whitespace, punctuation, lower case, number words -> digits,
    articles dropped, contractions restored. ``"Two dogs."`` -> ``"2 dogs"``."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(text))


# ---------------------------------------------------------------------------------------------------------
# exact, vqa


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1 when the normalised prediction equals any normalised gold answer."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy against the human answers (10 in VQAv2).

    Both sides are normalised (the official script normalises gold answers only where annotators disagree, as
    its gold files are already normalised; user gold files need not be). With a single answer there is no
    leave-one-out subset, so the score is exact match.
    """
    if len(answers) < 2:
        return exact_match(prediction, answers)
    pred = normalize_answer(prediction)
    hits = [normalize_answer(a) == pred for a in answers]
    # Leaving out human i, the others who agree are sum(hits) - hits[i].
    total = sum(hits)
    return sum(min(1.0, (total - h) / 3) for h in hits) / len(hits)


# ---------------------------------------------------------------------------------------------------------
# anls


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, golds: Sequence[str], *, threshold: float = 0.5) -> float:
    """DocVQA's ANLS of one answer: 1 - the smallest normalised edit distance to a gold answer, or 0 when that
    similarity is below ``threshold``.

    As the official DocVQA script: strings are compared lower-cased with whitespace collapsed, the distance is
    divided by the longer of the two strings as given, and a similarity of exactly 0.5 counts (the paper's
    formula, NL < 0.5, would give 0 there).
    """
    if not golds:
        return 0.0
    det = " ".join(prediction.lower().split())
    distances = []
    for gold in golds:
        length = max(len(gold.upper()), len(prediction.upper()))  # the script counts characters of upper()
        dist = levenshtein(" ".join(gold.lower().split()), det)
        distances.append(dist / length if length else 0.0)
    similarity = 1.0 - min(distances)
    return similarity if similarity >= threshold else 0.0


# ---------------------------------------------------------------------------------------------------------
# relaxed

RELAXED_TOLERANCE = Fraction(5, 100)


def _number(text: str) -> Fraction | None:
    """The value of a number as ChartQA reads one (Python float syntax; a trailing % divides by 100), exact."""
    percent = text.endswith("%")
    try:
        value = Decimal(text[:-1] if percent else text)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    return Fraction(value) / (100 if percent else 1)


def relaxed_accuracy(prediction: str, golds: Sequence[str], *, tolerance: Fraction = RELAXED_TOLERANCE) -> float:
    """ChartQA's relaxed accuracy, best gold answer: numbers count within ``tolerance`` relative error of a
    non-zero gold number (inclusive), anything else needs a case-insensitive exact match.

    Exact decimal arithmetic: "105" against "100" is exactly 5% off and counts (the reference code's floats
    agree there, but not for "1.05" against "1").
    """
    pred = prediction.strip()
    pred_value = _number(pred)
    for gold in golds:
        gold = gold.strip()
        gold_value = _number(gold)
        if pred_value is not None and gold_value:  # a zero gold falls back to the string match, as in ChartQA
            if abs(pred_value - gold_value) <= tolerance * abs(gold_value):
                return 1.0
        elif pred.lower() == gold.lower():
            return 1.0
    return 0.0


# ---------------------------------------------------------------------------------------------------------
# mc

_OPTION_SEPARATORS = re.compile(r"[.()\[\],:;!*#{}]")
_REFUSALS = ("Cannot determine the answer",)


def option_letters(choices: Sequence[str]) -> dict[str, str]:
    """Choices in order -> {"A": text, "B": text, ...}."""
    if len(choices) > 26:
        raise ValueError("at most 26 choices")
    return {chr(ord("A") + i): str(text) for i, text in enumerate(choices)}


def extract_option(answer: str, options: Mapping[str, str]) -> str | None:
    """The option letter an answer gives, MMBench style, or None.

    First the letters: with ``.()[],:;!*#{}`` read as spaces, exactly one option letter standing alone as a
    word ("The answer is (B)." -> B). Else the texts: exactly one option whose text (lower case) occurs in the
    answer. Anything ambiguous or absent is no answer.
    """
    if any(r in answer for r in _REFUSALS):
        return None
    words = set(_OPTION_SEPARATORS.sub(" ", answer).split())
    letters = [letter for letter in options if letter in words]
    if len(letters) == 1:
        return letters[0]
    lowered = answer.lower()
    texts = [letter for letter, text in options.items() if text.strip() and text.strip().lower() in lowered]
    return texts[0] if len(texts) == 1 else None


def mc_accuracy(prediction: str, gold_letter: str, options: Mapping[str, str]) -> float:
    return float(extract_option(prediction, options) == gold_letter)


# ---------------------------------------------------------------------------------------------------------
# yesno


def pope_label(answer: str) -> str:
    """POPE's reading of an answer: its first sentence, commas dropped, is "no" when a word is "no", "No" or
    "not", else "yes"."""
    first = answer.split(".", 1)[0].replace(",", "")
    words = first.split(" ")
    return "no" if {"no", "No", "not"} & set(words) else "yes"


def yesno_accuracy(prediction: str, gold: str) -> float:
    return float(pope_label(prediction) == normalize_answer(gold))


@dataclass(frozen=True)
class YesNoSummary:
    """POPE's numbers over a set of answers; "yes" is the positive class. A missing answer counts as wrong
    (in the accuracy's denominator) and as neither yes nor no."""

    accuracy: float
    precision: float
    recall: float
    f1: float
    yes_ratio: float  # answers read as yes / all


def yesno_summary(pairs: Iterable[tuple[str | None, str]]) -> YesNoSummary:
    """From (prediction or None, gold "yes"/"no") pairs."""
    tp = fp = tn = fn = n = 0
    for pred, gold in pairs:
        n += 1
        label = pope_label(pred) if pred is not None else None
        positive = normalize_answer(gold) == "yes"
        tp += label == "yes" and positive
        fp += label == "yes" and not positive
        tn += label == "no" and not positive
        fn += label != "yes" and positive
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return YesNoSummary(
        accuracy=(tp + tn) / n if n else 0.0, precision=precision, recall=recall, f1=f1,
        yes_ratio=(tp + fp) / n if n else 0.0,
    )

