"""Hostile sweep, CLI: `polymodal generate / eval / serve / export-data / train` with bad media, bad settings,
folders that are no checkpoints, mismatched parts (a tokenizer of another model, a draft of another family,
--init-from of another family than --model), files it must not overwrite, and a full disk. Each probe runs the
command twice in-process: once through its function, to assert the error's class, once through `main`, to assert
exit status 1 and one line on stderr; a probe expected to work must exit 0."""

import io
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import polymodal as pm
from polymodal.cli import COMMANDS, main, parser
from polymodal.families.collators import fit_to_tokenizer
from polymodal.data.synthetic import World
from polymodal.data.tokenizer import Tokenizer
from polymodal.errors import (CheckpointError, ConfigError, DocumentError, ExistingFileError, InputError,
                              MissingFileError, PathKindError, UnknownNameError)
from polymodal.presets import get_preset
from sweep_judge import judge

WORLD = World(seed=0)


def wav(samples: np.ndarray, rate: int, tag: int = 1, bits: int = 16) -> bytes:
    """A mono RIFF/WAVE file written here: 16-bit PCM, or float32 samples as they are (tag 3)."""
    raw = (np.round(np.clip(samples, -1, 1) * 32767).astype("<i2") if tag == 1 else samples.astype("<f4")).tobytes()
    fmt = struct.pack("<HHIIHH", tag, 1, rate, rate * bits // 8, bits // 8, bits)
    body = b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(raw)) + raw
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WAVE" + body


def tone(rate: int, seconds: float) -> np.ndarray:
    return (0.4 * np.sin(2 * np.pi * 440 * np.arange(int(rate * seconds)) / rate)).astype(np.float32)


def save(family: str, directory, tokenizer) -> None:
    config = get_preset(family)
    if family == "gemini-tiny":  # reads images and audio, writes text: the tokenizer's vocabulary, no image codes
        config = config.replace(vq=None, tokens=config.tokens.replace(draw=None))
    config = fit_to_tokenizer(config, tokenizer)
    torch.manual_seed(0)
    pm.save_pretrained(pm.build(config), directory)
    tokenizer.save(directory)


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """Checkpoints of three families sharing one tokenizer, broken folders, and media files."""
    root = tmp_path_factory.mktemp("cli")
    tokenizer = Tokenizer.train(WORLD.texts(), vocab_size=400)
    for family, name in (("paligemma-tiny", "pali"), ("gemini-tiny", "gemini"), ("llama-tiny", "llama")):
        save(family, root / name, tokenizer)
    shutil.copytree(root / "pali", root / "noweights")
    (root / "noweights" / "model.safetensors").rename(root / "noweights" / "optimizer.safetensors")
    shutil.copytree(root / "pali", root / "pickle")
    (root / "pickle" / "model.safetensors").rename(root / "pickle" / "pytorch_model.bin")
    shutil.copytree(root / "pali", root / "twoloose")
    shutil.copy(root / "twoloose" / "model.safetensors", root / "twoloose" / "a.safetensors")
    (root / "twoloose" / "model.safetensors").rename(root / "twoloose" / "b.safetensors")
    shutil.copytree(root / "pali", root / "othertok")
    Tokenizer.train(WORLD.texts(), vocab_size=600).save(root / "othertok")
    shutil.copytree(root / "pali", root / "run" / "checkpoints" / "step-000001")
    (root / "run" / "checkpoints" / "step-000001" / "trainer.json").write_text('{"train_config": {"tasks": [')
    (root / "emptyrun").mkdir()
    media = root / "media"
    media.mkdir()
    WORLD.draw("red", "circle").save(media / "red.png")
    ramp = (np.arange(64 * 64).reshape(64, 64) % 64 * 1040).astype(np.uint16)
    Image.fromarray(ramp).save(media / "grey16.png")
    Image.new("CMYK", (40, 30), (0, 200, 200, 0)).save(media / "cmyk.jpg")
    Image.new("RGBA", (40, 30), (255, 0, 0, 90)).save(media / "rgba.png")
    (media / "empty.png").write_bytes(b"")
    (media / "cut.png").write_bytes((media / "red.png").read_bytes()[:100])
    (media / "speech.wav").write_bytes(wav(tone(22050, 0.74), 22050))
    (media / "long.wav").write_bytes(wav(tone(22050, 1.5), 22050))
    (media / "float.wav").write_bytes(wav(tone(44100, 0.5), 44100, tag=3, bits=32))
    nan = tone(16000, 0.2)
    nan[3] = np.nan
    (media / "nan.wav").write_bytes(wav(nan, 16000, tag=3, bits=32))
    (media / "mulaw.wav").write_bytes(wav(tone(8000, 0.2), 8000)[:20] + struct.pack("<H", 7)
                                      + wav(tone(8000, 0.2), 8000)[22:])
    return root


