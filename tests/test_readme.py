"""Every ```python block of README.md runs as written and does what the README says of it (CHECKS).

The blocks run once each, in README order, in one namespace, as in a reader's Python session: later
blocks use the first block's `pm` and `torch`, and the image-output block the Gemini block's `world`,
`tok` and `make_collator`; a block selected alone (-k) first runs the blocks before it. They run in a
directory holding what they name: checkpoint directories written by HF transformers from the parity
tests' tiny random configs (PaliGemma's with a tokenizer.json and a preprocessor_config.json, Idefics'
with a tokenizer.json), a gemini-tiny run's checkpoint (random weights, the world's tokenizer), and cat.png. The tensors a block uses without defining them (the reader's own
`input_ids`, `pixel_values`, ...) come from INPUTS, shaped for the model the block loads. Left out: the
context-parallel block, which needs torchrun (tests/nn/test_context_parallel.py covers it).
"""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import torch
from PIL import Image
from tokenizers.models import WordLevel

import polymodal as pm
from polymodal.families.collators import fit_to_tokenizer
from polymodal.data.synthetic import World
from polymodal.data.tokenizer import Tokenizer
from polymodal.families.kosmos.presets import kosmos_tiny
from polymodal.presets import get_preset

transformers = pytest.importorskip("transformers", reason="the checkpoint directories are written by transformers")

sys.path.insert(0, str(Path(__file__).parent / "parity"))  # the parity tests' tiny HF models
from test_chameleon_parity import hf_model as hf_chameleon  # noqa: E402
from test_contrastive_parity import batch as contrastive_batch, hf_model as hf_contrastive  # noqa: E402
from test_decoder_parity import hf_model as hf_decoder  # noqa: E402
from test_idefics_parity import CONFIGS as IDEFICS_CONFIGS, IMG as IDEFICS_IMAGE  # noqa: E402
from test_idefics_parity import batch as idefics_batch, hf_model as hf_idefics  # noqa: E402
from test_paligemma_parity import hf_paligemma  # noqa: E402

README = Path(__file__).parents[1] / "README.md"


def python_blocks(markdown: str) -> list[tuple[str, str]]:
    """(heading of its section, code) of each ```python block, in order. The code is preceded by blank lines
    so that its line numbers, in tracebacks, are README.md's."""
    blocks, heading, fence, start = [], "", None, 0
    lines = markdown.splitlines()
    for n, line in enumerate(lines):
        if line.startswith("```"):
            if fence == "python":
                blocks.append((heading, "\n" * (start + 1) + "\n".join(lines[start + 1:n])))
            fence, start = (line[3:].strip(), n) if fence is None else (None, 0)
        elif fence is None and line.startswith("#"):
            heading = line.lstrip("#").strip()
    return blocks


# Context parallel needs torchrun (init_device_mesh): tests/nn/test_context_parallel.py
BLOCKS = [(h, code) for h, code in python_blocks(README.read_text()) if "init_device_mesh" not in code]


def kosmos_inputs() -> dict:
    cfg = kosmos_tiny()
    ids = torch.tensor([[cfg.text.bos_token_id, 40, 41, *cfg.image_tokens(), 42, 43]])
    size = cfg.vision.image_size
    return dict(input_ids=ids, pixel_values=torch.randn(1, 3, size, size), labels=ids)


def flamingo_inputs() -> dict:
    ids, am, _, _, pixels, _ = idefics_batch()
    return dict(input_ids=ids[:1], attention_mask=am[:1], pixel_values=pixels[:1])  # row 0: 3 images at IDEFICS_IMAGE


def contrastive_inputs() -> dict:
    ids, _, pixels = contrastive_batch("siglip")
    return dict(input_ids=ids, pixel_values=pixels)


# What the reader brings to a block: heading -> the block's free variables.
INPUTS = {
    "CLIP / SigLIP dual encoders": contrastive_inputs,
    "Flamingo (Idefics checkpoints)": flamingo_inputs,
    "KOSMOS-1": kosmos_inputs,
    "Build and train your own": lambda: dict(input_ids=torch.randint(0, 512, (2, 16))),  # DecoderConfig's vocab
}


