"""BLEU-4 and CIDEr-D on captions, as the COCO caption evaluation (coco-caption, pip `pycocoevalcap`) computes them.

BLEU (Papineni et al., 2002): clipped n-gram precisions for n = 1..4 against every reference at once, their
geometric mean, times a brevity penalty exp(1 - r/c) when the c hypothesis words fall short of r, the reference
length closest to c (the shorter one on a tie). The corpus score pools the counts of every sentence before
dividing; a sentence's own score uses its counts alone. As coco-caption does, 1e-15 is added to each matched
count and 1e-9 to each guessed one, so a sentence with no 4-gram match scores a tiny number, not a division by 0.

CIDEr-D (Vedantam et al., 2015): per n = 1..4, TF-IDF vectors of n-gram counts, the document frequency of an
n-gram being the number of examples whose references hold it (so the score depends on the whole set scored);
the similarity to each reference is sum(min(h, r) * r) / (|h| |r|) (clipped counts), damped by
exp(-d^2 / (2 * 6^2)) where d is the difference in bigram counts of the two sentences; mean over n and over
references, times 10. The corpus score is the mean of the examples'.

Both read text already split into words (`words`: lower case, punctuation dropped, as coco-caption's PTB
tokenizer leaves captions).
"""

from __future__ import annotations

import math
import re
from collections import Counter

N = 4
SIGMA = 6.0  # CIDEr-D's length penalty width
_TINY, _SMALL = 1e-15, 1e-9  # coco-caption's guards against empty counts


def words(text: str) -> str:
    """Lower case, punctuation dropped, words separated by single spaces."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def ngrams(text: str, n: int = N) -> Counter:
    """Counts of the 1..n-grams of space-separated text."""
    tokens = text.split()
    return Counter(tuple(tokens[i:i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def _bleu(matched: list[float], guessed: list[float], length: float, ref_length: float) -> float:
    """BLEU-4 from n-gram match and guess counts and the hypothesis / effective reference lengths."""
    product = math.prod((m + _TINY) / (g + _SMALL) for m, g in zip(matched, guessed))
    ratio = (length + _TINY) / (ref_length + _SMALL)
    return product ** (1 / N) * (math.exp(1 - 1 / ratio) if ratio < 1 else 1.0)


def bleu(predictions: list[str], references: list[list[str]]) -> tuple[float, list[float]]:
    """(corpus BLEU-4, each sentence's BLEU-4) of tokenised predictions against their references."""
    total_matched, total_guessed, total_length, total_ref = [0] * N, [0] * N, 0, 0
    sentences = []
    for prediction, refs in zip(predictions, references):
        counts, length = ngrams(prediction), len(prediction.split())
        most: Counter = Counter()
        for ref in refs:
            most |= ngrams(ref)  # the most times each n-gram occurs in one reference
        ref_length = min((abs(len(r.split()) - length), len(r.split())) for r in refs)[1]
        matched, guessed = [0] * N, [max(0, length - k) for k in range(N)]
        for gram, count in counts.items():
            matched[len(gram) - 1] += min(count, most[gram])
        sentences.append(_bleu(matched, guessed, length, ref_length))
        total_matched = [a + b for a, b in zip(total_matched, matched)]
        total_guessed = [a + b for a, b in zip(total_guessed, guessed)]
        total_length, total_ref = total_length + length, total_ref + ref_length
    return _bleu(total_matched, total_guessed, total_length, total_ref), sentences


def _tfidf(counts: Counter, df: Counter, log_n: float) -> tuple[list[dict], list[float], int]:
    """Per n: the TF-IDF vector and its norm; and the number of bigrams (CIDEr-D's length)."""
    vectors: list[dict] = [{} for _ in range(N)]
    for gram, count in counts.items():
        vectors[len(gram) - 1][gram] = count * (log_n - math.log(max(1.0, df[gram])))
    norms = [math.sqrt(sum(v * v for v in vec.values())) for vec in vectors]
    return vectors, norms, sum(c for g, c in counts.items() if len(g) == 2)


def cider(predictions: list[str], references: list[list[str]]) -> tuple[float, list[float]]:
    """(corpus CIDEr-D, each example's CIDEr-D) of tokenised predictions against their references."""
    refs_counts = [[ngrams(r) for r in refs] for refs in references]
    df: Counter = Counter(gram for counts in refs_counts for gram in set().union(*counts))
    log_n = math.log(len(references))
    scores = []
    for prediction, counts in zip(predictions, refs_counts):
        hyp, hyp_norms, hyp_length = _tfidf(ngrams(prediction), df, log_n)
        total = 0.0
        for ref_counts in counts:
            ref, ref_norms, ref_length = _tfidf(ref_counts, df, log_n)
            penalty = math.exp(-((hyp_length - ref_length) ** 2) / (2 * SIGMA ** 2))
            for n in range(N):
                dot = sum(min(h, ref[n].get(g, 0.0)) * ref[n].get(g, 0.0) for g, h in hyp[n].items())
                norm = hyp_norms[n] * ref_norms[n]
                total += (dot / norm if norm else 0.0) * penalty
        scores.append(10.0 * total / N / len(counts))
    return (sum(scores) / len(scores) if scores else 0.0), scores
