"""The README's serving example as written: `polymodal serve runs/paligemma-world`, then its `curl` line run by
bash (the port changed to the test server's) on the image `polymodal export-data` wrote, answers what
`pm.generate` answers for that image and question. The model is a PaliGemma whose weights are set to answer
"bottom right" (tests/scripted_paligemma.py: no training). tests/test_readme_shell.py runs the README's other
commands."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ENV, Live, generate_alone
from scripted_paligemma import write_scripted_paligemma

from polymodal.cli import main
from polymodal.data.documents import Segment, load_media

README = Path(__file__).parents[2] / "README.md"
ANSWER = "bottom right"  # what the README says the trained model answers; a PaliGemma set by hand to answer it


def readme_curl() -> str:
    """The serving section's curl command, its continuation lines joined as bash reads them."""
    section = README.read_text().split("## Serving", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)[1]
    return block[block.index("curl "):].strip()


@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("base64") is None,
                    reason="the README's line runs curl and base64, which this machine lacks")
def test_the_readme_curl_line_answers_as_polymodal_generate(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = Path("runs/paligemma-world")  # the README's run directory, as a model directory: the model id is its name
    write_scripted_paligemma(run, ANSWER)
    assert main(["export-data", "examples.jsonl", "--n", "3", "--split", "eval", "--tasks", "position", "count"]) == 0
    capsys.readouterr()
    command = readme_curl()
    question = re.search(r'"text": "([^"]+)"', command)[1]
    server = Live(run.resolve())
    try:
        assert "localhost:8000" in command
        out = subprocess.run(["bash", "-c", command.replace("localhost:8000", f"127.0.0.1:{server.port}")],
                             capture_output=True, text=True, env=ENV, timeout=120, check=True)
    finally:
        server.stop()
    reply = json.loads(out.stdout)
    assert reply["model"] == "paligemma-world", reply
    image = load_media("examples_media/000000-0.png", "image")
    max_tokens = reply["usage"]["completion_tokens"]
    expected = generate_alone(run, [Segment("image", media=image), Segment("text", question)], max_tokens)
    assert reply["choices"][0]["message"]["content"] == expected.strip() == ANSWER, (reply, expected)
