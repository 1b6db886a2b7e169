"""The chat page at `/` in real headless Chromium (the distribution's package, driven by Selenium), against two real
servers: a PaliGemma run trained on the world from the CLI (single-turn, needs an image, examples per trained
task) and a random gemini-tiny whose answers never end early (it converses, reads images and audio). What is
shown is checked: sizes of images, example buttons, answer texts equal to the server's answers to the same
messages through the `openai` client, where an error appears, what stop and new chat do, boxes drawn over an image.
"""

import base64
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ENV, WORLD, Live, call, image_message, png_url
from PIL import Image
from scripted_paligemma import INSIDE, SIDE, write_scripted_paligemma

import polymodal as pm
from polymodal.data.locations import format_object
from polymodal.data.tokenizer import Tokenizer
from polymodal.families.collators import fit_to_tokenizer
from polymodal.presets import get_preset
from polymodal.train.locations import WORLD_MASK_VAE

webdriver = pytest.importorskip("selenium.webdriver", reason="the page is driven by selenium")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--window-size=900,760")
TASKS = ("colour", "count", "position")  # the world run's tasks
RECORD = """window.sent = []; const real = window.fetch;
window.fetch = (url, options) => { if (options && options.body) window.sent.push(JSON.parse(options.body));
                                   return real(url, options); };"""  # what the page sends, still sent for real


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None or DRIVER is None:
        pytest.fail("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """`polymodal train` of the main job's model on three world tasks, two steps: a real run directory."""
    out = tmp_path_factory.mktemp("chat-world")
    subprocess.run([sys.executable, "-m", "polymodal.cli", "train", "--out-dir", str(out), "--name", "world",
                    "--tasks", *TASKS, "--max-steps", "2", "--batch-size", "4", "--eval-every", "1000",
                    "--checkpoint-every", "2"], env=ENV, check=True, capture_output=True)
    server = Live(out / "world")
    server.run = out / "world"
    yield server
    server.stop()


@pytest.fixture(scope="module")
def chatty(tmp_path_factory):
    """gemini-tiny with random weights whose output row for <eos> is zero: greedy answers run to max_tokens."""
    directory = tmp_path_factory.mktemp("chat-gemini") / "chatty"
    torch.manual_seed(0)
    tokenizer = Tokenizer.train(WORLD.texts(), vocab_size=320)
    reader = get_preset("gemini-tiny")
    model = pm.build(fit_to_tokenizer(reader.replace(vq=None, tokens=reader.tokens.replace(draw=None)), tokenizer))
    with torch.no_grad():
        model.decoder.output.weight[tokenizer.eos_id] = 0
    pm.save_pretrained(model, directory)
    tokenizer.save(directory)
    server = Live(directory)
    yield server
    server.stop()


def open_page(browser, server, model: str):
    browser.get(server.url + "/")
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "model").text == model)
    browser.execute_script(RECORD)


def set_field(browser, name: str, value) -> None:
    field = browser.find_element(By.ID, name)
    field.clear()
    field.send_keys(str(value))


def ask(browser, question: str | None = None, image=None, wait: bool = True):
    """Type (and attach), send, and return the turn's answer (or error) element once it is done."""
    if image is not None:
        browser.find_element(By.ID, "file").send_keys(str(image))
    if question is not None:
        browser.find_element(By.ID, "question").send_keys(question)
    before = len(browser.find_elements(By.CSS_SELECTOR, ".turn"))
    browser.find_element(By.ID, "send").click()
    turn = f".turn:nth-child({before + 1})"
    if not wait:
        return WebDriverWait(browser, 30).until(lambda b: b.find_element(By.CSS_SELECTOR, f"{turn} .msg.assistant"))
    return WebDriverWait(browser, 60).until(lambda b: b.find_element(By.CSS_SELECTOR, f"{turn} [data-done=true]"))


def answer(server, messages, **sampling) -> str:
    model = server.client.models.list().data[0].id
    return server.client.chat.completions.create(model=model, messages=messages, **sampling).choices[0].message.content


