"""PaliGemma's presets (its config, model, format and HF conversion still live in fusion/, models/, data/, convert/)."""