def argv(place, args: list[str]) -> list[str]:
    return [str(a).replace("{}", str(place)) for a in args]


GEN = ["generate", "{}/pali", "--prompt", "what colour is it?", "--max-new-tokens", "2"]
SEEN = [*GEN, "--image", "{}/media/red.png"]  # a PaliGemma answers about an image: settings are probed with one
GEM = ["generate", "{}/gemini", "--prompt", "what is it?", "--max-new-tokens", "2"]
PROBES = {  # name: (argv, error class or None for a result, what the message says)
    # media through generate
    "16-bit png": ([*GEN, "--image", "{}/media/grey16.png"], None, ""),
    "cmyk jpeg": ([*GEN, "--image", "{}/media/cmyk.jpg"], None, ""),
    "rgba png": ([*GEN, "--image", "{}/media/rgba.png"], None, ""),
    "missing image": ([*GEN, "--image", "{}/media/gone.png"], InputError, "expected an existing image file"),
    "image is a directory": ([*GEN, "--image", "{}/media"], InputError, "got directory"),
    "empty image": ([*GEN, "--image", "{}/media/empty.png"], InputError, "expected a readable image file"),
    "truncated image": ([*GEN, "--image", "{}/media/cut.png"], InputError, "expected a readable image file"),
    "wav as image": ([*GEN, "--image", "{}/media/speech.wav"], InputError, "expected a readable image file"),
    "png as audio": ([*GEM, "--audio", "{}/media/red.png"], InputError, "not a RIFF/WAVE file"),
    "audio to paligemma": ([*GEN, "--audio", "{}/media/speech.wav"], DocumentError, "PaliGemma reads images and text"),
    "0.74 s at 22.05 kHz": ([*GEM, "--audio", "{}/media/speech.wav"], None, ""),
    "1.5 s at 22.05 kHz": ([*GEM, "--audio", "{}/media/long.wav"], DocumentError,
                           "audio clip of 1.5 s (at 22050 Hz); the audio encoder hears at most 1 s"),
    "float wav at 44.1 kHz": ([*GEM, "--audio", "{}/media/float.wav"], None, ""),
    "nan wav": ([*GEM, "--audio", "{}/media/nan.wav"], InputError, "samples are NaN or infinite"),
    "mu-law wav": ([*GEM, "--audio", "{}/media/mulaw.wav"], InputError, "mu-law-encoded samples"),
    "image and audio": ([*GEM, "--image", "{}/media/grey16.png", "--audio", "{}/media/float.wav"], None, ""),
    "lone surrogate prompt": (["generate", "{}/pali", "--prompt", "bad \udcff text"], InputError, "lone surrogate"),
    # settings
    "seed 2**64": ([*SEEN, "--seed", str(2 ** 64)], InputError, "seed must be an integer >= 0"),
    "seed 2**70": ([*SEEN, "--seed", str(2 ** 70), "--do-sample"], InputError, "seed must be an integer >= 0"),
    "seed -1": ([*SEEN, "--seed", "-1"], InputError, "seed must be an integer >= 0"),
    "seed 2**64-1": ([*SEEN, "--seed", str(2 ** 64 - 1), "--do-sample"], None, ""),
    "max-new-tokens 0": (["generate", "{}/pali", "--prompt", "hi", "--image", "{}/media/red.png", "--max-new-tokens",
                          "0"], InputError,
                         "max_new_tokens must be an integer >= 1"),
    "max-new-tokens past context": (["generate", "{}/pali", "--prompt", "hi", "--image", "{}/media/red.png",
                                     "--max-new-tokens", "100000"], InputError, "past the model's context"),
    "temperature nan": ([*SEEN, "--do-sample", "--temperature", "nan"], InputError, "temperature"),
    "temperature inf": ([*SEEN, "--do-sample", "--temperature", "inf"], InputError, "temperature"),
    "temperature -1": ([*SEEN, "--do-sample", "--temperature", "-1"], InputError, "temperature"),
    "top-p 2": ([*SEEN, "--do-sample", "--top-p", "2"], InputError, "top_p"),
    "top-p nan": ([*SEEN, "--do-sample", "--top-p", "nan"], InputError, "top_p"),
    "top-k 0": ([*SEEN, "--do-sample", "--top-k", "0"], InputError, "top_k"),
    "prompt-lookup 0": ([*SEEN, "--prompt-lookup", "0"], InputError, "prompt_lookup_num_tokens"),
    "assistant tokens without assistant": ([*SEEN, "--num-assistant-tokens", "3"], InputError, "needs an assistant"),
    # folders that are no checkpoints, mismatched parts
    "missing checkpoint": (["generate", "{}/gone", "--prompt", "hi"], MissingFileError, "neither a model directory"),
    "checkpoint is a file": (["generate", "{}/media/red.png", "--prompt", "hi"], MissingFileError,
                             "neither a model directory"),
    "run without checkpoints": (["generate", "{}/emptyrun", "--prompt", "hi"], MissingFileError,
                                "neither a model directory"),
    "only optimizer.safetensors": (["generate", "{}/noweights", "--prompt", "hi"], MissingFileError,
                                   "has no weights: no model.safetensors"),
    "only a pickle": (["generate", "{}/pickle", "--prompt", "hi"], MissingFileError, "pickles, which polymodal never"),
    "two loose safetensors": (["generate", "{}/twoloose", "--prompt", "hi"], MissingFileError,
                              "{}/twoloose has no weights: no model.safetensors or model.safetensors.index.json "
                              "(a.safetensors, b.safetensors: several loose"),
    "tokenizer of another model": (["generate", "{}/othertok", "--prompt", "hi"], ConfigError,
                                   "tokens, the model's embeddings 400 rows"),
    "draft of another family": ([*GEN, "--image", "{}/media/red.png", "--assistant", "{}/gemini"], InputError,
                                "the draft (assistant_model, a Gemini"),
    "draft without weights": ([*GEN, "--assistant", "{}/noweights"], MissingFileError, "has no weights"),
    "draft missing": ([*GEN, "--assistant", "{}/gone"], MissingFileError, "neither a model directory"),
    "draft with another tokenizer": ([*GEN, "--assistant", "{}/othertok"], ConfigError,
                                     "--assistant (the draft) {}/othertok: the tokenizer has"),
    "text-only draft": ([*GEN, "--image", "{}/media/red.png", "--assistant", "{}/llama"], None, ""),
    # eval
    "corrupt trainer.json": (["eval", "{}/run", "--n", "1"], CheckpointError,
                             "{}/run/checkpoints/step-000001/trainer.json is not a readable trainer state"),
    "eval n 0": (["eval", "{}/run", "--n", "0"], InputError, "--n must be >= 1"),
    "eval batch 0": (["eval", "{}/run", "--batch-size", "0"], InputError, "--batch-size must be >= 1"),
    "eval unknown task": (["eval", "{}/pali", "--tasks", "nope", "--n", "1"], InputError, "unknown task 'nope'"),
    "eval without weights": (["eval", "{}/noweights", "--n", "1"], MissingFileError, "has no weights"),
    # serve: settings checked before anything is loaded (the folder has no weights)
    "port -1": (["serve", "{}/noweights", "--port", "-1"], InputError, "--port must be in [0, 65535], got -1"),
    "port 65536": (["serve", "{}/noweights", "--port", "65536"], InputError, "got 65536"),
    "port 99999": (["serve", "{}/noweights", "--port", "99999"], InputError, "got 99999"),
    "slots 0": (["serve", "{}/noweights", "--slots", "0"], InputError, "--slots must be >= 1"),
    "max-queue -1": (["serve", "{}/noweights", "--max-queue", "-1"], InputError, "--max-queue >= 0"),
    "serve without weights": (["serve", "{}/noweights"], MissingFileError, "has no weights"),
    # convert
    "convert onto itself": (["convert", "{}/pali", "{}/pali", "--to", "hf", "--model-type", "llama"], InputError,
                            "the target"),
    "convert no config": (["convert", "{}/media", "{}/out", "--to", "hf"], MissingFileError,
                          "is neither a model directory (no config.json)"),
    "convert unknown type": (["convert", "{}/llama", "{}/out", "--to", "hf", "--model-type", "gpt"], InputError,
                             "--model-type must be one of"),
    # train: refused before any work
    "init-from another family": (["train", "--init-from", "{}/pali", "--model", "kosmos-tiny", "--out-dir", "{}/runs"],
                                 ConfigError, "holds a PaliGemmaConfig model, --model kosmos-tiny a KosmosConfig"),
    "init-from without weights": (["train", "--init-from", "{}/noweights", "--out-dir", "{}/runs"], MissingFileError,
                                  "has no weights"),
    "init-from missing": (["train", "--init-from", "{}/gone", "--out-dir", "{}/runs"], MissingFileError,
                          "--init-from expects a model directory"),
    "train seed 2**40": (["train", "--seed", str(2 ** 40), "--out-dir", "{}/runs"], ConfigError, "seed must be"),
    "train seed 2**70": (["train", "--seed", str(2 ** 70), "--out-dir", "{}/runs"], ConfigError, "seed must be"),
    "train seed -1": (["train", "--seed", "-1", "--out-dir", "{}/runs"], ConfigError, "seed must be"),
    "train lr nan": (["train", "--lr", "nan", "--out-dir", "{}/runs"], ConfigError, "lr"),
    "train max-steps 0": (["train", "--max-steps", "0", "--out-dir", "{}/runs"], ConfigError, "max_steps"),
    "train unknown model": (["train", "--model", "gpt-9", "--out-dir", "{}/runs"], MissingFileError, "gpt-9"),
    "train missing data": (["train", "--data", "{}/gone.jsonl", "--out-dir", "{}/runs"], MissingFileError,
                           "--data expected a data file"),
    "train unknown task": (["train", "--tasks", "nope", "--out-dir", "{}/runs"], ConfigError, "task must be one of"),
    # export-data
    "export over a file": (["export-data", "{}/media/red.png", "--n", "1"], ExistingFileError,
                           "exists; export-data never overwrites"),
    "export onto a directory": (["export-data", "{}/media", "--n", "1"], PathKindError,
                                "expected a .jsonl file to write"),
    "export n 0": (["export-data", "{}/new.jsonl", "--n", "0"], InputError, "--n must be >= 1"),
    "export unknown task": (["export-data", "{}/new.jsonl", "--tasks", "nope"], InputError, "nope"),
}