def rect(browser, element) -> dict:
    return browser.execute_script("const r = arguments[0].getBoundingClientRect(); "
                                  "return {x: r.x, y: r.y, w: r.width, h: r.height, bottom: r.bottom};", element)


def test_examples_are_one_held_out_question_per_trained_task_or_a_fallback(world, chatty):
    status, info = call(world.url + "/v1/examples")
    assert status == 200
    assert (info["single_turn"], info["needs_image"], info["reads"]) == (True, True, ["image"])
    assert [e["task"] for e in info["examples"]] == list(TASKS)
    for example in info["examples"]:
        held_out = WORLD.sample(example["task"], 0, "eval")
        image, question = example["content"]
        sent = Image.open(io.BytesIO(base64.b64decode(image["image_url"]["url"].split(",")[1])))
        assert np.array_equal(np.asarray(sent), np.asarray(held_out.document.images[0]))
        assert question == {"type": "text", "text": held_out.document.segments[1].text}
        assert example["answer"] == held_out.answer

    status, info = call(chatty.url + "/v1/examples")  # no trainer.json: not a world run
    assert (info["single_turn"], info["needs_image"], info["reads"]) == (False, False, ["image", "audio"])
    kinds = [[p["type"] for p in e["content"]] for e in info["examples"]]
    assert ["image_url", "text"] in kinds and ["input_audio", "text"] in kinds
    assert all(e["answer"] is None for e in info["examples"])  # the world's answers are not this model's


def test_a_run_whose_training_record_is_damaged_still_offers_examples(world, tmp_path):
    run = tmp_path / "damaged"
    shutil.copytree(world.run, run)
    records = list(run.rglob("trainer.json"))
    assert records
    for record in records:
        record.write_text("{not json")
    server = Live(run)
    try:
        status, info = call(server.url + "/v1/examples")
    finally:
        server.stop()
    assert status == 200
    assert (info["single_turn"], info["needs_image"]) == (True, True)  # from the family spec, not the record
    assert info["examples"] and all(e["answer"] is None for e in info["examples"])  # the fallback's
    assert info["left_out"][0]["task"] is None and "cannot be read" in info["left_out"][0]["why"]


def test_a_dual_encoder_offers_no_chat(dual):
    status, info = call(dual.url + "/v1/examples")
    assert status == 200 and (info["chat"], info["examples"]) == (False, [])
    assert "/v1/embeddings" in info["source"]


def test_an_example_click_asks_it_shows_the_image_large_and_a_single_turn_model_is_asked_afresh(world, browser):
    open_page(browser, world, "world")
    buttons = browser.find_elements(By.CSS_SELECTOR, "#examples .example")
    assert [b.get_attribute("data-task") for b in buttons] == list(TASKS)
    assert "one question at a time" in browser.find_element(By.ID, "note").text
    buttons[TASKS.index("position")].click()
    held_out = WORLD.sample("position", 0, "eval").document
    question = held_out.segments[1].text
    assert browser.find_element(By.ID, "question").get_attribute("value") == question
    assert browser.find_element(By.CSS_SELECTOR, "#preview img").get_attribute("src").startswith("data:image/png")
    set_field(browser, "max-tokens", 6)
    first = ask(browser)
    assert first.text.strip() == answer(world, image_message(held_out.images[0], question), temperature=0,
                                        max_tokens=6).strip()
    shown = browser.find_element(By.CSS_SELECTOR, ".turn:nth-child(1) .user img.media")
    size = rect(browser, shown)
    assert shown.get_property("naturalWidth") == 32 and size["w"] >= 192 and size["h"] >= 192
    assert shown.value_of_css_property("image-rendering") == "pixelated"

    follow_up = ask(browser, "how many shapes?")  # no image attached: asked alone, with the last image
    sent = browser.execute_script("return window.sent")[-1]["messages"]
    assert len(sent) == 1 and [p["type"] for p in sent[0]["content"]] == ["image_url", "text"]
    assert sent[0]["content"][0] == browser.execute_script("return window.sent")[0]["messages"][0]["content"][0]
    assert follow_up.text.strip() == answer(world, image_message(held_out.images[0], "how many shapes?"),
                                            temperature=0, max_tokens=6).strip()
    assert "asked fresh" in browser.find_element(By.CSS_SELECTOR, ".turn:nth-child(2) .user").text

    browser.find_element(By.CSS_SELECTOR, ".example[data-task=colour]").click()  # a second image: a new question
    ask(browser)
    sent = browser.execute_script("return window.sent")[-1]["messages"]
    colour = call(world.url + "/v1/examples")[1]["examples"][TASKS.index("colour")]
    assert sent == [{"role": "user", "content": colour["content"]}]
    assert "this image alone" in browser.find_element(By.CSS_SELECTOR, ".turn:nth-child(3) .user").text


