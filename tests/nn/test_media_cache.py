"""The encoder cache: an image seen before (by content) is not encoded again, its features are the encoder's,
and the cache stays within its bound, least recently used out first."""

import pytest
import torch

import polymodal as pm
from polymodal.nn.media_cache import EncoderCache, content_hash


class Counted:
    """The model's own image encoder, recording how many images each call encodes."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.calls.append(pixel_values.shape[0])
        return self.model.embed_images(pixel_values)


def test_the_same_image_is_encoded_once_across_requests():
    torch.manual_seed(0)
    model = pm.build("paligemma-tiny").eval()
    a, b, c = torch.randn(3, 3, 32, 32)
    encoder, cache = Counted(model), EncoderCache(max_bytes=1 << 20)
    with torch.no_grad():
        first = cache.encode(torch.stack([a, b, a]), encoder)
        second = cache.encode(torch.stack([c, a.clone(), b]), encoder)
        alone = model.embed_images(torch.stack([a, b, c]))
    assert encoder.calls == [2, 1]  # a and b, then c: a repeated image, in a request or across two, is not
    assert (cache.misses, cache.hits) == (3, 3)
    for got, want in ((first[0], alone[0]), (first[1], alone[1]), (first[2], alone[0]), (second[0], alone[2]),
                      (second[1], alone[0]), (second[2], alone[1])):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_cache_keeps_within_its_bound_least_recent_out_first():
    def encoder(x):
        return x * 2

    items = torch.randn(4, 8)  # 32 bytes of output each
    cache = EncoderCache(max_bytes=64)
    for i in (0, 1, 0, 2):  # 0 touched after 1: 1 is the least recent when 2 comes
        cache.encode(items[i:i + 1], encoder)
    assert cache.bytes == 64 and len(cache) == 2
    assert set(cache.entries) == {content_hash(items[0]), content_hash(items[2])}
    torch.testing.assert_close(cache.encode(items[:1], encoder), items[:1] * 2)
    with pytest.raises(ValueError, match="max_bytes >= 1, got 0"):
        EncoderCache(0)


def test_content_hash_sees_every_value_the_shape_and_the_dtype():
    x = torch.zeros(2, 3)
    y = x.clone()
    y[1, 2] = 1e-6
    assert content_hash(x) == content_hash(x.clone()) != content_hash(y)
    assert content_hash(x) != content_hash(x.view(3, 2)) != content_hash(x.double())
