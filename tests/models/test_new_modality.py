"""A new modality is one encoder and one table entry: a 1-D sensor signal, with its own small encoder, added
to a Gemini built through `pm.build`, learns a task only the signal answers and generates with it (cached
greedy generation == the uncached forward's argmax), with the core's span finding and count checks."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import polymodal as pm
from polymodal.fusion.early import Modality
from polymodal.fusion.spans import Span

BOS, EOS, ASK, LOW, HIGH = 1, 2, 20, 30, 31
START, END = 12, 13  # the sensor span's tokens: ids the built-in tokenizer leaves unused
LENGTH, PATCH = 32, 8  # samples per signal, samples per token


class SensorEncoder(nn.Module):
    """(N, LENGTH) signals -> (N, LENGTH / PATCH, dim): strided 1-D convolution patches, projected."""

    def __init__(self, dim: int):
        super().__init__()
        self.patches = nn.Conv1d(1, 32, PATCH, stride=PATCH)
        self.proj = nn.Linear(32, dim)

    def forward(self, signals: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.patches(signals[:, None]).transpose(1, 2)))


def with_sensor(model):
    """The whole change: the encoder as a module of the model, and its row in the table."""
    model.sensor = SensorEncoder(model.config.text.dim)
    span = Span(model.config.tokens.placeholder, (START, END))
    model.modalities += (Modality("sensor", "sensor_values", "sensor", span, LENGTH // PATCH, plural="signals"),)
    return model


def batch(n: int, generator: torch.Generator):
    """Signals of 1 or 4 cycles per window (random phase, noise); the answer says which."""
    high = torch.rand(n, generator=generator) < 0.5
    t = torch.arange(LENGTH) / LENGTH
    phase = torch.rand(n, 1, generator=generator) * 2 * math.pi
    signals = torch.sin(2 * math.pi * torch.where(high, 4.0, 1.0)[:, None] * t + phase)
    signals = signals + 0.1 * torch.randn(n, LENGTH, generator=generator)
    prompt = torch.tensor([BOS, ASK, START] + [4] * (LENGTH // PATCH) + [END]).expand(n, -1)
    answer = torch.where(high, HIGH, LOW)[:, None]
    ids = torch.cat([prompt, answer, torch.full_like(answer, EOS)], 1)
    labels = torch.cat([torch.full_like(prompt, -100), answer, torch.full_like(answer, EOS)], 1)
    return ids, labels, signals, answer[:, 0]


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = with_sensor(pm.build("gemini-tiny"))
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(40):
        ids, labels, signals, _ = batch(16, g)
        loss = model(ids, sensor_values=signals, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model.eval(), losses


def test_the_sensor_is_one_encoder_and_one_table_row(trained):
    model, _ = trained
    assert {k.split(".")[0] for k in model.state_dict()} >= {"sensor", "decoder", "image_proj", "writer"}
    assert [m.key for m in model.modalities] == ["pixel_values", "input_features", "pixel_values_videos",
                                                 "sensor_values"]


def test_training_on_the_signal_lowers_the_loss_past_guessing(trained):
    _, losses = trained
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    # guessing the answer without the signal leaves ln(2)/2 per label (the answer, then a certain <eos>)
    assert last < first / 4 and last < math.log(2) / 2 * 0.5


def test_cached_generation_reads_the_signal_as_the_uncached_forward_does(trained):
    model, _ = trained
    ids, _, signals, answer = batch(8, torch.Generator().manual_seed(1))
    prompt = ids[:, :-2]
    got = pm.generate(model, prompt, sensor_values=signals, max_new_tokens=3)
    seq = prompt
    with torch.no_grad():
        for _ in range(3):
            seq = torch.cat([seq, model(seq, sensor_values=signals).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(got, seq[:, prompt.shape[1]:])
    assert (got[:, 0] == answer).float().mean() >= 0.75  # it reads the signal, not a prior


def test_a_signal_that_does_not_fit_its_span_is_named(trained):
    model, _ = trained
    ids, _, signals, _ = batch(1, torch.Generator().manual_seed(2))
    short = torch.cat([ids[:, :3], ids[:, 4:]], 1)  # one placeholder fewer
    with pytest.raises(pm.InputError, match=r"sensor span 0 \(row 0, position 3\) holds 3 placeholder tokens but "
                                            r"its sensor gives 4 embeddings"):
        model(short, sensor_values=signals)
    with pytest.raises(pm.InputError, match="input_ids hold 1 sensor spans but sensor_values holds 2 signals"):
        model(ids, sensor_values=signals.repeat(2, 1))
