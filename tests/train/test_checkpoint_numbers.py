"""A training checkpoint whose weights or optimizer state hold a NaN (a damaged file) is passed over when a run
resumes, as a truncated one is: it resumed, and its first step stopped on a NaN loss with a hint to lower the
learning rate, never reaching the intact checkpoint before it."""

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

import polymodal as pm
from polymodal.train import checkpoint as ckpt
from polymodal.weights import write_file


@pytest.mark.parametrize("file", [ckpt.WEIGHTS, ckpt.OPTIMIZER])
def test_a_nan_in_the_newest_checkpoint_falls_back_to_the_one_before(tmp_path, file):
    model = pm.build("llama-tiny")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 512, (2, 8))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        ckpt.save_checkpoint(ckpt.step_dir(root, step), model.config, model.state_dict(),
                             get_optimizer_state_dict(model, optimizer), {"step": step})
    damaged = ckpt.step_dir(root, 4) / file
    tensors = {k: t.clone() for k, t in load_file(damaged).items()}  # not views of the file rewritten below
    name = sorted(k for k, t in tensors.items() if t.is_floating_point() and t.numel() > 1)[0]
    tensors[name].view(-1)[1] = float("nan")
    write_file(damaged, tensors)
    said = []
    found, (_, _, trainer_state) = ckpt.load_latest(root, said.append)
    assert found == ckpt.step_dir(root, 2) and trainer_state == {"step": 2}
    assert said == [f"cannot resume from step-000004: {damaged}: tensor {name} holds 1 non-finite values (NaN or "
                    f"inf) among {tensors[name].numel():,}: the file is corrupt or the weights diverged; falling back "
                    "to the checkpoint before it"]
