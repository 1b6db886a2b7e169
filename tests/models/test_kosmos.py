"""KOSMOS-1: images spliced anywhere in the text, the engine protocol, clear errors, the document
format, and a tiny model that learns to look at its images on the built-in world."""

import math
import time

import pytest
import torch
import torch.nn.functional as F

import polymodal as pm
from polymodal.families.collators import fit_to_tokenizer, make_collator
from polymodal.data.documents import Document, Segment
from polymodal.data.synthetic import World
from polymodal.data.tokenizer import Tokenizer
from polymodal.families.kosmos.config import KosmosConfig
from polymodal.families.kosmos.model import Kosmos
from polymodal.families.kosmos.presets import kosmos_tiny


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Kosmos(kosmos_tiny()).eval()


def document_ids(cfg: KosmosConfig, *pieces) -> torch.Tensor:
    """(1, S) ids from pieces: "image" for an image block, or a list of text ids."""
    ids = [cfg.text.bos_token_id]
    for p in pieces:
        ids += cfg.image_tokens() if p == "image" else p
    return torch.tensor([ids])


@torch.no_grad()
def test_images_anywhere_equal_embedding_by_hand(model):
    cfg, n = model.config, model.config.n_image_latents
    ids = document_ids(cfg, "image", [40, 41, 42], [50, 51], "image", [60, 61])
    px = torch.randn(2, 3, 32, 32)
    got = model(ids, px).logits
    embeds = model.decoder.tok_embeddings(ids)
    for k, start in enumerate((ids[0] == cfg.image_token_id).nonzero()[:, 0].tolist()):
        embeds[0, start + 1:start + 1 + n] = model.embed_images(px[k:k + 1])[0]
    want = model.decoder(inputs_embeds=embeds).logits  # images one at a time: fp32 sums in another order (~1e-6)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # causal: the second image changes nothing before it
    second = int((ids[0] == cfg.image_token_id).nonzero()[1, 0])
    other = model(ids, torch.cat((px[:1], torch.randn(1, 3, 32, 32)))).logits
    torch.testing.assert_close(other[:, :second + 1], got[:, :second + 1], atol=1e-5, rtol=0)
    assert (other[:, second + 1:] - got[:, second + 1:]).abs().max() > 1e-3


@torch.no_grad()
def test_batched_and_packed_documents_equal_alone(model):
    cfg = model.config
    a = document_ids(cfg, [40, 41], "image", [42], "image", [43, 44])
    b = document_ids(cfg, "image", [50, 51, 52])
    px_a, px_b = torch.randn(2, 3, 32, 32), torch.randn(1, 3, 32, 32)
    S = a.shape[1]
    ids = torch.zeros(2, S, dtype=torch.long)
    mask = torch.zeros(2, S, dtype=torch.long)
    ids[0], mask[0] = a[0], 1
    ids[1, :b.shape[1]], mask[1, :b.shape[1]] = b[0], 1
    out = model(ids, torch.cat((px_a, px_b)), attention_mask=mask).logits
    torch.testing.assert_close(out[:1], model(a, px_a).logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1:, :b.shape[1]], model(b, px_b).logits, atol=1e-5, rtol=0)
    packed = model(torch.cat((a, b), 1), torch.cat((px_a, px_b)),
                   document_ids=torch.tensor([[1] * S + [2] * b.shape[1]])).logits
    torch.testing.assert_close(packed[:, :S], model(a, px_a).logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[:, S:], model(b, px_b).logits, atol=1e-5, rtol=0)


def test_loss_on_text_only(model):
    cfg = model.config
    ids = document_ids(cfg, [40, 41], "image", [42, 43, 44], [cfg.text.eos_token_id])
    px = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = model(ids, px, labels=ids)
    placeholder = torch.zeros_like(ids, dtype=torch.bool)
    start = int((ids[0] == cfg.image_token_id).nonzero()[0, 0])
    placeholder[0, start + 1:start + 1 + cfg.n_image_latents] = True
    targets = ids.masked_fill(placeholder, -100)[:, 1:]
    want = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, want)


