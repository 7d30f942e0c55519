"""The Visual Genome Faster R-CNN of bottom-up attention (ResNet C4, attribute head) on torchvision ops.

Module names follow Detectron2 (``backbone.res4.5.conv2.norm.weight``...) so the model's state dict
IS the Detectron2 weight layout. Semantics follow Detectron2 as py-bottom-up-attention uses it:
Caffe-style input (BGR, mean subtracted, std 1), frozen BN, stem max-pool with padding 0 and
ceil_mode, stride in the 1x1 conv, RPN anchors centred on cell corners (offset 0) without rounding,
box deltas weighted (1,1,1,1) in the RPN and (10,10,5,5) in the box head, boxes clipped to the image,
background as the LAST class of ``cls_score`` and of ``attr_score``.

Input rule (``cfg.resize``): "caffe" is the original bottom-up-attention's ``_get_image_blob``: the pixel
means subtracted from the float image, ONE scale factor, ``cv2.resize`` bilinear on the float image, boxes
mapped back by dividing by that factor; "detectron2" is ResizeShortestEdge's: PIL bilinear on the uint8
image (antialiased when shrinking), per-axis size ratios for the boxes. Either way the worker hands the
model its input tensor: uint8 pixels (detectron2, normalised on the device) or the already normalised
float image (caffe).

Precision: under autocast (CUDA bf16/fp16, CPU bf16) the backbone and res5 run in the low precision; the
RPN head and the box/class/attribute predictors run in float32 (bf16 objectness logits tie, so top-k and
NMS would pick among equals arbitrarily), and RoI pooling runs in float32 with float32 boxes.

Batching rule: padding images to a common size changes every border activation after the first
conv, and users lost GQA accuracy to it. The backbone and RPN therefore run on groups of images of
identical size only (no padding ever); the RoI head, where most of the time goes, runs on the
pooled regions of all images at once. A batch gives each image what batch size 1 gives it, up to
float rounding (the same proposals and kept boxes; features within 1e-4 relative).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import FrozenBatchNorm2d, clip_boxes_to_image, nms, roi_align, roi_pool

from extractor.detector.config import SCALE_CLAMP, DetectorConfig

C4_STRIDE = 16
# A resized image must give the backbone at least one C4 cell.
MIN_RESIZED_SIDE = C4_STRIDE
# Regions res5 runs on at once: about 5-7 MB of float32 activations each in R101 (one image's 300 proposals
# take 1.5-2 GB); any chunk gives the same features (res5 sees each region alone).
DEFAULT_REGION_CHUNK = 300


# ---------------------------------------------------------------- test-time input

def resized_shape(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """Detectron2's ResizeShortestEdge at test time: shortest side to min_size, longest capped at max_size."""
    scale = min_size / min(height, width)
    new_h, new_w = height * scale, width * scale
    if max(new_h, new_w) > max_size:
        cap = max_size / max(new_h, new_w)
        new_h, new_w = new_h * cap, new_w * cap
    return int(new_h + 0.5), int(new_w + 0.5)


def resize_image(image: np.ndarray, min_size: int, max_size: int) -> np.ndarray:
    """Resize an HxWx3 uint8 image as Detectron2 does at test time (PIL bilinear on uint8)."""
    h, w = image.shape[:2]
    new_h, new_w = resized_shape(h, w, min_size, max_size)
    if (new_h, new_w) == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))


def image_to_tensor(image: np.ndarray) -> Tensor:
    """HxWx3 BGR array -> 3xHxW tensor of the same dtype (uint8 stays uint8: DataLoader workers ship 4x less)."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def caffe_scale(height: int, width: int, min_size: int, max_size: int) -> float:
    """The original's one scale factor: shortest side to min_size unless the longest would pass max_size."""
    scale = float(min_size) / float(min(height, width))
    if np.round(scale * max(height, width)) > max_size:
        scale = float(max_size) / float(max(height, width))
    return scale


