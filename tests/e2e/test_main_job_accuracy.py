"""The main job's model learns what the README says, on a short CI budget: paligemma-world trained by the
real trainer on the built-in world's colour and shape questions, then scored by `polymodal.evaluate` on the
compositionally held-out split (each shape in a cell its object never occupies in training), must beat both
blind baselines (the most frequent training answer, and the same model given blank images) by MARGIN."""

import time

import polymodal as pm
from polymodal.data.tokenizer import Tokenizer
from polymodal.evaluate import evaluate, table
from polymodal.train.checkpoint import latest_checkpoint
from polymodal.train.trainer import WORLD, TrainConfig, train

TASKS = ("colour", "shape")
STEPS = 600
MARGIN = 0.3  # accuracy above the better blind baseline, for every task (measured: colour 98% vs 25%, shape 87% vs 33%)


def test_main_job_model_beats_its_blind_baselines(tmp_path, one_thread):
    start = time.perf_counter()
    run = train(TrainConfig(tasks=TASKS, max_steps=STEPS, out_dir=str(tmp_path), eval_every=STEPS, eval_docs=32,
                            log_every=STEPS, checkpoint_every=STEPS))
    trained = time.perf_counter() - start
    checkpoint = latest_checkpoint(run / "checkpoints")
    scores = evaluate(pm.from_pretrained(checkpoint), Tokenizer.from_file(checkpoint), TASKS, 100, WORLD)
    print(f"\n{STEPS} steps in {trained:.0f} s\n{table(scores)}")
    for s in scores:
        blind = max(s.majority, s.blanked, s.chance)
        assert s.accuracy >= blind + MARGIN, (s.task, s.accuracy, s.majority, s.blanked)
