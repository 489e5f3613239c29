"""Inputs from files and raw signals, in upstream's shapes (`imagebind/data.py`).

    load_and_transform_vision_data(["dog.jpg"])          # (B, 3, 224, 224)   needs Pillow, torchvision
    load_and_transform_audio_data(["dog.wav"])            # (B, 3, 1, 128, 204) needs torchaudio
    video_clips(frames, fps)                               # (15, 3, 2, 224, 224) from decoded frames

Tensors in these shapes are the model's input; these helpers reproduce upstream's pipeline for users
starting from files (video decoding is left to the caller's decoder). Clips are placed where
upstream's sampler places them. `mode="upstream"`, the default since the released weights were
trained with it, keeps two quirks of upstream's pipeline (overlapping audio clips' in-place mean
removal, floating-point frame rounding); `mode="clean"` has neither (the table: docs/imagebind.md).
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
MODES = ("upstream", "clean")  # upstream's quirks kept, or not: see the module doc


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise InputError(f"unknown pipeline mode {mode!r}; allowed: 'upstream' (upstream's pipeline with its "
                         f"quirks, what the released weights were trained with) or 'clean'")
    return mode


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


def clip_starts(duration: float | Fraction, clip_duration: float, clips: int) -> list[Fraction]:
    """Upstream's clip sampler (pytorchvideo `ConstantClipsPerVideoSampler`, at the commit upstream
    pins): clip i starts at i * max(duration - clip_duration, 0) / max(clips - 1, 1), in fractions
    (a float duration, as upstream's, at its exact binary value). Every clip starts at 0 when the
    input is shorter than one clip."""
    room = Fraction(max(duration - Fraction(clip_duration), 0))
    step = room / max(clips - 1, 1)
    return [step * i for i in range(clips)]


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


def clip_frames(num_frames: int, fps: float, *, clip_duration: float = 2, clips_per_video: int = 5,
                mode: str = "upstream") -> list[range]:
    """The frame indices of each clip of a video of `num_frames` frames at `fps` (the two modes:
    see the module doc)."""
    upstream = check_mode(mode) == "upstream"
    # upstream (pytorchvideo's decord reader): duration = frames / fps in floats
    duration = num_frames / float(fps) if upstream else Fraction(num_frames) / Fraction(fps)

    def first_frame(t: Fraction) -> int:
        """The first frame at or after time t."""
        if upstream:  # ceil(fps * t) of two floats: the product rounds (8.000000000000002 -> 9)
            return math.ceil(float(fps) * float(t))
        return math.ceil(Fraction(fps) * t)

    return [range(first_frame(start), min(first_frame(start + Fraction(clip_duration)), num_frames))
            for start in clip_starts(duration, clip_duration, clips_per_video)]


def video_clips(frames: torch.Tensor, fps: float, *, clip_duration: float = 2, clips_per_video: int = 5,
                frames_per_clip: int = 2, size: int = 224, mode: str = "upstream") -> torch.Tensor:
    """Decoded frames (T, H, W, 3) uint8 (or (T, 3, H, W)) at `fps` -> (clips * 3, 3, frames_per_clip,
    size, size), upstream's video input for one video (stack several for a batch).

    Per clip (`clip_frames`, `mode` as in the module doc): `frames_per_clip` evenly spaced frames
    (first and last for 2), scaled to [0, 1], short side to `size`, normalised with CLIP's
    mean/std, then cut into 3 crops."""
    check_mode(mode)
    if frames.ndim != 4 or 3 not in (frames.shape[1], frames.shape[-1]):
        raise InputError(f"video: expected decoded frames (T, H, W, 3) or (T, 3, H, W), got {tuple(frames.shape)}")
    if frames.shape[-1] == 3 and frames.shape[1] != 3:
        frames = frames.permute(0, 3, 1, 2)  # [T, 3, H, W]
    if not fps > 0 or frames.shape[0] == 0:
        raise InputError(f"video: need at least one frame and fps > 0, got {frames.shape[0]} frames at {fps}")
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1, 1)
    out = []
    for inside in clip_frames(frames.shape[0], fps, clip_duration=clip_duration,
                              clips_per_video=clips_per_video, mode=mode):
        if len(inside) == 0:
            raise InputError(f"video: no frame in a clip of {clip_duration} s at {fps} fps")
        pick = torch.linspace(0, len(inside) - 1, frames_per_clip).clamp(0, len(inside) - 1).long()
        clip = frames[inside.start + pick].permute(1, 0, 2, 3).float() / 255.0  # [3, t, H, W]
        clip = (_short_side_scale(clip, size) - mean) / std
        out.extend(_three_crops(clip, size))
    return torch.stack(out)  # [clips * 3, 3, t, size, size]


# -- audio -----------------------------------------------------------------------------------------


def waveform_clips(waveform: torch.Tensor, sample_rate: int, *, clip_duration: float = 2,
                   clips_per_video: int = 3, mode: str = "upstream") -> list[torch.Tensor]:
    """(channels, samples) -> the clips the filterbank sees: cut at `int(t * sample_rate)` where
    upstream's sampler places them, each with its mean removed (all channels together).

    `mode="upstream"`: the means are removed clip after clip, in place, on one copy of `waveform`
    (upstream's `waveform -= waveform.mean()` on a view), so a clip overlapping earlier ones also
    carries their mean removal; `"clean"`: each clip minus its own mean. `waveform` is not changed."""
    check_mode(mode)
    if waveform.ndim != 2:
        raise InputError(f"audio: expected a waveform (channels, samples), got {tuple(waveform.shape)}")
    duration = waveform.shape[1] / sample_rate
    spans = [(int(start * sample_rate), int((start + Fraction(clip_duration)) * sample_rate))
             for start in clip_starts(duration, clip_duration, clips_per_video)]
    if mode == "clean":
        return [waveform[:, a:b] - waveform[:, a:b].mean() for a, b in spans]
    shared = waveform.clone()
    clips = []
    for a, b in spans:
        view = shared[:, a:b]
        view -= view.mean()  # in place: later overlapping clips see it
        clips.append(view.clone())  # as it is now, before a later clip changes the samples again
    return clips


def waveform_to_melspec(waveform: torch.Tensor, sample_rate: int, num_mel_bins: int = 128,
                        target_length: int = 204, *, center: bool = True) -> torch.Tensor:
    """A clip -> (1, mel bins, target_length) log-mel filterbank (Kaldi-compatible, torchaudio),
    zero-padded or cut to `target_length` frames (25 ms windows every 10 ms). `center` removes the
    clip's mean first (upstream); `waveform_clips` gives clips with it already removed."""
    try:
        from torchaudio.compliance import kaldi
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError("audio from waveforms needs torchaudio (pip install torchaudio matching your "
                                  "torch); or pass (B, S, 1, 128, 204) mel-spectrogram tensors") from exc
    if center:
        waveform = waveform - waveform.mean()
    fbank = kaldi.fbank(waveform, htk_compat=True, sample_frequency=sample_rate, use_energy=False,
                        window_type="hanning", num_mel_bins=num_mel_bins, dither=0.0, frame_length=25,
                        frame_shift=10).t()  # [mels, frames]
    pad = target_length - fbank.shape[1]
    fbank = F.pad(fbank, (0, pad)) if pad > 0 else fbank[:, :target_length]
    return fbank.unsqueeze(0)  # [1, mels, target_length]


def audio_clips(waveform: torch.Tensor, sample_rate: int = 16000, *, num_mel_bins: int = 128,
                target_length: int = 204, clip_duration: float = 2, clips_per_video: int = 3,
                mode: str = "upstream") -> torch.Tensor:
    """A waveform at `sample_rate` -> (clips, 1, mel bins, frames), normalised: one file's audio input."""
    clips = waveform_clips(waveform, sample_rate, clip_duration=clip_duration, clips_per_video=clips_per_video,
                           mode=mode)
    mels = [waveform_to_melspec(c, sample_rate, num_mel_bins, target_length, center=False) for c in clips]
    return (torch.stack(mels) - AUDIO_MEAN) / AUDIO_STD  # [clips, 1, mels, frames]


def load_and_transform_audio_data(paths: Sequence[str | os.PathLike], device: str | torch.device = "cpu", *,
                                  num_mel_bins: int = 128, target_length: int = 204, sample_rate: int = 16000,
                                  clip_duration: float = 2, clips_per_video: int = 3,
                                  mode: str = "upstream") -> torch.Tensor:
    """Audio files -> (B, clips, 1, mel bins, frames): resampled to 16 kHz, 3 clips of 2 s, normalised
    (`audio_clips`; `mode` as in the module doc)."""
    check_mode(mode)
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
        batch.append(audio_clips(waveform, sample_rate, num_mel_bins=num_mel_bins, target_length=target_length,
                                 clip_duration=clip_duration, clips_per_video=clips_per_video, mode=mode))
    return torch.stack(batch).to(device)


__all__ = ["load_and_transform_vision_data", "load_and_transform_text", "video_clips", "clip_frames",
           "waveform_clips", "waveform_to_melspec", "audio_clips", "load_and_transform_audio_data", "clip_starts",
           "check_mode", "MODES", "CLIP_MEAN", "CLIP_STD"]
