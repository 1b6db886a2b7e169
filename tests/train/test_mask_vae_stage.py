"""The mask VQ-VAE stage of training on the world's segment task: fitted once to the training masks before the
decoder trains, saved in the checkpoint, skipped on resume (the checkpoint's VAE restored), and the one that codes
the targets' segmentation tokens; a family that writes no location tokens is refused before any work."""

import base64
import io
import re

import numpy as np
from PIL import Image

import pytest
import torch

import polymodal as pm
from polymodal.config import ConfigError
from polymodal.data.locations import SEG_TOKENS, encode_mask, format_object, parse_locations
from polymodal.data.synthetic import WORLD
from polymodal.data.tokenizer import Tokenizer
from polymodal.encoders.mask_vae import MaskVAE
from polymodal.families.collators import make_collator
from polymodal.serve.app import Server
from polymodal.train.locations import share_mask_vae
from polymodal.train.trainer import TrainConfig, train

SETTINGS = dict(model="paligemma-tiny", tasks=("segment",), vq_steps=15, eval_docs=4, batch_size=4, warmup_steps=1,
                eval_every=100, log_every=100, checkpoint_every=100)


def vae_of(model) -> MaskVAE:
    [vae] = [m for m in model.modules() if isinstance(m, MaskVAE)]
    return vae


def test_the_mask_vae_is_fitted_once_saved_and_restored_on_resume(tmp_path, capsys):
    run = train(TrainConfig(**SETTINGS, max_steps=2, out_dir=str(tmp_path), name="seg"))
    out = capsys.readouterr().out
    assert re.search(r"mask VQ-VAE fitted to \d+ training masks in 15 steps", out), out
    first = pm.from_pretrained(run / "checkpoints" / "step-000002")
    fresh = MaskVAE(vae_of(first).config)
    assert not torch.equal(vae_of(first).codebook, fresh.codebook)  # fitted, not as built

    train(TrainConfig(**SETTINGS, max_steps=3, out_dir=str(tmp_path), name="seg", resume=True))
    out = capsys.readouterr().out
    assert "resumed from" in out and "mask VQ-VAE" not in out, out
    second = pm.from_pretrained(run / "checkpoints" / "step-000003")
    a, b = vae_of(first).state_dict(), vae_of(second).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # frozen while the decoder trained

    # the targets' segmentation tokens are the checkpoint's VAE's codes of the rendered masks
    tokenizer = Tokenizer.from_file(run / "checkpoints" / "step-000003")
    collator = make_collator(second.config, tokenizer)
    share_mask_vae(second, collator)
    doc = WORLD.sample("segment", 0).document
    ids = collator.encode(doc).tokens["input_ids"]
    seg_ids = {tokenizer.token_id(t): i for i, t in enumerate(SEG_TOKENS)}
    written = [seg_ids[i] for i in ids if i in seg_ids]
    objects = doc.segments[-1]
    expected = [c for (_, box), mask in zip(objects.boxes, objects.masks)
                for c in encode_mask(torch.from_numpy(np.asarray(mask) > 127), box, vae_of(second))]
    assert written == expected and len(written) == 16 * len(objects.boxes)

    # a server of the run decodes an answer's segmentation tokens with the run's own VAE (no --mask-vae given)
    server = Server(run / "checkpoints" / "step-000003")
    assert all(torch.equal(server.mask_vae.state_dict()[k], v) for k, v in vae_of(second).state_dict().items())
    size = doc.images[0].size[::-1]  # (height, width)
    places = server.locator(doc)(format_object(objects.boxes[0][1], size, "shape", expected[:16]))
    truth = parse_locations(format_object(objects.boxes[0][1], size, "shape", expected[:16]), size, vae_of(second))
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(places[0]["mask"].split(",")[1])))) == 255
    assert np.array_equal(decoded, truth.objects[0].mask.numpy())


def test_a_family_without_location_tokens_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match="task detect answers with location tokens; a GeminiConfig model writes none"):
        train(TrainConfig(**{**SETTINGS, "model": "gemini-tiny", "tasks": ("detect",)}, max_steps=1,
                          out_dir=str(tmp_path), name="g"))
    assert not (tmp_path / "g").exists()


def test_a_given_mask_vae_joins_a_model_without_copies_and_is_refused_where_it_cannot_serve():
    from polymodal.presets import get_preset
    from polymodal.convert.mask_vae_file import with_mask_vae
    from polymodal.train.locations import WORLD_MASK_VAE

    model, vae = pm.build("paligemma-tiny"), MaskVAE(WORLD_MASK_VAE)
    joined = with_mask_vae(model, vae)
    assert joined.config == model.config.replace(mask_vae=WORLD_MASK_VAE)
    state = joined.state_dict()
    assert all(state[k].data_ptr() == v.data_ptr() for k, v in model.state_dict().items())  # the same tensors
    assert all(torch.equal(state[f"mask_vae.{k}"], v) for k, v in vae.state_dict().items())
    assert not any(p.requires_grad for p in vae_of(joined).parameters())
    with pytest.raises(ConfigError, match="holds a mask VQ-VAE of its own"):
        with_mask_vae(joined, vae)
    with pytest.raises(ConfigError, match="a GeminiConfig model writes none"):
        with_mask_vae(pm.build(get_preset("gemini-tiny")), vae)