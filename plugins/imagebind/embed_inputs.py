"""`surgery embed`'s inputs: files of each kind -> one batch in the model's input shape.

Each reader takes the files of one input option and the model, and returns a float32 batch on the
CPU, sized from the model's config (an image at its vision size, audio at its mel bins and
frames, clouds at its points per cloud, text at its context), through this plugin's own loaders
(`transforms.py`, `point_loading.py`, `tokenizer.py`: upstream's pipelines). Upstream ships no
loader for depth, thermal or IMU: those are arrays of one item's input, as a user's own pipeline
made them. An image, video or audio input may be such an array too (already preprocessed), which
is also how video runs where no decoder (PyAV) is installed.

Every file is checked before anything runs; a file that is missing, undecodable or of the wrong
shape is a `ModelInputError` naming the option, the file and what is allowed.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from surgery.errors import CheckpointError, ModelInputError
from surgery.images import load_images

ARRAY_SUFFIXES = (".npy", ".pt")


def _exists(option: str, path: str) -> Path:
    file = Path(path)
    if not file.is_file():
        raise ModelInputError(f"--{option} {path}: no such file")
    return file


def read_array(option: str, path: str, ranks: dict[int, str]) -> torch.Tensor:
    """One item's input from a .npy (read without pickle) or .pt (weights only) file; `ranks` maps the
    ranks allowed to the shape they stand for (in messages)."""
    file = _exists(option, path)
    allowed = " or ".join(ranks.values())
    try:
        if file.suffix.lower() == ".npy":
            value = torch.from_numpy(np.load(file, allow_pickle=False))
        else:
            from surgery.checkpoint_io import read_torch

            value = read_torch(file)
    except (ValueError, OSError, EOFError, pickle.UnpicklingError, CheckpointError, RuntimeError) as exc:
        detail = (str(exc).splitlines() or [""])[0][:160]
        raise ModelInputError(f"--{option} {path}: not a readable {file.suffix} array ({detail})") from None
    if not isinstance(value, torch.Tensor) or not (value.is_floating_point() or value.dtype in
                                                      (torch.uint8, torch.int16, torch.int32, torch.int64)):
        what = f"an array of {value.dtype}" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"
        raise ModelInputError(f"--{option} {path}: expected a numeric array {allowed}, the file holds {what}")
    if value.ndim not in ranks:
        raise ModelInputError(f"--{option} {path}: expected an array {allowed}, got shape {tuple(value.shape)}")
    value = value.float()
    if not bool(torch.isfinite(value).all()):
        raise ModelInputError(f"--{option} {path}: values must be finite (NaN or infinity found)")
    return value


def stack(option: str, paths: list[str], items: list[torch.Tensor]) -> torch.Tensor:
    """One batch from items of one shape; files of different shapes are named."""
    shapes = {tuple(x.shape) for x in items}
    if len(shapes) > 1:
        listed = ", ".join(f"{p} {tuple(x.shape)}" for p, x in zip(paths, items))
        raise ModelInputError(f"--{option}: the files have different shapes ({listed}); one batch needs one shape")
    return torch.stack(items)


def _is_array(path: str) -> bool:
    return Path(path).suffix.lower() in ARRAY_SUFFIXES


# -- one reader per input option ----------------------------------------------------------------------


def read_image(model: nn.Module, paths: list[str]) -> torch.Tensor:
    """(B, 3, S, S): ImageBind's image pipeline (RGB, CLIP's transform at the vision size), or arrays."""
    size = model.config.modalities["vision"].input_size[-1]
    if all(_is_array(p) for p in paths):
        return stack("image", paths, [read_array("image", p, {3: "(3, H, W)"}) for p in paths])
    if any(_is_array(p) for p in paths):
        raise ModelInputError("--image: give image files or preprocessed arrays, not both in one batch")

    return load_images(paths, size, rgb_first=True)  # each file checked to decode first


def read_video(model: nn.Module, paths: list[str]) -> torch.Tensor:
    """(B, 15, 3, T, S, S): upstream's 5 clips of 2 s, T frames each, 3 crops (`video_clips`)."""
    from .transforms import video_clips

    frames, size = model.config.modalities["vision"].input_size[0], model.config.modalities["vision"].input_size[-1]
    items = []
    for path in paths:
        if _is_array(path):
            clip = read_array("video", path, {4: "(3, T, H, W) (one clip)", 5: "(clips, 3, T, H, W)"})
            items.append(clip if clip.ndim == 5 else clip.unsqueeze(0))
            continue
        decoded, fps = decode_video(path)
        items.append(video_clips(decoded, fps, frames_per_clip=frames, size=size))
    return stack("video", paths, items)


def decode_video(path: str) -> tuple[torch.Tensor, float]:
    """(frames (T, H, W, 3) uint8, frames per second) of a video file's first video stream, with PyAV."""
    _exists("video", path)
    try:
        import av
    except ModuleNotFoundError:
        raise ModelInputError(f"--video {path}: decoding video files needs PyAV (pip install av); or give the "
                              f"preprocessed clips as a .npy array (clips, 3, T, H, W)") from None
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ModelInputError(f"--video {path}: the file has no video stream")
            stream = container.streams.video[0]
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
            rate = stream.average_rate or stream.guessed_rate
    except ModelInputError:
        raise
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise ModelInputError(f"--video {path}: not a video PyAV can decode ({exc})") from None
    if not frames or not rate:
        raise ModelInputError(f"--video {path}: no decodable frames (or no frame rate) in its video stream")
    return torch.from_numpy(np.stack(frames)), float(rate)


