"""surgery.images.load_images: every file is checked to decode before any is transformed."""

import numpy as np
import pytest
import torch
from PIL import Image

from surgery.errors import ModelInputError
from surgery.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, load_images


def test_a_plain_image_is_clip_preprocessed(tmp_path):
    pixels = np.full((40, 60, 3), (255, 0, 128), dtype=np.uint8)  # already square after the crop
    Image.fromarray(pixels).save(tmp_path / "flat.png")
    batch = load_images([tmp_path / "flat.png", tmp_path / "flat.png"], 16)
    expected = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    assert batch.shape == (2, 3, 16, 16)
    torch.testing.assert_close(batch[:, :, 8, 8], expected.expand(2, 3), atol=1e-2, rtol=0)


@pytest.mark.parametrize("name, content, says", [
    ("missing.png", None, "no such file"),
    ("bad.png", b"\x89PNG but not really", "not an image Pillow can decode"),
    ("empty.jpg", b"", "not an image Pillow can decode"),
])
def test_a_file_that_cannot_be_read_is_named_before_any_work(tmp_path, name, content, says):
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(good)
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelInputError, match=f"image {path}: {says}"):
        load_images([good, path], 8)
