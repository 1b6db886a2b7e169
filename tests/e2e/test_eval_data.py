"""`polymodal eval RUN --data FILE` on runs trained through the CLI on a JSONL file: PaliGemma, Gemini and Flamingo
(answers), a dual encoder (retrieval) and a text-only decoder. Each run trains a few seconds on one thread, long
enough to learn its eight documents' answers by heart, which is what lets the scores below mean something."""

import json
from collections import Counter

import numpy as np
import pytest

from polymodal.cli import main
from polymodal.data.documents import Audio, Document, Segment, read_jsonl, write_jsonl
from polymodal.data.synthetic import World
from polymodal.evaluate import blank
from polymodal.evaluate.metrics import normalise, vqa_accuracy

FAMILIES = ("paligemma-tiny", "gemini-tiny", "flamingo-tiny")
THINGS = ["apple", "grass", "sky", "sun", "ball", "box", "roof", "moon"]
ANSWERS = ["red", "green", "blue", "yellow", "red", "blue", "green", "yellow"]
COLOURS, SHAPES = ["red", "green", "blue", "yellow"], ["circle", "square", "triangle"]


def said(err: str) -> list[str]:
    """stderr's lines but the resolver's note of which checkpoint a run directory gave ("using ...")."""
    return [line for line in err.splitlines() if not line.startswith("using ")]


def question(i: int, answer: str, **target) -> Document:
    image = World(seed=0).draw(COLOURS[i % 4], SHAPES[i % 3])
    return Document([Segment("image", media=image), Segment("text", f"what colour is the {THINGS[i]}?"),
                     Segment("text", answer, target=True, **target)], id=f"q{i}", task="odd" if i % 2 else "even")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    train = [question(i, a) for i, a in enumerate(ANSWERS)]
    write_jsonl(train, root / "train.jsonl")
    wrong = question(0, ANSWERS[0], references=["zebra"])  # a reference no training answer is
    write_jsonl([*train, Document(wrong.segments, id="wrong", task="even")], root / "eval.jsonl")
    return root


@pytest.fixture(scope="module")
def runs(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")

    def run(preset: str, data: str = "train.jsonl", steps: int = 60):
        if not (out / preset).exists():
            assert main(["train", "--model", preset, "--data", str(files / data), "--max-steps", str(steps),
                         "--batch-size", "8", "--vq-steps", "0", "--eval-every", "1000", "--log-every", "1000",
                         "--out-dir", str(out), "--name", preset]) == 0
        return out / preset
    return run


def evaluate(run, data, out, *flags):
    assert main(["eval", str(run), "--data", str(data), "--out", str(out), *flags]) == 0
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return records, {row["task"]: row for row in json.loads((out / "results.json").read_text())["scores"]}


@pytest.mark.parametrize("preset", FAMILIES)
def test_eval_data_scores_what_its_predictions_say(preset, files, runs, tmp_path, one_thread):
    records, rows = evaluate(runs(preset), files / "eval.jsonl", tmp_path / "out")
    docs = read_jsonl(files / "eval.jsonl")
    assert [r["id"] for r in records] == [d.id for d in docs]
    for r, d in zip(records, docs):
        target = d.segments[-1]
        assert r["references"] == (target.references or [target.text]) and r["task"] == d.task
        assert r["prompt"] == f"<image> {d.segments[1].text}"
        assert r["score"] == float(normalise(r["prediction"]) in map(normalise, r["references"]))
    assert sum(r["score"] for r in records[:8]) >= 7, records  # it learned its training answers
    assert records[-1]["score"] == 0 and records[-1]["prediction"] == records[0]["prediction"]
    for task, row in rows.items():  # each figure is the mean of its documents' scores
        mine = [r["score"] for r in records if task in ("all", r["task"])]
        assert row["n"] == len(mine) and row["score"] == pytest.approx(sum(mine) / len(mine))
    assert sorted(rows) == ["all", "even", "odd"]

    train = read_jsonl(files / "train.jsonl", load_media=False)
    by_question = {}
    for d in train:
        by_question.setdefault(d.segments[1].text, Counter())[d.segments[2].text] += 1
    guesses = [by_question[d.segments[1].text].most_common(1)[0][0] for d in docs]
    right = [g in (d.segments[-1].references or [d.segments[-1].text]) for g, d in zip(guesses, docs)]
    assert rows["all"]["majority"] == pytest.approx(sum(right) / len(right))

    write_jsonl([blank(d) for d in docs], tmp_path / "blank.jsonl")  # the same documents, their images black
    _, blanked = evaluate(runs(preset), tmp_path / "blank.jsonl", tmp_path / "blanked")
    assert rows["all"]["blanked"] == pytest.approx(blanked["all"]["score"])


def test_vqa_references_sampling_and_the_output_folder(files, runs, tmp_path, one_thread, capsys):
    rng_refs = [["red"] * 2 + ["crimson"] * 8, ["green"] * 9 + ["lime"], ["blue", "navy"] * 5]
    docs = [question(i, ANSWERS[i], references=refs) for i, refs in enumerate(rng_refs)]
    write_jsonl(docs, tmp_path / "vqa.jsonl")
    run = runs("paligemma-tiny")
    records, rows = evaluate(run, tmp_path / "vqa.jsonl", tmp_path / "out", "--metric", "vqa")
    for r in records:
        assert r["score"] == pytest.approx(vqa_accuracy([r["prediction"]], [r["references"]])[1][0])
    assert rows["all"]["score"] == pytest.approx(sum(r["score"] for r in records) / len(records))
    assert 0 < rows["all"]["score"] < 1  # partial credit: two of ten annotators said red

    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(tmp_path / "vqa.jsonl"), "--out", str(tmp_path / "out")]) == 1
    assert "exists" in capsys.readouterr().err  # an earlier evaluation is not replaced silently
    sampled = [evaluate(run, tmp_path / "vqa.jsonl", tmp_path / f"s{k}", "--do-sample", "--temperature", "5",
                        "--seed", "3")[0] for k in range(2)]
    assert sampled[0] == sampled[1]  # one seed, one sample
    evaluate(run, tmp_path / "vqa.jsonl", tmp_path / "out", "--overwrite")


