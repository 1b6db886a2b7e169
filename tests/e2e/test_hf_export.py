"""A fresh user's round trip: `polymodal train` -> `polymodal convert --to hf RUN out` (no other flag) ->
transformers' AutoProcessor + AutoModelForImageTextToText and its image-text-to-text pipeline give the greedy
answers `polymodal generate` gives, from the same ids; and back with `--to polymodal`."""

import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from PIL import Image

import polymodal as pm
from polymodal.cli import main
from polymodal.families.collators import make_collator
from polymodal.data.synthetic import World
from polymodal.data.tokenizer import Tokenizer
from polymodal.generation.engine import generate

transformers = pytest.importorskip("transformers")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TASKS = ("colour", "shape", "count", "position", "caption")


def polymodal(*args, cwd):
    out = subprocess.run([sys.executable, "-m", "polymodal.cli", *map(str, args)], capture_output=True, text=True,
                         env=ENV, timeout=300, cwd=cwd)
    assert out.returncode == 0, f"polymodal {' '.join(map(str, args))} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A short main-job run (the README's run directory) and its HF export, both by the command line."""
    home = tmp_path_factory.mktemp("user")
    polymodal("train", "--max-steps", 150, "--eval-every", 150, cwd=home)
    out = polymodal("convert", "--to", "hf", "runs/paligemma-world", "hf", cwd=home)
    assert "model_type paligemma" in out
    return home


def ours(run, docs):
    """polymodal's greedy answers and prompt inputs, as `polymodal generate` lays them out."""
    checkpoint = sorted((run / "checkpoints").iterdir())[-1]
    model, tokenizer = pm.from_pretrained(checkpoint), Tokenizer.from_file(checkpoint)
    collator = make_collator(model.config, tokenizer)
    prompts = [collator.format.encode(d, prompt_only=True) for d in docs]
    answers = []
    for p in prompts:
        batch = collator.pad([p])
        del batch["labels"]
        new = generate(model, **batch, max_new_tokens=8, eos_token_id=tokenizer.eos_id)[0]
        answers.append(tokenizer.decode([i for i in new.tolist() if i != tokenizer.eos_id]).strip())
    return prompts, answers


def test_transformers_reads_the_export_and_answers_as_polymodal_does(exported):
    hf = exported / "hf"
    world = World(seed=0)
    examples = [world.sample(task, i, "eval") for task in TASKS for i in range(2)]
    docs = [e.document for e in examples]
    prompts, answers = ours(exported / "runs" / "paligemma-world", docs)
    tasks = [task for task in TASKS for _ in range(2)]
    assert sum(a in world.choices(t) for a, t in zip(answers, tasks)) >= 8, answers  # answers, not noise

    processor = transformers.AutoProcessor.from_pretrained(hf)
    model = transformers.AutoModelForImageTextToText.from_pretrained(hf).eval()
    assert type(processor).__name__ == "PaliGemmaProcessor" and type(model).__name__.startswith("PaliGemma")
    pipe = transformers.pipeline("image-text-to-text", model=str(hf))
    for doc, prompt, answer in zip(docs, prompts, answers):
        image, question = doc.segments[0].media, doc.segments[1].text
        x = processor(images=image, text=question, return_tensors="pt")
        assert x["input_ids"][0].tolist() == prompt.tokens["input_ids"]  # <image>*16 <bos> question "\n"
        assert x["token_type_ids"][0].tolist() == prompt.tokens["token_type_ids"]
        torch.testing.assert_close(x["pixel_values"], prompt.media["pixel_values"], rtol=0, atol=1e-6)
        with torch.no_grad():
            out = model.generate(**x, max_new_tokens=8)  # greedy: generation_config.json says so
        theirs = processor.decode(out[0, x["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert theirs == answer, (question, theirs, answer)
        [piped] = pipe(images=image, text=question, max_new_tokens=8, return_full_text=False)
        assert piped["generated_text"].strip() == answer


def test_the_cli_answer_and_the_export_files(exported, tmp_path):
    hf = exported / "hf"
    names = {p.name for p in hf.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
            "processor_config.json", "generation_config.json", "README.md"} <= names, names
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(hf.stat().st_mode) == 0o777 & ~umask
    for path in [*hf.iterdir(), *(exported / "runs" / "paligemma-world" / "checkpoints").rglob("*")]:
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == want, path
    card = (hf / "README.md").read_text()
    assert "built-in synthetic world" in card and "150 steps" in card and "| colour |" in card

    world = World(seed=0)
    example = world.sample("colour", 0, "eval")
    example.document.segments[0].media.save(tmp_path / "q.png")
    said = polymodal("generate", "runs/paligemma-world", "--prompt", example.document.texts[0], "--image",
                     tmp_path / "q.png", cwd=exported).strip()
    processor = transformers.AutoProcessor.from_pretrained(hf)
    model = transformers.AutoModelForImageTextToText.from_pretrained(hf)
    x = processor(images=Image.open(tmp_path / "q.png"), text=example.document.texts[0], return_tensors="pt")
    out = model.generate(**x, max_new_tokens=32)
    assert processor.decode(out[0, x["input_ids"].shape[1]:], skip_special_tokens=True).strip() == said


def test_back_to_polymodal_reads_the_processor_settings(exported, tmp_path, capsys):
    hf = exported / "hf"
    assert main(["convert", str(hf), str(tmp_path / "back"), "--to", "polymodal"]) == 0
    back = tmp_path / "back"
    assert (back / "preprocessor_config.json").read_bytes() == (hf / "preprocessor_config.json").read_bytes()
    assert Tokenizer.from_file(back).encode("where is the red circle?") == Tokenizer.from_file(hf).encode(
        "where is the red circle?")
    checkpoint = sorted((exported / "runs" / "paligemma-world" / "checkpoints").iterdir())[-1]
    a, b = pm.from_pretrained(checkpoint).state_dict(), pm.from_pretrained(back).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    other = tmp_path / "other"
    other.mkdir()
    for p in hf.iterdir():
        (other / p.name).write_bytes(p.read_bytes())
    config = json.loads((other / "preprocessor_config.json").read_text())
    (other / "preprocessor_config.json").write_text(json.dumps({**config, "image_mean": [0.48, 0.46, 0.41]}))
    assert main(["convert", str(other), str(tmp_path / "wrong"), "--to", "polymodal"]) == 1
    err = capsys.readouterr().err
    assert "preprocesses images otherwise" in err and "image_mean" in err and not (tmp_path / "wrong").exists()


def test_a_text_decoder_exports_a_chat_template_laid_out_as_polymodal_prompts(tmp_path):
    """AutoTokenizer's apply_chat_template on the export gives the ids of polymodal's own prompt layout."""
    from polymodal.families.collators import fit_to_tokenizer
    from polymodal.data.documents import Document, Segment
    from polymodal.presets import get_preset

    tokenizer = Tokenizer.train(World(seed=0).texts(), vocab_size=300)
    model = pm.build(fit_to_tokenizer(get_preset("llama-tiny"), tokenizer))
    pm.save_pretrained(model, tmp_path / "ours")
    tokenizer.save(tmp_path / "ours")
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    turns = ["what colour is the shape?", "and how many shapes?"]
    ids = theirs.apply_chat_template([{"role": "user", "content": t} for t in turns], tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    prompt = make_collator(model.config, tokenizer).format.encode(Document([Segment("text", t) for t in turns]),
                                                                  prompt_only=True)
    assert list(ids) == prompt.tokens["input_ids"]
    config = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (config["eos_token_id"], config["do_sample"]) == (tokenizer.eos_id, False)
