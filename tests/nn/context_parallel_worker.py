"""Run by test_context_parallel.py under `torchrun --nproc_per_node W` (gloo, CPU), W = 2 or 4: python
context_parallel_worker.py OUT.

Ring attention: per case, every process builds the same model and inputs. A reference runs the whole
sequence in one process (sdpa); a copy with the same weights is switched to context parallel over all W
processes (ring attention on its sdpa backend). Both compute logits and the loss and run backward; the
copy's gradients are averaged over the processes, as DDP or FSDP would. Tiles of 16 tokens, so that tile
skipping and several tiles per block are exercised on short sequences.
With W = 4 also: FSDP2 over all 4 processes on a 2-D (data 2 x context 2) mesh, each data-parallel pair on
its half of the batch, against one process on the whole batch. With W = 2 also: PyTorch's context parallel
(FlexAttention, forward only on CPU) against one process. And greedy generation on a split model against
one process.

Writes the largest differences per case to OUT/w{W}-rank{r}.json.
"""

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import polymodal as pm
from polymodal.families.chameleon.model import Chameleon
from polymodal.families.chameleon.presets import chameleon_tiny
from polymodal.families.gemini.model import Gemini
from polymodal.families.gemini.presets import gemini_tiny
from polymodal.families.kosmos.model import Kosmos
from polymodal.families.kosmos.presets import kosmos_tiny
from polymodal.families.paligemma.model import PaliGemma
from polymodal.nn import ring_attention
from polymodal.nn.context_parallel import context_parallel
from polymodal.nn.transformer import Block, Decoder
from polymodal.families.paligemma.presets import paligemma_tiny
from polymodal.train.distributed import barrier, init_process, shutdown

B, S = 2, 100  # not a multiple of 2W chunks: the split pads


def left_padded() -> torch.Tensor:
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, :30] = 0  # row 1's image comes after its pads
    return mask


def gemini_case(**mask) -> tuple[Gemini, dict, torch.Tensor]:
    cfg = gemini_tiny()
    tokens, P = cfg.tokens, cfg.tokens_per_image
    ids = torch.randint(12, cfg.text.vocab_size, (B, S))
    for row, start in ((0, 5), (1, 60)):  # one image per row; row 1's in its second half
        ids[row, start], ids[row, start + 1:start + 1 + P], ids[row, start + 1 + P] = tokens.image[0], tokens.placeholder, tokens.image[1]
    real = mask.get("attention_mask", torch.ones(B, S)).bool()
    labels = ids.masked_fill(~real | ~real.roll(1, 1), -100)  # no target on a pad, nor one a pad would predict
    inputs = dict(input_ids=ids, pixel_values=torch.randn(B, 3, cfg.image_size, cfg.image_size), labels=labels, **mask)
    return Gemini(cfg), inputs, real


def paligemma_case() -> tuple[PaliGemma, dict, torch.Tensor]:
    cfg = paligemma_tiny()
    n = cfg.tokens_per_image
    ids = torch.randint(0, cfg.image_token_id, (B, S))
    ids[:, :n] = cfg.image_token_id
    ids[0, :n], ids[0, 20:20 + n] = torch.randint(0, cfg.image_token_id, (n,)), cfg.image_token_id  # row 0 left-padded
    pad = torch.ones(B, S, dtype=torch.long)
    pad[0, :20] = 0
    suffix = torch.zeros(B, S, dtype=torch.long)
    suffix[0, 60:], suffix[1, 45:] = 1, 1  # a prefix-LM block (image + prompt), then the causal answer
    labels = ids.masked_fill(suffix == 0, -100)
    inputs = dict(input_ids=ids, pixel_values=torch.randn(B, 3, 32, 32), attention_mask=pad, token_type_ids=suffix,
                  labels=labels)
    return PaliGemma(cfg), inputs, pad.bool()


def kosmos_case() -> tuple[Kosmos, dict, torch.Tensor]:
    cfg = kosmos_tiny()
    image = cfg.image_tokens()
    rows = [[1] + torch.randint(12, 512, (30,)).tolist() + image + torch.randint(12, 512, (S - 31 - len(image),)).tolist()
            for _ in range(B)]
    ids = torch.tensor(rows)
    return Kosmos(cfg), dict(input_ids=ids, pixel_values=torch.randn(B, 3, 32, 32), labels=ids), torch.ones(B, S).bool()


def chameleon_case() -> tuple[Chameleon, dict, torch.Tensor]:
    ids = torch.randint(12, 512, (B, S))  # text and image-code tokens, packed as two documents
    docs = torch.ones(B, S, dtype=torch.long)
    docs[:, 70:] = 2
    return Chameleon(chameleon_tiny()), dict(input_ids=ids, document_ids=docs, labels=ids), torch.ones(B, S).bool()


def alibi_blocks_case() -> tuple[Decoder, dict, torch.Tensor]:
    cfg = pm.DecoderConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=512,
                           positions="alibi")
    ids = torch.randint(0, 96, (B, S))
    blocks = torch.zeros(B, S, dtype=torch.long)
    blocks[0, 10:40], blocks[1, 30:46], blocks[1, 70:90] = 1, 1, 2  # bidirectional image blocks among causal text
    return Decoder(cfg), dict(input_ids=ids, block_ids=blocks, labels=ids), torch.ones(B, S).bool()


CASES = {
    "gemini causal, images": (lambda: gemini_case(), True),
    "gemini left padding": (lambda: gemini_case(attention_mask=left_padded()), False),
    "gemini packed documents": (lambda: gemini_case(document_ids=(torch.arange(S) >= 45).long().expand(B, S) + 1), True),
    "paligemma prefix-LM, left padding": (paligemma_case, True),
    "kosmos xPos, sub-LN": (kosmos_case, False),
    "chameleon qk-norm, packed documents": (chameleon_case, True),
    "decoder ALiBi, GQA, image blocks": (alibi_blocks_case, False),
}


