"""Hypothesis throws random JSONL documents, configs and generate arguments at the library: every outcome is a
result or a polymodal error with a one-line message; never another exception type, never NaN output.
Run with `--hypothesis-show-statistics` to see how many inputs ended in each outcome."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

import polymodal as pm
from polymodal.config import DecoderConfig
from polymodal.families.collators import fit_to_tokenizer, make_collator
from polymodal.data.documents import read_jsonl, wav_bytes, Audio
from polymodal.data.tokenizer import Tokenizer
from polymodal.errors import PolymodalError

FUZZ = settings(max_examples=100, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])
SPECIALS = list(Tokenizer.SPECIAL_TOKENS)


def outcome(run) -> object:
    """run()'s result, or None after a polymodal error with a one-line message; any other exception fails."""
    try:
        result = run()
    except PolymodalError as e:
        message = str(e)
        assert message and "\n" not in message, repr(message)
        event(f"refused: {type(e).__name__}")
        return None
    event("result")
    return result


# -- JSONL documents ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    Image.new("RGB", (16, 16), "red").save(d / "ok.png")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (d / "text.png").write_text("not an image")
    (d / "folder").mkdir()
    (d / "ok.wav").write_bytes(wav_bytes(Audio(np.zeros(8000, dtype=np.float32), 16000)))
    (d / "long.wav").write_bytes(wav_bytes(Audio(np.zeros(40000, dtype=np.float32), 16000)))
    (d / "slow.wav").write_bytes(wav_bytes(Audio(np.zeros(800, dtype=np.float32), 8000)))
    Image.new("RGB", (8, 8)).save(d.parent / "outside.png")
    return d


PATHS = st.sampled_from(["ok.png", "broken.png", "text.png", "folder", "missing.png", "../outside.png", "/etc/passwd",
                         "ok.wav", "long.wav", "slow.wav", "", "ok.png\x00"])
TEXT = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(SPECIALS)), max_size=4).map("".join)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=6)
SEGMENT = st.one_of(
    st.fixed_dictionaries({"text": TEXT}, optional={"target": st.one_of(st.booleans(), JSON)}),
    st.fixed_dictionaries({"image": st.one_of(PATHS, JSON)}, optional={"target": st.booleans()}),
    st.fixed_dictionaries({"audio": st.one_of(PATHS, JSON)}, optional={"target": st.booleans()}),
    st.fixed_dictionaries({"video": st.one_of(st.lists(PATHS, max_size=3), JSON)}),
    st.dictionaries(st.sampled_from(["text", "image", "audio", "video", "target", "extra"]), JSON, max_size=3),
    JSON)
VALID_SEGMENT = st.one_of(st.fixed_dictionaries({"text": TEXT, "target": st.booleans()}),
                          st.sampled_from([{"image": "ok.png"}, {"audio": "ok.wav"}, {"video": ["ok.png", "ok.png"]}]))
DOCUMENT = st.one_of(st.fixed_dictionaries({"segments": st.lists(VALID_SEGMENT, min_size=1, max_size=4)}),
                     st.fixed_dictionaries({"segments": st.lists(SEGMENT, max_size=4)},
                                           optional={"id": st.one_of(st.text(max_size=4), JSON)}), JSON)
LINE = st.one_of(DOCUMENT.map(json.dumps), st.binary(max_size=20).map(lambda b: b.decode("latin-1")))


@pytest.fixture(scope="module")
def collators():
    tok = Tokenizer.train(["what colour is the shape? red green blue"], 300)
    return [make_collator(fit_to_tokenizer(pm.PRESETS[name](), tok), tok, max_len=256)
            for name in ("llama-tiny", "paligemma-tiny", "gemini-tiny")]


