"""A chat whose image comes after more text than the batcher's first prefill chunk (256 tokens): the chunk ends
after the image's span, its end token included, so the server answers (not a 500 for a cut span) what
`pm.generate` answers alone."""

from conftest import WORLD, generate_alone, png_url

from polymodal.data.documents import Segment

EARLIER = "a" * 300  # more tokens than the server's prefill_chunk, before the image's span


def test_an_image_after_a_long_earlier_message_answers_as_pm_generate_alone(live, checkpoint, one_thread):
    image = WORLD.draw("red", "circle")
    response = live.client.chat.completions.with_raw_response.create(
        model="gemini-tiny", max_tokens=8, temperature=0,
        messages=[{"role": "user", "content": EARLIER},
                  {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url(image)}},
                                               {"type": "text", "text": "caption"}]}])
    assert response.status_code == 200
    answer = response.parse().choices[0].message.content
    assert answer == generate_alone(checkpoint, [Segment("text", EARLIER), Segment("image", media=image),
                                                 Segment("text", "caption")])
