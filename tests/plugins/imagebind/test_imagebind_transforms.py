"""Loaders in upstream's shapes: images from files, video clips from decoded frames, audio clips.

The video and audio references below restate upstream's semantics (`imagebind/data.py`, pytorchvideo's
sampler and decord reader at the commit upstream pins) in plain torch, on synthetic frames and waveforms.
"""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from surgery_plugins.imagebind.config import InputError
from surgery_plugins.imagebind.transforms import (CLIP_MEAN, CLIP_STD, audio_clips, clip_frames, clip_starts,
                                                  load_and_transform_vision_data, video_clips, waveform_clips,
                                                  waveform_to_melspec)


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


# -- references of upstream's semantics (imagebind/data.py with pytorchvideo at the pinned commit) --------


class ConstantClips:
    """pytorchvideo's ConstantClipsPerVideoSampler as upstream drives it: called until it says
    "last"; the spacing divides the room by clips - 1 (the sampler fix upstream's pin includes)."""

    def __init__(self, clip_duration, clips):
        self.clip_duration, self.clips, self.index = Fraction(clip_duration), clips, 0

    def __call__(self, duration):
        room = Fraction(max(duration - self.clip_duration, 0))
        spacing = Fraction(room, max(self.clips - 1, 1))
        start = spacing * self.index
        self.index += 1
        last = self.index >= self.clips or spacing * self.index > room
        return start, start + self.clip_duration, last

    def all(self, duration):
        spans, last = [], False
        while not last:
            start, end, last = self(duration)
            spans.append((start, end))
        return spans


def reference_audio_clips(waveform, sample_rate, clips=3):
    """Upstream: the file's samples, cut with int(t * sr), each cut centred IN PLACE in turn."""
    samples = waveform.clone()
    out = []
    for start, end in ConstantClips(2, clips).all(samples.size(1) / sample_rate):
        cut = samples[:, int(start * sample_rate):int(end * sample_rate)]
        cut -= cut.mean()
        out.append(cut.clone())
    return out


def reference_video(frames_thwc, fps, size, clips=5):
    """Upstream's video pipeline on decoded frames: decord's frame range per clip (float product,
    ceil), 2 evenly spaced frames, /255, ShortSideScale (bilinear), CLIP normalisation, 3 crops."""
    T = frames_thwc.shape[0]
    video = frames_thwc.permute(3, 0, 1, 2).float()  # [C, T, H, W] in 0..255, as decord gives it
    out = []
    for start, end in ConstantClips(2, clips).all(float(T) / float(fps)):
        first, stop = math.ceil(fps * start), min(math.ceil(fps * end), T)
        clip = video[:, first:stop]
        keep = torch.clamp(torch.linspace(0, clip.shape[1] - 1, 2), 0, clip.shape[1] - 1).long()
        clip = torch.index_select(clip, 1, keep) / 255.0
        h, w = clip.shape[-2:]
        new = (int(math.floor(h / w * size)), size) if w < h else (size, int(math.floor(w / h * size)))
        clip = F.interpolate(clip, size=new, mode="bilinear", align_corners=False)
        clip = (clip - torch.tensor(CLIP_MEAN)[:, None, None, None]) / torch.tensor(CLIP_STD)[:, None, None, None]
        h, w = clip.shape[-2:]
        y, x = math.ceil((h - size) / 2), math.ceil((w - size) / 2)
        for where in (0, 1, 2):
            yy = (0, y, h - size)[where] if h > w else y
            xx = (0, x, w - size)[where] if h <= w else x
            out.append(clip[:, :, yy:yy + size, xx:xx + size])
    return torch.stack(out)


def indexed_video(T, H=10, W=14):
    """Frames whose red channel is the frame index (mod 256) and green the column."""
    frames = torch.zeros(T, H, W, 3, dtype=torch.uint8)
    frames[..., 0] = (torch.arange(T) % 256).to(torch.uint8)[:, None, None]
    frames[..., 1] = (torch.arange(W) * 16).to(torch.uint8)[None, None, :]
    return frames


def picked_frames(out):
    """The frame index each output clip's 2 frames came from (red channel, back to 0..255)."""
    red = out[::3, 0, :, 0, 0] * CLIP_STD[0] + CLIP_MEAN[0]
    return (red * 255).round().long().tolist()


# -- clip placement ----------------------------------------------------------------------------------


def test_clip_starts_are_upstreams_constant_clips():
    assert clip_starts(10, 2, 5) == [0, 2, 4, 6, 8]  # the clips tile the video: the last ends at the end
    assert clip_starts(Fraction(7, 2), 2, 3) == [0, Fraction(3, 4), Fraction(3, 2)]
    assert clip_starts(1, 2, 3) == [0, 0, 0]  # shorter than a clip: every clip starts at 0
    assert clip_starts(5, 2, 1) == [0]
    for duration in (1.0, 3.3, 5.999, 6.0, 10.0, 92 / 30):
        assert clip_starts(duration, 2, 3) == [s for s, _ in ConstantClips(2, 3).all(duration)]


# -- video -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("T, fps", [(40, 4.0), (92, 30.0), (150, 25.0), (7, 1.0)])
def test_video_clips_upstream_mode_is_upstreams_pipeline(T, fps):
    frames = indexed_video(T)
    out = video_clips(frames, fps, size=8)  # mode="upstream" is the default
    assert out.shape == (15, 3, 2, 8, 8)
    torch.testing.assert_close(out, reference_video(frames, fps, 8), rtol=0, atol=1e-6)
    assert video_clips(frames.permute(0, 3, 1, 2), fps, size=8).equal(out)  # (T, 3, H, W) too