@pytest.mark.parametrize("name", [pytest.param(n, id=f"{(e.__name__ if e else 'result')}-cli-{n}")
                                  for n, (_, e, _) in PROBES.items()])
def test_cli_probe(place, capsys, name):
    args, error, says = PROBES[name]
    args = argv(place, args)
    says = says.replace("{}", str(place))
    if error is not None:
        parsed = parser().parse_args(args)
        judge(lambda: COMMANDS[parsed.command](parsed), error, says)
    code = judge(lambda: main(args), None)
    err = capsys.readouterr().err
    if error is None:
        assert code == 0, err
        return
    said = [line for line in err.strip().splitlines() if not line.startswith("using ")]  # the checkpoint chosen
    assert code == 1 and len(said) == 1 and "Traceback" not in err, err
    assert said[0].startswith(f"polymodal {args[0]}: error: ") and says in said[0], err


def test_export_data_never_overwrites_a_file_or_its_media(tmp_path, capsys):
    out = tmp_path / "world.jsonl"
    assert main(["export-data", str(out), "--n", "2"]) == 0
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert main(["export-data", str(out), "--n", "3"]) == 1
    assert "world.jsonl exists; export-data never overwrites a file" in capsys.readouterr().err
    out.unlink()
    del before[out]
    assert main(["export-data", str(out), "--n", "3"]) == 1  # its media are still there
    assert "world_media exists and is not empty" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_init_from_names_the_run_after_the_model_it_trains(place, tmp_path, capsys, one_thread):
    """Without --model or --name, a run fine-tuning `pali` is `pali-tuned`, not the default model's name."""
    code = main(["train", "--init-from", str(place / "pali"), "--out-dir", str(tmp_path), "--max-steps", "1",
                 "--batch-size", "2", "--eval-every", "100", "--tasks", "colour"])
    assert code == 0, capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["pali-tuned"]
    assert json.loads((tmp_path / "pali-tuned" / "checkpoints" / "step-000001" / "config.json").read_text())[
        "config_class"] == "PaliGemmaConfig"


def test_a_full_disk_in_train_is_one_line(tmp_path):
    """Files past 64 kB fail to write (EFBIG, as a full disk fails with ENOSPC): `train` says so in one line."""
    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    proc = subprocess.run([sys.executable, "-m", "polymodal.cli", "train", "--model", "paligemma-tiny", "--tasks",
                           "colour", "--max-steps", "1", "--batch-size", "2", "--out-dir", str(tmp_path)],
                          preexec_fn=small_disk, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "File too large" in proc.stderr, proc.stderr
    assert proc.stderr.startswith("polymodal train: error: "), proc.stderr


def test_an_out_dir_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["train", "--model", "paligemma-tiny", "--out-dir", str(tmp_path / "file" / "runs")]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Not a directory" in err, err
