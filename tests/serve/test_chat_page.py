"""The chat page at `/` in real headless Chromium (the distribution's package, driven by Selenium): pick an
image, ask, and the streamed answer on screen is the server's answer to the same message."""

import os
import shutil

import pytest
from conftest import WORLD, image_message

webdriver = pytest.importorskip("selenium.webdriver", reason="the page is driven by selenium")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--window-size=900,640")
SCREENSHOT = os.environ.get("POLYMODAL_SCREENSHOT")  # where to save the page (the README's picture)


@pytest.fixture
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


def test_an_image_and_a_question_stream_the_models_answer_on_screen(live, browser, tmp_path):
    image = WORLD.draw("red", "circle").resize((96, 96))
    image.save(tmp_path / "red.png")
    question = "what colour is the shape?"
    expected = live.client.chat.completions.create(model="gemini-tiny", messages=image_message(image, question),
                                                   temperature=0, max_tokens=40).choices[0].message.content

    browser.get(live.url + "/")
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "model").text == "gemini-tiny")
    browser.find_element(By.ID, "file").send_keys(str(tmp_path / "red.png"))
    browser.find_element(By.ID, "question").send_keys(question)
    assert browser.find_element(By.ID, "temperature").get_attribute("value") == "0"  # greedy, as above
    browser.find_element(By.ID, "max-tokens").clear()
    browser.find_element(By.ID, "max-tokens").send_keys("40")
    browser.find_element(By.ID, "send").click()
    answer = WebDriverWait(browser, 60).until(
        lambda b: b.find_element(By.CSS_SELECTOR, ".msg.assistant[data-done=true]"))
    assert answer.text.strip() == expected.strip() != ""
    assert int(answer.get_attribute("data-chunks")) > 1  # it arrived in pieces
    user = browser.find_element(By.CSS_SELECTOR, ".msg.user")
    assert question in user.text
    assert user.find_element(By.TAG_NAME, "img").get_attribute("src").startswith("data:image/")
    if SCREENSHOT:
        browser.save_screenshot(SCREENSHOT)
