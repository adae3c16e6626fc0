"""Torch stand-ins for the two timm layers the released LightningDiT imports, for machines
without timm (timm imports torchvision, which some environments cannot install).

The release's `models/lightningdit_we.py` (sii-research/GAE, also hustvl/LightningDiT) does
`from timm.models.vision_transformer import PatchEmbed, Mlp` and uses nothing else of timm:

  PatchEmbed(img_size, patch_size, in_chans, embed_dim, bias=True)   the DiT's x_embedder:
      a Conv2d with kernel = stride = patch_size, then (B, C, H, W) -> (B, H*W, C); the
      release reads its `.proj`, `.num_patches` and `.patch_size[0]`.
  Mlp(in_features, hidden_features, out_features, act_layer, drop)   the block MLP when
      use_swiglu=False: fc1 -> act -> fc2 (dropout 0).

Both keep timm's parameter names (x_embedder.proj.*, mlp.fc1.*, mlp.fc2.*), so a state
dict is the same as with timm and `gae_jax.convert.dit` reads it unchanged. Written from
timm's documented behaviour (timm/layers/patch_embed.py, timm/layers/mlp.py: defaults
norm_layer=None, flatten=True, strict image size), not copied.

`release_timm()` is a context manager: inside it `import timm.models.vision_transformer`
gives these classes ONLY when the real timm cannot be imported; it says which one it is.
"""

import contextlib
import importlib
import sys
import types

SHIM_MODULES = ("timm", "timm.models", "timm.models.vision_transformer")


def _pair(v):
  return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _classes():
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top

  class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> patch tokens (B, H/p * W/p, embed_dim) by a strided conv."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768,
                 norm_layer=None, flatten=True, bias=True, strict_img_size=True):
      super().__init__()
      self.img_size, self.patch_size = _pair(img_size), _pair(patch_size)
      self.grid_size = (self.img_size[0] // self.patch_size[0],
                        self.img_size[1] // self.patch_size[1])
      self.num_patches = self.grid_size[0] * self.grid_size[1]
      self.flatten, self.strict_img_size = flatten, strict_img_size
      self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size,
                            stride=self.patch_size, bias=bias)
      self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: "torch.Tensor") -> "torch.Tensor":
      if self.strict_img_size and tuple(x.shape[-2:]) != self.img_size:
        raise ValueError(f"PatchEmbed: input size {tuple(x.shape[-2:])} != {self.img_size}")
      x = self.proj(x)
      if self.flatten:
        x = x.flatten(2).transpose(1, 2)
      return self.norm(x)

  class Mlp(nn.Module):
    """fc1 -> act -> dropout -> fc2 -> dropout (token-wise)."""

    def __init__(self, in_features, hidden_features=None, out_features=None,
                 act_layer=nn.GELU, norm_layer=None, bias=True, drop=0.0):
      super().__init__()
      hidden_features = hidden_features or in_features
      out_features = out_features or in_features
      self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
      self.act = act_layer()
      self.drop1 = nn.Dropout(drop)
      self.norm = norm_layer(hidden_features) if norm_layer else nn.Identity()
      self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
      self.drop2 = nn.Dropout(drop)

    def forward(self, x):
      return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))

  return PatchEmbed, Mlp


def timm_importable() -> tuple[bool, str]:
  """(True, version) when `timm.models.vision_transformer` imports, else (False, why).
  A failed import leaves no half-imported timm modules behind."""
  try:
    mod = importlib.import_module("timm.models.vision_transformer")
    del mod
    return True, sys.modules["timm"].__dict__.get("__version__", "?")
  except ImportError as e:
    for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
      del sys.modules[name]
    return False, f"{type(e).__name__}: {e}"


@contextlib.contextmanager
def release_timm(log=print):
  """Inside: timm's PatchEmbed / Mlp importable, the real ones when timm imports, else this
  module's stand-ins (inserted into sys.modules and removed on exit; modules imported
  inside keep their references). Yields 'timm <version>' or 'shim (<why timm failed>)'."""
  ok, info = timm_importable()
  if ok:
    yield f"timm {info}"
    return
  patch_embed, mlp = _classes()
  vt = types.ModuleType("timm.models.vision_transformer")
  vt.PatchEmbed, vt.Mlp = patch_embed, mlp
  models = types.ModuleType("timm.models")
  models.vision_transformer = vt
  root = types.ModuleType("timm")
  root.models = models
  root.__version__ = "gae_jax.benchmark.timm_shim"
  for name, mod in zip(SHIM_MODULES, (root, models, vt)):
    mod.__file__ = __file__
    sys.modules[name] = mod
  what = f"shim (timm's PatchEmbed and Mlp from gae_jax/benchmark/timm_shim.py; timm: {info})"
  log(f"torch_compare: timm cannot be imported, the release's LightningDiT uses the {what}")
  try:
    yield what
  finally:
    for name in SHIM_MODULES:
      if sys.modules.get(name) in (root, models, vt):
        del sys.modules[name]
