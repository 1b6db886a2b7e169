"""The CLIP / SigLIP dual encoders: config, model, image-caption pair format and collator, HF conversion, presets."""
