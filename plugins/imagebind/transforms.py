"""Inputs from files and raw signals, in upstream's shapes (`imagebind/data.py`).

    load_and_transform_vision_data(["dog.jpg"])          # (B, 3, 224, 224)   needs Pillow, torchvision
    load_and_transform_text(["a dog"], tokenizer)          # (B, 77)            needs regex (ftfy advised)
    video_clips(frames, fps)                               # (15, 3, 2, 224, 224) from decoded frames
    load_and_transform_audio_data(["dog.wav"])            # (B, 3, 1, 128, 204) needs torchaudio
    waveform_clips(waveform, sample_rate)                  # the 3 two-second clips, no extra package

Tensors in these shapes are the model's primary input; these helpers reproduce upstream's
pipeline for users starting from files. Images: upstream's transform is CLIP's (bicubic resize of
the short side to 224, center crop, CLIP mean/std), the core's `surgery.images`, applied after
converting to RGB as upstream does. Video decoding is left to the caller's
decoder (PyAV, decord, torchcodec): `video_clips` takes the decoded frames and their rate and
does upstream's clip sampling (5 clips of 2 s), 2 frames per clip, short-side scaling, and
3 spatial crops. Audio needs torchaudio's Kaldi filterbank (`torchaudio.compliance.kaldi`).
"""

from __future__ import annotations

import math
import os
from fractions import Fraction
from typing import Sequence

import torch
import torch.nn.functional as F

from surgery.errors import ModelInputError
from surgery.images import OPENAI_CLIP_MEAN as CLIP_MEAN
from surgery.images import OPENAI_CLIP_STD as CLIP_STD
from surgery.images import ImageLike, load_images

from .config import InputError

AUDIO_MEAN, AUDIO_STD = -4.268, 9.138  # upstream's mel-spectrogram normalisation



def load_and_transform_vision_data(images: ImageLike | Sequence[ImageLike], device: str | torch.device = "cpu",
                                   image_size: int = 224) -> torch.Tensor:
    """Paths or PIL images -> (B, 3, S, S): RGB, bicubic short side to S, center crop, CLIP normalisation."""
    try:
        return load_images(images, image_size, rgb_first=True).to(device)  # [B, 3, S, S]
    except ModelInputError as exc:
        raise InputError(f"vision: {exc}") from None


def load_and_transform_text(texts: str | Sequence[str], tokenizer, device: str | torch.device = "cpu") -> torch.Tensor:
    """Strings -> (B, context) token ids with `tokenizer` (a `BPETokenizer`)."""
    ids = tokenizer([texts] if isinstance(texts, str) else list(texts))
    return ids.to(device)


def clip_starts(duration: float, clip_duration: float, clips: int) -> list[Fraction]:
    """Upstream's clip sampler (pytorchvideo `ConstantClipsPerVideoSampler`): clip i starts at
    i * max(duration - clip_duration, 0) / clips, exactly (fractions)."""
    room = Fraction(max(duration - clip_duration, 0))
    return [room / clips * i for i in range(clips)]


# -- video -----------------------------------------------------------------------------------------


def _short_side_scale(clip: torch.Tensor, size: int) -> torch.Tensor:
    """(C, T, H, W): bilinear resize so that the short side is `size` (pytorchvideo's ShortSideScale)."""
    h, w = clip.shape[-2:]
    if w < h:
        new_h, new_w = int(math.floor(h / w * size)), size
    else:
        new_h, new_w = size, int(math.floor(w / h * size))
    return F.interpolate(clip, size=(new_h, new_w), mode="bilinear", align_corners=False)


