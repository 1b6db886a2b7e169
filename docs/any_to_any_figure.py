"""The README's any-to-any figure and counts from a trained gemini-tiny checkpoint (held-out examples only):

    python docs/any_to_any_figure.py runs/gemini-tiny/checkpoints/step-001000 docs/any-to-any.png

Prints the README block's three rows, then, over 100 held-out say_and_draw examples, how often the text names
the object, its colour, and how often the drawing shows the true object and the object the text names. Writes
a PNG: 8 held-out say_and_draw images (top), the drawings written after saying what they show (middle), the
drawings for 8 held-out text->image prompts (bottom), each 32x32 image shown at 96x96.
"""

import sys

from PIL import Image

import polymodal as pm
from polymodal.data.synthetic import World, recognise
from polymodal.data.tokenizer import Tokenizer
from polymodal.evaluate import written
from polymodal.families.collators import make_collator

SIDE, PAD, N = 96, 8, 8


def main(run: str, png: str) -> None:
    world = World(seed=0)
    model, tok = pm.from_pretrained(run), Tokenizer.from_file(run)
    collate = make_collator(model.config, tok)

    def answers(task: str, n: int):
        examples = [world.sample(task, i, "eval") for i in range(n)]
        return examples, written(model, collate, tok, [e.document for e in examples], 80)

    for task in ("say_and_draw", "audio_pitch", "text_to_image"):
        [example], [(text, image)] = answers(task, 1)
        print(f"{example.document.texts[0]!r} -> {text!r} + {int(image is not None)} image(s)")
    said, replies = answers("say_and_draw", 100)
    shown = [f"a {' '.join(recognise(image))}" if image is not None and recognise(image) else None
             for _, image in replies]
    print(f"say_and_draw, 100 held-out: names the object {sum(t == e.answer for (t, _), e in zip(replies, said))}, "
          f"its colour {sum(t.split()[1:2] == e.answer.split()[1:2] for (t, _), e in zip(replies, said))}; "
          f"the drawing shows the object {sum(s == e.answer for s, e in zip(shown, said))}, "
          f"what the text names {sum(s == t for s, (t, _) in zip(shown, replies))}")
    prompts, drawn = answers("text_to_image", N)
    blank = Image.new("RGB", (32, 32), (60, 60, 60))
    rows = [[e.document.images[0] for e in said[:N]], [image or blank for _, image in replies[:N]],
            [image or blank for _, image in drawn]]
    print("said:", [t for t, _ in replies[:N]], "\nprompts:", [e.document.texts[0] for e in prompts])
    canvas = Image.new("RGB", (N * (SIDE + PAD) + PAD, len(rows) * (SIDE + PAD) + PAD), (255, 255, 255))
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            canvas.paste(image.resize((SIDE, SIDE), Image.NEAREST), (PAD + j * (SIDE + PAD), PAD + i * (SIDE + PAD)))
    canvas.save(png)


if __name__ == "__main__":
    main(*sys.argv[1:3])
