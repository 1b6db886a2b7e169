"""Flamingo / HF Idefics: config, model, document format and collator, HF conversion, presets."""
