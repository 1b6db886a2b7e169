"""Compiled decoding (`generate(compile=True)`) == eager decoding, token for token, compiled once."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import polymodal as pm
from polymodal.config import DecoderConfig
from polymodal.nn.transformer import Decoder
from polymodal.presets import get_preset


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return Decoder(DecoderConfig(vocab_size=97, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64,
                                 max_seq_len=64)).eval()


def ragged(vocab: int = 97) -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of 7, 4 and 2 tokens: a full row, a left-padded row and a right-padded row."""
    ids = torch.randint(0, vocab, (3, 7), generator=torch.Generator().manual_seed(1))
    am = torch.ones_like(ids)
    am[1, :3] = 0
    am[2, 2:] = 0
    return ids, am


def test_greedy_matches_eager_and_compiles_once(llama):
    ids, am = ragged()
    stop = int(pm.generate(llama, ids, am, max_new_tokens=10)[0, 2])  # row 0 stops, then writes pads
    kw = dict(max_new_tokens=10, eos_token_id=stop, pad_token_id=0)
    eager = pm.generate(llama, ids, am, **kw)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = pm.generate(llama, ids, am, **kw, compile=True)
        graphs = counters["stats"]["unique_graphs"]
        again = pm.generate(llama, ids, am, **kw, compile=True)  # same shapes: the kept cache, emptied
    assert counters["stats"]["unique_graphs"] == graphs
    assert torch.equal(compiled, eager) and torch.equal(again, eager)


def test_seeded_sampling_matches_eager(llama):
    ids, am = ragged()
    kw = dict(max_new_tokens=8, do_sample=True, temperature=0.8, top_k=40, top_p=0.9, seed=5)
    stops = pm.generate(llama, ids, am, **kw)[:, 4].tolist()  # every row stops: steps past that are dropped
    eager = pm.generate(llama, ids, am, **kw, eos_token_id=stops)
    assert eager.shape[1] <= 5
    assert torch.equal(pm.generate(llama, ids, am, **kw, eos_token_id=stops, compile=True), eager)


def test_paligemma_greedy_matches_eager():
    torch.manual_seed(0)
    cfg = get_preset("paligemma-tiny")
    cfg = cfg.replace(text=cfg.text.replace(n_layers=1))  # compile time grows with the layers
    model = pm.build(cfg).eval()
    n_img = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
    text, am = ragged(cfg.image_token_id)
    ids = torch.cat([torch.full((3, n_img), cfg.image_token_id), text], dim=1)
    am = torch.cat([torch.ones(3, n_img, dtype=am.dtype), am], dim=1)
    px = torch.randn(3, 3, cfg.vision.image_size, cfg.vision.image_size)
    eager = pm.generate(model, ids, am, pixel_values=px, max_new_tokens=8)
    assert torch.equal(pm.generate(model, ids, am, pixel_values=px, max_new_tokens=8, compile=True), eager)


def test_host_and_device_fill_agree(llama):
    cache = llama.make_cache(1, 4)
    llama(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    assert cache.length == int(cache.fill) == 3
    with pytest.raises(ValueError, match="KV cache holds 4 tokens; it has 3 and was given 2 more"):
        cache.reserve(2)
    cache.reserve(1)  # as the engine does before a compiled loop: the step's write then skips the host
    llama(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    assert cache.length == int(cache.fill) == 4


def test_image_writing_model_compiles_as_one_graph_and_matches_eager():
    """Chameleon with rows in different modes (one asked to draw, one in text, one inside an image):
    the span constraints run inside the one compiled graph, and sampled tokens equal eager's."""
    torch.manual_seed(0)
    cfg = get_preset("chameleon-tiny")
    cfg = cfg.replace(text=cfg.text.replace(n_layers=1), vq=cfg.vq.replace(channel_multiplier=[1, 2, 2, 2]))  # 4x4 codes
    model = pm.build(cfg).eval()
    codes = (torch.arange(5) + cfg.image_tokens).tolist()
    prompts = [[1, 20, 21, cfg.begin_image_id], [1, 30, 31, 32], [1, cfg.begin_image_id, *codes]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    am = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kw = dict(max_new_tokens=cfg.vq.tokens_per_image + 4, do_sample=True, seed=0)
    eager = pm.generate(model, ids, am, **kw)
    assert cfg.end_image_id in eager[0].tolist() and cfg.end_image_id in eager[2].tolist()
    assert torch.equal(pm.generate(model, ids, am, **kw, compile=True), eager)  # compile is fullgraph
