"""The mask VQ-VAE: a file of the official `vae-oid.npz` layout loads (and a wrong one is refused by name),
the codes and masks have big_vision's shapes, and the model learns to code masks."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import polymodal as pm
from polymodal.encoders.mask_vae import MaskVAE, MaskVAEConfig, load_mask_vae


def official_layout() -> dict[str, tuple[int, ...]]:
    """Every array of big_vision's `vae-oid.npz` (AiT's VQVAE state dict: hidden_dim 16, downsample_ratio 16,
    128 x 512 EMA codebook), written out here independently of the model code."""
    layout = {}
    for i, (c_in, c_out) in enumerate([(1, 16), (16, 32), (32, 64), (64, 128)]):
        layout |= {f"encoder.{2 * i}.weight": (c_out, c_in, 4, 4), f"encoder.{2 * i}.bias": (c_out,)}
    for part, blocks in (("encoder", (8, 9)), ("decoder", (2, 3))):
        for b in blocks:
            for j, k in ((0, 3), (2, 3), (4, 1)):
                layout |= {f"{part}.{b}.net.{j}.weight": (128, 128, k, k), f"{part}.{b}.net.{j}.bias": (128,)}
    layout |= {"encoder.10.weight": (512, 128, 1, 1), "encoder.10.bias": (512,),
               "decoder.0.weight": (128, 512, 1, 1), "decoder.0.bias": (128,)}
    for i, (c_in, c_out) in enumerate([(128, 128), (128, 64), (64, 32), (32, 16)]):  # ConvTranspose2d: (in, out, ...)
        layout |= {f"decoder.{4 + 2 * i}.weight": (c_in, c_out, 4, 4), f"decoder.{4 + 2 * i}.bias": (c_out,)}
    layout |= {"decoder.12.weight": (1, 16, 1, 1), "decoder.12.bias": (1,),
               "_vq_vae._embedding": (128, 512), "_vq_vae._ema_cluster_size": (128,), "_vq_vae._ema_w": (128, 512)}
    return layout


def write_npz(path, layout, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {name: (rng.standard_normal(shape) * 0.05).astype(np.float32) for name, shape in layout.items()}
    np.savez(path, **arrays)
    return arrays


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "vae-oid.npz"
    return path, write_npz(path, official_layout())


def test_a_file_of_the_official_layout_loads(official):
    path, arrays = official
    vae = load_mask_vae(path)
    state = vae.state_dict()
    assert set(state) == set(arrays) - {"_vq_vae._ema_cluster_size", "_vq_vae._ema_w"}
    assert all(torch.equal(state[k], torch.from_numpy(arrays[k])) for k in state)
    masks = (torch.rand(3, 64, 64) > 0.5).float()
    codes = vae.encode(masks)
    assert codes.shape == (3, 16) and codes.dtype == torch.long and 0 <= codes.min() and codes.max() < 128
    logits = vae.decode(codes)
    assert logits.shape == (3, 64, 64)


def resblock(x, w, name):
    h = F.relu(F.conv2d(F.pad(x, (1, 1, 1, 1)), w[f"{name}.net.0.weight"], w[f"{name}.net.0.bias"]))
    h = F.relu(F.conv2d(F.pad(h, (1, 1, 1, 1)), w[f"{name}.net.2.weight"], w[f"{name}.net.2.bias"]))
    return x + F.conv2d(h, w[f"{name}.net.4.weight"], w[f"{name}.net.4.bias"])


def big_vision_encode(masks, w):
    """big_vision's encoder: tf.nn.conv2d(padding='SAME') pads a stride-2 4x4 conv on an even side by one pixel
    each side, a 3x3 conv by one, a 1x1 by none; codes by the distances it writes out."""
    x = 2.0 * (masks[:, None] - 0.5)
    for i in range(4):
        x = F.relu(F.conv2d(F.pad(x, (1, 1, 1, 1)), w[f"encoder.{2 * i}.weight"], w[f"encoder.{2 * i}.bias"],
                            stride=2))
    x = resblock(resblock(x, w, "encoder.8"), w, "encoder.9")
    z = F.conv2d(x, w["encoder.10.weight"], w["encoder.10.bias"]).permute(0, 2, 3, 1).reshape(-1, 512)
    e = w["_vq_vae._embedding"]
    distances = (z ** 2).sum(1, keepdim=True) + (e ** 2).sum(1) - 2 * z @ e.T
    return distances.argmin(1).view(len(masks), 16)


def big_vision_decode(codes, w):
    """big_vision's flax decoder: ConvTranspose(4x4, stride 2, padding=2, transpose_kernel=True) is a conv with
    the flipped, in/out-swapped kernel over the input dilated by 2 and padded by 2."""
    x = w["_vq_vae._embedding"][codes].view(len(codes), 4, 4, 512).permute(0, 3, 1, 2)
    x = F.relu(F.conv2d(x, w["decoder.0.weight"], w["decoder.0.bias"]))
    x = resblock(resblock(x, w, "decoder.2"), w, "decoder.3")
    for i in (4, 6, 8, 10):
        b, c, h, _ = x.shape
        dilated = x.new_zeros(b, c, 2 * h - 1, 2 * h - 1)
        dilated[:, :, ::2, ::2] = x
        kernel = w[f"decoder.{i}.weight"].transpose(0, 1).flip(-2, -1)
        x = F.relu(F.conv2d(F.pad(dilated, (2, 2, 2, 2)), kernel, w[f"decoder.{i}.bias"]))
    return F.conv2d(x, w["decoder.12.weight"], w["decoder.12.bias"])[:, 0]


def test_codes_and_masks_are_big_vision_s(official):
    path, arrays = official
    vae = load_mask_vae(path)
    w = {k: torch.from_numpy(v) for k, v in arrays.items()}
    masks = (torch.rand(4, 64, 64) > 0.5).float()
    codes = torch.randint(0, 128, (4, 16))
    with torch.no_grad():
        assert torch.equal(vae.encode(masks), big_vision_encode(masks, w))
        torch.testing.assert_close(vae.decode(codes), big_vision_decode(codes, w), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("change, match", [
    (lambda layout: layout.pop("decoder.6.weight"), r"lacks 1 array\(s\) of the mask VQ-VAE: \['decoder.6.weight'\]"),
    (lambda layout: layout.update({"decoder.6.weight": (128, 32, 4, 4)}),
     r"array decoder.6.weight must be a float array of shape \(128, 64, 4, 4\), got float32 \(128, 32, 4, 4\)"),
    (lambda layout: layout.update({"_vq_vae._embedding": (256, 512)}), r"_vq_vae._embedding .* \(128, 512\)"),
    (lambda layout: layout.update({"decoder.14.weight": (1, 1, 1, 1)}), r"no mask VQ-VAE of this config has: "
                                                                        r"\['decoder.14.weight'\]"),
])
def test_a_wrong_file_is_refused_by_name(tmp_path, change, match):
    layout = official_layout()
    change(layout)
    write_npz(tmp_path / "bad.npz", layout)
    with pytest.raises(pm.CheckpointError, match=match):
        load_mask_vae(tmp_path / "bad.npz")


def test_unreadable_files_are_refused(tmp_path):
    with pytest.raises(pm.MissingFileError, match="does not exist"):
        load_mask_vae(tmp_path / "vae-oid.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(pm.CheckpointError, match="not a readable .npz"):
        load_mask_vae(tmp_path / "junk.npz")
    np.savez(tmp_path / "pickled.npz", **{"_vq_vae._embedding": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(pm.CheckpointError, match="not a readable .npz"):  # never unpickled
        load_mask_vae(tmp_path / "pickled.npz")


def test_bad_masks_and_codes_are_clear_errors():
    vae = MaskVAE(MaskVAEConfig(hidden_dim=2, codebook_dim=4))
    with pytest.raises(pm.InputError, match=r"masks must be \(batch, 64, 64\)"):
        vae.encode(torch.zeros(1, 32, 32))
    with pytest.raises(pm.InputError, match=r"values in \[0, 1\]"):
        vae.encode(torch.full((1, 64, 64), 2.0))
    with pytest.raises(pm.InputError, match=r"codes must be \(batch, 16\)"):
        vae.decode(torch.zeros(1, 15, dtype=torch.long))
    with pytest.raises(pm.InputError, match=r"codes must be in \[0, 128\)"):
        vae.decode(torch.full((1, 16), 128))


def test_training_reaches_every_part_and_fits_a_batch():
    """The straight-through codes pass the reconstruction's gradient to the encoder; a few steps fit
    a handful of masks (a small config: seconds on a CPU)."""
    torch.manual_seed(0)
    vae = MaskVAE(MaskVAEConfig(mask_size=16, n_down=2, hidden_dim=4, codebook_dim=8, codebook_size=16,
                                n_res_blocks=1))
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    masks = torch.stack([((yy - 4 - i) ** 2 + (xx - 11 + i) ** 2 <= 9 + 3 * i).float() for i in range(6)])
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        out = vae(masks)
        optimizer.zero_grad()
        out.loss.backward()
        if not losses:
            parts = [*vae.encoder.parameters(), vae.codebook]  # through the straight-through codes
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in parts)
        optimizer.step()
        losses.append(out.loss.item())
    assert out.logits.shape == (6, 16, 16) and out.codes.shape == (6, 16)
    assert losses[-1] < 0.6 * losses[0]


@pytest.mark.parametrize("config", [MaskVAEConfig(), MaskVAEConfig(mask_size=32, hidden_dim=8, n_down=3,
                                                                   n_res_blocks=1, codebook_dim=32)])
def test_a_written_file_loads_back_equal_with_its_architecture_read_from_its_arrays(tmp_path, config):
    from polymodal.encoders.mask_vae import mask_vae_npz

    torch.manual_seed(0)
    vae = MaskVAE(config)
    (tmp_path / "vae-oid.npz").write_bytes(mask_vae_npz(vae))
    back = load_mask_vae(tmp_path / "vae-oid.npz")
    assert back.config == config
    assert all(torch.equal(back.state_dict()[k], v) for k, v in vae.state_dict().items())
    with np.load(tmp_path / "vae-oid.npz") as npz:  # big_vision's names (the official file's, at its size)
        assert {str(npz[k].dtype) for k in npz.files} == {"float32"}
        if config == MaskVAEConfig():
            assert set(npz.files) == set(official_layout()) - {"_vq_vae._ema_cluster_size", "_vq_vae._ema_w"}
