"""`polymodal serve --dtype` and `polymodal generate --dtype`: a checkpoint served in bfloat16 holds its weights
and its KV cache in half the float32 bytes and answers text and images; `--dtype auto` keeps a float32
checkpoint's dtype, answering exactly what float32 answers."""

import re
import subprocess
import sys

import pytest
from conftest import ENV, WORLD, Live, image_message


def kv_mib(log: list[str]) -> float:
    line = next(line for line in log if line.startswith("serving "))
    return float(re.search(r"KV cache ([\d,.]+) MiB", line)[1].replace(",", ""))


def test_a_bfloat16_server_holds_half_the_kv_bytes_and_answers(live, checkpoint):
    half = Live(checkpoint, "--slots", 8, "--dtype", "bfloat16")
    try:
        assert half.health()["dtype"] == "bfloat16" and live.health()["dtype"] == "float32"
        assert "bfloat16 weights" in "".join(half.log) and kv_mib(half.log) == pytest.approx(kv_mib(live.log) / 2, abs=0.1)
        messages = image_message(WORLD.draw("red", "circle"), "what colour is the shape?")
        answer = half.client.chat.completions.create(model="gemini-tiny", messages=messages, temperature=0,
                                                     max_tokens=6)
        assert answer.choices[0].message.content and answer.usage.completion_tokens <= 6
        streamed = half.client.completions.create(model="gemini-tiny", prompt="a red", max_tokens=5, stream=True)
        assert "".join(c.choices[0].text for c in streamed if c.choices)
    finally:
        half.stop()


def test_generate_with_dtype_auto_keeps_a_float32_checkpoint(checkpoint):
    def generate(*flags) -> str:
        return subprocess.run([sys.executable, "-m", "polymodal.cli", "generate", str(checkpoint), "--prompt",
                               "what is the shape?", "--max-new-tokens", "6", *flags], capture_output=True, text=True,
                              env=ENV, timeout=300, check=True).stdout
    assert generate("--dtype", "auto") == generate() != ""
    assert generate("--dtype", "bfloat16").strip()
