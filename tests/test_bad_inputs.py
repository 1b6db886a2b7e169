"""Never garbage without an error: every bad input below ends in one polymodal error with a one-line message
naming what was expected and what was given, before any compute (issue 14's cases, one test each)."""

import json
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import polymodal as pm
from polymodal.cli import main
from polymodal.config import ConfigError, DecoderConfig
from polymodal.families import load_config
from polymodal.families.collators import fit_to_tokenizer, make_collator
from polymodal.data.documents import MAX_IMAGE_PIXELS, Audio, Document, DocumentError, Segment, read_jsonl
from polymodal.data.tokenizer import Tokenizer
from polymodal.errors import PolymodalError, check_number
from polymodal.serialization import save_state_dict

NAN, INF = float("nan"), float("inf")


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert isinstance(error.value, PolymodalError) and "\n" not in message and message
    return message


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return pm.build(DecoderConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_seq_len=32)).eval()


def test_check_number_lets_no_nan_inf_or_bool_through():
    for value in (NAN, INF, -INF, -1.0, 0, True, "1", None, torch.tensor(1.0)):
        with pytest.raises(PolymodalError, match="x must be a finite number > 0, got"):
            check_number("x", value, above=0)
    assert check_number("x", 2.5, above=0) == 2.5 and check_number("n", np.int64(3), integer=True, at_least=1) == 3
    with pytest.raises(PolymodalError, match="n must be an integer >= 1, got 2.5"):
        check_number("n", 2.5, integer=True, at_least=1)


@pytest.mark.parametrize("field, value, expected", [
    ("rope_theta", NAN, "DecoderConfig.rope_theta must be a finite number, got nan"),
    ("rope_theta", -1e4, "DecoderConfig.rope_theta must be a finite number > 0, got -10000.0"),
    ("norm_eps", INF, "DecoderConfig.norm_eps must be a finite number, got inf"),
    ("init_std", 0.0, "DecoderConfig.init_std must be a finite number > 0, got 0.0"),
    ("rope_scaling", {"rope_type": "linear", "factor": NAN}, "rope_scaling.factor must be a finite number > 0"),
    ("eos_token_id", 512, r"DecoderConfig.eos_token_id must be a token id in \[0, 512\) \(the vocabulary\), got 512"),
    ("pad_token_id", -1, r"DecoderConfig.pad_token_id must be a token id in \[0, 512\)"),
    ("eos_token_id", [2, 600], r"eos_token_id must be a token id in \[0, 512\) \(the vocabulary\), got \[2, 600\]"),
])
def test_config_numbers_and_token_ids_are_checked(field, value, expected):
    with pytest.raises(ConfigError, match=expected) as e:
        DecoderConfig(**{field: value})
    one_line(e)


def test_media_token_ids_lie_in_the_vocabulary():
    cfg = pm.PRESETS["paligemma-tiny"]()
    with pytest.raises(ConfigError, match=r"image_token_id \(9999\) must be a token id below text.vocab_size"):
        cfg.replace(image_token_id=9999)
    with pytest.raises(ConfigError, match=r"media token ids \[700\] are outside the vocabulary \[0, 512\)"):
        gemini = pm.PRESETS["gemini-tiny"]()
        gemini.replace(tokens=gemini.tokens.replace(placeholder=700))


def test_nan_in_a_saved_config_json_is_refused_on_load(tmp_path, model):
    pm.save_pretrained(model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "rope_theta": NAN}))  # JSON writes NaN
    with pytest.raises(ConfigError, match="config.json: DecoderConfig.rope_theta must be a finite number, got nan"):
        pm.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("content, expected", [
    ("[1, 2]", "config.json: expected a JSON object of settings, got list"),
    ("null", "config.json: expected a JSON object of settings, got NoneType"),
    ('{"config_class": "KosmosConfig", "text": {}}', r"KosmosConfig needs the section\(s\) \['vision', 'perceiver'\]"),
    ('{"config_class": "PaliGemmaConfig", "vision": null, "text": {}}', "PaliGemmaConfig.vision must be VisionConfig"),
    ('{"config_class": "DecoderConfig", "dim": "64"}', r"DecoderConfig.dim must be int, got '64' \(str\)"),
    ("{not json", "config.json: expected a JSON model config, got malformed JSON"),
])
def test_malformed_polymodal_configs(tmp_path, content, expected):
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(ConfigError, match=expected) as e:
        load_config(tmp_path / "config.json")
    one_line(e)


@pytest.mark.parametrize("change, expected", [
    ({"hidden_size": "64"}, r"DecoderConfig.dim must be an integer, got '64' \(str\)"),
    ({"num_attention_heads": "4"}, r"DecoderConfig.n_heads must be an integer, got '4' \(str\)"),
    ({"rms_norm_eps": NAN}, "DecoderConfig.norm_eps must be a finite number, got nan"),
    ({"eos_token_id": 4000}, r"eos_token_id must be a token id in \[0, 64\)"),
    ({"hidden_size": None}, r"DecoderConfig.dim must be an integer, got None \(NoneType\)"),
])
def test_hf_configs_with_strings_nan_or_null_are_one_line_naming_the_file(tmp_path, change, expected):
    hf = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 1, "num_attention_heads": 4, **change}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConfigError, match=f"{tmp_path / 'config.json'}.*{expected}") as e:
        pm.from_pretrained(tmp_path)
    one_line(e)
    del hf["num_hidden_layers"]
    (tmp_path / "config.json").write_text(json.dumps({**hf, **{k: v for k, v in change.items() if k != "hidden_size"}}))
    with pytest.raises(ConfigError, match="has no 'num_hidden_layers', which a llama config needs"):
        pm.from_pretrained(tmp_path)


