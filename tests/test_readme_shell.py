"""Every `polymodal ...` command of README.md's ```bash blocks runs, in README order, and does what the README
says of it (tests/test_readme.py does the same for the ```python blocks).

The commands run in one directory, as a reader's shell session would (`NAME=value` lines set variables later
commands use), through `polymodal.cli.main` with the README's arguments, on a budget: training commands get
`--max-steps 4` (and evals, checkpoints and logs at that step, a 2-step VQ stage) appended, evals `--n 8`
(and a small chain-of-thought validation), so each flag the README gives is still parsed and used. A checkpoint
path `runs/X/checkpoints/step-N` the README names becomes run X's checkpoint at the test's budget. Before the
first command the directory holds what a reader brings: runs/paligemma-world from a short `polymodal train`
(the README's own run directory), my.jsonl and text.jsonl document files, my_config.json with a run of it to
resume, shape.png, and the section "The formats you already have"'s llava.json, llava_val.json, messages.jsonl,
a `datasets` folder my_dataset/train and WebDataset shards laion-000000.tar ... laion-000099.tar, and for the
PaliGemma detection commands paligemma-hf (a tiny HF PaliGemma whose tokenizer holds the location tokens),
detect.jsonl and its images 0.png ... (tests/detection_data.py). The main job's line, run again, gets the refusal its comment names (--resume or --name).
Not run: the first screen's set-up line and `bash .ci/run` (tests/e2e/test_main_job_accuracy.py runs the main
job), `polymodal serve` (a server: tests/serve/), and lines that are not `polymodal` commands (pip, torchrun,
curl, python benchmarks/...).
"""

import io
import json
import re
import shlex
import tarfile
from pathlib import Path

import pytest

from polymodal.cli import main
from polymodal.data.synthetic import COLOURS, SHAPES, World
from polymodal.presets import get_preset
from polymodal.train.checkpoint import latest_checkpoint

from detection_data import boxes, write_hf_paligemma, write_jsonl

README = Path(__file__).parents[1] / "README.md"
FIRST_SCREEN = ("pip install torch==", "bash .ci/run")  # the set-up commands, run by CI itself
NOT_HERE = ("serve",)  # needs a live server: tests/serve/
TRAIN_BUDGET = ["--max-steps", "4", "--eval-every", "4", "--checkpoint-every", "4", "--log-every", "4",
                "--vq-steps", "2", "--eval-docs", "8"]
EVAL_BUDGET = ["--n", "8", "--cot-validation", "8"]


def shell_lines(markdown: str) -> list[tuple[int, str]]:
    """(README line number, logical line) of every ```bash block: continuation lines joined, and lines inside an
    open quotation (curl's JSON) kept with it."""
    out, fence, pending, start = [], None, "", 0
    for n, line in enumerate(markdown.splitlines(), 1):
        if line.startswith("```"):
            fence = line[3:].strip() if fence is None else None
            continue
        if fence != "bash":
            continue
        if not pending:
            start = n
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # a quotation still open
            pending += "\n"
            continue
        out.append((start, pending))
        pending = ""
    return out


def commands(markdown: str) -> list[tuple[int, str, list[str]]]:
    """(line, kind, argv): kind "set" (NAME=value), "run" (a polymodal command), "again" (a polymodal command
    the README says to give --resume or another --name when its run is there already) or "skip"."""
    out = []
    for n, line in shell_lines(markdown):
        if any(s in line for s in FIRST_SCREEN):
            continue
        words = shlex.split(line, comments=True)
        if not words and "a second time: --resume" in line and out:  # a comment line continuing the command's own
            out[-1] = (out[-1][0], "again", out[-1][2])
            continue
        if len(words) == 1 and re.fullmatch(r"[A-Za-z_]\w*=\S+", words[0]):
            out.append((n, "set", words[0].split("=", 1)))
            continue
        while words:  # a && b: each command in turn
            cut = words.index("&&") if "&&" in words else len(words)
            command, words = words[:cut], words[cut + 1:]
            runs = command[:1] == ["polymodal"] and command[1] not in NOT_HERE
            out.append((n, "run" if runs else "skip", command))
    return out


def budget(argv: list[str], variables: dict[str, str]) -> list[str]:
    """The README's arguments, variables expanded, checkpoint paths mapped, the test's budget appended."""
    argv = [re.sub(r"\$(\w+)", lambda m: variables[m[1]], a) for a in argv]
    mapped = []
    for a in argv:
        m = re.fullmatch(r"(.*)/checkpoints/step-\d+", a)
        mapped.append(str(latest_checkpoint(Path(m[1]) / "checkpoints")) if m else a)
    extra = {"train": TRAIN_BUDGET, "eval": EVAL_BUDGET}.get(mapped[0], [])
    return mapped + extra


