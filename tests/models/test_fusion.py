"""The early-fusion core: vectorised span finding against a token-by-token reference, count checks that
name both numbers, the scatter, and the prefill/decode split."""

import random
import re

import pytest
import torch

from polymodal.errors import InputError
from polymodal.fusion import early
from polymodal.fusion import spans as fusion

PH, KINDS, WRAPPERS = 4, ["image", "audio", "video"], [(6, 7), (8, 9), None]  # video: no span tokens here


def reference_spans(ids: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """(row, start, length, kind) read token by token, as the family code did before the core; raises
    the first malformed place in row-major order."""
    starts = {pair[0]: (k, pair[1]) for k, pair in enumerate(WRAPPERS) if pair}
    ends = {pair[1]: k for k, pair in enumerate(WRAPPERS) if pair}
    out = []
    for b, row in enumerate(ids.tolist()):
        i = 0
        while i < len(row):
            if row[i] in starts:
                kind, end = starts[row[i]]
                j = i + 1
                while j < len(row) and row[j] == PH:
                    j += 1
                if j == len(row) or row[j] != end:
                    found = "the end of the input" if j == len(row) else f"token {row[j]}"
                    raise InputError(f"row {b}: the {KINDS[kind]} span opened at position {i} must be placeholders "
                                     f"closed by {end}, but {found} follows at position {j}")
                out.append((b, i + 1, j - i - 1, kind))
                i = j + 1
            elif row[i] == PH:
                raise InputError(f"row {b}: media placeholder at position {i} is outside any media span")
            elif row[i] in ends:
                raise InputError(f"row {b}: {KINDS[ends[row[i]]]} span end token at position {i} has no start")
            else:
                i += 1
    return out


def random_stream(rng: random.Random, rows: int, length: int, corrupt: bool) -> torch.Tensor:
    ids = []
    for _ in range(rows):
        row = []
        while len(row) < length:
            if rng.random() < 0.3:
                start, end = WRAPPERS[rng.randrange(2)]
                row += [start] + [PH] * rng.randrange(4) + [end]
            else:
                row.append(rng.randrange(10, 20))
        ids.append(row[:length])  # a cut span is malformed too
    ids = torch.tensor(ids)
    if corrupt:
        ids[rng.randrange(rows), rng.randrange(length)] = rng.choice([PH, 6, 7, 8, 9, 15])
    return ids


@pytest.mark.parametrize("seed", range(200))
def test_wrapped_spans_match_the_token_by_token_reading(seed):
    rng = random.Random(seed)
    ids = random_stream(rng, rng.randint(1, 3), rng.randint(1, 24), corrupt=seed % 2 == 1)
    try:
        expected = reference_spans(ids)
    except InputError as e:
        with pytest.raises(InputError, match=f"^{re.escape(str(e))}$"):
            fusion.wrapped_spans(ids, PH, WRAPPERS, KINDS)
        return
    spans = fusion.wrapped_spans(ids, PH, WRAPPERS, KINDS)
    got = list(zip(spans.rows.tolist(), spans.starts.tolist(), spans.lengths.tolist(), spans.kinds.tolist()))
    assert got == expected


@pytest.mark.parametrize("seed", range(50))
def test_runs_and_their_index_cover_exactly_the_placeholders(seed):
    g = torch.Generator().manual_seed(seed)
    held = torch.rand(3, 17, generator=g) < 0.5
    spans = fusion.runs(held)
    rows, cols = spans.index()
    covered = torch.zeros_like(held)
    covered[rows, cols] = True
    assert torch.equal(covered, held)
    n_runs = sum(v and (i == 0 or not row[i - 1]) for row in held.tolist() for i, v in enumerate(row))
    assert (spans.lengths > 0).all() and len(spans) == n_runs
    x = torch.randn(3, 17, 5, generator=g)
    media = torch.randn(int(held.sum()), 5, generator=g)
    assert torch.equal(fusion.scatter(x, spans, media), x.masked_scatter(held[..., None], media))


def test_count_errors_name_both_numbers():
    spans = fusion.runs(torch.tensor([[0, 1, 1, 0, 1]], dtype=torch.bool))
    with pytest.raises(InputError, match="^input_ids hold 3 image placeholder tokens but pixel_values gives 4 image "
                                         "embeddings$"):
        fusion.check_total(spans, 4, "image placeholder tokens", "pixel_values gives 4 image embeddings")
    with pytest.raises(InputError, match="^input_ids hold 2 image spans but pixel_values holds 3 images$"):
        fusion.check_spans(spans, [2, 1, 1], "image", "pixel_values", "images")
    with pytest.raises(InputError, match=r"^image span 1 \(row 0, position 4\) holds 1 placeholder tokens but its "
                                         "image gives 2 embeddings$"):
        fusion.check_spans(spans, [2, 2], "image", "pixel_values", "images")
    fusion.check_spans(spans, [2, 1], "image", "pixel_values", "images")


def test_decode_steps_take_no_prefill_inputs():
    class Filled:
        length = 3

    assert not early.decoding(None, pixel_values=torch.zeros(1))
    assert early.decoding(Filled(), pixel_values=None)
    with pytest.raises(InputError, match=r"^\['pixel_values'\] belong to the first \(prefill\) call"):
        early.decoding(Filled(), pixel_values=torch.zeros(1), token_type_ids=None)