def write_checkpoints(directory: Path) -> None:
    """The directories, tokenizer, processor config and image that the README's blocks name."""
    torch.manual_seed(0)
    llama = hf_decoder("llama", dict(num_key_value_heads=2))
    llama.resize_token_embeddings(32000)  # the README's prompt holds Llama ids up to 17354
    llama.save_pretrained(directory / "path/to/llama-or-gemma-dir")

    paligemma = directory / "paligemma-3b-pt-224"
    tok = Tokenizer.train(["caption en", "a cat on a mat", "a red circle"])
    hf = hf_paligemma()
    hf.resize_token_embeddings(tok.vocab_size)  # the tokenizer's vocabulary and <image>
    hf.config.image_token_id = tok.token_id("<image>")
    hf.save_pretrained(paligemma)
    tok.save(paligemma)
    size = hf.config.vision_config.image_size
    transformers.SiglipImageProcessor(size={"height": size, "width": size}).save_pretrained(paligemma)

    hf_contrastive("siglip").save_pretrained(directory / "siglip-base-patch16-224")
    idefics = hf_idefics(dict(IDEFICS_CONFIGS["resampler-qknorm-vector-gates"]))
    idefics.save_pretrained(directory / "idefics-9b")
    # its <image> id lives in its tokenizer: a word-level one over its vocabulary, <image> where the batch has it
    n = idefics.config.vocab_size + idefics.config.additional_vocab_size
    vocab = {f"t{i}": i for i in range(n) if i != IDEFICS_IMAGE} | {"<image>": IDEFICS_IMAGE}
    tokenizers.Tokenizer(WordLevel(vocab, unk_token="t0")).save(str(directory / "idefics-9b/tokenizer.json"))
    hf_chameleon().save_pretrained(directory / "chameleon-7b")
    world_tok = Tokenizer.train(World(seed=0).texts(), vocab_size=512)
    gemini = directory / "runs/gemini-tiny/checkpoints/step-001000"  # what `polymodal train --model gemini-tiny` writes
    pm.save_pretrained(pm.build(fit_to_tokenizer(get_preset("gemini-tiny"), world_tok)), gemini)
    world_tok.save(gemini)
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(directory / "cat.png")


class Session:
    """One namespace in which the README's blocks run in order, each at most once: a block that fails is
    not run again, so only it and the blocks using its names fail."""

    def __init__(self):
        self.namespace: dict = {}
        self.started = 0

    def run(self, i: int) -> dict:
        """Runs the blocks up to and including i that have not been started; returns the namespace."""
        while self.started <= i:
            heading, code = BLOCKS[self.started]
            self.started += 1
            self.namespace.update(INPUTS.get(heading, dict)())
            exec(compile(code, str(README), "exec"), self.namespace)
        return self.namespace


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("readme")
    write_checkpoints(directory)
    return directory


@pytest.fixture(scope="module")
def session():
    return Session()


def unit_rows(x: torch.Tensor) -> bool:
    return torch.allclose(x.norm(dim=-1), torch.ones(x.shape[0]), atol=1e-5)


def check_load_and_generate(ns, printed):
    assert ns["new_tokens"].shape == (1, 32)  # no eos_token_id: all 32 new tokens, prompt not included


def check_speculative(ns, printed):
    model, ids = ns["model"], ns["ids"]
    plain = ns["pm"].generate(model, ids, max_new_tokens=32)
    assert torch.equal(ns["fast"], plain) and torch.equal(ns["lookup"], plain)  # the target's own greedy tokens
    routed, votes = ns["routed"], ns["routed"].votes
    assert routed.routes == ["consensus" if s >= ns["threshold"] else "greedy" for s in votes.share]
    assert printed == f"{routed.answers} {routed.routes}\n"


def check_paligemma(ns, printed):
    size = ns["model"].config.vision.image_size
    assert ns["pixel_values"].shape == (1, 3, size, size)
    assert ns["out"].shape[0] == 1 and ns["out"].shape[1] <= 20
    assert printed == ns["tok"].decode(ns["out"][0].tolist()) + "\n"


