import json
import os

import pytest
import torch

import polymodal as pm
from polymodal.config import DecoderConfig
from polymodal.convert.hf import save_hf
from polymodal.errors import MissingFileError
from polymodal.serialization import atomic_directory


def tiny(**kw):
    return pm.build(DecoderConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_seq_len=16, **kw))


def test_save_load_round_trip_identical_logits(tmp_path):
    model = tiny(tie_embeddings=True).eval()
    pm.save_pretrained(model, tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]
    loaded = pm.from_pretrained(tmp_path / "m")
    ids = torch.randint(0, 50, (2, 7))
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_a_save_over_a_folder_of_the_other_layout_leaves_no_stale_weights(tmp_path):
    """One file over shards and shards over one file: the folder loads the newest save, and holds only its files
    (and the user's own, kept)."""
    first, second = tiny(), tiny()
    pm.save_pretrained(first, tmp_path / "m")
    (tmp_path / "m" / "notes.txt").write_text("mine")
    for model, shard_size in ((second, 4000), (first, "50GB")):
        pm.save_pretrained(model, tmp_path / "m", max_shard_size=shard_size)
        loaded = pm.from_pretrained(tmp_path / "m").state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
        weights = sorted(n for n in os.listdir(tmp_path / "m") if "safetensors" in n)
        assert (weights == ["model.safetensors"]) == (shard_size == "50GB"), weights
        assert (tmp_path / "m" / "notes.txt").read_text() == "mine"


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path):
    model = tiny()
    pm.save_pretrained(model, tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_directory(tmp_path / "m") as tmp:
            (tmp / "model.safetensors").write_bytes(b"partial")
            raise RuntimeError("disk full")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no temp dirs left behind


def test_pickle_weights_are_refused(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 8, "hidden_size": 8,
                                               "num_hidden_layers": 1, "num_attention_heads": 2,
                                               "intermediate_size": 8}))
    torch.save({"x": torch.zeros(1)}, d / "pytorch_model.bin")
    with pytest.raises(MissingFileError, match="has no weights: .*only pytorch_model.bin: pickles, which polymodal "
                                               "never loads"):
        pm.from_pretrained(d)


def test_two_loose_weight_files_are_refused_by_loader_and_cli_alike(tmp_path):
    """Which file holds the model is the loader's decision (`weight_files`), and the CLI asks it: one message."""
    from polymodal.cli import _with_weights

    model = tiny()
    pm.save_pretrained(model, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").rename(tmp_path / "m" / "a.safetensors")
    (tmp_path / "m" / "b.safetensors").write_bytes((tmp_path / "m" / "a.safetensors").read_bytes())
    with pytest.raises(MissingFileError) as loader:
        pm.from_pretrained(tmp_path / "m")
    with pytest.raises(MissingFileError) as cli:
        _with_weights(tmp_path / "m")
    assert str(loader.value) == str(cli.value)
    assert "a.safetensors, b.safetensors: several loose *.safetensors files" in str(cli.value)
    (tmp_path / "m" / "b.safetensors").unlink()  # one loose file is the model's, on both paths
    assert _with_weights(tmp_path / "m") == tmp_path / "m"
    torch.testing.assert_close(pm.from_pretrained(tmp_path / "m").state_dict(), model.state_dict())


def test_checkpoint_that_does_not_fit_the_config(tmp_path):
    pm.save_pretrained(tiny(), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["hidden_dim"] = 48
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"does not fit the model config; wrong shapes: \['layers.0.mlp.w_in.weight: "
                                         r"expected \(96, 32\), got \(128, 32\)"):
        pm.from_pretrained(tmp_path / "m")


def test_saving_never_replaces_what_is_not_a_checkpoint(tmp_path):
    """A file, or a folder of the user's, in the way of a save is refused and left as it was; an empty folder
    or an earlier checkpoint is replaced."""
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "data.csv").write_text("mine too")
    model = tiny()
    for target in ("notes.txt", "folder"):
        with pytest.raises(FileExistsError, match="is not a checkpoint directory .* refusing to replace it"):
            pm.save_pretrained(model, tmp_path / target)
        with pytest.raises(FileExistsError, match="is not a checkpoint directory"):
            save_hf(model, tmp_path / target, "llama")
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "folder" / "data.csv").read_text() == "mine too"
    assert sorted(os.listdir(tmp_path)) == ["folder", "notes.txt"]  # nothing hidden or half-written left behind
    (tmp_path / "empty").mkdir()
    pm.save_pretrained(model, tmp_path / "empty")
    pm.save_pretrained(model, tmp_path / "empty")  # now a checkpoint: replaced
    assert sorted(os.listdir(tmp_path / "empty")) == ["config.json", "model.safetensors"]


def test_export_to_another_family_is_a_clear_error_before_writing(tmp_path):
    with pytest.raises(ValueError, match="a DecoderConfig model cannot be written as model_type 'paligemma'"):
        save_hf(tiny(), tmp_path / "out", "paligemma")
    assert not (tmp_path / "out").exists()


def test_unsupported_hf_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert' is not supported; supported: .*'gemma'.*'llama'"):
        pm.from_pretrained(tmp_path)


def test_bad_inputs_are_clear_errors():
    model = tiny()
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 50\); got \[50, 77\]"):
        model(torch.tensor([[1, 50, 77]]))
    with pytest.raises(ValueError, match="sequence of 17 tokens exceeds max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, seq\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(KeyError, match="unknown preset 'gpt-5'"):
        pm.build("gpt-5")


def test_presets_build():
    model = pm.build("llama-tiny")
    assert model(torch.zeros(1, 3, dtype=torch.long)).logits.shape == (1, 3, 512)
