"""The README's picture of the chat page: headless Chromium (Selenium) opens a running `polymodal serve`, clicks
the world's `position` example, asks a follow-up question about the same image, and saves a screenshot.

    polymodal serve runs/paligemma-world &
    python docs/chat_screenshot.py http://127.0.0.1:8000 docs/serve-chat.png
"""

import argparse
import shutil

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def ask(driver, question: str | None = None) -> str:
    if question:
        driver.find_element(By.ID, "question").send_keys(question)
    turns = len(driver.find_elements(By.CSS_SELECTOR, ".turn"))
    driver.find_element(By.ID, "send").click()
    done = f".turn:nth-child({turns + 1}) [data-done=true]"
    return WebDriverWait(driver, 60).until(lambda d: d.find_element(By.CSS_SELECTOR, done)).text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("out")
    parser.add_argument("--task", default="position", help="the example to click")
    parser.add_argument("--then", default="what colour is the shape?", help="the follow-up question")
    args = parser.parse_args()
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=860,1000", "--hide-scrollbars"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options,
                              service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")))
    try:
        driver.get(args.url)
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#examples .example"))
        driver.find_element(By.CSS_SELECTOR, f".example[data-task={args.task}]").click()
        print("answer:", ask(driver))
        print("follow-up:", ask(driver, args.then))
        driver.save_screenshot(args.out)
        print(f"wrote {args.out}")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