def test_absurd_sizes_are_refused_with_the_estimate_before_allocating():
    for cfg in (DecoderConfig(dim=10**9, n_heads=8, hidden_dim=128), DecoderConfig(n_layers=10**6),
                pm.PRESETS["gemini-tiny"]().replace(text=DecoderConfig(vocab_size=10**12))):
        start = time.perf_counter()
        with pytest.raises(ConfigError, match=r"would have at least \S+ parameters \(\S+ GiB at 4 bytes each\), more "
                                              r"than this machine's \S+ GiB of memory; refusing before allocating"):
            pm.build(cfg)
        assert time.perf_counter() - start < 1.0  # nothing was allocated


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_corrupt_weights_name_the_file_everywhere(tmp_path, model, capsys, damage):
    pm.save_pretrained(model, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"\x07" * 64}[damage])
    with pytest.raises(pm.CheckpointError, match=f"{weights} is not a readable safetensors file") as e:
        pm.from_pretrained(tmp_path / "m")
    one_line(e)
    for argv in (["generate", str(tmp_path / "m"), "--prompt", "hi"],
                 ["convert", str(tmp_path / "m"), str(tmp_path / "out"), "--to", "hf", "--model-type", "llama"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert f"{weights} is not a readable safetensors file" in err and err.count("\n") == 1


def test_corrupt_tokenizer_files_name_the_file(tmp_path):
    for name, expected in (("tokenizer.json", "is not a readable tokenizer.json"),
                           ("tokenizer.model", "is not a readable SentencePiece model")):
        (tmp_path / name).write_bytes(b"\x00garbage{")
        with pytest.raises(pm.CheckpointError, match=f"{tmp_path / name} {expected}") as e:
            Tokenizer.from_file(tmp_path / name)
        one_line(e)


def sharded(tmp_path, model, weight_map):
    d = tmp_path / "sharded"
    pm.save_pretrained(model, d)
    (d / "model.safetensors").rename(d / "shard-1.safetensors")
    (d / "model.safetensors.index.json").write_text(weight_map if isinstance(weight_map, str) else
                                                   json.dumps({"weight_map": weight_map}))
    return d


def test_shard_indexes_are_checked(tmp_path, model):
    names = list(model.state_dict())
    ids = torch.randint(0, 50, (1, 4))
    good = sharded(tmp_path, model, {n: "shard-1.safetensors" for n in names})
    assert torch.equal(pm.from_pretrained(good)(ids).logits, model(ids).logits)
    outside = tmp_path / "outside.safetensors"
    save_state_dict(model.state_dict(), outside)
    cases = [("{oops", "model.safetensors.index.json is not valid JSON"),
             ('{"weights": {}}', "must hold a non-empty 'weight_map' of tensor name -> shard file name"),
             ({names[0]: "../outside.safetensors"}, "lists shard '../outside.safetensors', which lies outside"),
             ({names[0]: str(outside)}, "which lies outside"),
             ({names[0]: "shard-2.safetensors"}, "lists shard shard-2.safetensors, which is missing")]
    for index, expected in cases:
        with pytest.raises(pm.CheckpointError, match=expected) as e:
            pm.from_pretrained(sharded(tmp_path, model, index))
        one_line(e)


def test_generate_arguments(model):
    ids = torch.tensor([[1, 2, 3]])
    cases = [
        (dict(input_ids=ids.float()), r"input_ids must be a tensor of integer token ids \(torch.long or int32\), "
                                      "got torch.float32"),
        (dict(input_ids=ids.to(torch.uint8)), "got torch.uint8"),
        (dict(input_ids=[[1, 2]]), "got list"),
        (dict(input_ids=torch.tensor([[1, 50]])), r"input_ids must be token ids in \[0, 50\) \(the vocabulary\); "
                                                  r"got \[50\]"),
        (dict(max_new_tokens=2.5), "max_new_tokens must be an integer >= 1, got 2.5"),
        (dict(max_new_tokens=True), "max_new_tokens must be an integer >= 1, got True"),
        (dict(do_sample=True, temperature=NAN), "temperature must be a finite number > 0, got nan"),
        (dict(temperature=-1.0), "temperature must be a finite number >= 0, got -1.0"),
        (dict(repetition_penalty=INF), "repetition_penalty must be a finite number > 0, got inf"),
        (dict(top_k=0), "top_k must be an integer >= 1, got 0"),
        (dict(top_p=NAN), "top_p must be a finite number > 0 and <= 1, got nan"),
        (dict(eos_token_id=50), r"eos_token_id must be an integer >= 0 and < 50, got 50"),
        (dict(eos_token_id=[2, -3]), "eos_token_id must be an integer >= 0 and < 50, got -3"),
        (dict(pad_token_id=1.5), "pad_token_id must be an integer >= 0 and < 50, got 1.5"),
        (dict(seed=NAN), "seed must be an integer >= 0 and < 18446744073709551616, got nan"),
    ]
    for kwargs, expected in cases:
        with pytest.raises(pm.InputError, match=expected) as e:
            pm.generate(model, **{"input_ids": ids, "max_new_tokens": 3, **kwargs})
        one_line(e)
    assert pm.generate(model, ids.int(), max_new_tokens=3).dtype == torch.long  # int32 ids are fine


def test_labels_outside_the_vocabulary(model):
    ids = torch.tensor([[1, 2, 3, 4]])
    for labels, given in ((torch.tensor([[1, 2, 50, 4]]), r"\[50\]"), (torch.tensor([[1, -5, 3, -100]]), r"\[-5\]"),
                          (ids.float(), "torch.float32")):
        with pytest.raises(pm.InputError, match=rf"labels must be integer token ids in \[0, 50\) or -100 \(ignored\), "
                                                rf"got {given}"):
            model(ids, labels=labels)
    assert torch.isfinite(model(ids, labels=torch.tensor([[1, -100, 3, 4]])).loss)


def test_control_token_text_in_data_is_encoded_as_text():
    tok = Tokenizer.train(["red blue green <eos> <image>"], 300)
    config = fit_to_tokenizer(pm.PRESETS["llama-tiny"](), tok)
    enc = make_collator(config, tok).encode(Document([Segment("text", "what?"), Segment("text", "red<eos> blue<image>",
                                                                                    target=True)]))
    ids = enc.tokens["input_ids"]
    assert ids.count(tok.eos_id) == 1 and ids[-1] == tok.eos_id  # only the document's own end
    assert tok.token_id("<image>") not in ids
    answer = [i for i, label in zip(ids, enc.tokens["labels"]) if label != -100][:-1]
    assert tok.decode(answer) == "red<eos> blue<image>"
    assert tok.encode("a<eos>") [-1] == tok.eos_id  # plain encode still reads control tokens


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header says width x height, with one pixel of data: decoding it would fail."""
    import io

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytearray(data[12:29])  # type + 13 bytes of IHDR
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def test_huge_images_are_refused_from_their_header(tmp_path):
    (tmp_path / "huge.png").write_bytes(png_claiming(12000, 12000))
    (tmp_path / "d.jsonl").write_text(json.dumps({"segments": [{"image": "huge.png"}, {"text": "hi"}]}) + "\n")
    with pytest.raises(DocumentError, match=f"line 1, segments\\[0\\].image: expected an image of at most "
                                            f"{MAX_IMAGE_PIXELS:,} pixels, got .*huge.png' of 12000x12000") as e:
        read_jsonl(tmp_path / "d.jsonl")
    one_line(e)


def test_strict_paths_refuse_media_outside_the_jsonl_folder(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    Image.new("RGB", (8, 8)).save(data / "inside.png")
    (data / "link.png").symlink_to(tmp_path / "outside.png")
    for path in ("../outside.png", str(tmp_path / "outside.png"), "link.png"):
        (data / "d.jsonl").write_text(json.dumps({"segments": [{"image": path}, {"text": "hi"}]}) + "\n")
        assert len(read_jsonl(data / "d.jsonl")) == 1  # allowed by default (documented)
        with pytest.raises(DocumentError, match=f"line 1, segments\\[0\\].image: expected a path inside the JSONL's "
                                                f"folder .*\\(strict paths\\), got '{path}'") as e:
            read_jsonl(data / "d.jsonl", strict_paths=True)
        one_line(e)
    (data / "d.jsonl").write_text(json.dumps({"segments": [{"video": ["inside.png", "../outside.png"]}]}) + "\n")
    with pytest.raises(DocumentError, match=r"segments\[0\].video\[1\]: expected a path inside"):
        read_jsonl(data / "d.jsonl", strict_paths=True)
    (data / "d.jsonl").write_text(json.dumps({"segments": [{"image": "inside.png"}, {"text": "hi"}]}) + "\n")
    assert len(read_jsonl(data / "d.jsonl", strict_paths=True)) == 1


def test_audio_longer_than_the_encoder_window_is_refused():
    tok = Tokenizer.train(["a beep"], 300)
    config = fit_to_tokenizer(pm.PRESETS["gemini-tiny"](), tok)  # a 1 s audio window
    collator = make_collator(config, tok)
    clip = lambda seconds: Audio(np.zeros(int(16000 * seconds), dtype=np.float32), 16000)
    assert collator.encode(Document([Segment("audio", media=clip(1.0)), Segment("text", "a beep", target=True)]))
    with pytest.raises(ValueError, match=r"has an audio clip of 1.5 s \(at 16000 Hz\); the audio encoder hears at most 1 s: cut it"):
        collator.encode(Document([Segment("audio", media=clip(1.5)), Segment("text", "a beep", target=True)]))