def caffe_input(image: np.ndarray, pixel_mean: Sequence[float], pixel_std: Sequence[float], min_size: int,
                max_size: int) -> tuple[np.ndarray, float]:
    """(HxWx3 float32 network input, scale): means subtracted from the float image, then one cv2 bilinear
    resize by the scale, as bottom-up-attention's _get_image_blob (std 1 there; other stds divide after)."""
    h, w = image.shape[:2]
    scale = caffe_scale(h, w, min_size, max_size)
    im = image.astype(np.float32, copy=True)
    im -= np.asarray(pixel_mean, dtype=np.float64)  # float64 means, as the original's cfg.PIXEL_MEANS
    im = cv2.resize(im, None, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    if any(s != 1.0 for s in pixel_std):
        im /= np.asarray(pixel_std, dtype=np.float32)
    return im, scale


def preprocess(image: np.ndarray, cfg: DetectorConfig) -> tuple[Tensor, float | None]:
    """Original HxWx3 uint8 BGR image -> (the detector's 3xhxw input, the caffe scale or None) by cfg.resize:
    caffe gives the normalised float32 image, detectron2 the resized uint8 pixels (normalised on the device)."""
    if cfg.resize == "caffe":
        im, scale = caffe_input(image, cfg.pixel_mean, cfg.pixel_std, cfg.min_size_test, cfg.max_size_test)
        return image_to_tensor(im), scale
    return image_to_tensor(resize_image(image, cfg.min_size_test, cfg.max_size_test)), None


def boxes_to_original(boxes: Tensor, original_size: tuple[int, int], resized_size: tuple[int, int],
                      scale: float | None) -> Tensor:
    """(n, 4) boxes in input pixels -> original pixels, clipped to the image: divided by the caffe scale
    (generate_tsv's ``rois / im_scale``), or, with scale None (detectron2), times the per-axis size ratios."""
    h, w = original_size
    if scale is not None:
        out = boxes.float() / scale
    else:
        rh, rw = resized_size
        out = boxes.float() * boxes.new_tensor([w / rw, h / rh, w / rw, h / rh], dtype=torch.float32)
    out[:, 0::2] = out[:, 0::2].clamp(0, w)
    out[:, 1::2] = out[:, 1::2].clamp(0, h)
    return out


# ---------------------------------------------------------------- backbone

class Conv2dNorm(nn.Conv2d):
    """A bias-free conv followed by a frozen BN stored as ``.norm`` (Detectron2's layout).

    The frozen BN is an affine map, so it is folded into the conv's weight and bias on the fly:
    one pass over the activations instead of three, same result up to rounding.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=False)
        self.norm = FrozenBatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        bn = self.norm
        scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
        bias = bn.bias - bn.running_mean * scale
        return F.conv2d(x, self.weight * scale.view(-1, 1, 1, 1), bias, self.stride, self.padding,
                        self.dilation, self.groups)


class Stem(nn.Module):
    """conv1 7x7/2 + frozen BN + ReLU + 3x3/2 max-pool (Caffe: padding 0, ceil_mode)."""

    def __init__(self, out_channels: int, caffe_maxpool: bool) -> None:
        super().__init__()
        self.conv1 = Conv2dNorm(3, out_channels, 7, stride=2, padding=3)
        self.caffe_maxpool = caffe_maxpool

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu_(self.conv1(x))
        if self.caffe_maxpool:
            return F.max_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True)
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class Bottleneck(nn.Module):
    """ResNet bottleneck; the stride sits in conv1 (MSRA/Caffe) when stride_in_1x1."""

    def __init__(self, in_channels: int, out_channels: int, bottleneck_channels: int, *, stride: int,
                 num_groups: int, dilation: int, stride_in_1x1: bool) -> None:
        super().__init__()
        self.shortcut = (Conv2dNorm(in_channels, out_channels, 1, stride=stride)
                         if in_channels != out_channels else None)
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = Conv2dNorm(in_channels, bottleneck_channels, 1, stride=stride_1x1)
        self.conv2 = Conv2dNorm(bottleneck_channels, bottleneck_channels, 3, stride=stride_3x3,
                                padding=dilation, dilation=dilation, groups=num_groups)
        self.conv3 = Conv2dNorm(bottleneck_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        out = self.conv3(out)
        out = out + (x if self.shortcut is None else self.shortcut(x))
        return F.relu_(out)


def make_stage(num_blocks: int, in_channels: int, out_channels: int, bottleneck_channels: int, *,
               first_stride: int, dilation: int, num_groups: int, stride_in_1x1: bool) -> nn.Sequential:
    """A ResNet stage: the first block changes width/stride, the rest keep it."""
    blocks = []
    for i in range(num_blocks):
        blocks.append(Bottleneck(in_channels if i == 0 else out_channels, out_channels, bottleneck_channels,
                                 stride=first_stride if i == 0 else 1, num_groups=num_groups,
                                 dilation=dilation, stride_in_1x1=stride_in_1x1))
    return nn.Sequential(*blocks)


class ResNetC4(nn.Module):
    """stem + res2..res4: the stride-16 feature map (C4) shared by the RPN and the RoI head."""

    def __init__(self, cfg: DetectorConfig) -> None:
        super().__init__()
        width = cfg.num_groups * cfg.width_per_group
        out = cfg.res2_out_channels
        kw = {"dilation": 1, "num_groups": cfg.num_groups, "stride_in_1x1": cfg.stride_in_1x1}
        self.stem = Stem(cfg.stem_out_channels, cfg.caffe_maxpool)
        self.res2 = make_stage(cfg.num_blocks[0], cfg.stem_out_channels, out, width, first_stride=1, **kw)
        self.res3 = make_stage(cfg.num_blocks[1], out, out * 2, width * 2, first_stride=2, **kw)
        self.res4 = make_stage(cfg.num_blocks[2], out * 2, out * 4, width * 4, first_stride=2, **kw)
        self.out_channels = out * 4

    def forward(self, x: Tensor) -> Tensor:
        return self.res4(self.res3(self.res2(self.stem(x))))


# ---------------------------------------------------------------- region proposals

class BoxDecoder(BoxCoder):
    """torchvision's BoxCoder (weights, scale clamp, encode) with a decode that makes no tensor from a Python
    number: torchvision's makes two per call, each a synchronous host-to-device copy on CUDA. The same
    arithmetic element by element (centre shift, clamped log-scale, half sizes), so the same boxes."""

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        """(R, 4K) deltas applied to (R, 4) boxes -> (R, 4K) boxes x1 y1 x2 y2."""
        boxes = boxes.to(rel_codes.dtype)
        n, k = rel_codes.shape[0], rel_codes.shape[1] // 4
        size = boxes[:, 2:] - boxes[:, :2]  # (R, 2) width, height
        centre = boxes[:, :2] + 0.5 * size
        deltas = rel_codes.reshape(n, k, 4)
        wx, wy, ww, wh = self.weights
        shift = torch.stack((deltas[..., 0] / wx, deltas[..., 1] / wy), dim=-1)
        log_scale = torch.stack((deltas[..., 2] / ww, deltas[..., 3] / wh), dim=-1).clamp(max=self.bbox_xform_clip)
        new_centre = shift * size[:, None] + centre[:, None]
        half = 0.5 * (torch.exp(log_scale) * size[:, None])
        return torch.cat((new_centre - half, new_centre + half), dim=-1).reshape(n, 4 * k)


def cell_anchors(sizes: Sequence[float], ratios: Sequence[float]) -> Tensor:
    """(A, 4) anchors centred on 0, size-major then ratio (Detectron2's order and maths, no rounding)."""
    out = []
    for size in sizes:
        for ratio in ratios:
            w = (size * size / ratio) ** 0.5
            h = ratio * w
            out.append([-w / 2, -h / 2, w / 2, h / 2])
    return torch.tensor(out, dtype=torch.float32)


def grid_anchors(cells: Tensor, height: int, width: int, stride: int, offset: float) -> Tensor:
    """(H*W*A, 4) anchors of a feature map, location-major: row y, column x, then anchor a."""
    dev = cells.device
    xs = torch.arange(width, dtype=torch.float32, device=dev) * stride + offset * stride
    ys = torch.arange(height, dtype=torch.float32, device=dev) * stride + offset * stride
    sy, sx = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack((sx, sy, sx, sy), dim=-1).reshape(-1, 1, 4)
    return (shifts + cells.view(1, -1, 4)).reshape(-1, 4)


class RPNHead(nn.Module):
    """3x3 conv (hidden channels) + ReLU, then 1x1 objectness and 1x1 box deltas per anchor."""

    def __init__(self, in_channels: int, hidden_channels: int, num_anchors: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, hidden_channels, 3, padding=1)
        self.objectness_logits = nn.Conv2d(hidden_channels, num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(hidden_channels, num_anchors * 4, 1)
        for layer in (self.conv, self.objectness_logits, self.anchor_deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        with torch.autocast(x.device.type, enabled=False):  # float32 logits: no ties for top-k and NMS
            t = F.relu(self.conv(x.float()))
            return self.objectness_logits(t), self.anchor_deltas(t)


class RegionProposalNetwork(nn.Module):
    """RPN on C4: top-k anchors by objectness, decode, clip, drop empty, NMS, keep post-NMS top-k."""

    def __init__(self, cfg: DetectorConfig, in_channels: int) -> None:
        super().__init__()
        hidden = in_channels if cfg.rpn_hidden_channels == -1 else cfg.rpn_hidden_channels
        self.rpn_head = RPNHead(in_channels, hidden, cfg.num_anchors)
        self.register_buffer("cell_anchors", cell_anchors(cfg.anchor_sizes, cfg.anchor_ratios),
                             persistent=False)
        self.box_coder = BoxDecoder(cfg.rpn_bbox_reg_weights, bbox_xform_clip=SCALE_CLAMP)
        self.anchor_offset = cfg.anchor_offset
        self.pre_nms_topk = cfg.rpn_pre_nms_topk
        self.post_nms_topk = cfg.rpn_post_nms_topk
        self.nms_thresh = cfg.rpn_nms_thresh
        self.min_size = cfg.rpn_min_size

    def head_outputs(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Objectness (N, H*W*A), deltas (N, H*W*A, 4) and anchors (H*W*A, 4), all in one order."""
        logits, deltas = self.rpn_head(features)
        n, a, h, w = logits.shape
        logits = logits.permute(0, 2, 3, 1).reshape(n, -1)
        deltas = deltas.view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
        anchors = grid_anchors(self.cell_anchors, h, w, C4_STRIDE, self.anchor_offset)
        return logits.float(), deltas.float(), anchors

    def select(self, logits: Tensor, deltas: Tensor, anchors: Tensor, image_size: tuple[int, int]) -> Tensor:
        """One image's proposals (R, 4), sorted by objectness, from its flat head outputs."""
        k = min(self.pre_nms_topk, logits.numel())
        scores, idx = logits.topk(k)
        boxes = self.box_coder.decode_single(deltas[idx], anchors[idx])
        boxes = clip_boxes_to_image(boxes, image_size)
        wh = boxes[:, 2:] - boxes[:, :2]
        keep = (wh > self.min_size).all(dim=1) & torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
        keep = torch.where(keep)[0]  # one nonzero (one host sync on CUDA) for both gathers
        boxes, scores = boxes[keep], scores[keep]
        keep = nms(boxes, scores, self.nms_thresh)[: self.post_nms_topk]
        return boxes[keep]

    def forward(self, features: Tensor, image_sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
        logits, deltas, anchors = self.head_outputs(features)
        return [self.select(logits[i], deltas[i], anchors, size) for i, size in enumerate(image_sizes)]


# ---------------------------------------------------------------- RoI head

class BoxPredictor(nn.Module):
    """cls_score (C+1, background last), class-specific bbox_pred (4C), optional attribute head."""

    def __init__(self, feature_dim: int, num_classes: int, num_attributes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(feature_dim, num_classes + 1)
        self.bbox_pred = nn.Linear(feature_dim, num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)
        self.attribute_on = num_attributes > 0
        if self.attribute_on:
            self.cls_embedding = nn.Embedding(num_classes + 1, feature_dim // 8)
            self.fc_attr = nn.Linear(feature_dim + feature_dim // 8, feature_dim // 4)
            self.attr_score = nn.Linear(feature_dim // 4, num_attributes + 1)

    def attribute_logits(self, features: Tensor, classes: Tensor) -> Tensor:
        """Attribute logits given each region's class (at test time its argmax, background included)."""
        with torch.autocast(features.device.type, enabled=False):
            features = features.float()
            x = torch.cat([features, self.cls_embedding(classes).to(features.dtype)], dim=-1)
            return self.attr_score(F.relu(self.fc_attr(x)))

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        with torch.autocast(features.device.type, enabled=False):  # float32 even under autocast
            features = features.float()
            logits = self.cls_score(features)
            deltas = self.bbox_pred(features)
        attrs = self.attribute_logits(features, logits.argmax(dim=-1)) if self.attribute_on else None
        return logits, deltas, attrs


class Res5RoIHeads(nn.Module):
    """Pool regions from C4, run res5 (stride 1, conv2 dilated 2, unless res5_halve), mean-pool."""

    def __init__(self, cfg: DetectorConfig, in_channels: int) -> None:
        super().__init__()
        width = cfg.num_groups * cfg.width_per_group * 8
        self.res5 = make_stage(cfg.num_blocks[3], in_channels, cfg.feature_dim, width,
                               first_stride=2 if cfg.res5_halve else 1, dilation=1 if cfg.res5_halve else 2,
                               num_groups=cfg.num_groups, stride_in_1x1=cfg.stride_in_1x1)
        self.box_predictor = BoxPredictor(cfg.feature_dim, cfg.num_classes,
                                          cfg.num_attributes if cfg.attribute_on else 0)
        self.pooler_type = cfg.pooler_type
        self.resolution = cfg.pooler_resolution
        self.sampling_ratio = cfg.pooler_sampling_ratio
        self.region_chunk = DEFAULT_REGION_CHUNK

    def pool(self, features: Tensor, boxes: list[Tensor]) -> Tensor:
        """(sum R_i, C, S, S) region maps of the images stacked in features, boxes in image pixels.

        Pooled in float32 with float32 boxes and returned in the features' dtype, as torchvision's CUDA
        autocast wrapper does (it has none for the CPU, where low-precision features failed).
        """
        size, scale = (self.resolution, self.resolution), 1.0 / C4_STRIDE
        rois = [b.float() for b in boxes]
        with torch.autocast(features.device.type, enabled=False):
            if self.pooler_type == "ROIPool":
                out = roi_pool(features.float(), rois, size, scale)
            else:
                out = roi_align(features.float(), rois, size, scale, sampling_ratio=self.sampling_ratio,
                                aligned=self.pooler_type == "ROIAlignV2")
        return out.to(features.dtype)

    def forward(self, pooled: Tensor) -> Tensor:
        """Region features (R, D): res5 on the pooled maps, region_chunk regions at a time, then the spatial
        mean (each region is computed alone, so the chunk bounds memory without changing features)."""
        if pooled.shape[0] <= self.region_chunk:
            return self.res5(pooled).mean(dim=(2, 3))
        return torch.cat([self.res5(part).mean(dim=(2, 3)) for part in pooled.split(self.region_chunk)])


# ---------------------------------------------------------------- the detector

@dataclass
class Detections:
    """One image's raw detector output over all its proposals, in resized-image pixels."""

    image_size: tuple[int, int]  # (height, width) of the resized image
    proposals: Tensor  # (R, 4) RPN boxes x1 y1 x2 y2
    scores: Tensor  # (R, C+1) softmax class probabilities, background last
    boxes: Tensor  # (R, C, 4) class-specific regressed boxes, clipped to the image
    features: Tensor  # (R, D) pooled res5 features
    attr_scores: Tensor | None  # (R, A+1) softmax attribute probabilities, "no attribute" last


class VGDetector(nn.Module):
    """Faster R-CNN R-C4 with the Visual Genome attribute head; state dict = Detectron2 weight names."""

    def __init__(self, cfg: DetectorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = ResNetC4(cfg)
        self.proposal_generator = RegionProposalNetwork(cfg, self.backbone.out_channels)
        self.roi_heads = Res5RoIHeads(cfg, self.backbone.out_channels)
        self.box_coder = BoxDecoder(cfg.bbox_reg_weights, bbox_xform_clip=SCALE_CLAMP)
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(3, 1, 1), persistent=False)
        for m in self.modules():
            if isinstance(m, Conv2dNorm):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, Bottleneck):  # each block starts close to identity: sane random outputs
                nn.init.constant_(m.conv3.norm.weight, 0.1)
        self.eval()

    def prepare(self, image: np.ndarray) -> Tensor:
        """Original HxWx3 uint8 BGR image -> the 3xhxw input of forward() by the config's resize rule."""
        return preprocess(image, self.cfg)[0]

    def normalize(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) input -> the network's float input: uint8 BGR pixels are mean-subtracted and
        std-divided here; a float input is already normalised (the caffe rule does it before resizing)."""
        if images.is_floating_point():
            return images.to(self.pixel_mean.device, torch.float32)
        return (images.to(self.pixel_mean.device, torch.float32) - self.pixel_mean) / self.pixel_std

    def predict(self, features: Tensor, proposals: list[Tensor],
                image_sizes: Sequence[tuple[int, int]]) -> list[Detections]:
        """Class/box/attribute predictions for regions already pooled; features (sum R_i, D)."""
        logits, deltas, attr_logits = self.roi_heads.box_predictor(features)
        counts = [p.shape[0] for p in proposals]  # sizes, not len(): a fake tensor's size may be symbolic
        all_props = torch.cat(proposals)
        boxes = self.box_coder.decode_single(deltas.float(), all_props.float())
        boxes = boxes.view(-1, self.cfg.num_classes, 4)
        scores = F.softmax(logits.float(), dim=-1).split(counts)
        attr = F.softmax(attr_logits.float(), dim=-1).split(counts) if attr_logits is not None else None
        out = []
        for i, (props, b, f) in enumerate(zip(proposals, boxes.split(counts), features.split(counts))):
            b = clip_boxes_to_image(b, image_sizes[i])
            out.append(Detections(image_sizes[i], props, scores[i], b, f.float(),
                                  attr[i] if attr is not None else None))
        return out

    @torch.no_grad()
    def forward(self, images: Sequence[Tensor]) -> list[Detections]:
        """Detect on resized 3xHxW BGR images of any sizes; per image as a batch of one (no padding)."""
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(sizes):
            groups.setdefault(s, []).append(i)
        proposals: dict[int, Tensor] = {}
        pooled: dict[int, Tensor] = {}
        for size, idx in groups.items():
            c4 = self.backbone(self.normalize(torch.stack([images[i] for i in idx])))
            props = self.proposal_generator(c4, [size] * len(idx))
            regions = self.roi_heads.pool(c4, props).split([p.shape[0] for p in props])
            for j, i in enumerate(idx):
                proposals[i], pooled[i] = props[j], regions[j]
        order = range(len(images))
        features = self.roi_heads(torch.cat([pooled[i] for i in order]))
        return self.predict(features, [proposals[i] for i in order], sizes)
