"""The text-only decoder LMs (Llama, Gemma). Their config (`config.DecoderConfig`) and model (`nn.transformer.Decoder`)
are the shared ones every family nests; this folder holds what is theirs alone: the document format, the HF
conversion and the presets."""