def test_eval_without_data_on_a_jsonl_run_says_what_to_pass(files, runs, tmp_path, capsys):
    run = runs("paligemma-tiny")
    capsys.readouterr()
    assert main(["eval", str(run)]) == 1
    err = capsys.readouterr().err
    assert "--data" in err and str(files / "train.jsonl") in err and len(said(err)) == 1
    assert main(["eval", str(run), "--metric", "vqa"]) == 1  # a --data flag without --data
    assert "--data" in capsys.readouterr().err


@pytest.mark.parametrize("metric", ["bleu4", "recall"])
def test_a_bad_metric_is_one_line_and_writes_nothing(metric, files, runs, tmp_path, capsys):
    run = runs("paligemma-tiny")
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(files / "eval.jsonl"), "--metric", metric,
                 "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert len(said(err)) == 1 and "exact" in err and metric in err
    assert not (tmp_path / "out" / "results.json").exists()


def test_vqa_on_questions_with_one_reference_is_refused_before_any_answer(files, runs, tmp_path, capsys):
    run = runs("paligemma-tiny")
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(files / "eval.jsonl"), "--metric", "vqa",
                 "--out", str(tmp_path / "out")]) == 1
    err = said(capsys.readouterr().err)
    assert len(err) == 1 and "eval.jsonl, q0: --metric vqa" in err[0], err
    assert "scores 0 whatever the answer" in err[0] and "--metric exact" in err[0]
    assert not (tmp_path / "out" / "results.json").exists()


def test_dual_encoder_is_scored_by_retrieval(files, runs, tmp_path, one_thread, capsys):
    captions = [f"a {c} {s}" for c in COLOURS for s in SHAPES]
    docs = [Document([Segment("image", media=World(seed=0).draw(*c.split()[1:])), Segment("text", c, target=True)],
                     task=c.split()[2]) for c in captions]
    write_jsonl(docs, files / "pairs.jsonl")
    records, rows = evaluate(runs("clip-tiny", "pairs.jsonl", 30), files / "pairs.jsonl", tmp_path / "out")
    assert [r["references"] for r in records] == [[c] for c in captions]
    assert all(r["prediction"] in captions and r["score"] == float(r["prediction"] == r["references"][0])
               for r in records)
    assert rows["all"]["score"] == pytest.approx(sum(r["score"] for r in records) / len(records))
    assert rows["all"]["image_to_text_R@10"] >= rows["all"]["image_to_text_R@5"] >= rows["all"]["score"]
    assert sorted(rows) == sorted(["all", *SHAPES]) and rows["circle"]["n"] == 4
    assert "image->text R@1" in capsys.readouterr().out


def test_text_only_decoder_has_no_blanked_baseline(files, runs, tmp_path, one_thread):
    write_jsonl([Document([Segment("text", f"colour of the {t}?"), Segment("text", a, target=True)])
                 for t, a in zip(THINGS, ANSWERS)], files / "text.jsonl")
    records, rows = evaluate(runs("llama-tiny", "text.jsonl"), files / "text.jsonl", tmp_path / "out")
    assert rows["all"]["blanked"] is None and rows["all"]["majority"] == 1.0  # each question has one answer
    assert [r["id"] for r in records] == [f"line {i}" for i in range(1, 9)] and sorted(rows) == ["all"]


@pytest.mark.parametrize("bad, says", [
    (Document([Segment("audio", media=Audio(np.zeros(1600, np.float32), 16000)), Segment("text", "what?"),
               Segment("text", "beep", target=True)]), "audio"),
    (Document([Segment("text", "no answer marked")]), "no target text segment"),
])
def test_a_document_it_cannot_score_stops_eval_before_any_answer(bad, says, files, runs, tmp_path, capsys):
    write_jsonl([question(0, "red"), bad], tmp_path / "bad.jsonl")
    run = runs("paligemma-tiny")
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert len(said(err)) == 1 and "line 2" in err and says in err, err
    assert not (tmp_path / "out").exists()
