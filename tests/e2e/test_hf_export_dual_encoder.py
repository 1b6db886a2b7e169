"""A SigLIP dual encoder exported by `polymodal convert --to hf` embeds as polymodal does through HF's own
`AutoProcessor` (padding="max_length", as HF's SigLIP docs say) and `AutoModel`: the exported tokenizer lays a
caption out as polymodal's collator does (`text <eos>`, right-padded to the text tower's length), so the text
embeddings are equal, not only the image ones."""

import pytest
import torch

import polymodal as pm
from polymodal.cli import main
from polymodal.data.documents import Document, Segment
from polymodal.data.synthetic import World
from polymodal.data.tokenizer import Tokenizer
from polymodal.families.collators import fit_to_tokenizer, make_collator
from polymodal.presets import get_preset

transformers = pytest.importorskip("transformers", reason="transformers reads the export")
WORLD = World(seed=0)
CAPTIONS = ["a blue square", "a red circle", "a green triangle"]


def test_hf_processor_and_model_embed_captions_and_images_as_polymodal(tmp_path, capsys):
    torch.manual_seed(0)
    tokenizer = Tokenizer.train(WORLD.texts(), vocab_size=320)
    ours = pm.build(fit_to_tokenizer(get_preset("siglip-tiny"), tokenizer)).eval()
    pm.save_pretrained(ours, tmp_path / "siglip")
    tokenizer.save(tmp_path / "siglip")
    assert main(["convert", "--to", "hf", str(tmp_path / "siglip"), str(tmp_path / "hf")]) == 0
    assert "its embeddings (texts padded to max_length) are polymodal's" in (tmp_path / "hf/README.md").read_text()
    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    hf = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()

    images = [WORLD.draw(*caption.split()[1:]) for caption in CAPTIONS]
    given = processor(text=CAPTIONS, images=images, padding="max_length", return_tensors="pt")
    batch = make_collator(ours.config, tokenizer)([Document([Segment("image", media=image), Segment("text", text)])
                                                  for image, text in zip(images, CAPTIONS)])
    assert torch.equal(given["input_ids"], batch["input_ids"])
    with torch.no_grad():
        texts = hf.get_text_features(input_ids=given["input_ids"])
        pixels = hf.get_image_features(pixel_values=given["pixel_values"])
        texts, pixels = (getattr(x, "pooler_output", x) for x in (texts, pixels))
        unit = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
        assert (unit(texts) - ours.encode_text(batch["input_ids"])).abs().max() <= 1e-5
        assert (unit(pixels) - ours.encode_image(batch["pixel_values"])).abs().max() <= 1e-5
