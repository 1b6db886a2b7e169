"""The VQ image tokenizer: encode parity with HF `ChameleonVQVAE`, decoder parity with HF
`JanusVQVAEDecoder` (the same VQGAN decoder layout; HF has none for Chameleon), the quantiser's
straight-through estimator and losses, clear errors, save/load, and training on the built-in world
until held-out images come back at a PSNR far above a blank guess."""

import pytest
import torch
import torch.nn.functional as F

import polymodal as pm
from polymodal.data.synthetic import World
from polymodal.data.processors import images_to_pixels
from polymodal.encoders.vq import VQConfig, VQModel, pixels_to_images

transformers = pytest.importorskip("transformers")
from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE  # noqa: E402
from transformers.models.janus.modeling_janus import JanusVQVAEDecoder  # noqa: E402

TOL = 1e-4
SHAPES = dict(resolution=32, base_channels=32, channel_multiplier=[1, 2, 2], num_res_blocks=2, latent_channels=16,
              embed_dim=16, num_embeddings=64)


def randomise(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image, on [0, 1] pixels, of two (B, 3, H, W) batches in [-1, 1]."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).mean((1, 2, 3))
    return 10 * torch.log10(1 / mse)


def test_encode_matches_hf_chameleon_vqvae():
    hf_cfg = transformers.ChameleonVQVAEConfig(**{k: v for k, v in SHAPES.items()}, attn_resolutions=[16])
    hf = ChameleonVQVAE(hf_cfg).eval()
    randomise(hf)
    ours = VQModel(VQConfig(**SHAPES, attn_resolutions=[16], decoder=False)).eval()
    ours.load_state_dict(hf.state_dict())  # same names, key for key
    pixels = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        theirs = hf.encode(pixels)
        latent = ours.quant_conv(ours.encoder(pixels))
        assert (latent - hf.quant_conv(hf.encoder(pixels))).abs().max() <= TOL
        assert torch.equal(ours.encode(pixels), theirs.image_tokens.view(4, -1))


def test_decoder_matches_hf_vqgan_decoder_layout():
    hf_cfg = transformers.JanusVQVAEConfig(**{k: v for k, v in SHAPES.items() if k != "resolution"}, num_patches=8)
    hf = JanusVQVAEDecoder(hf_cfg).eval()
    randomise(hf)
    ours = VQModel(VQConfig(**SHAPES, attn_resolutions=[8])).eval()  # Janus attends at the lowest resolution
    ours.decoder.load_state_dict(hf.state_dict())
    z = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        assert (ours.decoder(z) - hf(z)).abs().max() <= TOL
        # codes -> pixels is the codebook lookup, post_quant_conv, then that decoder
        codes = torch.randint(0, 64, (2, 64))
        latent = ours.post_quant_conv(ours.quantize.embedding(codes).transpose(1, 2).reshape(2, 16, 8, 8))
        assert torch.equal(ours.decode(codes), ours.decoder(latent))


def test_straight_through_and_losses():
    vq = VQModel(VQConfig(**SHAPES))
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    out = vq(pixels)
    assert out.codes.shape == (2, 64) and out.pixels.shape == pixels.shape
    out.loss.backward()
    # the encoder learns through the non-differentiable argmin, the codebook through its own loss
    assert vq.encoder.conv_in.weight.grad.abs().sum() > 0
    assert vq.quantize.embedding.weight.grad.abs().sum() > 0
    z = vq.quant_conv(vq.encoder(pixels)).detach()
    zq, loss, codes = vq.quantize(z)
    nearest = vq.quantize.lookup(codes, 8)
    assert torch.allclose(zq, nearest, atol=1e-6)
    assert torch.allclose(loss, 1.25 * F.mse_loss(nearest, z))  # codebook + beta (0.25) * commitment
    assert torch.equal(vq.encode(pixels), out.codes)


def test_clear_errors_and_save_load(tmp_path):
    vq = VQModel(VQConfig(**SHAPES)).eval()
    with pytest.raises(ValueError, match=r"pixel_values must be \(batch, 3, 32, 32\), got \(1, 3, 16, 16\)"):
        vq.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"codes must be \(batch, 64\)"):
        vq.decode(torch.zeros(1, 10, dtype=torch.long))
    with pytest.raises(ValueError, match=r"codes must be in \[0, 64\)"):
        vq.decode(torch.full((1, 64), 64))
    with pytest.raises(ValueError, match="no decoder"):
        VQModel(VQConfig(**SHAPES, decoder=False)).decode(torch.zeros(1, 64, dtype=torch.long))
    with pytest.raises(pm.ConfigError, match="divisible by norm_groups"):
        VQConfig(base_channels=12)
    pm.save_pretrained(vq, tmp_path)
    back = pm.from_pretrained(tmp_path)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    assert back.config == vq.config and torch.equal(back.encode(pixels), vq.encode(pixels))


def test_trained_on_the_built_in_world_reconstructs_held_out_images(world_vq):
    """world_vq (conftest.py): 400 AdamW steps of 16 images of the world's train split."""
    world = World(seed=0)
    tasks = ("caption", "count", "text_to_image")  # the mix world_vq was fitted to, from the held-out split
    held_out = images_to_pixels([s.media for ex in world.examples("eval", tasks, 200)
                                 for s in ex.document.segments if s.kind == "image"], 32)
    vq = world_vq.model
    with torch.no_grad():
        codes = vq.encode(held_out)
        score = psnr(vq.decode(codes), held_out).mean().item()
    mean_image = world_vq.train_pixels.mean(0, keepdim=True).expand_as(held_out)  # the best blind guess
    blank = psnr(mean_image, held_out).mean().item()
    print(f"VQ: held-out PSNR {score:.1f} dB (mean-image guess {blank:.1f} dB), {codes.unique().numel()} of 128 "
          f"codes used, 8x8 codes per 32x32 image, trained in {world_vq.seconds:.0f} s, "
          f"final loss {world_vq.losses[-1]:.3f}")
    assert score >= 20.0 and score >= blank + 6.0
    round_trip = images_to_pixels(pixels_to_images(held_out[:4]), 32)  # PIL <-> [-1, 1] is lossless at 8 bits
    assert (round_trip - held_out[:4]).abs().max() <= 1 / 127.5