@pytest.fixture
def reader(tmp_path, monkeypatch, capsys, one_thread):
    """A directory holding what the README's commands expect a reader to have."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--max-steps", "20", "--eval-every", "20"]) == 0  # runs/paligemma-world
    get_preset("paligemma-tiny").to_json("my_config.json")
    assert main(["train", "--model", "my_config.json", "--max-steps", "2", "--checkpoint-every", "2"]) == 0  # to resume
    world = World(seed=0)
    world.draw("red", "circle").save("shape.png")
    assert main(["export-data", "my.jsonl", "--n", "24", "--tasks", "colour", "count"]) == 0
    texts = [json.dumps({"segments": [{"text": f"{a} plus {b} is"}, {"text": str(a + b), "target": True}]})
             for a in range(6) for b in range(6)]
    Path("text.jsonl").write_text("\n".join(texts) + "\n")
    formats_you_have(world)
    Path("paligemma-hf").mkdir()
    write_hf_paligemma(Path("paligemma-hf"))
    write_jsonl(Path(), boxes(8, seed=0))
    capsys.readouterr()
    return tmp_path


def formats_you_have(world: World) -> None:
    """The README's own-format examples, with the world's pictures: LLaVA JSON, messages JSONL, a datasets folder
    and 100 one-sample WebDataset shards."""
    import datasets

    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    Path("images").mkdir()
    for c, s in pairs:
        world.draw(c, s).save(f"images/{c}-{s}.png")
    llava = [{"id": f"{c}-{s}", "image": f"images/{c}-{s}.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat colour is the shape?"}, {"from": "gpt", "value": c}]}
        for c, s in pairs]
    Path("llava.json").write_text(json.dumps(llava))
    Path("llava_val.json").write_text(json.dumps(llava[:4]))
    Path("messages.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": "<image>what shape is it?"}, {"role": "assistant", "content": s}],
        "images": [f"images/{c}-{s}.png"]}) + "\n" for c, s in pairs))
    datasets.Dataset.from_dict({"image": [world.draw(c, s) for c, s in pairs], "conversations": [
        r["conversations"] for r in llava]}).cast_column("image", datasets.Image()).save_to_disk("my_dataset/train")
    for i in range(100):
        c, s = pairs[i % len(pairs)]
        with tarfile.open(f"laion-{i:06d}.tar", "w") as tar:
            tar.add(f"images/{c}-{s}.png", arcname=f"{i:06d}.png")
            caption = f"a {c} {s}".encode()
            info = tarfile.TarInfo(f"{i:06d}.txt")
            info.size = len(caption)
            tar.addfile(info, io.BytesIO(caption))


def check(argv: list[str], out: str, before: set[Path]) -> None:
    """What the README says each kind of command does."""
    kind = argv[0]
    if kind == "train":
        run = re.search(r"run dir ([^\s;]+)", out)[1]
        assert latest_checkpoint(Path(run) / "checkpoints") is not None and "done: 4 steps" in out, out
    elif kind == "eval":
        after = argv[argv.index("--tasks") + 1:] if "--tasks" in argv else []
        tasks = after[:next((i for i, a in enumerate(after) if a.startswith("--")), len(after))]
        rows = [line.split()[0] for line in out.splitlines() if re.search(r"\d%", line)]
        assert rows and set(tasks) <= set(rows), out  # a row with percentages for each task asked
    elif kind == "generate":
        assert out.strip(), "generate printed nothing"
    elif kind in ("export-data", "convert", "plot"):
        assert out.startswith("wrote") and set(Path().iterdir()) - before, out


def test_every_polymodal_command_of_the_readme_runs_as_written(reader, capsys):
    variables: dict[str, str] = {}
    ran = []
    for n, kind, argv in commands(README.read_text()):
        if kind == "set":
            variables[argv[0]] = argv[1]
            continue
        if kind == "skip":
            continue
        args = budget(argv[1:], variables)
        before = set(Path().iterdir())
        code = main(args)
        out = capsys.readouterr()
        if kind == "again":  # the run is there (the reader's own): the one-line refusal the README's comment names
            assert code == 1 and "already holds checkpoint" in out.err and "--resume" in out.err, out.err
            continue
        assert code == 0, f"README.md:{n}: polymodal {' '.join(argv[1:])} failed:\n{out.out}\n{out.err}"
        check(args, out.out, before)
        ran.append(args[0])
    assert {"train", "eval", "generate", "export-data", "convert"} <= set(ran), ran


def test_the_readme_asks_what_the_exported_image_holds(tmp_path, monkeypatch, capsys):
    """The question the README's generate asks about examples_media/000000-0.png is the one export-data wrote."""
    monkeypatch.chdir(tmp_path)
    listed = commands(README.read_text())
    export = next(argv for _, kind, argv in listed if argv[1:2] == ["export-data"] and "examples.jsonl" in argv)
    generate = next(argv for _, kind, argv in listed
                    if argv[1:2] == ["generate"] and "examples_media/000000-0.png" in argv)
    assert main(export[1:]) == 0
    printed = capsys.readouterr().out
    question = generate[generate.index("--prompt") + 1]
    assert f"examples_media/000000-0.png: {question!r}" in printed, (question, printed)
    first = json.loads(Path("examples.jsonl").read_text().splitlines()[0])
    assert [s["text"] for s in first["segments"] if "text" in s and not s.get("target")] == [question]
