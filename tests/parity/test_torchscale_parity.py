"""Magneto decoder vs torchscale 0.3.0's `Decoder(subln=True, xpos_rel_pos=True)` (the KOSMOS-1 reference):
the same weights give the same logits, full and cached step by step, the same greedy tokens, and
`init="magneto"` draws weights like torchscale does.

torchscale imports `timm.models.layers.drop_path` at module load, for its `DropPath`, which it builds
only when drop_path_rate > 0 (never here: it is 0). timm 0.6 imports torchvision, and PyPI's
torchvision does not load against the CPU build of torch that CI uses (`torchvision::nms does not
exist`), so CI installs torchscale and fairscale without timm. When timm cannot be imported, a
stand-in module provides `drop_path` for torchscale's import only (it raises if ever called, and is
taken out of sys.modules again right after); nothing else of timm is used. Everything compared runs
torchscale's real code.
"""

import importlib
import sys
import types

import pytest
import torch
from torch import nn

import polymodal as pm
from polymodal.convert.torchscale import config_from_torchscale, decoder_rules, load_torchscale_decoder
from polymodal.families.kosmos.presets import kosmos_1, kosmos_tiny
from polymodal.nn.transformer import Decoder

pytest.importorskip("fairscale", reason="torchscale needs fairscale (CI installs it)")
pytest.importorskip("torchscale", reason="torchscale is the KOSMOS-1 reference (CI installs it)")


def import_torchscale():
    try:
        importlib.import_module("timm.models.layers")
        stand_in = {}
    except ImportError:
        def drop_path(*args, **kwargs):
            raise RuntimeError("timm stand-in: torchscale built a DropPath (drop_path_rate > 0)")

        timm, models, layers = (types.ModuleType(n) for n in ("timm", "timm.models", "timm.models.layers"))
        timm.models, models.layers, layers.drop_path = models, layers, drop_path
        stand_in = {"timm": timm, "timm.models": models, "timm.models.layers": layers}
    saved = {k: sys.modules.get(k) for k in stand_in}
    sys.modules.update(stand_in)
    try:
        from torchscale.architecture.config import DecoderConfig
        from torchscale.architecture.decoder import Decoder as TSDecoder
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return DecoderConfig, TSDecoder


TSConfig, TSDecoder = import_torchscale()
VOCAB = 96
CASES = {
    # KOSMOS-1's choices: sqrt(dim) embedding scale, output head tied to the embeddings
    "kosmos": dict(no_scale_embedding=False, share_decoder_input_output_embed=True),
    # torchscale's defaults plus layernorm_embedding and a short xPos decay scale
    "defaults-embed-norm": dict(layernorm_embedding=True, xpos_scale_base=16),
    "pre-ln": dict(subln=False, no_scale_embedding=False),
}


def torchscale_decoder(**overrides):
    args = TSConfig(vocab_size=VOCAB, decoder_embed_dim=32, decoder_attention_heads=4, decoder_ffn_embed_dim=64,
                    decoder_layers=3, xpos_rel_pos=True, max_target_positions=64, **overrides)
    embed = nn.Embedding(VOCAB, 32)
    nn.init.normal_(embed.weight, std=32 ** -0.5)  # fairseq's Embedding, as KOSMOS's LM builds it
    ts = TSDecoder(args, embed_tokens=embed).eval()
    with torch.no_grad():  # random norms, so a wrong norm formula cannot hide behind ones/zeros
        for name, p in ts.named_parameters():
            if "norm" in name or "_ln" in name:
                p.add_(0.3 * torch.randn_like(p))
    return ts, args


@pytest.fixture(params=sorted(CASES))
def pair(request):
    ts, args = torchscale_decoder(**CASES[request.param])
    return ts, load_torchscale_decoder(ts.state_dict(), args).eval()


@torch.no_grad()
def test_logits_match(pair):
    ts, ours = pair
    ids = torch.randint(0, VOCAB, (2, 40))
    ref, got = ts(ids)[0], ours(ids).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


