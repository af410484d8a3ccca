"""FCN-8s (Long, Shelhamer & Darrell, "Fully Convolutional Networks for Semantic Segmentation", 2015).

VGG16 encoder -> fc6/fc7 as convolutions -> class scores at strides 32 (conv7), 16 (pool4) and 8
(pool3), fused by addition after learned 2x up-sampling, then a fixed 8x bilinear up-sampling.

Choices, and why:

* ``encoder.features`` is torchvision's VGG16 ``features`` stack (built by torchvision's own
  ``make_layers``, so the layer indices and state-dict keys are identical: pool3 = ``features[16]``,
  pool4 = ``features[23]``, pool5 = ``features[30]``). ``encoder.classifier`` keeps torchvision's
  indices too (``0`` = fc6, ``3`` = fc7), so a torchvision VGG16 state dict loads into ``encoder`` as is,
  with fc6/fc7 "convolutionalised" by :func:`pipeline.model.registry.load_encoder_weights` (a Linear
  [4096, 25088] weight is exactly a 7x7 conv [4096, 512, 7, 7] weight, reshaped).
* fc6 is a 7x7 convolution with padding 3 (the paper's fc6, same receptive field, 102.8M parameters)
  rather than the 1x1 variant: it is what makes the ImageNet fc6 weights usable. The paper's 100-pixel
  input padding and crop offsets are replaced by ``padding=3`` so the score maps align with the input
  without cropping (inputs must have H, W divisible by 32; :class:`pipeline.model.registry.SegModel` pads).
* The new score layers on pool3/pool4 start at zero (as in the paper): at initialisation FCN-8s equals
  FCN-32s, and the skips are learned from there.
* The learned 2x up-samplings are ``ConvTranspose2d(k=4, s=2)`` initialised to bilinear interpolation.
  Their input is replicate-padded by one cell first, so the initial operator is exactly bilinear up to
  the border (a plain zero-padded deconvolution fades the outer row to 75 %, i.e. the outer 32 image
  pixels at stride 32, where aerial tiles often have buildings cut by the tile edge).
* The final 8x up-sampling is fixed bilinear (the paper freezes it too), done with ``F.interpolate``:
  the same operator as a bilinear deconvolution in the interior, without the fade at the borders.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.vgg import cfgs, make_layers

# Indices in VGG16 ``features`` (torchvision layout) whose outputs feed the skips.
POOL3, POOL4 = 16, 23


def bilinear_kernel(channels: int, size: int) -> Tensor:
    """Weight [channels, channels, size, size] of a ConvTranspose2d doing bilinear up-sampling by
    ``size // 2`` channel by channel (identity across channels), as in the FCN reference code."""
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    og = torch.arange(size, dtype=torch.float32)
    filt1d = 1 - (og - center).abs() / factor
    filt = filt1d[:, None] * filt1d[None, :]
    weight = torch.zeros(channels, channels, size, size)
    weight[range(channels), range(channels)] = filt
    return weight


class Upsample2x(nn.Module):
    """Learned 2x up-sampling: replicate-pad by 1, ``ConvTranspose2d(k=4, s=2, p=3)``, bilinear init.

    [B, C, h, w] -> [B, C, 2h, 2w]; at initialisation it equals bilinear interpolation everywhere
    (``align_corners=False`` with edge clamping), borders included.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        # Output size (h + 2 - 1) * 2 - 2 * 3 + 4 = 2h: the extra padding cancels the replicate border.
        self.deconv = nn.ConvTranspose2d(channels, channels, kernel_size=4, stride=2, padding=3, bias=False)
        with torch.no_grad():
            self.deconv.weight.copy_(bilinear_kernel(channels, 4))

    def forward(self, x: Tensor) -> Tensor:
        return self.deconv(F.pad(x, (1, 1, 1, 1), mode="replicate"))


class VGG16Backbone(nn.Module):
    """VGG16 conv layers plus fc6/fc7 as convolutions; returns (pool3, pool4, fc7).

    Shapes for input [B, in_channels, H, W]: pool3 [B, 256, H/8, W/8], pool4 [B, 512, H/16, W/16],
    fc7 [B, 4096, H/32, W/32].
    """

    def __init__(self, in_channels: int = 3, fc_channels: int = 4096, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = make_layers(cfgs["D"], batch_norm=False)  # torchvision's VGG16 stack
        if in_channels != 3:
            self.features[0] = nn.Conv2d(in_channels, 64, kernel_size=3, padding=1)
        # Same indices as torchvision's VGG classifier (0 = fc6, 3 = fc7) so its weights map by name.
        self.classifier = nn.Sequential(
            nn.Conv2d(512, fc_channels, kernel_size=7, padding=3),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Conv2d(fc_channels, fc_channels, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # torchvision's VGG init, for training from scratch
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        pool3 = pool4 = x
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i == POOL3:
                pool3 = x
            elif i == POOL4:
                pool4 = x
        return pool3, pool4, self.classifier(x)


class FCN8s(nn.Module):
    """FCN-8s: logits [B, classes, H, W] for input [B, in_channels, H, W], H and W divisible by 32."""

    output_stride = 32

    def __init__(self, classes: int, in_channels: int = 3, fc_channels: int = 4096) -> None:
        super().__init__()
        self.encoder = VGG16Backbone(in_channels, fc_channels)
        self.score_fr = nn.Conv2d(fc_channels, classes, kernel_size=1)  # on conv7 (fc7), stride 32
        self.score_pool4 = nn.Conv2d(512, classes, kernel_size=1)  # stride 16
        self.score_pool3 = nn.Conv2d(256, classes, kernel_size=1)  # stride 8
        for m in (self.score_pool4, self.score_pool3):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        self.upscore2 = Upsample2x(classes)  # stride 32 -> 16
        self.upscore_pool4 = Upsample2x(classes)  # stride 16 -> 8

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if h % 32 or w % 32:
            raise ValueError(
                f"FCN8s needs H and W divisible by 32, got {h}x{w}; pad the input (SegModel does this)"
            )
        pool3, pool4, fc7 = self.encoder(x)
        score = self.upscore2(self.score_fr(fc7)) + self.score_pool4(pool4)
        score = self.upscore_pool4(score) + self.score_pool3(pool3)
        return F.interpolate(score, size=(h, w), mode="bilinear", align_corners=False)