def test_errors_show_in_plain_words_beside_the_message_that_caused_them(world, browser, tmp_path):
    open_page(browser, world, "world")
    error = ask(browser, "what colour is it?")  # PaliGemma needs an image and none was given: refused by the page
    assert "needs an image" in error.text and browser.execute_script("return window.sent") == []
    (tmp_path / "notes.png").write_bytes(b"hello, not a picture")
    for _ in range(3):  # a longer log: the error comes further down
        browser.find_element(By.CSS_SELECTOR, ".example[data-task=count]").click()
        ask(browser)
    error = ask(browser, "what is this?", image=tmp_path / "notes.png")
    assert "is not a decodable image" in error.text
    assert "object at 0x" not in error.text and "messages[" not in error.text
    user = browser.find_element(By.CSS_SELECTOR, ".turn:last-child .msg.user")
    assert "failed" in user.get_attribute("class")
    mine, err = rect(browser, user), rect(browser, error)
    assert 0 <= err["y"] - mine["bottom"] <= 24  # right below the message that caused it
    log, form = rect(browser, browser.find_element(By.ID, "log")), rect(browser, browser.find_element(By.ID, "form"))
    assert log["y"] <= err["y"] and err["bottom"] <= log["bottom"] <= form["y"]  # seen whole, not under the input bar


def test_a_conversation_its_seed_new_chat_and_stop(chatty, browser, tmp_path):
    open_page(browser, chatty, "chatty")
    assert browser.find_element(By.ID, "note").text == ""  # a model that converses
    image = WORLD.draw("red", "circle").resize((96, 96))
    image.save(tmp_path / "red.png")
    set_field(browser, "max-tokens", 8)
    first = ask(browser, "what colour is the shape?", image=tmp_path / "red.png")
    assert int(first.get_attribute("data-chunks")) > 1  # it arrived in pieces
    assert rect(browser, browser.find_element(By.CSS_SELECTOR, ".user img.media"))["w"] >= 192
    second = ask(browser, "and how many?")
    conversation = [*image_message(image, "what colour is the shape?"), {"role": "assistant", "content": first.text},
                    {"role": "user", "content": [{"type": "text", "text": "and how many?"}]}]
    assert first.text == answer(chatty, conversation[:1], temperature=0, max_tokens=8)
    assert second.text == answer(chatty, conversation, temperature=0, max_tokens=8)  # the whole conversation

    browser.find_element(By.ID, "new-chat").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".turn") == []
    set_field(browser, "temperature", 1)
    set_field(browser, "seed", 7)
    fresh = ask(browser, "and how many?")
    sent = browser.execute_script("return window.sent")[-1]
    assert len(sent["messages"]) == 1 and sent["seed"] == 7
    assert fresh.text == answer(chatty, conversation[2:], temperature=1, seed=7, max_tokens=8)

    set_field(browser, "max-tokens", 400)
    streaming = ask(browser, "tell me everything", wait=False)
    WebDriverWait(browser, 60).until(lambda b: int(streaming.get_attribute("data-chunks")) >= 2)
    browser.find_element(By.ID, "stop").click()
    WebDriverWait(browser, 10).until(lambda b: streaming.get_attribute("data-done") == "true")
    assert streaming.get_attribute("data-stopped") == "true" and "stopped" in streaming.text
    assert int(streaming.get_attribute("data-chunks")) < 400
    WebDriverWait(browser, 10).until(lambda b: chatty.health()["running"] == 0)  # the server let it go
    assert browser.find_element(By.ID, "send").is_enabled() and not browser.find_element(By.ID, "stop").is_enabled()