@torch.no_grad()
def test_cached_decoding_matches_incremental_state(pair):
    """Prefill a prompt, then one token at a time: our static cache vs torchscale's incremental_state
    (fairseq style: the whole prefix is passed and only its last token runs)."""
    ts, ours = pair
    ids = torch.randint(0, VOCAB, (2, 24))
    state = {"is_first_step": True}
    cache = ours.make_cache(2, 24)
    ref = ts(ids[:, :8], incremental_state=state)[0]
    got = ours(ids[:, :8], cache=cache).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    state["is_first_step"] = False
    for t in range(8, 24):
        ref = ts(ids[:, :t + 1], incremental_state=state)[0][:, -1]
        got = ours(ids[:, t:t + 1], cache=cache).logits[:, -1]
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


@torch.no_grad()
def test_greedy_generation_matches(pair):
    ts, ours = pair
    prompt = torch.randint(0, VOCAB, (2, 6))
    state, seq = {"is_first_step": True}, prompt
    for _ in range(16):
        logits = ts(seq, incremental_state=state)[0][:, -1]
        state["is_first_step"] = False
        seq = torch.cat((seq, logits.argmax(-1, keepdim=True)), dim=1)
    tokens = pm.generate(ours, prompt, max_new_tokens=16)
    assert torch.equal(tokens, seq[:, 6:])


def test_magneto_init_matches_torchscale():
    """Every weight of `init="magneto"` has the spread of its torchscale counterpart (q, k and v of the
    fused wqkv compared apart: only v takes the sqrt(log 2N) gain); 6 layers make the gain 1.58."""
    torch.manual_seed(0)
    args = TSConfig(vocab_size=512, decoder_embed_dim=128, decoder_attention_heads=4, decoder_ffn_embed_dim=512,
                    decoder_layers=6, xpos_rel_pos=True)
    embed = nn.Embedding(512, 128)
    nn.init.normal_(embed.weight, std=128 ** -0.5)
    theirs = TSDecoder(args, embed_tokens=embed).state_dict()
    cfg = config_from_torchscale(args)
    assert cfg.init == "magneto"
    ours = Decoder(cfg).state_dict()
    compared = 0
    for rule in decoder_rules(cfg):
        if not rule.ours.endswith("weight") or "norm" in rule.ours:
            continue
        pieces = rule.split(ours[rule.ours])
        for key, mine in pieces.items():
            ref = theirs[key]
            assert abs(mine.std() / ref.std() - 1) < 0.05, (key, float(mine.std()), float(ref.std()))
            compared += 1
    assert compared == 2 + 6 * 6  # embeddings, output head, and q, k, v, out, fc1, fc2 of each layer


def test_unsupported_torchscale_options_are_refused():
    args = TSConfig(vocab_size=VOCAB, decoder_layers=2, xpos_rel_pos=True, deepnorm=True)
    with pytest.raises(pm.ConfigError, match="deepnorm"):
        config_from_torchscale(args)


@pytest.mark.parametrize("preset", [kosmos_tiny, kosmos_1])
def test_kosmos_text_decoder_is_torchscales_magneto(preset):
    """The presets' decoder is exactly what torchscale builds for KOSMOS-1's options."""
    text = preset().text
    args = TSConfig(vocab_size=text.vocab_size, decoder_embed_dim=text.dim, decoder_attention_heads=text.n_heads,
                    decoder_ffn_embed_dim=text.hidden_dim, decoder_layers=text.n_layers,
                    max_target_positions=text.max_seq_len, subln=True, xpos_rel_pos=True, no_scale_embedding=False,
                    share_decoder_input_output_embed=True, dropout=text.dropout, attention_dropout=text.dropout)
    assert config_from_torchscale(args) == text.replace(pad_token_id=None, bos_token_id=None, eos_token_id=None)
