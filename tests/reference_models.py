"""PyTorch reference models for the parity tests (torchvision, timm, DINO formulas).

Everything here is test-side: the references are built from torchvision and
timm with random weights *and random BatchNorm/LayerNorm statistics*, so that
swapped mean/var, a missing batch_stats entry or a transposed scale cannot hide
behind the default 0/1 values.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def randomize_(model: nn.Module, seed: int, *, attention_scale: float = 1.0) -> nn.Module:
  """Gives every parameter and norm statistic a random, well-scaled value.

  Convolutions and linears get variance-preserving normal weights
  (std 1/sqrt(fan_in)) so activations stay O(1) through deep nets; BatchNorm
  gets running_mean ~ N(0, 0.5), running_var ~ U(0.5, 2), scale ~ U(0.5, 1.5),
  bias ~ N(0, 0.2); LayerNorm likewise. ``attention_scale`` multiplies the qkv
  weights so attention is far from uniform (a wrong head count must then
  change the output visibly); keep it moderate (<= 1.5 for 12 ViT blocks):
  sharper attention makes the net chaotic, and float32 rounding alone then
  grows by ~2x per block.
  """
  gen = torch.Generator().manual_seed(seed)

  def normal(shape, std):
    return torch.randn(shape, generator=gen) * std

  with torch.no_grad():
    for name, module in model.named_modules():
      if isinstance(module, (nn.Conv2d, nn.Linear)):
        fan_in = module.weight[0].numel()
        scale = attention_scale if name.endswith('attn.qkv') else 1.0
        std = scale / math.sqrt(fan_in)
        if module.weight.numel() >= 16:
          # In place, without a temporary (ResNet-50 x5 has 586M weights); from 16
          # elements on, torch's normal_ draws exactly the values of randn(...) * std.
          module.weight.normal_(0.0, std, generator=gen)
        else:
          module.weight.copy_(normal(module.weight.shape, std))
        if module.bias is not None:
          module.bias.copy_(normal(module.bias.shape, 0.1))
      elif isinstance(module, nn.BatchNorm2d):
        c = module.num_features
        module.running_mean.copy_(normal((c,), 0.5))
        module.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
        module.weight.copy_(torch.rand(c, generator=gen) + 0.5)
        module.bias.copy_(normal((c,), 0.2))
      elif isinstance(module, nn.LayerNorm):
        module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
        module.bias.copy_(normal(module.bias.shape, 0.2))
    for name, param in model.named_parameters():
      if name in ('cls_token', 'pos_embed'):
        param.copy_(normal(param.shape, 0.5))
  return model.eval()


def state_dict_numpy(model: nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


class TFSamePad(nn.Module):
  """Runs ``inner`` (padding 0) after TensorFlow 'SAME' padding, done by hand.

  TF pads ``total = max((ceil(n / s) - 1) * s + k - n, 0)`` with
  ``total // 2`` before and the rest after: asymmetric for even sizes and
  stride 2, unlike PyTorch's symmetric padding.
  """

  def __init__(self, inner: nn.Module, kernel: int, stride: int, value: float = 0.0):
    super().__init__()
    self.inner, self.kernel, self.stride, self.value = inner, kernel, stride, value

  def forward(self, x):
    pads = []
    for n in (x.shape[-1], x.shape[-2]):  # F.pad order: last dim first
      total = max((math.ceil(n / self.stride) - 1) * self.stride + self.kernel - n, 0)
      pads += [total // 2, total - total // 2]
    return self.inner(F.pad(x, pads, value=self.value))


def tf_same_resnet_(model: nn.Module, *, convs: bool, pool: bool) -> nn.Module:
  """Turns a torchvision ResNet's padding into TF 'SAME' (BYOL: both; SimCLR: pool)."""
  def swap(parent: nn.Module):
    for name, child in parent.named_children():
      if convs and isinstance(child, nn.Conv2d):
        k, s = child.kernel_size[0], child.stride[0]
        child.padding = (0, 0)
        setattr(parent, name, TFSamePad(child, k, s))
      elif pool and isinstance(child, nn.MaxPool2d):
        child.padding = 0
        setattr(parent, name, TFSamePad(child, child.kernel_size, child.stride,
                                        value=-math.inf))
      else:
        swap(child)
  swap(model)
  return model


def unwrap_tf_same_state(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """State dict names of a :func:`tf_same_resnet_` model without the wrapper level."""
  return {k.replace('.inner.', '.'): v for k, v in state.items()}


def dino_interpolate_pos_encoding(pos_embed: torch.Tensor, height: int, width: int,
                                  patch: int) -> torch.Tensor:
  """DINO's ``VisionTransformer.interpolate_pos_encoding``, written from its formula.

  Bicubic ``F.interpolate`` (no antialias, align_corners=False) of the patch
  position grid with ``scale_factor = ((h // p + 0.1) / g, (w // p + 0.1) / g)``.
  """
  num_patches = pos_embed.shape[1] - 1
  grid = int(math.sqrt(num_patches))
  h0, w0 = height // patch, width // patch
  if h0 * w0 == num_patches and height == width:
    return pos_embed
  dim = pos_embed.shape[-1]
  patch_pos = pos_embed[:, 1:].reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
  patch_pos = F.interpolate(patch_pos, scale_factor=((h0 + 0.1) / grid, (w0 + 0.1) / grid),
                            mode='bicubic')
  assert patch_pos.shape[-2:] == (h0, w0)
  patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)
  return torch.cat([pos_embed[:, :1], patch_pos], dim=1)


def dino_forward(vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
  """DINO's ViT forward (prepare_tokens -> blocks -> norm -> CLS) on timm modules."""
  n, _, height, width = images.shape
  tokens = vit.patch_embed.proj(images).flatten(2).transpose(1, 2)
  tokens = torch.cat([vit.cls_token.expand(n, -1, -1), tokens], dim=1)
  tokens = tokens + dino_interpolate_pos_encoding(
      vit.pos_embed, height, width, vit.patch_embed.proj.kernel_size[0])
  for block in vit.blocks:
    tokens = block(tokens)
  return vit.norm(tokens)[:, 0]


def max_relative_error(actual, expected) -> float:
  """max_i max_j |actual_ij - expected_ij| / max_j |expected_ij| over samples i."""
  actual = np.asarray(actual, np.float64).reshape(len(actual), -1)
  expected = np.asarray(expected, np.float64).reshape(len(expected), -1)
  scale = np.abs(expected).max(axis=1)
  return float((np.abs(actual - expected).max(axis=1) / scale).max())