def check_contrastive(ns, printed):
    model, out, ids, px = ns["model"], ns["out"], ns["input_ids"], ns["pixel_values"]
    assert unit_rows(ns["img"]) and unit_rows(ns["txt"])
    with torch.no_grad():
        whole = model(ids, px)
    assert out.logits_per_image.shape == (px.shape[0], ids.shape[0])
    assert math.isfinite(out.loss.item()) and abs(out.loss.item() - whole.loss.item()) < 1e-5  # one process


def check_flamingo(ns, printed):
    model = ns["model"]
    assert model.config.media_token_id == IDEFICS_IMAGE  # read from the directory's tokenizer
    assert ns["out"].shape[0] == ns["input_ids"].shape[0] and ns["out"].shape[1] <= 20
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"perceiver", "cross_layers"}


def check_kosmos(ns, printed):
    model, one_image = ns["model"], ns["one_image"]
    cfg = model.config
    assert len(one_image) == cfg.perceiver.n_latents + 2
    assert one_image[0] == cfg.image_token_id and one_image[-1] == cfg.image_end_token_id
    assert math.isfinite(ns["out"].loss.item())
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"perceiver", "projector", "decoder"}


def check_gemini(ns, printed):
    assert math.isfinite(ns["loss"].item())
    assert ns["answers"].shape[0] == 3 and ns["answers"].shape[1] <= 4


def check_any_to_any(ns, printed):
    out, spans = ns["out"], ns["model"].image_spans
    assert len(out.images) == 3 and len(printed.strip().splitlines()) == 3  # a line per row
    for row, images in enumerate(out.images):
        assert len(images) == int((out.tokens[row] == spans.end).sum())  # every image the row completed
        for k, image in enumerate(images):
            assert Image.open(f"answer-{row}-{k}.png").size == image.size == (32, 32)


def check_image_output(ns, printed):
    out, spans = ns["out"], ns["model"].image_spans
    assert len(out.images) == 2  # per row
    for row, images in enumerate(out.images):
        assert len(images) == int((out.tokens[row] == spans.end).sum())  # every image the row completed
        for k, image in enumerate(images):
            assert Image.open(f"drawn-{row}-{k}.png").size == image.size


def check_build(ns, printed):
    model, ids = ns["model"], ns["input_ids"]
    assert math.isfinite(ns["out"].loss.item())
    model.eval()
    assert model(ids, labels=ids).logits.shape == (*ids.shape, model.config.vocab_size)
    assert sorted(p.name for p in Path("runs/mine").iterdir()) == ["config.json", "model.safetensors"]


def check_lora(ns, printed):
    from polymodal.nn.lora import adapters
    from polymodal.nn.quantize import Int8Linear

    assert sorted(p.name for p in Path("my-adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert sum("lora_A" in name for name, _ in ns["hf"].named_parameters()) == 2 * ns["model"].config.n_layers
    assert not adapters(ns["model"]) and isinstance(ns["small"].layers[0].attn.wqkv, Int8Linear)


CHECKS = {
    "Load a checkpoint directory and generate": check_load_and_generate,
    "Speculative decoding and uncertainty-routed chain-of-thought": check_speculative,
    "PaliGemma (and SigLIP / CLIP vision towers)": check_paligemma,
    "CLIP / SigLIP dual encoders": check_contrastive,
    "Flamingo (Idefics checkpoints)": check_flamingo,
    "KOSMOS-1": check_kosmos,
    "Gemini-style any-to-any: one decoder over text, images, audio and video (Fuyu, Whisper encoder)": check_gemini,
    "Any-to-any output: text and drawings from one generate call": check_any_to_any,
    "Image output (Chameleon-style VQ tokens)": check_image_output,
    "Build and train your own": check_build,
    "Fine-tune with LoRA, share the adapter with peft, decode quantized": check_lora,
}


def test_every_block_is_checked():
    assert [h for h, _ in BLOCKS] == list(CHECKS) and set(INPUTS) <= set(CHECKS)


@pytest.mark.parametrize("i", range(len(BLOCKS)), ids=[h for h, _ in BLOCKS])
def test_block_runs_and_does_what_the_readme_says(i, session, workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    ns = session.run(i)
    CHECKS[BLOCKS[i][0]](ns, capsys.readouterr().out)