def mask_url(size: int, box) -> str:
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, tuple(box))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_drawn_images_are_large_and_locations_are_drawn_over_the_image(world, browser):
    """The page's own chunk handler given an answer's chunks: a drawn image, then the last chunk with locations
    (the server's contract: boxes in the pixels of the request's image, masks as PNGs of its size)."""
    open_page(browser, world, "world")
    image = WORLD.sample("position", 0, "eval").document.images[0]
    locations = [{"label": "blue square", "box": [17.0, 17.0, 30.0, 30.0], "mask": mask_url(32, (17, 17, 30, 30))},
                 {"label": "red circle", "box": [2.0, 4.0, 12.0, 14.0], "mask": None}]
    browser.execute_script("""
        const turn = {element: document.createElement("div"), text: "", image: arguments[0]};
        turn.element.className = "turn"; document.getElementById("turns").appendChild(turn.element);
        turn.answer = turn.element.appendChild(document.createElement("div")); turn.answer.className = "msg assistant";
        handleChunk({choices: [{index: 0, delta: {content: "blue square"}, finish_reason: null}]}, turn);
        handleChunk({choices: [{index: 0, delta: {content: [{type: "image_url", image_url: {url: arguments[2]}}]},
                                finish_reason: null}]}, turn);
        handleChunk({choices: [{index: 0, delta: {locations: arguments[1]}, finish_reason: "stop"}]}, turn);""",
                           png_url(image), locations, png_url(WORLD.draw("green", "triangle")))
    overlay = WebDriverWait(browser, 10).until(lambda b: b.find_element(By.CSS_SELECTOR, ".overlay[data-drawn='2']"))
    drawn, shown = browser.find_elements(By.CSS_SELECTOR, ".assistant img.media")  # a drawn image, then the located
    assert rect(browser, drawn)["w"] >= 192 and drawn.value_of_css_property("image-rendering") == "pixelated"
    shown = rect(browser, shown)
    scale = shown["w"] / 32
    assert scale >= 6
    boxes = overlay.find_elements(By.CSS_SELECTOR, ".box")
    assert [b.text for b in boxes] == ["blue square", "red circle"]
    for element, location in zip(boxes, locations):
        x0, y0, x1, y1 = location["box"]
        got = rect(browser, element)
        assert got["x"] == pytest.approx(shown["x"] + x0 * scale, abs=1.5)
        assert got["y"] == pytest.approx(shown["y"] + y0 * scale, abs=1.5)
        assert got["w"] == pytest.approx((x1 - x0) * scale, abs=1.5)
    canvas = WebDriverWait(browser, 10).until(lambda b: b.find_element(By.CSS_SELECTOR, "canvas.mask[data-drawn]"))
    assert rect(browser, canvas)["w"] == pytest.approx(shown["w"], abs=1)
    alpha = browser.execute_script("const c = arguments[0].getContext('2d'); "
                                   "return [c.getImageData(20, 20, 1, 1).data[3], c.getImageData(5, 25, 1, 1).data[3]];",
                                   canvas)
    assert alpha[0] > 0 == alpha[1]  # tinted inside the mask only
    assert json.loads(browser.execute_script("return JSON.stringify(window.sent)")) == []  # drawn, nothing asked


