"""HF `WhisperModel` / `WhisperForConditionalGeneration` checkpoints -> polymodal `AudioEncoder` (the encoder
only: the text decoder is not read).

Whisper's k projection has no bias (ours holds zeros there: a bias on k adds the same q.b to every score of
a query, which the softmax cancels). Sits below the families (tests/test_imports.py): the audio encoder's
spec and any family holding it read this map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polymodal.config import ConfigError
from polymodal.convert.rules import Family, Rule, linear_rules, norm_rules
from polymodal.encoders.audio import AudioConfig, AudioEncoder


@dataclass(frozen=True)
class BiasWithoutKey(Rule):
    """ours = cat(q bias, zeros, v bias) <- theirs (q bias, v bias); `sizes` are (q, k, v) rows."""

    def gather(self, hf: dict[str, torch.Tensor]) -> torch.Tensor:
        self.check(hf)
        q, v = (hf[k] for k in self.theirs)
        return torch.cat((q, q.new_zeros(self.sizes[1]), v))

    def shape(self, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
        return (sum(self.sizes),)

    def split(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        q, _, v = tensor.split(list(self.sizes))
        return dict(zip(self.theirs, (q, v)))



def whisper_config_from_hf(hf: dict) -> AudioConfig:
    if hf.get("activation_function", "gelu") != "gelu":
        raise ConfigError(f"Whisper activation_function {hf['activation_function']!r} is not supported; supported: "
                          "['gelu']")
    return AudioConfig(n_mels=hf["num_mel_bins"], n_positions=hf["max_source_positions"], dim=hf["d_model"],
                       n_layers=hf["encoder_layers"], n_heads=hf["encoder_attention_heads"],
                       hidden_dim=hf["encoder_ffn_dim"])


def whisper_config_to_hf(cfg: AudioConfig) -> dict:
    raise ConfigError("an audio encoder alone cannot be written as an HF Whisper checkpoint, which needs its "
                      "text decoder too")


def whisper_rules(cfg: AudioConfig) -> list[Rule]:
    e, d = "encoder.", cfg.dim
    rules = [*linear_rules("conv1", [f"{e}conv1"], None, True), *linear_rules("conv2", [f"{e}conv2"], None, True),
             Rule("pos_embed", (f"{e}embed_positions.weight",)), *norm_rules("norm", f"{e}layer_norm")]
    for i in range(cfg.n_layers):
        o, h = f"layers.{i}.", f"{e}layers.{i}."
        rules += [Rule(f"{o}attn.wqkv.weight", tuple(f"{h}self_attn.{p}_proj.weight" for p in "qkv"), (d, d, d)),
                  BiasWithoutKey(f"{o}attn.wqkv.bias", (f"{h}self_attn.q_proj.bias", f"{h}self_attn.v_proj.bias"),
                                 (d, d, d))]
        rules += linear_rules(f"{o}attn.wo", [f"{h}self_attn.out_proj"], None, True)
        rules += linear_rules(f"{o}mlp.w_in", [f"{h}fc1"], None, True)
        rules += linear_rules(f"{o}mlp.w_out", [f"{h}fc2"], None, True)
        rules += norm_rules(f"{o}attn_norm", f"{h}self_attn_layer_norm")
        rules += norm_rules(f"{o}mlp_norm", f"{h}final_layer_norm")
    return rules


WHISPER = Family(
    config_from_hf=whisper_config_from_hf, build=AudioEncoder, rules=whisper_rules, config_to_hf=whisper_config_to_hf,
    aliases=(("model.encoder.", "encoder."), ("model.decoder.", "decoder.")),
    skip=("decoder.", "proj_out."),  # the text decoder: only the encoder is read
)
