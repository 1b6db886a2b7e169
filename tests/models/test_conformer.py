"""The USM Conformer encoder: a stream encoded chunk by chunk gives the whole clip's states; its errors."""

import pytest
import torch

from polymodal.encoders.conformer import ConformerConfig, ConformerEncoder
from polymodal.errors import InputError

CONFIG = ConformerConfig(n_mels=16, dim=32, n_layers=2, n_heads=4, chunk=4, left_context=5, conv_kernel=3,
                         sub_channels=(8, 4))


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    model = ConformerEncoder(CONFIG).eval()
    with torch.no_grad():  # off the ones/zeros init, so that a lost left context shows
        for name, p in model.named_parameters():
            if "norm" in name or "per_dim_scale" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.3)
    return model


@pytest.mark.parametrize("chunks", [[1] * 48 + [102], [7, 3, 50, 1, 2, 64, 23], [150]])
def test_stream_chunk_by_chunk_equals_the_whole_clip(encoder, chunks):
    torch.manual_seed(1)
    features = torch.randn(2, sum(chunks), CONFIG.n_mels)
    with torch.no_grad():
        whole = encoder(features)
        stream = encoder.stream(batch=2)
        pieces, start = [], 0
        for n in chunks:
            pieces.append(stream.push(features[:, start:start + n]).states)
            start += n
        pieces.append(stream.push(features[:, :0], final=True).states)  # the convs' look-ahead, zero-padded
    streamed = torch.cat(pieces, 1)
    assert streamed.shape == whole.states.shape == (2, 10, CONFIG.dim)
    assert (streamed - whole.states).abs().max() <= 1e-5


def test_states_only_look_back(encoder):
    """What a stream has given out never changes: the first frames' states ignore later audio."""
    torch.manual_seed(2)
    features = torch.randn(1, 96, CONFIG.n_mels)
    changed = features.clone()
    changed[:, 64:] += 3.0
    with torch.no_grad():
        a, b = encoder(features).states, encoder(changed).states
    assert torch.equal(a[:, :3], b[:, :3]) and not torch.allclose(a[:, 4:], b[:, 4:])


def test_stream_errors(encoder):
    stream = encoder.stream(batch=2)
    with pytest.raises(InputError, match=r"features must be \(2, frames, 16\) log-mel frames, got \(1, 5, 16\)"):
        stream.push(torch.zeros(1, 5, 16))
    stream.push(torch.zeros(2, 5, 16), final=True)
    with pytest.raises(InputError, match="this audio stream has ended"):
        stream.push(torch.zeros(2, 5, 16))
    with pytest.raises(ValueError, match=r"input_features must be \(num_clips, num_frames, 16\) log-mel frames"):
        encoder(torch.zeros(2, 16, 40))
