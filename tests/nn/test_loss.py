"""Chunked cross-entropy == F.cross_entropy on full logits (loss and gradients), without the full logits."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import polymodal as pm
from polymodal.nn.loss import chunked_cross_entropy

N, D, V = 23, 16, 50


def inputs(ignored=()):
    torch.manual_seed(0)
    h = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    targets[list(ignored)] = -100
    return h, w, targets


def loss_and_grads(fn, h, w, targets):
    loss = fn(h, w, targets)
    return (loss, *torch.autograd.grad(loss, (h, w)))


def reference(h, w, targets):
    return F.cross_entropy(F.linear(h, w).float(), targets, ignore_index=-100)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, N, 64])
@pytest.mark.parametrize("ignored", [(), (0, 5, 22), tuple(range(8))])  # range(8): whole chunks ignored
def test_matches_full_logits(chunk_size, ignored):
    h, w, targets = inputs(ignored)
    got = loss_and_grads(lambda *a: chunked_cross_entropy(*a, chunk_size=chunk_size), h, w, targets)
    want = loss_and_grads(reference, h, w, targets)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r.to(g.dtype), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("chunk_size", [4, N])  # recomputed logits; logits kept from forward (one chunk)
def test_second_backward_gives_the_same_gradients(chunk_size):
    h, w, targets = inputs()
    loss = chunked_cross_entropy(h, w, targets, chunk_size=chunk_size)
    first = torch.autograd.grad(loss, (h, w), retain_graph=True)
    second = torch.autograd.grad(loss, (h, w))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_float32_inputs_match():
    h, w, targets = inputs((3,))
    h32, w32 = (t.detach().float().requires_grad_() for t in (h, w))
    got = loss_and_grads(lambda *a: chunked_cross_entropy(*a, chunk_size=5), h32, w32, targets)
    want = loss_and_grads(reference, h32, w32, targets)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)


def test_autocast_runs_in_its_dtype_and_keeps_weight_gradients_float32():
    h, w, targets = inputs((2,))
    h32, w32 = (t.detach().float().requires_grad_() for t in (h, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_and_grads(lambda *a: chunked_cross_entropy(*a, chunk_size=6), h32, w32, targets)
        want = loss_and_grads(reference, h32, w32, targets)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.float32
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, atol=2e-2, rtol=2e-2)


def test_all_ignored_is_a_defined_zero_with_zero_gradients():
    """Nothing to predict costs 0 (F.cross_entropy says NaN), and the gradients are F.cross_entropy's zeros."""
    h, w, targets = inputs(range(N))
    got = loss_and_grads(lambda *a: chunked_cross_entropy(*a, chunk_size=4), h, w, targets)
    want = loss_and_grads(reference, h, w, targets)
    assert got[0].item() == 0.0 and want[0].isnan()
    for g, r in zip(got[1:], want[1:]):
        assert torch.equal(g, r) and not g.any()


def test_bad_targets_shape():
    h, w, targets = inputs()
    with pytest.raises(ValueError, match=r"targets must have shape \(23,\)"):
        chunked_cross_entropy(h, w, targets[:-1])


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op produces (forward and backward alike)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def largest_tensor(fn, h, w, targets):
    with LargestTensor() as mode:
        fn(h, w, targets).backward()
    return mode.largest


def test_never_materialises_full_logits():
    n, d, v, chunk = 256, 8, 1000, 32
    h = torch.randn(n, d, requires_grad=True)
    w = torch.randn(v, d, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    assert largest_tensor(reference, h, w, targets) >= n * v
    assert largest_tensor(lambda *a: chunked_cross_entropy(*a, chunk_size=chunk), h, w, targets) == chunk * v
    if torch.cuda.is_available():
        peaks = []
        for fn in (reference, lambda *a: chunked_cross_entropy(*a, chunk_size=chunk)):
            hc, wc = (t.detach().cuda().requires_grad_() for t in (h, w))
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn(hc, wc, targets.cuda()).backward()
            peaks.append(torch.cuda.max_memory_allocated() - base)
        assert peaks[1] < peaks[0]


def test_decoder_loss_matches_plain_cross_entropy():
    """Decoder.head: the shifted, chunked loss == F.cross_entropy on the eval-mode logits; in training
    mode a call with labels returns no logits."""
    torch.manual_seed(0)
    model = pm.build("gemma-tiny").double()
    ids = torch.randint(0, 512, (2, 9))
    labels = ids.masked_fill(torch.rand(2, 9) < 0.3, -100)
    out = model.eval()(ids, labels=labels)
    want = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, want, atol=1e-6, rtol=1e-6)
    train = model.train()(ids, labels=labels)
    assert train.logits is None
    torch.testing.assert_close(train.loss, out.loss, atol=1e-6, rtol=1e-6)