def _three_crops(clip: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Left/top, center, right/bottom `size` crops along the long side (upstream `SpatialCrop(size, 3)`)."""
    h, w = clip.shape[-2:]
    y, x = int(math.ceil((h - size) / 2)), int(math.ceil((w - size) / 2))
    crops = []
    for index in range(3):
        yy, xx = y, x
        if h > w:
            yy = (0, y, h - size)[index]
        else:
            xx = (0, x, w - size)[index]
        crops.append(clip[..., yy:yy + size, xx:xx + size])
    return crops


def video_clips(frames: torch.Tensor, fps: float, *, clip_duration: float = 2, clips_per_video: int = 5,
                frames_per_clip: int = 2, size: int = 224) -> torch.Tensor:
    """Decoded frames (T, H, W, 3) uint8 (or (T, 3, H, W)) at `fps` -> (clips * 3, 3, frames_per_clip,
    size, size), upstream's video input for one video (stack several for a batch).

    Per clip [start, start + clip_duration): the frames whose timestamp i / fps falls inside, of
    which `frames_per_clip` evenly spaced ones (first and last for 2) are kept, scaled to [0, 1],
    short side to `size`, normalised with CLIP's mean/std, then cut into 3 crops."""
    if frames.ndim != 4 or 3 not in (frames.shape[1], frames.shape[-1]):
        raise InputError(f"video: expected decoded frames (T, H, W, 3) or (T, 3, H, W), got {tuple(frames.shape)}")
    if frames.shape[-1] == 3 and frames.shape[1] != 3:
        frames = frames.permute(0, 3, 1, 2)  # [T, 3, H, W]
    if fps <= 0 or frames.shape[0] == 0:
        raise InputError(f"video: need at least one frame and fps > 0, got {frames.shape[0]} frames at {fps}")
    times = torch.arange(frames.shape[0], dtype=torch.float64) / fps
    duration = frames.shape[0] / fps
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1, 1)
    out = []
    for start in clip_starts(duration, clip_duration, clips_per_video):
        inside = ((times >= float(start)) & (times < float(start + clip_duration))).nonzero().flatten()
        if inside.numel() == 0:
            raise InputError(f"video: no frame in the clip starting at {float(start):.3f} s")
        pick = torch.linspace(0, inside.numel() - 1, frames_per_clip).clamp(0, inside.numel() - 1).long()
        clip = frames[inside[pick]].permute(1, 0, 2, 3).float() / 255.0  # [3, t, H, W]
        clip = (_short_side_scale(clip, size) - mean) / std
        out.extend(_three_crops(clip, size))
    return torch.stack(out)  # [clips * 3, 3, t, size, size]


# -- audio -----------------------------------------------------------------------------------------


def waveform_clips(waveform: torch.Tensor, sample_rate: int, *, clip_duration: float = 2,
                   clips_per_video: int = 3) -> list[torch.Tensor]:
    """(channels, samples) -> the clips upstream encodes: `waveform[:, int(start * sr):int(end * sr)]`."""
    if waveform.ndim != 2:
        raise InputError(f"audio: expected a waveform (channels, samples), got {tuple(waveform.shape)}")
    duration = waveform.shape[1] / sample_rate
    return [waveform[:, int(start * sample_rate):int((start + clip_duration) * sample_rate)]
            for start in clip_starts(duration, clip_duration, clips_per_video)]


def waveform_to_melspec(waveform: torch.Tensor, sample_rate: int, num_mel_bins: int = 128,
                        target_length: int = 204) -> torch.Tensor:
    """A clip -> (1, mel bins, target_length) log-mel filterbank (Kaldi-compatible, torchaudio),
    zero-padded or cut to `target_length` frames (25 ms windows every 10 ms)."""
    try:
        from torchaudio.compliance import kaldi
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError("audio from waveforms needs torchaudio (pip install torchaudio matching your "
                                  "torch); or pass (B, S, 1, 128, 204) mel-spectrogram tensors") from exc
    waveform = waveform - waveform.mean()
    fbank = kaldi.fbank(waveform, htk_compat=True, sample_frequency=sample_rate, use_energy=False,
                        window_type="hanning", num_mel_bins=num_mel_bins, dither=0.0, frame_length=25,
                        frame_shift=10).t()  # [mels, frames]
    pad = target_length - fbank.shape[1]
    fbank = F.pad(fbank, (0, pad)) if pad > 0 else fbank[:, :target_length]
    return fbank.unsqueeze(0)  # [1, mels, target_length]


def load_and_transform_audio_data(paths: Sequence[str | os.PathLike], device: str | torch.device = "cpu", *,
                                  num_mel_bins: int = 128, target_length: int = 204, sample_rate: int = 16000,
                                  clip_duration: float = 2, clips_per_video: int = 3) -> torch.Tensor:
    """Audio files -> (B, clips, 1, mel bins, frames): resampled to 16 kHz, 3 clips of 2 s, normalised."""
    try:
        import torchaudio
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError("loading audio files needs torchaudio (pip install torchaudio matching your "
                                  "torch)") from exc
    batch = []
    for path in paths:
        waveform, rate = torchaudio.load(str(path))
        if rate != sample_rate:
            waveform = torchaudio.functional.resample(waveform, orig_freq=rate, new_freq=sample_rate)
        clips = [waveform_to_melspec(c, sample_rate, num_mel_bins, target_length)
                 for c in waveform_clips(waveform, sample_rate, clip_duration=clip_duration,
                                         clips_per_video=clips_per_video)]
        batch.append((torch.stack(clips) - AUDIO_MEAN) / AUDIO_STD)  # [clips, 1, mels, frames]
    return torch.stack(batch).to(device)


__all__ = ["load_and_transform_vision_data", "load_and_transform_text", "video_clips", "waveform_clips",
           "waveform_to_melspec", "load_and_transform_audio_data", "clip_starts", "CLIP_MEAN", "CLIP_STD"]
