"""A tiny PaliGemma whose greedy answer to any prompt is a text chosen by the test, its weights set by hand: a real
checkpoint that answers with location (and segmentation) tokens, for the tests of what the server, the chat page and
`polymodal generate --draw` do with such answers (tests/serve/test_located_answers.py, tests/serve/test_chat_page.py,
tests/e2e/test_draw_without_mask_vae.py), without training one. `script` does the same to any untied decoder (a
gemini-tiny that answers text then a drawing: tests/serve/test_drawing_serve.py).

How: every block's attention and MLP outputs are zero, so the last hidden state at a position is its own token's
embedding (normalised); the untied output head then maps each token of the answer to the next one (its row is the
direction of the previous token's embedding), and any other token (the prompt's last) to the answer's first, through
one embedding dimension that only tokens outside the answer have.
"""

from pathlib import Path

import torch

import polymodal as pm
from polymodal.data.locations import add_location_tokens
from polymodal.data.synthetic import World
from polymodal.data.tokenizer import Tokenizer
from polymodal.encoders.mask_vae import MaskVAEConfig, mask_vae_of
from polymodal.families.collators import fit_to_tokenizer
from polymodal.presets import get_preset

SIDE = 32  # paligemma-tiny reads 32x32 images
INSIDE = 64  # the scripted mask VQ-VAE's codes below this paint their cell of the mask's grid inside


def paint_cells(vae: torch.nn.Module) -> None:
    """Set a mask VQ-VAE's weights so that each code paints its cell of the code grid: inside for a code below
    INSIDE, outside for the others (blurred at the cells' edges by the upsampling). One channel carries it: the
    codebook's first dimension (1 inside, 0 outside) through the first 1x1 conv, identity residual blocks,
    transposed convolutions that spread each value over the pixels it upsamples to, and a last 1x1 conv that
    thresholds at 0.5."""
    with torch.no_grad():
        for p in vae.decoder.parameters():
            p.zero_()
        vae.codebook.zero_()
        vae.codebook[:INSIDE, 0] = 1.0
        vae.decoder[0].weight[0, 0] = 1.0
        for layer in vae.decoder:
            if isinstance(layer, torch.nn.ConvTranspose2d):
                layer.weight[0, 0] = 0.25  # each output pixel sums 2x2 taps inside
        vae.decoder[-1].weight[0, 0] = 1.0
        vae.decoder[-1].bias.fill_(-0.5)


def script(decoder: torch.nn.Module, ids: list[int]) -> None:
    """Set an untied decoder's weights so that its greedy answer to any prompt is `ids` (each id another): see
    the module's docstring."""
    with torch.no_grad():
        for layer in decoder.layers:
            layer.attn.wo.weight.zero_()
            layer.mlp.w_out.weight.zero_()
        embeddings = torch.nn.functional.normalize(torch.randn_like(decoder.tok_embeddings.weight), dim=-1)
        embeddings[:, 0] = 3.0  # outside the answer: mostly along dimension 0
        embeddings[ids, 0] = 0.0
        decoder.tok_embeddings.weight.copy_(embeddings)
        head = torch.zeros_like(decoder.output.weight)
        head[ids[0], 0] = 50.0
        for before, after in zip(ids, ids[1:]):
            head[after] = 50.0 * torch.nn.functional.normalize(embeddings[before], dim=0)
        decoder.output.weight.copy_(head)


def write_scripted_paligemma(directory: Path, answer: str, mask_vae: MaskVAEConfig | None = None) -> list[int]:
    """Save in `directory` a paligemma-tiny (with its tokenizer, which holds the location tokens, and a mask VQ-VAE
    of `mask_vae` if given, `paint_cells`) that answers `answer` then <eos> to any prompt; returns the answer's token
    ids."""
    tokenizer = Tokenizer.train(World(seed=0).texts(), vocab_size=320)
    add_location_tokens(tokenizer)
    ids = tokenizer.encode(answer) + [tokenizer.eos_id]
    assert len(set(ids)) == len(ids), f"each token of the answer must be another: {ids}"
    config = fit_to_tokenizer(get_preset("paligemma-tiny"), tokenizer)
    config = config.replace(text=config.text.replace(tie_embeddings=False), mask_vae=mask_vae)
    torch.manual_seed(0)
    model = pm.build(config)
    script(model.decoder, ids)
    vae = mask_vae_of(model)
    if vae is not None:
        with torch.no_grad():
            paint_cells(vae)
    pm.save_pretrained(model, directory)
    tokenizer.save(directory)
    return ids[:-1]