@FUZZ
@given(lines=st.lists(LINE, min_size=1, max_size=3), strict=st.booleans())
def test_random_jsonl_documents(media_dir, collators, lines, strict):
    path = media_dir / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogateescape")
    docs = outcome(lambda: read_jsonl(path, strict_paths=strict))
    for doc in docs or []:
        for collator in collators:
            enc = outcome(lambda: collator.encode(doc))
            if enc is not None:
                config = getattr(collator.format, "config", None)  # a model's vocabulary may go past its tokenizer's
                V = config.text.vocab_size if config is not None else collator.format.tokenizer.vocab_size
                ids = enc.tokens["input_ids"]
                assert all(0 <= i for i in ids) and (V is None or all(i < V for i in ids))
                for value in enc.media.values():
                    assert torch.isfinite(value).all()


# -- configs --------------------------------------------------------------------------------------------------

SMALL_INTS = st.one_of(st.integers(-3, 40), st.sampled_from([10**9, 10**12, 2**63]))
NUMBERS = st.one_of(SMALL_INTS, st.floats(-1e6, 1e6), st.floats(0, 2), st.sampled_from([math.nan, math.inf, -math.inf]))
VALUE = st.one_of(NUMBERS, st.booleans(), st.none(), st.text(max_size=6), st.lists(SMALL_INTS, max_size=3),
                  st.sampled_from(["swiglu", "gelu", "layernorm", "rmsnorm", "sub", "rope", "alibi", "xpos", "none",
                                   "magneto"]),
                  st.fixed_dictionaries({"rope_type": st.sampled_from(["linear", "llama3", "yarn"]),
                                         "factor": NUMBERS}))
FIELDS = [f for f in DecoderConfig.__dataclass_fields__] + ["unknown_option"]


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(FIELDS), st.one_of(VALUE, NUMBERS), max_size=2))
def test_random_configs(changes):
    base = dict(vocab_size=40, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_seq_len=16)
    model = outcome(lambda: pm.build(DecoderConfig.from_dict({**base, **changes})))
    if model is not None:
        ids = torch.randint(0, model.config.vocab_size, (1, min(5, model.config.max_seq_len)))
        with torch.no_grad():
            assert torch.isfinite(model.eval()(ids).logits).all(), changes


# -- generate arguments -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = pm.build(DecoderConfig(vocab_size=40, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_seq_len=32)).eval()
    pm.generate(model, torch.zeros(1, 1, dtype=torch.long), max_new_tokens=4, do_sample=True, seed=0)  # first-call set-up, off the clock
    return model


ARGS = st.fixed_dictionaries({}, optional={
    "max_new_tokens": st.one_of(st.integers(-2, 6), NUMBERS, st.booleans(), st.none()),
    "do_sample": st.booleans(),
    "temperature": NUMBERS, "top_k": st.one_of(SMALL_INTS, NUMBERS, st.none()), "top_p": st.one_of(NUMBERS, st.none()),
    "repetition_penalty": NUMBERS, "seed": st.one_of(st.integers(-5, 2**40), NUMBERS, st.none()),
    "eos_token_id": st.one_of(st.integers(-3, 45), st.lists(st.integers(-3, 45), max_size=3), NUMBERS, st.none()),
    "pad_token_id": st.one_of(st.integers(-3, 45), NUMBERS, st.none()),
})
IDS = st.tuples(st.lists(st.lists(st.integers(-2, 42), min_size=1, max_size=5), min_size=1, max_size=2),
                st.sampled_from([torch.long, torch.int32, torch.uint8, torch.float32, torch.bool]))


@settings(FUZZ, max_examples=80)
@given(ids=IDS, kwargs=ARGS)
def test_random_generate_arguments(model, ids, kwargs):
    rows, dtype = ids
    width = max(map(len, rows))
    input_ids = torch.tensor([r + [0] * (width - len(r)) for r in rows]).to(dtype)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    tokens = outcome(lambda: pm.generate(model, input_ids, mask, **{"max_new_tokens": 4, **kwargs}))
    if tokens is not None:
        assert tokens.dtype == torch.long and ((tokens >= 0) & (tokens < 40)).all()