@pytest.fixture(scope="module")
def locating(tmp_path_factory):
    """A PaliGemma whose greedy answer is one object, a box and a mask (tests/scripted_paligemma.py), decoded by the
    mask VQ-VAE it holds to the left half of the box (the codes of the grid's left two columns paint inside): a
    server whose answers carry `locations`, a mask a strict part of its box."""
    directory = tmp_path_factory.mktemp("chat-locating") / "locating"
    codes = [i if i % 4 < 2 else INSIDE + i for i in range(16)]  # row-major over the 4x4 grid
    write_scripted_paligemma(directory, format_object((4, 6, 21, 27), SIDE, "red circle", codes), WORLD_MASK_VAE)
    server = Live(directory)
    yield server
    server.stop()


def test_the_places_of_a_real_answer_are_drawn_over_its_image(locating, browser, tmp_path):
    """Through the page's own request and stream: the box of the server's answer outlines its pixels of the image
    shown, labelled, and its mask tints the image inside the mask only."""
    image = WORLD.draw("red", "circle")
    image.save(tmp_path / "scene.png")
    reply = locating.client.chat.completions.create(model="locating", messages=image_message(image, "segment it"),
                                                   temperature=0, max_tokens=40).choices[0].message
    [place] = reply.model_extra["locations"]
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(place["mask"].split(",")[1])))) == 255
    x0, y0, x1, y1 = place["box"]
    in_box = np.zeros_like(mask)
    in_box[int(y0):int(y1), int(x0):int(x1)] = True
    half = in_box.copy()
    half[:, (int(x0) + int(x1)) // 2 + 1:] = False
    assert mask.any() and not mask[~half].any() and (in_box & ~mask).any()  # in the box's left half, not all of it

    open_page(browser, locating, "locating")
    set_field(browser, "max-tokens", 40)
    done = ask(browser, "segment it", image=tmp_path / "scene.png")
    assert done.text.splitlines()[0] == reply.content  # (the box's label follows it, over the image)
    overlay = WebDriverWait(browser, 10).until(lambda b: b.find_element(By.CSS_SELECTOR, ".overlay[data-drawn='1']"))
    shown = rect(browser, browser.find_element(By.CSS_SELECTOR, ".turn:last-child .assistant img.media"))
    scale = shown["w"] / SIDE
    assert scale >= 6
    [box] = overlay.find_elements(By.CSS_SELECTOR, ".box")
    assert box.text == "red circle"
    got = rect(browser, box)
    for edge, expected in (("x", shown["x"] + x0 * scale), ("y", shown["y"] + y0 * scale),
                           ("w", (x1 - x0) * scale), ("h", (y1 - y0) * scale)):
        assert got[edge] == pytest.approx(expected, abs=1.5), edge
    canvas = WebDriverWait(browser, 10).until(lambda b: b.find_element(By.CSS_SELECTOR, "canvas.mask[data-drawn]"))
    alpha = np.array(browser.execute_script(
        "const c = arguments[0]; return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);",
        canvas)).reshape(SIDE, SIDE, 4)[..., 3]
    assert (alpha[mask] > 0).all() and (alpha[in_box & ~mask] == 0).all() and (alpha[~in_box] == 0).all()
    assert json.loads(browser.execute_script("return JSON.stringify(window.sent)"))[0]["stream"] is True


def test_a_sound_example_is_sent_as_audio_and_answered(chatty, browser):
    open_page(browser, chatty, "chatty")
    examples = call(chatty.url + "/v1/examples")[1]["examples"]
    sound = next(e for e in examples if e["content"][0]["type"] == "input_audio")
    browser.find_element(By.CSS_SELECTOR, f".example[data-task={sound['task']}]").click()
    assert browser.find_element(By.ID, "preview").text.endswith(".wav")
    set_field(browser, "max-tokens", 6)
    shown = ask(browser)
    assert browser.execute_script("return window.sent")[0]["messages"] == [{"role": "user", "content": sound["content"]}]
    assert browser.find_element(By.CSS_SELECTOR, ".turn .user audio").get_attribute("src").startswith("data:audio/wav")
    assert shown.text == answer(chatty, [{"role": "user", "content": sound["content"]}], temperature=0, max_tokens=6)