@torch.no_grad()
def test_generate_encodes_images_once_and_matches_uncached(model):
    cfg = model.config
    prompts = [document_ids(cfg, "image", [40, 41], "image", [42]), document_ids(cfg, [50], "image", [51, 52])]
    pixels = [torch.randn(2, 3, 32, 32), torch.randn(1, 3, 32, 32)]
    calls = []
    hook = model.vision.register_forward_hook(lambda *args: calls.append(1))
    try:
        S = max(p.shape[1] for p in prompts)
        ids = torch.zeros(2, S, dtype=torch.long)
        mask = torch.zeros(2, S, dtype=torch.long)
        for r, p in enumerate(prompts):  # right-padded; the engine left-aligns
            ids[r, :p.shape[1]], mask[r, :p.shape[1]] = p[0], 1
        batched = pm.generate(model, ids, mask, pixel_values=torch.cat(pixels), max_new_tokens=6)
        assert len(calls) == 1  # prefill only; decode steps take no images
    finally:
        hook.remove()
    for r, (p, px) in enumerate(zip(prompts, pixels)):
        seq = p
        for _ in range(6):  # greedy without a cache: the whole sequence each step
            seq = torch.cat((seq, model(seq, px).logits[:, -1:].argmax(-1)), dim=1)
        assert torch.equal(batched[r], seq[0, p.shape[1]:])


def test_errors_name_what_was_expected(model):
    cfg = model.config
    ids = document_ids(cfg, "image", [40], "image", [41])
    with pytest.raises(ValueError, match=r"hold 2 images .* holds 1 images"):
        model(ids, torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"hold 2 images .* \(none given\)"):
        model(ids)
    with pytest.raises(ValueError, match=r"pixel_values must be \(num_images, 3, 32, 32\)"):
        model(ids, torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="was it cut at the context limit"):
        model(ids[:, :-3], torch.randn(2, 3, 32, 32))
    bad = ids.clone()
    bad[0, 1 + cfg.n_image_latents + 1] = 40
    with pytest.raises(ValueError, match=rf"needs </image> \(id {cfg.image_end_token_id}\) at token 10"):
        model(bad, torch.randn(2, 3, 32, 32))
    cache = model.make_cache(1, ids.shape[1] + 2)
    with torch.no_grad():
        model(ids, torch.randn(2, 3, 32, 32), cache=cache)
    with pytest.raises(ValueError, match="prefill"):
        model(ids[:, :1], torch.randn(1, 3, 32, 32), cache=cache)


def test_images_past_the_context_limit_raise_before_compute():
    cfg = kosmos_tiny()
    cfg = cfg.replace(text=cfg.text.replace(max_seq_len=24))
    model = Kosmos(cfg)
    ids = document_ids(cfg, [40] * 6, "image", [41] * 12, "image", [42])  # images at tokens 7..16 and 29..38
    with pytest.raises(ValueError, match=r"^image 1 \(row 0, tokens 29\.\.38\) lies past the context limit of "
                                         r"max_seq_len=24 tokens \(the input has 40\)"):
        model(ids, torch.randn(2, 3, 32, 32))
    straddling = document_ids(cfg, [40] * 20, "image")  # tokens 21..30
    with pytest.raises(ValueError, match=r"^image 0 \(row 0, tokens 21\.\.30\) lies past"):
        model(straddling, torch.randn(1, 3, 32, 32))


def test_trainable_parts_and_a_frozen_clip():
    model = Kosmos(kosmos_tiny())
    model.trainable(["perceiver", "projector", "decoder"])  # the paper's frozen CLIP
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"perceiver", "projector", "decoder"}
    assert not any(p.requires_grad for p in model.vision.parameters())
    model.trainable(["vision"])
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"vision"}
    with pytest.raises(ValueError, match=r"unknown parts \['clip'\]; choose from "
                                         r"\['vision', 'perceiver', 'projector', 'decoder'\]"):
        model.trainable(["clip", "decoder"])