def largest(diffs) -> float:
    return max((float(d) for d in diffs), default=0.0)


def grad_diffs(ref: torch.nn.Module, got: dict[str, torch.Tensor | None]) -> dict:
    names = [n for n, p in ref.named_parameters() if p.grad is not None]
    return {"grads_compared": len(names), "same_params_with_grads": sorted(names) == sorted(n for n, g in got.items() if g is not None),
            "max_grad": largest(ref.get_parameter(n).grad.abs().max() for n in names),
            "grad_diff": largest((ref.get_parameter(n).grad - got[n]).abs().max() for n in names)}


def ring_case(name: str, make, load_balance: bool, mesh) -> dict:
    torch.manual_seed(0)
    ref, inputs, real = make()
    ref.eval()  # no dropout; logits are returned beside the loss
    cp = context_parallel(copy.deepcopy(ref), mesh, load_balance=load_balance)
    want = ref(**inputs)
    want.loss.backward()
    out = cp(**inputs)
    out.loss.backward()
    world = mesh.size()
    got = {}
    for n, p in cp.named_parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world
        got[n] = p.grad
    return {"case": name, "load_balance": load_balance, "shape_ok": out.logits.shape == want.logits.shape,
            "logit_diff": (want.logits - out.logits).abs().amax(-1)[real].max().item(),
            "max_logit": want.logits.abs().max().item(), "loss_diff": abs(want.loss.item() - out.loss.item()),
            **grad_diffs(ref, got)}


def fsdp_2d_case() -> dict:
    """Data parallel 2 x context parallel 2, FSDP2 over all four processes (as torchtitan shards over dp x cp)."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
    torch.manual_seed(0)
    ref = Decoder(pm.DecoderConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                                   max_seq_len=512)).eval()
    rows = 2 * B
    ids = torch.randint(0, 96, (rows, S))
    labels = ids.clone()
    labels[:, :S // 3] = -100  # rows of one data-parallel half hold different numbers of targets
    labels[0, :] = -100
    labels[0, -5:] = ids[0, -5:]
    cp = context_parallel(copy.deepcopy(ref), mesh["cp"])
    for block in cp.modules():
        if isinstance(block, Block):
            fully_shard(block)
    fully_shard(cp)
    want = ref(input_ids=ids, labels=labels)
    want.loss.backward()
    half = slice(mesh.get_local_rank("dp") * B, mesh.get_local_rank("dp") * B + B)
    out = cp(input_ids=ids[half], labels=labels[half])
    n_half, n_all = int((labels[half, 1:] != -100).sum()), int((labels[:, 1:] != -100).sum())
    # FSDP averages over 4 processes; each context-parallel pair holds the same loss twice: 2 x its share of the mean
    (out.loss * 2 * n_half / n_all).backward()
    loss = out.loss.detach() * n_half / n_all
    dist.all_reduce(loss)
    got = {n: p.grad.full_tensor() if p.grad is not None else None for n, p in cp.named_parameters()}
    return {"case": "fsdp2 2-D mesh (dp 2 x cp 2)", "load_balance": True, "shape_ok": True,
            "logit_diff": (want.logits[half] - out.logits).abs().max().item(), "max_logit": want.logits.abs().max().item(),
            "loss_diff": abs(want.loss.item() - loss.item() / 2), **grad_diffs(ref, got)}


def flex_case(mesh) -> dict:
    """PyTorch's context parallel (FlexAttention): forward only on CPU."""
    torch.manual_seed(0)
    cfg = gemini_tiny()
    ref = Gemini(cfg).eval()
    cp = context_parallel(Gemini(cfg, backend="flex").eval(), mesh)
    cp.load_state_dict(ref.state_dict())
    _, inputs, real = gemini_case(attention_mask=left_padded(), document_ids=(torch.arange(S) >= 45).long().expand(B, S) + 1)
    inputs.pop("labels")
    with torch.no_grad():
        want, got = ref(**inputs).logits, cp(**inputs).logits
    return {"case": "pytorch context parallel (flex), padding + packed documents", "load_balance": True,
            "shape_ok": got.shape == want.shape, "logit_diff": (want - got).abs().amax(-1)[real].max().item(),
            "max_logit": want.abs().max().item()}


def generate_case(mesh) -> dict:
    """Generation on a context-parallel model: each process runs the whole sequence with its KV cache."""
    torch.manual_seed(0)
    ref, inputs, _ = alibi_blocks_case()
    cp = context_parallel(copy.deepcopy(ref.eval()), mesh)
    prompt = inputs["input_ids"][:, :20]
    return {"tokens": pm.generate(cp, prompt, max_new_tokens=6).tolist(),
            "expected": pm.generate(ref, prompt, max_new_tokens=6).tolist()}


def run_cases(world: int) -> list[dict]:
    mesh = init_device_mesh("cpu", (world,))
    ring_attention.TILE = 16
    results = [ring_case(name, make, balance, mesh) for name, (make, balance) in CASES.items()]
    results.append(fsdp_2d_case() if world == 4 else flex_case(mesh))
    results.append(generate_case(mesh))
    return results


def main(out: Path) -> None:
    torch.set_num_threads(1)
    proc = init_process("cpu")
    results = run_cases(proc.world_size)  # the meshes and the models are gone once it returns
    (out / f"w{proc.world_size}-rank{proc.rank}.json").write_text(json.dumps(results, indent=1))
    barrier()  # no process leaves the group while another is still in a collective
    shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
