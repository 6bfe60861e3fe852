"""Image distortions and preprocessing on whole batches, on the training device.

Definitions follow tf.image (the recipe's library): brightness adds a delta, contrast
scales each channel about its own mean, and per-image standardization divides by
max(std, 1/sqrt(N)) over all N values of an image. No clipping: the recipe distorts
float images, for which tf.image does not clip.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def crop(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int) -> torch.Tensor:
    """size x size windows at per-image offsets, gathered in one indexing operation over a view of
    every window (no copy until the gather)."""
    windows = images.unfold(-2, size, 1).unfold(-2, size, 1)  # N, C, rows, cols, size, size
    return windows[torch.arange(len(images), device=images.device), :, top, left]


def centre_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    top = (images.shape[-2] - size) // 2
    left = (images.shape[-1] - size) // 2
    return images[..., top : top + size, left : left + size]


def flip(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the images where mask is true."""
    return torch.where(mask[:, None, None, None], images.flip(-1), images)


def standardize(images: torch.Tensor) -> torch.Tensor:
    values = images[0].numel()
    variance, mean = torch.var_mean(images.flatten(1), dim=1, correction=0)
    std = variance.sqrt().clamp_min(values**-0.5)
    return (images - mean[:, None, None, None]) / std[:, None, None, None]


def uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=generator.device) * (high - low) + low


def channel_moments(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of each image's channels, (N, C) each: the mean, then the mean square about it.
    Two passes are as accurate as torch.var_mean's Welford pass and a tenth of its time on the CPU, where it
    was a measurable share of the recipe's step."""
    flat = images.flatten(2)
    mean = flat.mean(2)
    centred = flat - mean[..., None]
    return mean, torch.linalg.vecdot(centred, centred) / flat.shape[2]


def standardized_brightness_contrast(images: torch.Tensor, delta: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """standardize(adjust_contrast(adjust_brightness(images, delta), factor)), in one pass over the pixels.

    Brightness adds delta to every value; contrast maps each channel to (x - m) * factor + m, m its mean.
    Together they send x to x * factor + shift, per image and channel, so the mean and variance that
    standardization needs follow from each channel's own, and the result is one multiply-add
    (written channels_last, the layout the networks run in).
    """
    mean, variance = channel_moments(images)
    factor, delta = factor[:, None], delta[:, None]
    shift = mean * (1 - factor) + delta  # (x + delta - (m + delta)) * factor + m + delta = x * factor + shift
    image_mean = mean.mean(1, keepdim=True) + delta
    image_variance = factor**2 * variance.mean(1, keepdim=True) + mean.var(1, correction=0, keepdim=True)
    std = image_variance.sqrt().clamp_min(images[0].numel() ** -0.5)
    out = torch.empty_like(images, memory_format=torch.channels_last)
    return torch.addcmul(((shift - image_mean) / std)[..., None, None], images, (factor / std)[..., None, None],
                         out=out)


def draws(n: int, generator: torch.Generator, windows: tuple[int, int] | None, flip_prob: float,
          max_brightness: float, contrast: tuple[float, float] | None, coin: bool) -> tuple[torch.Tensor | None, ...]:
    """One batch's random draws, in the recipe's order: crop offsets (from `windows` positions down and across;
    None for the centre), the mirror coin (when `coin`), brightness deltas, contrast factors."""
    device = generator.device
    top, left = (torch.randint(0, w, (n,), generator=generator, device=device) for w in windows) if windows \
        else (None, None)
    mirror = torch.rand(n, generator=generator, device=device) < flip_prob if coin else None
    delta = uniform(n, -max_brightness, max_brightness, generator) if max_brightness else torch.zeros(n, device=device)
    factor = uniform(n, contrast[0], contrast[1], generator) if contrast else torch.ones(n, device=device)
    return top, left, mirror, delta, factor


def distort(
    images: torch.Tensor,
    generator: torch.Generator | list[torch.Generator],
    crop_size: int,
    random_crop: bool = True,
    pad: int = 0,
    flip_prob: float = 0.5,
    max_brightness: float = 63.0,
    contrast: tuple[float, float] = (0.2, 1.8),
    mirror: torch.Tensor | None = None,
) -> torch.Tensor:
    """The recipe's training distortions on a uint8 batch, returning standardized float32, channels_last.

    pad > 0 reflects the borders out first, so that a random crop can also translate the image.
    `mirror`, when given, says which images to flip instead of a coin with flip_prob. Without padding
    (which reflects in float), crops are cut from the bytes before the conversion: a quarter of the traffic.
    A list of generators splits the batch into as many equal parts, each drawn from its own generator: every
    part comes out as it would alone, for the cost of one batch (on the CPU, mostly the operations' own).
    """
    x = F.pad(images.float(), (pad,) * 4, mode="reflect") if pad else images
    generators = generator if isinstance(generator, list) else [generator]
    windows = tuple(side - crop_size + 1 for side in x.shape[-2:]) if random_crop else None
    parts = [draws(len(x) // len(generators), g, windows, flip_prob, max_brightness, contrast, mirror is None)
             for g in generators]
    top, left, coin, delta, factor = (torch.cat(drawn) if drawn[0] is not None else None for drawn in zip(*parts))
    x = crop(x, top, left, crop_size) if random_crop else centre_crop(x, crop_size)
    x = flip(x.float(), coin if mirror is None else mirror)
    return standardized_brightness_contrast(x, delta, factor)


def shrink(images: torch.Tensor, size: int) -> torch.Tensor:
    """A float batch scaled down to size x size, antialiased (every pixel counts, none is skipped), channels_last."""
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True).contiguous(
        memory_format=torch.channels_last)


def preprocess(images: torch.Tensor, crop_size: int) -> torch.Tensor:
    """Test-time preprocessing: centre crop and standardization, never a distortion."""
    return standardize(centre_crop(images.float(), crop_size))


def tta_views(images: torch.Tensor, level: int) -> list[tuple[float, torch.Tensor]]:
    """(weight, view) pairs whose weighted logits make the test-time-augmented prediction.

    level 0: the image; 1: the image and its mirror; 2: half of that, plus the mirrored pairs of the
    image shifted one pixel up-left and down-right (reflected borders), a quarter each.
    """
    if level == 0:
        return [(1.0, images)]
    mirrored = [(0.5, images), (0.5, images.flip(-1))]
    if level == 1:
        return mirrored
    h, w = images.shape[-2:]
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    shifted = [padded[..., :h, :w], padded[..., 2:, 2:]]
    return [(weight / 2, view) for weight, view in mirrored] + [
        (0.125, view) for s in shifted for view in (s, s.flip(-1))
    ]
