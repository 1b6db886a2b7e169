"""A multi-turn conversation trains on its assistant turns only, in every family whose layout holds one:
labels are the input ids exactly on each answer and the separator or <eos> that ends it, -100 everywhere
else (the image, the system prompt, every user turn); PaliGemma's prefix-LM layout refuses it by name."""

import pytest

import polymodal as pm
from polymodal.families.collators import fit_to_tokenizer, make_collator
from polymodal.data.conversations import conversation_document
from polymodal.data.formats import IGNORE, SEPARATOR
from polymodal.data.synthetic import World
from polymodal.data.tokenizer import Tokenizer
from polymodal.errors import DocumentError

WORLD = World(seed=0)
TOK = Tokenizer.train(WORLD.texts(), vocab_size=400)
ANSWERS = ("a red circle", "yes, just one")


def conversation(image: bool, system: bool = True):
    record = {"messages": [{"role": "system", "content": "you see shapes"}] * system + [
                           {"role": "user", "content": ("<image>" if image else "") + "what is it?"},
                           {"role": "assistant", "content": ANSWERS[0]},
                           {"role": "user", "content": "only one?"},
                           {"role": "assistant", "content": ANSWERS[1]}],
              "images": [WORLD.draw("red", "circle")] if image else []}
    return conversation_document(record, lambda kind, value, where: (value, None))


def answer_positions(ids: list[int]) -> set[int]:
    """Where each answer's tokens lie in the row, with the one token that ends it (separator, or <eos> last)."""
    positions = set()
    for n, answer in enumerate(ANSWERS):
        span = TOK.encode(answer, split_special_tokens=True)
        ends = TOK.encode(SEPARATOR) if n < len(ANSWERS) - 1 else [TOK.eos_id]
        starts = [i for i in range(len(ids)) if ids[i:i + len(span) + len(ends)] == span + ends]
        assert len(starts) == 1, (answer, starts)
        positions |= set(range(starts[0], starts[0] + len(span) + len(ends)))
    return positions


@pytest.mark.parametrize("preset, image", [("llama-tiny", False), ("gemini-tiny", True), ("kosmos-tiny", True),
                                          ("chameleon-tiny", True), ("flamingo-tiny", True)])
def test_labels_are_the_assistant_turns_exactly(preset, image):
    config = fit_to_tokenizer(pm.PRESETS[preset](), TOK)
    batch = make_collator(config, TOK)([conversation(image)])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    on = answer_positions(ids)
    assert [i for i, label in enumerate(labels) if label != IGNORE] == sorted(on)
    assert all(labels[i] == ids[i] for i in on)
    prompt = TOK.decode([t for i, t in enumerate(ids) if i not in on], skip_special_tokens=True)
    assert all(turn in prompt for turn in ("you see shapes", "what is it?", "only one?"))
    assert not any(answer in prompt for answer in ANSWERS)
    assert pm.build(config)(**batch).loss.isfinite()  # the model trains on it


def test_paligemma_refuses_a_second_user_turn_by_name():
    config = fit_to_tokenizer(pm.PRESETS["paligemma-tiny"](), TOK)
    with pytest.raises(DocumentError, match="prompt text after target text \\(a user turn after an answer\\); "
                                            "PaliGemma's prefix-LM layout holds one prompt"):
        make_collator(config, TOK)([conversation(image=True, system=False)])  # the image first, as it must be