def test_presets_and_config_round_trip(tmp_path):
    cfg = kosmos_tiny()
    assert KosmosConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(pm.ConfigError, match="must differ"):
        cfg.replace(placeholder_token_id=cfg.image_token_id)
    with pytest.raises(pm.ConfigError, match="max_media and max_frames must be 0, got 2 and 0"):
        cfg.replace(perceiver=cfg.perceiver.replace(max_media=2))
    torch.manual_seed(0)
    model = pm.build("kosmos-tiny").eval()
    ids, px = document_ids(cfg, "image", [40, 41]), torch.randn(1, 3, 32, 32)
    pm.save_pretrained(model, tmp_path / "kosmos")
    loaded = pm.from_pretrained(tmp_path / "kosmos")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, px).logits, model(ids, px).logits, atol=0, rtol=0)
    with torch.device("meta"):  # the real shapes, without allocating 1.6B parameters
        big = pm.build("kosmos-1")
    assert big.config.vision.n_patches == 256 and big.config.n_image_latents == 64
    text_params = sum(p.numel() for p in big.decoder.parameters())
    assert 1.3e9 < text_params < 1.4e9  # the paper's "about 1.3B" MLLM


def test_format_lays_out_an_interleaved_document():
    world = World(seed=0)
    tok = Tokenizer.train(world.texts(), vocab_size=320)
    cfg = fit_to_tokenizer(kosmos_tiny(), tok)
    collate = make_collator(cfg, tok)
    red, blue = world.draw("red", "circle"), world.draw("blue", "square")
    doc = Document([Segment("text", "caption"), Segment("image", media=red), Segment("text", "and"),
                    Segment("image", media=blue), Segment("text", "a blue square", target=True)])
    batch = collate([doc, world.sample("colour", 0).document])
    ids, labels = batch["input_ids"], batch["labels"]
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    starts = (ids[0] == cfg.image_token_id).nonzero()[:, 0].tolist()
    assert len(starts) == 2
    for s in starts:
        assert ids[0, s + 1 + cfg.n_image_latents] == cfg.image_end_token_id
    first_label = int((labels[0] != -100).nonzero()[0, 0])
    assert tok.decode(ids[0, first_label:].tolist()) == "a blue square"
    assert first_label > starts[1]
    out = Kosmos(cfg)(**batch)
    assert torch.isfinite(out.loss)
    prompts = collate.prompts([doc])
    assert prompts["pixel_values"].shape[0] == 2
    assert pm.generate(Kosmos(cfg).eval(), max_new_tokens=3, **prompts).shape == (1, 3)


def answer_loss(model, batch):
    """Loss on the first answer token only: the image-dependent one (the colour's name)."""
    labels = batch["labels"]
    first = (labels != -100).float().argmax(1)
    rows = torch.arange(len(labels))
    answer = torch.full_like(labels, -100)
    answer[rows, first] = labels[rows, first]
    with torch.no_grad():
        return model(**{**batch, "labels": answer}).loss.item()


def test_tiny_kosmos_learns_to_look_at_its_images():
    """150 steps on the built-in world's colour questions; the answer token's loss with the real
    images must end far below what the same model gets with shuffled or blank images (and below
    ln 4, the best a model that does not look can do over 4 colours)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matrices this small run fastest on one thread, and steadily under load
    try:
        torch.manual_seed(0)
        world = World(seed=0)
        tok = Tokenizer.train(world.texts(), vocab_size=320)
        cfg = fit_to_tokenizer(kosmos_tiny(), tok)
        model = Kosmos(cfg)
        collate = make_collator(cfg, tok)
        train = world.examples("train", "colour")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
        start = time.time()
        for step in range(150):
            for group in opt.param_groups:
                group["lr"] = 1e-3 * min(1.0, (step + 1) / 20)
            loss = model(**collate([next(train).document for _ in range(32)])).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        seconds = time.time() - start
        model.eval()
        batch = collate([e.document for e in world.examples("eval", "colour", n=128)])
        real = answer_loss(model, batch)
        shuffled = answer_loss(model, {**batch, "pixel_values": batch["pixel_values"].roll(1, 0)})
        blank = answer_loss(model, {**batch, "pixel_values": torch.zeros_like(batch["pixel_values"])})
    finally:
        torch.set_num_threads(threads)
    print(f"answer-token loss after 150 steps ({seconds:.1f} s): real images {real:.3f}, shuffled {shuffled:.3f}, "
          f"blank {blank:.3f}, chance ln 4 = {math.log(4):.3f}")
    assert real < 0.2
    assert shuffled > real + 2.0 and blank > real + 1.0
    assert real < 0.15 * math.log(4)
