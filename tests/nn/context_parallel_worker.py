"""Run by test_context_parallel.py under `torchrun --nproc_per_node 2` (gloo, CPU).

Every process builds the same models and inputs: a reference (sdpa, one process, whole sequence) and a
copy built with backend="flex" and switched to context parallel over a 2-process mesh (the Gemini model
load-balanced, the decoder in contiguous slices). Both are called on the whole sequence; the differences of their logits on real tokens go to OUT/rank{rank}.json.
"""

import json
import os
import sys
from pathlib import Path

# each process compiles its block mask in its own inductor cache: two sharing one race on its precompiled headers
os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(sys.argv[1], f"inductor-{os.environ.get('LOCAL_RANK', '0')}")
os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"  # compile in this process: no worker pool to tear down at exit

import torch
from torch.distributed.device_mesh import init_device_mesh

import polymodal as pm
from polymodal.models.gemini import Gemini, gemini_tiny
from polymodal.nn.context_parallel import context_parallel
from polymodal.nn.transformer import Decoder
from polymodal.train.distributed import barrier, init_process, shutdown

B, S = 2, 300  # pads to 512 = 2 processes x 128-token blocks x 2


def gemini_inputs() -> dict:
    cfg = gemini_tiny()
    tokens, P = cfg.tokens, cfg.tokens_per_image
    ids = torch.randint(12, cfg.text.vocab_size, (B, S))
    for row, start in ((0, 5), (1, 190)):  # one image per row; row 1's in its second half
        ids[row, start], ids[row, start + 1:start + 1 + P], ids[row, start + 1 + P] = tokens.image[0], tokens.placeholder, tokens.image[1]
    return dict(input_ids=ids, pixel_values=torch.randn(B, 3, cfg.image_size, cfg.image_size))


def compare(name: str, ref: torch.nn.Module, cp: torch.nn.Module, inputs: dict, real: torch.Tensor) -> dict:
    with torch.no_grad():
        want, got = ref(**inputs).logits, cp(**inputs).logits
    diff = (want - got).abs().amax(-1)[real]
    return {"case": name, "max_diff": diff.max().item(), "max_logit": want.abs().max().item(),
            "shape_ok": got.shape == want.shape}


def run_cases(world_size: int) -> list[dict]:
    mesh = init_device_mesh("cpu", (world_size,))
    torch.manual_seed(0)
    cfg = gemini_tiny()
    ref = Gemini(cfg).eval()
    cp = context_parallel(Gemini(cfg, backend="flex").eval(), mesh)
    cp.load_state_dict(ref.state_dict())
    inputs = gemini_inputs()
    pad = torch.ones(B, S, dtype=torch.long)
    pad[0, :40] = 0  # a left-padded row (its image comes later)
    docs = torch.ones(B, S, dtype=torch.long)
    docs[:, 150:] = 2  # two packed documents; the boundary is inside process 0's slice
    everything = torch.ones(B, S, dtype=torch.bool)
    results = [
        compare("gemini causal", ref, cp, inputs, everything),
        compare("gemini padding", ref, cp, {**inputs, "attention_mask": pad}, pad.bool()),
        compare("gemini packed", ref, cp, {**inputs, "document_ids": docs}, everything),
    ]
    text = pm.DecoderConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=512)
    ref_lm = Decoder(text).eval()
    cp_lm = context_parallel(Decoder(text, backend="flex").eval(), mesh, load_balance=False)
    cp_lm.load_state_dict(ref_lm.state_dict())
    blocks = torch.zeros(B, 256, dtype=torch.long)
    blocks[0, :100], blocks[1, 120:200] = 1, 1  # prefix-LM blocks, one across the processes' boundary
    ids = torch.randint(0, 96, (B, 256))
    results.append(compare("decoder prefix blocks, contiguous slices", ref_lm, cp_lm, dict(input_ids=ids, block_ids=blocks),
                           torch.ones(B, 256, dtype=torch.bool)))
    try:
        context_parallel(Decoder(text), mesh)
        wrong_backend = "no error"
    except ValueError as e:
        wrong_backend = str(e)
    results.append({"case": "sdpa backend", "error": wrong_backend})
    return results


def main(out: Path) -> None:
    torch.set_num_threads(1)
    proc = init_process("cpu")
    results = run_cases(proc.world_size)  # the mesh and the models are gone once it returns
    (out / f"rank{proc.rank}.json").write_text(json.dumps(results, indent=1))
    barrier()  # no process leaves the group while the other is still in a collective
    shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
