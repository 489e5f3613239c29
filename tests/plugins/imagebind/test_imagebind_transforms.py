"""Loaders in upstream's shapes: images from files, video clips from decoded frames, audio clips."""

from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from surgery_plugins.imagebind.config import InputError
from surgery_plugins.imagebind.transforms import (CLIP_MEAN, CLIP_STD, clip_starts, load_and_transform_vision_data,
                                                  video_clips, waveform_clips, waveform_to_melspec)


def test_images_from_files_follow_upstreams_transform(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (60, 90, 4), dtype=np.uint8)
    Image.fromarray(pixels, "RGBA").save(tmp_path / "a.png")
    out = load_and_transform_vision_data([tmp_path / "a.png", str(tmp_path / "a.png")], image_size=32)
    assert out.shape == (2, 3, 32, 32) and torch.equal(out[0], out[1])
    # the reference: RGB first, bicubic short side to 32 (PIL), center crop, CLIP mean/std
    rgb = Image.open(tmp_path / "a.png").convert("RGB").resize((48, 32), Image.BICUBIC)
    crop = np.asarray(rgb, dtype=np.float32)[:, 8:40] / 255.0
    expected = (torch.from_numpy(crop).permute(2, 0, 1) - torch.tensor(CLIP_MEAN)[:, None, None]) \
        / torch.tensor(CLIP_STD)[:, None, None]
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=0)


def test_clip_starts_are_upstreams_constant_clips():
    assert clip_starts(10, 2, 5) == [Fraction(0), Fraction(8, 5), Fraction(16, 5), Fraction(24, 5), Fraction(32, 5)]
    assert clip_starts(1, 2, 3) == [0, 0, 0]  # shorter than a clip: every clip starts at 0


def test_video_clips_pick_frames_scale_and_crop():
    fps, T, H, W = 4.0, 40, 20, 30  # 10 s
    frames = torch.zeros(T, H, W, 3, dtype=torch.uint8)
    frames[..., 0] = torch.arange(T, dtype=torch.uint8)[:, None, None]  # red = frame index
    frames[:, :, :, 1] = torch.arange(W, dtype=torch.uint8)[None, None, :] * 8  # green = column
    out = video_clips(frames, fps, size=8)
    assert out.shape == (15, 3, 2, 8, 8)
    red = out[:, 0, :, 0, 0] * CLIP_STD[0] + CLIP_MEAN[0]  # [15, 2] back to [0, 1]
    index = (red * 255).round().long()
    # clip i covers [1.6 i, 1.6 i + 2) s = frames ceil(6.4 i) .. ceil(6.4 i + 8) - 1; first and last kept
    for i in range(5):
        first = -(-int(64 * i) // 10)
        last = -(-int(64 * i + 80) // 10) - 1
        assert index[3 * i].tolist() == [first, last], i
    green = out[:3, 1, 0, 0, :] * CLIP_STD[1] + CLIP_MEAN[1]  # first row of the left, center, right crops
    assert green[0, 0] < green[1, 0] < green[2, 0]  # the crops move along the long side (width)
    with pytest.raises(InputError, match="decoded frames"):
        video_clips(torch.zeros(4, 5, 5), fps)


def test_waveform_clips_cut_where_upstream_does():
    wave = torch.arange(16000 * 5, dtype=torch.float32)[None]  # 5 s at 16 kHz
    clips = waveform_clips(wave, 16000)
    assert [c.shape[1] for c in clips] == [32000] * 3
    assert [int(c[0, 0]) for c in clips] == [0, 16000, 32000]  # starts at i * (5 - 2) / 3 s


def test_melspec_needs_torchaudio():
    try:
        import torchaudio  # noqa: F401
    except ModuleNotFoundError:
        with pytest.raises(ModuleNotFoundError, match="torchaudio"):
            waveform_to_melspec(torch.zeros(1, 32000), 16000)
        return
    mel = waveform_to_melspec(torch.randn(1, 32000, generator=torch.Generator().manual_seed(0)), 16000)
    assert mel.shape == (1, 128, 204)