def read_audio(model: nn.Module, paths: list[str]) -> torch.Tensor:
    """(B, 3, 1, mel bins, frames): upstream's audio pipeline at the model's sizes (needs torchaudio)."""
    from .transforms import load_and_transform_audio_data

    mel_bins, target = model.config.modalities["audio"].input_size
    if all(_is_array(p) for p in paths):
        items = [read_array("audio", p, {3: "(1, mel bins, frames) (one clip)", 4: "(clips, 1, mel bins, frames)"})
                 for p in paths]
        return stack("audio", paths, [x if x.ndim == 4 else x.unsqueeze(0) for x in items])
    if any(_is_array(p) for p in paths):
        raise ModelInputError("--audio: give audio files or preprocessed arrays, not both in one batch")
    for path in paths:
        _exists("audio", path)
    try:
        return load_and_transform_audio_data(paths, num_mel_bins=mel_bins, target_length=target)
    except ModuleNotFoundError as exc:
        raise ModelInputError(f"--audio: {exc}; or give log-mel clips as .npy arrays (clips, 1, {mel_bins}, "
                              f"{target})") from None
    except (OSError, RuntimeError) as exc:
        detail = (str(exc).splitlines() or [""])[0][:160]
        raise ModelInputError(f"--audio {paths[0] if len(paths) == 1 else paths}: not an audio file torchaudio "
                              f"can decode ({detail})") from None


def _channel_map(option: str) -> Callable[[nn.Module, list[str]], torch.Tensor]:
    """Depth and thermal: (1, H, W) or (H, W) arrays (upstream has no loader for them)."""
    def read(model: nn.Module, paths: list[str]) -> torch.Tensor:
        for path in paths:
            if not _is_array(path):
                raise ModelInputError(f"--{option} {path}: give a .npy or .pt array (1, H, W) or (H, W) of the "
                                      f"{option} map as your pipeline prepares it (ImageBind ships no {option} "
                                      f"loader)")
        items = [read_array(option, p, {2: "(H, W)", 3: "(1, H, W)"}) for p in paths]
        for path, x in zip(paths, items):
            if x.ndim == 3 and x.shape[0] != 1:
                raise ModelInputError(f"--{option} {path}: expected one channel, (1, H, W) or (H, W), got shape "
                                      f"{tuple(x.shape)}")
        return stack(option, paths, [x if x.ndim == 3 else x.unsqueeze(0) for x in items])
    return read


def read_imu(model: nn.Module, paths: list[str]) -> torch.Tensor:
    """(B, 6, L): accelerometer and gyroscope signals, arrays (upstream has no loader for them)."""
    channels = model.config.modalities["imu"].in_chans
    for path in paths:
        if not _is_array(path):
            raise ModelInputError(f"--imu {path}: give a .npy or .pt array ({channels}, L) of IMU signals "
                                  f"(ImageBind ships no IMU loader)")
    items = [read_array("imu", p, {2: f"({channels}, L)"}) for p in paths]
    for path, x in zip(paths, items):
        if x.shape[0] != channels:
            raise ModelInputError(f"--imu {path}: expected ({channels}, L) signals (accelerometer and gyroscope "
                                  f"x, y, z), got shape {tuple(x.shape)}")
    return stack("imu", paths, items)


def read_points(model: nn.Module, paths: list[str]) -> torch.Tensor:
    """(B, N, 3): each cloud resampled to the model's points per cloud and normalised (`point_loading`)."""
    from .point_loading import load_and_transform_point_cloud_data

    point = model.config.modalities["point"]
    try:
        return load_and_transform_point_cloud_data(paths, num_points=point.input_size[0], min_points=point.num_groups)
    except ModelInputError as exc:
        raise ModelInputError(f"--points: {exc}") from None


def read_text(model: nn.Module, texts: list[str], vocab: str | None) -> torch.Tensor:
    """(B, context) token ids with CLIP's BPE, whose vocabulary must be the model's."""
    from .tokenizer import BPETokenizer
    from .transforms import load_and_transform_text

    text = model.config.modalities["text"]
    try:
        tokenizer = BPETokenizer(vocab, context_length=text.context_length)
    except CheckpointError as exc:  # none installed, or not a merges file
        raise ModelInputError(f"--text: {exc}" + ("" if vocab else "; give it with --bpe-vocab FILE")) from None
    if tokenizer.vocab_size != text.vocab_size:
        raise ModelInputError(f"--text: the BPE vocabulary {tokenizer.vocab_path} has {tokenizer.vocab_size} ids and "
                              f"the model's text encoder {text.vocab_size}: its ids would be other words; give the "
                              f"vocabulary the model was trained with (--bpe-vocab)")
    return load_and_transform_text(texts, tokenizer)


READERS: dict[str, Callable[[nn.Module, list[str]], torch.Tensor]] = {
    "image": read_image, "video": read_video, "audio": read_audio, "depth": _channel_map("depth"),
    "thermal": _channel_map("thermal"), "imu": read_imu, "points": read_points,
}


__all__ = ["READERS", "ARRAY_SUFFIXES", "read_array", "read_text", "decode_video", "stack"]