def test_video_modes_differ_only_where_the_float_product_rounds():
    # 92 frames at 30 fps: clip 1 starts at 8/30 s, exactly frame 8, but 30.0 * 0.2666... = 8.000000000000002;
    # clip 3 ends at 84/30 s (frame 84 is out) but 30.0 * 2.8000000000000003 = 84.00000000000001
    frames = indexed_video(92)
    upstream, clean = video_clips(frames, 30.0, size=8), video_clips(frames, 30.0, size=8, mode="clean")
    assert picked_frames(clean) == [[0, 59], [8, 67], [16, 75], [24, 83], [32, 91]]  # [start, end) exactly
    assert picked_frames(upstream) == [[0, 59], [9, 67], [17, 75], [25, 84], [33, 91]]
    assert clip_frames(92, 30.0, mode="clean")[1] == range(8, 68)
    assert clip_frames(92, 30.0)[1] == range(9, 68)
    # 40 frames at 4 fps: every product is exact, the modes agree
    frames = indexed_video(40)
    assert video_clips(frames, 4.0, size=8, mode="clean").equal(video_clips(frames, 4.0, size=8))
    assert picked_frames(video_clips(frames, 4.0, size=8)) == [[0, 7], [8, 15], [16, 23], [24, 31], [32, 39]]


def test_video_crops_move_along_the_long_side_and_bad_input_is_refused():
    out = video_clips(indexed_video(40), 4.0, size=8)
    green = out[:3, 1, 0, 0, :] * CLIP_STD[1] + CLIP_MEAN[1]  # first row of the left, center, right crops
    assert green[0, 0] < green[1, 0] < green[2, 0]
    with pytest.raises(InputError, match="decoded frames"):
        video_clips(torch.zeros(4, 5, 5), 4.0)
    with pytest.raises(InputError, match="unknown pipeline mode 'exact'; allowed: 'upstream'"):
        video_clips(indexed_video(40), 4.0, mode="exact")


# -- audio -----------------------------------------------------------------------------------------


def test_waveform_clips_cut_where_upstream_does():
    wave = torch.arange(16000 * 10, dtype=torch.float32)[None]  # 10 s at 16 kHz: clips at 0, 4, 8 s
    clips = waveform_clips(wave, 16000, mode="clean")
    assert [c.shape[1] for c in clips] == [32000] * 3
    starts = [0, 64000, 128000]
    for clip, a in zip(clips, starts):
        torch.testing.assert_close(clip, wave[:, a:a + 32000] - wave[:, a:a + 32000].mean(), rtol=0, atol=0)


@pytest.mark.parametrize("seconds", [1.0, 3.0, 4.5, 5.99, 6.5, 10.0])
def test_waveform_clips_upstream_mode_is_upstreams_in_place_centring(seconds):
    gen = torch.Generator().manual_seed(0)
    n = int(16000 * seconds)
    wave = torch.randn(2, n, generator=gen) + torch.linspace(-3, 5, n)  # stereo, a trend: clip means differ
    before = wave.clone()
    ours = waveform_clips(wave, 16000)  # mode="upstream" is the default
    assert torch.equal(wave, before)  # the caller's waveform is not changed
    reference = reference_audio_clips(wave, 16000)
    assert len(ours) == len(reference) == 3
    for a, b in zip(ours, reference):
        assert torch.equal(a, b)
    clean = waveform_clips(wave, 16000, mode="clean")
    assert torch.equal(ours[0], clean[0])  # the first clip sees nothing before it
    overlapping = seconds < 6.0  # 3 clips of 2 s overlap in a file under 6 s (under 2 s they coincide)
    for k in (1, 2):
        assert torch.equal(ours[k], clean[k]) != overlapping, (seconds, k)


def test_audio_clips_feed_the_filterbank_the_centred_clips():
    try:
        from torchaudio.compliance import kaldi
    except ModuleNotFoundError:
        pytest.skip("needs torchaudio")
    gen = torch.Generator().manual_seed(1)
    wave = torch.randn(1, 16000 * 3, generator=gen) + torch.linspace(0, 4, 16000 * 3)
    out = audio_clips(wave, 16000)
    assert out.shape == (3, 1, 128, 204)
    for k, clip in enumerate(reference_audio_clips(wave, 16000)):
        fbank = kaldi.fbank(clip, htk_compat=True, sample_frequency=16000, use_energy=False, window_type="hanning",
                            num_mel_bins=128, dither=0.0, frame_length=25, frame_shift=10).t()
        fbank = F.pad(fbank, (0, 204 - fbank.shape[1])) if fbank.shape[1] < 204 else fbank[:, :204]
        torch.testing.assert_close(out[k, 0], (fbank - -4.268) / 9.138, rtol=0, atol=0)


def test_melspec_needs_torchaudio():
    try:
        import torchaudio  # noqa: F401
    except ModuleNotFoundError:
        with pytest.raises(ModuleNotFoundError, match="torchaudio"):
            waveform_to_melspec(torch.zeros(1, 32000), 16000)
        return
    mel = waveform_to_melspec(torch.randn(1, 32000, generator=torch.Generator().manual_seed(0)), 16000)
    assert mel.shape == (1, 128, 204)
