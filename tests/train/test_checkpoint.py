"""Training checkpoints: a lossless round trip with no pickle, atomic writes, pruning, RNG restore."""

import json
import random

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

import polymodal as pm
from polymodal.errors import CheckpointError
from polymodal.train import checkpoint as ckpt


def trained_llama():
    model = pm.build("llama-tiny")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 512, (2, 8))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    return model, optimizer


def named_state(model, optimizer):
    """The optimizer state keyed by parameter names, as the trainer saves it."""
    return get_optimizer_state_dict(model, optimizer)


def test_round_trip_is_exact_and_pickle_free(tmp_path):
    model, optimizer = trained_llama()
    directory = ckpt.step_dir(tmp_path, 7)
    ckpt.save_checkpoint(directory, model.config, model.state_dict(), named_state(model, optimizer), {"step": 7})
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors",
                                                          "optimizer.safetensors", "trainer.json"]
    for f in directory.iterdir():  # safetensors start with a little-endian header length, JSON with "{"
        assert not f.read_bytes().startswith(b"\x80"), f"{f.name} looks like a pickle"
    model_state, optimizer_state, trainer_state = ckpt.load_checkpoint(directory)
    assert trainer_state == {"step": 7}
    for k, v in model.state_dict().items():
        assert torch.equal(model_state[k], v)
    fresh_model = pm.build("llama-tiny")
    fresh = torch.optim.AdamW(fresh_model.parameters(), lr=1e-3)
    set_optimizer_state_dict(fresh_model, fresh, optimizer_state)
    assert fresh.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    for i, expected in optimizer.state_dict()["state"].items():
        got = fresh.state_dict()["state"][i]
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    # the model half is a normal model directory
    loaded = pm.from_pretrained(directory)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


class Exploding:
    def save(self, directory):
        (directory / "tokenizer.json").write_text("{")
        raise OSError("disk full")


def test_an_interrupted_save_leaves_the_last_checkpoint_whole(tmp_path):
    model, optimizer = trained_llama()
    good = ckpt.step_dir(tmp_path, 1)
    ckpt.save_checkpoint(good, model.config, model.state_dict(), named_state(model, optimizer), {"step": 1})
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(ckpt.step_dir(tmp_path, 2), model.config, model.state_dict(),
                             named_state(model, optimizer), {"step": 2}, tokenizer=Exploding())
    with pytest.raises(OSError, match="disk full"):  # over an existing one: the old one stays
        ckpt.save_checkpoint(good, model.config, model.state_dict(), named_state(model, optimizer), {"step": 1},
                             tokenizer=Exploding())
    assert ckpt.list_checkpoints(tmp_path) == [good]
    assert ckpt.load_checkpoint(good)[2] == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == [good.name]


def test_prune_keeps_the_newest_and_removes_leftovers(tmp_path):
    for step in (5, 10, 15, 20):
        ckpt.step_dir(tmp_path, step).mkdir()
    (tmp_path / ".step-000025.tmp-abc").mkdir()  # what a kill -9 during a save leaves
    (tmp_path / "notes").mkdir()
    assert ckpt.latest_checkpoint(tmp_path) == ckpt.step_dir(tmp_path, 20)
    ckpt.prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "step-000015", "step-000020"]


def test_rng_state_round_trips_through_json():
    state = json.loads(json.dumps(ckpt.rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(7)  # move every generator on
    ckpt.set_rng_state(state)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_missing_files_are_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="has no model.safetensors: not a complete training checkpoint"):
        ckpt.load_checkpoint(tmp_path)


@pytest.fixture
def one_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _cut_the_last_bytes(path):  # the header intact, the last tensor's data short
    path.write_bytes(path.read_bytes()[:-4])


def _overwrite_header(path):
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, says", [(_truncate, "is not a readable safetensors file"),
                                          (_cut_the_last_bytes, "is not a readable safetensors file"),
                                          (_overwrite_header, "is not a readable safetensors file"),
                                          (lambda path: path.unlink(), "holds no shard files")])
def test_load_latest_falls_back_past_a_damaged_sharded_checkpoint(tmp_path, one_process_group, damage, says):
    model, optimizer = trained_llama()
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        ckpt.save_sharded(ckpt.step_dir(root, step), model.config, model, optimizer, {"step": step}, None, main=True)
    shard = next((ckpt.step_dir(root, 4) / "sharded").glob("*.safetensors"))
    damage(shard)
    said = []
    found, (model_state, optimizer_meta, trainer_state) = ckpt.load_latest(root, said.append)
    assert found == ckpt.step_dir(root, 2) and trainer_state == {"step": 2} and model_state is None
    assert len(said) == 1 and "cannot resume from step-000004" in said[0] and says in said[0]
    assert str(shard if shard.exists() else shard.parent) in said[0]
    fresh = pm.build("llama-tiny")  # the intact one resumes exactly
    ckpt.load_sharded(found, fresh, torch.optim.AdamW(fresh.parameters(), lr=1e-3), optimizer_meta)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
