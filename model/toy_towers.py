"""The toy world's vision towers: what stands in for OpenAI's CLIP and for SAM's SA-1B weights.

In LISA nothing on the vision side is random: CLIP ViT-L/14 comes pretrained and frozen, SAM comes
pretrained on SA-1B. The toy LISA copies that: both towers are pretrained once on toy scenes
(``training/toy_towers.py``) and committed, and the toy LISA trains on top of them.

- The CLIP stand-in is a real ``CLIPVisionModel`` (112 px, patch 14: N = 64 tokens), so every
  method that reads CLIP (CLS attention, hidden states, keys) reads it as it reads ViT-L/14.
- The SAM stand-in is a real ``Sam`` whose image encoder is convolutional, as MobileSAM's TinyViT
  and EfficientViT-SAM's stages are: small ViTs learn shape far more slowly than convolutions
  (a global-attention patch-32 ViT reached 0.44 kind accuracy in 19 CPU minutes here). The encoder
  keeps SAM's contract: ``B x 3 x 1024 x 1024`` normalised input -> ``B x C x 64 x 64`` embedding.
"""

from __future__ import annotations

from segment_anything.modeling.common import LayerNorm2d
from torch import Tensor, nn

#: SAM's input side and embedding grid (the toy encoder keeps both).
SAM_INPUT = 1024
SAM_GRID = 64


class ConvBlock(nn.Sequential):
    """3 x 3 convolution (optionally dilated or strided), BatchNorm, GELU."""

    def __init__(self, cin: int, cout: int, *, stride: int = 1, dilation: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(cout),
            nn.GELU(),
        )


class ResidualDilated(nn.Module):
    """``x + block(x)`` at one resolution; dilation widens the receptive field without striding."""

    def __init__(self, width: int, dilation: int):
        super().__init__()
        self.block = ConvBlock(width, width, dilation=dilation)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class ToyConvImageEncoder(nn.Module):
    """SAM's image encoder for the toy world: ``B x 3 x 1024 x 1024`` -> ``B x out_chans x 64 x 64``.

    The toy images are 128 px, which SAM's preprocessing enlarges 8x; the stem undoes that with an
    8 x 8 stride-8 convolution (one cell per original pixel), a strided block halves to the 64 x 64
    grid, and residual dilated blocks (dilations ``dilations``) reach across a whole shape (the largest
    is 42 px wide, 21 cells). The neck is SAM's (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d).
    """

    img_size = SAM_INPUT

    def __init__(self, *, width: int = 64, out_chans: int = 64, dilations: tuple[int, ...] = (1, 2, 4, 8, 1)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width // 2, kernel_size=8, stride=8), nn.BatchNorm2d(width // 2),
                                  nn.GELU())
        self.down = ConvBlock(width // 2, width, stride=2)
        self.blocks = nn.Sequential(*(ResidualDilated(width, d) for d in dilations))
        self.neck = nn.Sequential(
            nn.Conv2d(width, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.neck(self.blocks(self.down(self.stem(x))))
