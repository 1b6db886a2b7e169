"""The README's main job as a user runs it: `polymodal train` with every default (paligemma-world on the
built-in world's five image tasks), then `polymodal eval` on the checkpoint it picks (the best by held-out
validation accuracy), scored on the compositionally held-out test questions (each shape in a cell its object
never occupies in training). Every task must clear the README's floor and beat its better blind baseline (the
most frequent training answer, the same model given blank images, or chance) by MARGIN.

Slow by design: the whole default recipe (2,500 steps and 25 evals, about 2.5 minutes of CPU time on one
thread); it is the test that the README's headline table stands on."""

import os
import subprocess
import sys

MARGIN = 0.30
# the lowest of three seeds' figures in the README's table, less 5 points of sampling noise (200 questions)
FLOORS = {"caption": 0.80, "colour": 0.95, "shape": 0.85, "count": 0.90, "position": 0.55}


def polymodal(*args, cwd):
    out = subprocess.run([sys.executable, "-m", "polymodal.cli", *map(str, args)], capture_output=True, text=True,
                         cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=1500)
    assert out.returncode == 0, f"polymodal {' '.join(map(str, args))} failed:\n{out.stdout}\n{out.stderr}"
    return out


def test_the_main_job_generalises_as_the_readme_says(tmp_path):
    polymodal("train", cwd=tmp_path)
    out = polymodal("eval", cwd=tmp_path)
    assert "the best checkpoint by accuracy" in out.stderr
    print(f"\n{out.stdout}")
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[2:]}
    assert sorted(rows) == sorted(FLOORS)
    for task, (_, n, accuracy, blanked, majority, chance) in rows.items():
        accuracy, blind = float(accuracy[:-1]) / 100, max(float(x[:-1]) / 100 for x in (blanked, majority, chance))
        assert n == "200" and accuracy >= FLOORS[task] and accuracy >= blind + MARGIN, (task, rows[task])
