"""The answer metrics people report, by name (`polymodal eval --data FILE --metric NAME`).

Each metric scores predictions against their references (one or more per prediction) and returns the
corpus figure and one score per prediction:
- exact: normalised exact match as SQuAD's evaluation normalises (lower case, punctuation and the articles
  a/an/the dropped, whitespace collapsed); 1 when the prediction equals any reference.
- vqa: VQAv2 accuracy (Antol et al., 2015; the official VQA evaluation): answers normalised as EvalAI's answer
  processor does (punctuation, number words to digits, articles dropped, contractions restored), then for
  each of the n references min(#other references equal to the prediction / 3, 1), averaged: the mean over
  the n subsets of n - 1 annotators of min(#humans that gave the answer / 3, 1). VQAv2 has 10 references per
  question; the official script skips normalising references that all agree, which are stored normalised.
- anls: Average Normalized Levenshtein Similarity (ST-VQA, Biten et al., 2019; DocVQA): lower-cased, stripped
  answers; 1 - edit distance / longer length when that distance is below 0.5, else 0; the best reference.
- bleu, cider: BLEU-4 and CIDEr-D on captions (`ngrams.py`), after `ngrams.words`.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from dataclasses import dataclass

from polymodal.evaluate import ngrams

Scores = tuple[float, list[float]]  # (corpus figure, per-prediction scores)


@dataclass(frozen=True)
class Metric:
    name: str
    what: str  # a few words for the header of the table
    score: Callable[[list[str], list[list[str]]], Scores]


def _mean(per: list[float]) -> Scores:
    return (sum(per) / len(per) if per else 0.0), per


# -- exact match ---------------------------------------------------------------------------------

def normalise(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def exact_match(predictions: list[str], references: list[list[str]]) -> Scores:
    return _mean([float(normalise(p) in {normalise(r) for r in refs}) for p, refs in zip(predictions, references)])


# -- VQAv2 ----------------------------------------------------------------------------------------

CONTRACTIONS = {  # the official VQA evaluation's map (keys are looked up lower-cased, so "Im" never matches)
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
NUMBERS["none"] = "0"
VQA_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_PERIOD = re.compile(r"\.(?!\d)")  # a full stop, not a decimal point
_DIGIT_COMMA = re.compile(r"(?<=\d),+(?=\d)")  # 1,000


def vqa_normalise(answer: str) -> str:
    """EvalAI's VQA answer processing."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    glued = _DIGIT_COMMA.search(text) is not None
    out = text
    for p in VQA_PUNCTUATION:  # dropped where it touches a space (or in a number), else a space
        out = out.replace(p, "" if (p + " " in text or " " + p in text or glued) else " ")
    out = _PERIOD.sub("", out)
    kept = [NUMBERS.get(w, w) for w in out.split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in kept if w not in ("a", "an", "the"))


def vqa_accuracy(predictions: list[str], references: list[list[str]]) -> Scores:
    per = []
    for prediction, refs in zip(predictions, references):
        answer, n = vqa_normalise(prediction), len(refs)
        m = sum(vqa_normalise(r) == answer for r in refs)  # annotators who gave it
        # an annotator who gave it leaves m - 1 others who did; one who did not leaves m
        per.append((m * min((m - 1) / 3, 1.0) + (n - m) * min(m / 3, 1.0)) / n)
    return _mean(per)


# -- ANLS -----------------------------------------------------------------------------------------

ANLS_THRESHOLD = 0.5


def levenshtein(a: str, b: str) -> int:
    """Edits (insert, delete, substitute one character) turning a into b."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def anls(predictions: list[str], references: list[list[str]]) -> Scores:
    clean = lambda s: " ".join(s.strip().lower().split())  # noqa: E731

    def similarity(p: str, r: str) -> float:
        longest = max(len(p), len(r))
        distance = levenshtein(p, r) / longest if longest else 0.0
        return 1 - distance if distance < ANLS_THRESHOLD else 0.0

    return _mean([max(similarity(clean(p), clean(r)) for r in refs) for p, refs in zip(predictions, references)])


# -- captions -------------------------------------------------------------------------------------

def _tokenised(metric: Callable[[list[str], list[list[str]]], Scores]):
    def score(predictions: list[str], references: list[list[str]]) -> Scores:
        return metric([ngrams.words(p) for p in predictions], [[ngrams.words(r) for r in refs] for refs in references])
    return score


METRICS = {m.name: m for m in (
    Metric("exact", "normalised exact match", exact_match),
    Metric("vqa", "VQAv2 accuracy", vqa_accuracy),
    Metric("anls", "ANLS", anls),
    Metric("bleu", "BLEU-4", _tokenised(ngrams.bleu)),
    Metric("cider", "CIDEr-D", _tokenised(ngrams.cider)),
)}
