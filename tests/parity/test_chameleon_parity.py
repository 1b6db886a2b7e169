"""Chameleon vs HF transformers `ChameleonForConditionalGeneration` on tiny random configs (fp32):
VQ image codes, logits on a mixed text + image sequence (pre-norm and swin-norm), HF checkpoint dirs
through pm.from_pretrained and back, greedy generation token for token.

HF sets image-code logits to the dtype minimum (its checkpoints may not draw), so logits are
compared on the other columns; in generation our state machine masks those codes outside images."""

import pytest
import torch

import polymodal as pm
from polymodal.convert.hf import save_hf
from polymodal.families.chameleon.convert import code_name
from polymodal.families.chameleon.presets import chameleon_tiny

transformers = pytest.importorskip("transformers")

V, N_CODES, IMAGE, BOI, EOI = 96, 32, 60, 61, 62
TOL = 1e-4


def hf_model(swin: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    perm = torch.randperm(N_CODES).tolist()  # image tokens not in code order: exercises the vocabulary map
    vocab = {f"t{i}": i for i in range(60)} | {"<image>": IMAGE, "<racm3:break>": BOI, "<eoss>": EOI}
    vocab |= {code_name(c): 64 + perm[c] for c in range(N_CODES)}
    cfg = transformers.ChameleonConfig(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, swin_norm=swin,
        vocabulary_map=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        vq_config=dict(embed_dim=16, num_embeddings=N_CODES, latent_channels=16, resolution=32, base_channels=32,
                       channel_multiplier=[1, 2, 2], num_res_blocks=1, attn_resolutions=[16, 8]))
    model = transformers.ChameleonForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # move norms and biases off their identity init so a mis-mapped weight shows
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def loaded(directory, swin: bool = False):
    """The HF model, and ours read from the checkpoint dir it writes."""
    hf = hf_model(swin)
    hf.save_pretrained(directory)
    return hf, pm.from_pretrained(directory)


def mixed_batch(n_text: int = 5):
    """Two rows: text, `<racm3:break>`, 64 image placeholders, `<eoss>`, text."""
    g = torch.Generator().manual_seed(1)
    text = lambda: torch.randint(3, 60, (2, n_text), generator=g)  # noqa: E731
    ids = torch.cat([text(), torch.full((2, 1), BOI), torch.full((2, 64), IMAGE), torch.full((2, 1), EOI), text()], 1)
    pixels = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    return ids, pixels


def text_columns(hf) -> torch.Tensor:
    keep = torch.ones(hf.config.vocab_size, dtype=torch.bool)
    keep[hf.model.vocabulary_mapping.image_tokens] = False
    return keep


def test_vq_codes_match(tmp_path):
    hf, ours = loaded(tmp_path)
    _, pixels = mixed_batch()
    with torch.no_grad():
        theirs_latent = hf.model.vqmodel.quant_conv(hf.model.vqmodel.encoder(pixels))
        ours_latent = ours.vq.quant_conv(ours.vq.encoder(pixels))
        assert (ours_latent - theirs_latent).abs().max() <= TOL
        assert torch.equal(ours.image_token_ids(pixels), hf.model.get_image_tokens(pixels))


@pytest.mark.parametrize("swin", [False, True])
def test_logits_on_mixed_sequence(tmp_path, swin):
    hf, ours = loaded(tmp_path, swin)
    assert ours.config.text.norm_placement == ("swin" if swin else "pre")
    ids, pixels = mixed_batch()
    with torch.no_grad():
        theirs = hf(input_ids=ids, pixel_values=pixels).logits
        mine = ours(ids, pixel_values=pixels).logits
    keep = text_columns(hf)
    diff = (mine[..., keep] - theirs[..., keep]).abs().max().item()
    assert diff <= TOL, diff
    assert (theirs[..., ~keep] == torch.finfo(theirs.dtype).min).all()


def test_greedy_generation_equal(tmp_path):
    hf, ours = loaded(tmp_path)
    ids, pixels = mixed_batch()
    with torch.no_grad():
        theirs = hf.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=16, do_sample=False,
                             eos_token_id=2, pad_token_id=0)[:, ids.shape[1]:]
    mine = pm.generate(ours, ids, pixel_values=pixels, max_new_tokens=16, eos_token_id=2, pad_token_id=0)
    assert torch.equal(mine, theirs), (mine, theirs)


def test_hf_round_trip(tmp_path):
    hf, ours = loaded(tmp_path / "hf")
    assert not ours.config.vq.decoder  # HF checkpoints carry no VQ decoder
    save_hf(ours, tmp_path / "back", "chameleon")
    again = transformers.ChameleonForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    theirs = hf.state_dict()
    for k, v in again.state_dict().items():
        assert torch.equal(v, theirs[k]), k
    assert pm.from_pretrained(tmp_path / "back").config == ours.config


def test_polymodal_model_with_vq_decoder_round_trips_through_hf(tmp_path):
    cfg = chameleon_tiny()
    model = pm.build(cfg.replace(vq=cfg.vq.replace(norm_groups=32, base_channels=32))).eval()  # HF: 32 groups
    save_hf(model, tmp_path, "chameleon")
    back = pm.from_pretrained(tmp_path)
    assert back.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    hf = transformers.ChameleonForConditionalGeneration.from_pretrained(tmp_path).eval()  # skips the VQ decoder
    ids = torch.tensor([[1, 20, 21, 22, 6]])
    with torch.no_grad():
        keep = text_columns(hf)
        diff = (hf(input_ids=ids).logits[..., keep] - model(ids).logits[..., keep]).abs().max().item()
    assert diff <= TOL, diff
