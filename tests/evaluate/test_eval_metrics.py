"""Each metric of `polymodal eval --data` against a reference implementation on the same random inputs: coco-caption's
(pycocoevalcap) Bleu and Cider on pre-tokenised text, sacrebleu's corpus BLEU, the `anls` package's ANLS. VQAv2
accuracy, SQuAD's normalised exact match and recall@k have no pip-installable reference here, so each is checked
against a plain implementation written in this file from the official definition (the VQA evaluation script's
loop over annotators, SQuAD v1.1's normalize_answer, recall read off a full ranking)."""

import math
import random
import re
import string

import pytest
import torch
from anls import anls_score
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from sacrebleu.metrics import BLEU

from polymodal.evaluate import metrics, ngrams
from polymodal.evaluate.user_data import Item, recall

WORDS = "a the red blue circle square small big on left right of in two dogs dog is are".split()


def sentence(rng: random.Random, lo: int = 1, hi: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def corpus(seed: int, n: int = 150, refs: tuple[int, int] = (1, 5), lo: int = 1):
    rng = random.Random(seed)
    references = [[sentence(rng, lo) for _ in range(rng.randint(*refs))] for _ in range(n)]
    # some predictions copy a reference, some share words with one, some are unrelated
    predictions = [rng.choice([rng.choice(r), sentence(rng, lo), " ".join(rng.choice(r).split()[::-1])])
                   for r in references]
    return predictions, references


def coco(references, predictions):
    return {i: r for i, r in enumerate(references)}, {i: [p] for i, p in enumerate(predictions)}


@pytest.mark.parametrize("seed", range(5))
def test_bleu4_matches_coco_caption_corpus_and_sentences(seed):
    predictions, references = corpus(seed)
    ours, per = ngrams.bleu(predictions, references)
    theirs, theirs_per = Bleu(4).compute_score(*coco(references, predictions), verbose=0)
    assert ours == pytest.approx(theirs[3], rel=1e-9)
    assert per == pytest.approx(theirs_per[3], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_bleu4_matches_sacrebleu_corpus_bleu(seed):
    predictions, references = corpus(seed, refs=(3, 3), lo=4)  # sacrebleu takes as many references per sentence
    ours, _ = ngrams.bleu(predictions, references)
    streams = [list(r) for r in zip(*references)]
    theirs = BLEU(tokenize="none", smooth_method="none", force=True).corpus_score(predictions, streams).score / 100
    assert theirs > 0.05  # every n-gram order has matches, so coco-caption's 1e-15 guards do not show
    assert ours == pytest.approx(theirs, rel=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_cider_d_matches_coco_caption_corpus_and_examples(seed):
    predictions, references = corpus(seed)
    ours, per = ngrams.cider(predictions, references)
    theirs, theirs_per = Cider().compute_score(*coco(references, predictions))
    assert ours == pytest.approx(theirs, rel=1e-9)
    assert per == pytest.approx(list(theirs_per), rel=1e-9, abs=1e-12)


def test_caption_metrics_tokenise_raw_text_as_they_score_it():
    raw, tokenised = ["A red circle, on the LEFT."], [["a red circle on the left", "A small red circle."]]
    assert metrics.METRICS["cider"].score(raw, tokenised) == ngrams.cider([ngrams.words(raw[0])],
                                                                         [[ngrams.words(r) for r in tokenised[0]]])
    assert metrics.METRICS["bleu"].score(raw, tokenised)[0] == pytest.approx(
        Bleu(4).compute_score(*coco([[ngrams.words(r) for r in tokenised[0]]], [ngrams.words(raw[0])]),
                              verbose=0)[0][3])


def noisy(rng: random.Random, text: str) -> str:
    """text with a few random character edits, case changes and extra spaces."""
    chars = list(text)
    for _ in range(rng.randint(0, 4)):
        i = rng.randrange(len(chars) + 1)
        op = rng.choice("ids")
        if op == "i":
            chars.insert(i, rng.choice(string.ascii_lowercase + " "))
        elif chars and i < len(chars):
            chars[i] = rng.choice(string.ascii_letters) if op == "s" else ""
    out = "".join(chars)
    return rng.choice([out, out.upper(), f"  {out} "])


@pytest.mark.parametrize("seed", range(5))
def test_anls_matches_the_anls_package(seed):
    rng = random.Random(seed)
    references = [[sentence(rng, 1, 4) for _ in range(rng.randint(1, 3))] for _ in range(200)]
    predictions = [noisy(rng, rng.choice(r)) if rng.random() < 0.8 else sentence(rng, 1, 3) for r in references]
    ours, per = metrics.anls(predictions, references)
    theirs = [anls_score(p, r) for p, r in zip(predictions, references)]
    assert per == pytest.approx(theirs, abs=1e-12)
    assert ours == pytest.approx(sum(theirs) / len(theirs))
    assert 0 < ours < 1 and len(set(per)) > 10  # partial credit happens, and so do misses


# -- VQAv2 accuracy, from the definition -----------------------------------------------------------------

def evalai_processed(answer: str) -> str:
    """The EvalAI answer processor, step by step: lower case; ',' and '?' dropped; "'s" split off; newlines and
    tabs to spaces; each listed punctuation mark removed where it touches a space (or anywhere when the
    answer holds a digit,digit comma), else replaced by a space; periods not before a digit removed; number
    words to digits; articles dropped; contractions restored."""
    a = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").replace("\n", " ").replace("\t", " ")
    a = a.strip()
    numbered = bool(re.search(r"\d,+\d", a))
    out = a
    for mark in ";/[]\"{}()=+\\_-><@`,?!":
        touches = (mark + " ") in a or (" " + mark) in a
        out = out.replace(mark, "" if touches or numbered else " ")
    out = re.sub(r"\.(?!\d)", "", out)
    numbers = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    words = []
    for w in out.split():
        w = "0" if w == "none" else str(numbers.index(w)) if w in numbers else w
        if w not in ("a", "an", "the"):
            words.append(metrics.CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_reference(prediction: str, answers: list[str]) -> float:
    """The official evaluation: for each annotator, min(1, matches among the other annotators / 3), averaged."""
    prediction = evalai_processed(prediction)
    answers = [evalai_processed(a) for a in answers]
    accs = []
    for i in range(len(answers)):
        others = answers[:i] + answers[i + 1:]
        accs.append(min(1.0, sum(a == prediction for a in others) / 3))
    return sum(accs) / len(accs)


VQA_WORDS = ["two", "2", "Two", "yes", "no", "dont", "don't", "the dog", "a dog", "dog.", "dog", "red;", "red",
             "none", "0", "man's hat", "1,000", "1000", "3.5", "left-side", "left side", "(blue)", "Blue!", "ten"]


@pytest.mark.parametrize("seed", range(5))
def test_vqa_accuracy_matches_the_official_definition(seed):
    rng = random.Random(seed)
    references = []
    for _ in range(300):
        pool = rng.sample(VQA_WORDS, rng.randint(1, 4))  # annotators agree on a few answers
        references.append([rng.choice(pool) for _ in range(10)])
    predictions = [rng.choice(VQA_WORDS) for _ in references]
    ours, per = metrics.vqa_accuracy(predictions, references)
    theirs = [vqa_reference(p, r) for p, r in zip(predictions, references)]
    assert per == pytest.approx(theirs, abs=1e-12)
    assert {0.0, 1.0} < set(per)  # credit in thirds occurs besides none and full


def test_vqa_normalisation_is_evalai_s():
    for answer in VQA_WORDS + [f"{a} {b}" for a in VQA_WORDS for b in VQA_WORDS[:6]]:
        assert metrics.vqa_normalise(answer) == evalai_processed(answer), answer


# -- exact match and recall, from the definition ---------------------------------------------------------

def squad_normalize_answer(s: str) -> str:
    """SQuAD v1.1's evaluation: lower, drop punctuation, drop articles, fix whitespace (in that script's order)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


@pytest.mark.parametrize("seed", range(3))
def test_exact_match_matches_squad_normalisation(seed):
    rng = random.Random(seed)
    references = [[sentence(rng, 1, 3) for _ in range(rng.randint(1, 3))] for _ in range(300)]
    predictions = [rng.choice([rng.choice(r).upper() + ".", "the " + rng.choice(r), sentence(rng, 1, 3)])
                   for r in references]
    _, per = metrics.exact_match(predictions, references)
    theirs = [float(any(squad_normalize_answer(p) == squad_normalize_answer(x) for x in r))
              for p, r in zip(predictions, references)]
    assert per == theirs and 0 < sum(per) < len(per)


@pytest.mark.parametrize("seed", range(3))
def test_recall_at_k_matches_a_full_ranking(seed):
    gen = torch.Generator().manual_seed(seed)
    texts = [f"caption {i}" for i in range(15)]
    rng = random.Random(seed)
    questions = [Item(str(i), None, None, "", rng.sample(texts, rng.randint(1, 2))) for i in range(20)]
    sim = torch.randn(20, 15, generator=gen)
    ours = recall(sim, texts, questions)
    for k in (1, 5, 10):
        found = 0
        for i, q in enumerate(questions):  # image i: its k nearest texts
            ranked = sorted(range(len(texts)), key=lambda j: -sim[i, j].item())[:k]
            found += any(texts[j] in q.references for j in ranked)
        assert ours[f"image_to_text_R@{k}"] == pytest.approx(found / len(questions))
        found = 0
        for j, t in enumerate(texts):  # text j: its k nearest images
            ranked = sorted(range(len(questions)), key=lambda i: -sim[i, j].item())[:k]
            found += any(t in questions[i].references for i in ranked)
        assert ours[f"text_to_image_R@{k}"] == pytest.approx(found / len(texts))
    assert not math.isclose(ours["image_to_text_R@1"], ours["image_to_text_R@10"])
