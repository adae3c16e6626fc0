"""The authors' released GAE autoencoder (PyTorch Lightning `.ckpt`) <-> gae_jax GAE params.

Their `state_dict` (github.com/sii-research/GAE, tokenizer/gae.py FoundationEncoderModel):
  foundation_encoder.patch_embed.weight        (W, 3, p, p)     conv, no bias
  foundation_encoder.pos_embed                 (1, N, W)
  foundation_encoder.blocks.{i}.attn.qkv.weight (3W, W)         rows [q | k | v], each (heads, 64)
  foundation_encoder.blocks.{i}.attn.proj.weight (W, W)
  foundation_encoder.blocks.{i}.mlp.{fc1,gate}.weight (F, W); mlp.fc2.weight (W, F)
  foundation_encoder.proj_out.weight           (W, W)
  adapter.model.weight                         (d, W)           projector
  decoder.z_proj.weight                        (Wd, d)
  decoder.pos_embed                            (1, N, Wd)
  decoder.blocks.{i}.*                         as the encoder
  decoder.linear_out.weight                    (p*p*3, Wd)      token features (p1, p2, c)
RMSNorms (block norms, QK-norm, final norms, latent norm) carry no parameters. Keys of the
loss (LPIPS, discriminator, logvar) and of the frozen teacher in a training ckpt are ignored.

Torch Linear weights are (out, in): our Dense kernels are their transpose.
"""

from collections.abc import Mapping
import re
from typing import Any, Optional

from absl import logging
import flax.linen as nn
import numpy as np

from gae_jax.models import layers

ENC = "foundation_encoder."
DEC = "decoder."
ADAPTER = "adapter.model.weight"
HEAD_DIM = 64  # the release's head_dim (ViT-L: 1024 / 16)
_BLOCK_RE = re.compile(r"blocks\.(\d+)\.")


def _to_numpy(v: Any) -> np.ndarray:
  """torch.Tensor (any float dtype, incl. bfloat16) or array -> float32 numpy."""
  if hasattr(v, "detach"):  # torch tensor (bfloat16 has no numpy dtype); no torch import
    v = v.detach().cpu().float().numpy()
  return np.asarray(v, dtype=np.float32)


def _find_prefix(state_dict: Mapping[str, Any]) -> str:
  """'' normally; a wrapper prefix such as 'module.' or 'model.' if every key has it."""
  anchor = ENC + "patch_embed.weight"
  if anchor in state_dict:
    return ""
  for k in state_dict:
    if k.endswith(anchor):
      return k[: -len(anchor)]
  return ""


def _num_blocks(keys, prefix: str) -> int:
  idx = {int(m.group(1)) for k in keys if k.startswith(prefix)
         for m in [_BLOCK_RE.match(k[len(prefix):])] if m}
  return max(idx) + 1 if idx else 0


def _heads(width: int, given: Optional[int], what: str) -> int:
  if given is not None:
    if width % given:
      raise ValueError(f"{what} width {width} is not divisible by num_heads {given}")
    return given
  if width % HEAD_DIM:
    raise ValueError(f"cannot infer {what} num_heads: width {width} is not a multiple of "
                     f"head_dim {HEAD_DIM}; pass num_heads explicitly")
  return width // HEAD_DIM


def _shape(sd, key) -> tuple:
  if key not in sd:
    raise ValueError(f"GAE checkpoint is missing key {key!r}")
  return tuple(np.shape(sd[key]))


def infer_model_kwargs(state_dict: Mapping[str, Any], num_heads: Optional[int] = None,
                       decoder_num_heads: Optional[int] = None) -> dict:
  """GAE sizes from tensor shapes (heads default to width / 64, the release's head_dim)."""
  sd = state_dict
  pe = _shape(sd, ENC + "patch_embed.weight")
  if len(pe) != 4 or pe[1] != 3 or pe[2] != pe[3]:
    raise ValueError(f"{ENC}patch_embed.weight has shape {pe}, expected (width, 3, p, p)")
  width, _, patch, _ = pe
  n_enc = _shape(sd, ENC + "pos_embed")[1]
  grid = int(round(n_enc ** 0.5))
  if grid * grid != n_enc:
    raise ValueError(f"{ENC}pos_embed has {n_enc} positions, not a square grid")
  latent_dim = _shape(sd, ADAPTER)[0]
  dz = _shape(sd, DEC + "z_proj.weight")
  dec_width = dz[0]
  lo = _shape(sd, DEC + "linear_out.weight")[0]
  dec_patch = int(round((lo / 3) ** 0.5))
  if dec_patch * dec_patch * 3 != lo:
    raise ValueError(f"{DEC}linear_out.weight has {lo} outputs, not p*p*3")
  if dec_patch != patch:
    raise ValueError(f"decoder patch size {dec_patch} (from {DEC}linear_out.weight) differs "
                     f"from the encoder's {patch}; gae_jax's GAE uses one patch_size")
  n_dec = _shape(sd, DEC + "pos_embed")[1]
  if n_dec != n_enc:
    raise ValueError(f"{DEC}pos_embed has {n_dec} positions but {ENC}pos_embed has {n_enc}")
  depth = _num_blocks(sd, ENC)
  dec_depth = _num_blocks(sd, DEC)
  if depth == 0 or dec_depth == 0:
    raise ValueError(f"GAE checkpoint has no transformer blocks "
                     f"(missing {ENC if depth == 0 else DEC}blocks.0.*)")
  return dict(width=int(width), depth=depth, num_heads=_heads(width, num_heads, "encoder"),
              decoder_width=int(dec_width), decoder_depth=dec_depth,
              decoder_num_heads=_heads(dec_width, decoder_num_heads, "decoder"),
              patch_size=int(patch), latent_dim=int(latent_dim), image_size=int(grid * patch))


def _expected_shapes(kw: dict) -> dict[str, tuple]:
  """The authors' key -> shape for a model of sizes `kw`."""
  w, dw, p, d = kw["width"], kw["decoder_width"], kw["patch_size"], kw["latent_dim"]
  n = (kw["image_size"] // p) ** 2
  out = {ENC + "patch_embed.weight": (w, 3, p, p), ENC + "pos_embed": (1, n, w),
         ENC + "proj_out.weight": (w, w), ADAPTER: (d, w),
         DEC + "z_proj.weight": (dw, d), DEC + "pos_embed": (1, n, dw),
         DEC + "linear_out.weight": (p * p * 3, dw)}
  for prefix, width, depth in ((ENC, w, kw["depth"]), (DEC, dw, kw["decoder_depth"])):
    f = layers.swiglu_hidden(width)
    for i in range(depth):
      b = f"{prefix}blocks.{i}."
      out.update({b + "attn.qkv.weight": (3 * width, width), b + "attn.proj.weight": (width, width),
                  b + "mlp.fc1.weight": (f, width), b + "mlp.gate.weight": (f, width),
                  b + "mlp.fc2.weight": (width, f)})
  return out


def _blocks_to_flax(get, prefix: str, depth: int, heads: int, scan: bool) -> dict:
  blocks = []
  for i in range(depth):
    b = f"{prefix}blocks.{i}."
    qkv = get(b + "attn.qkv.weight")  # (3W, W)
    width = qkv.shape[1]
    hd = width // heads
    blocks.append({
        "attn": {"qkv": {"kernel": qkv.T.reshape(width, 3, heads, hd)},
                 "proj": {"kernel": get(b + "attn.proj.weight").T.reshape(heads, hd, width)}},
        "mlp": {"fc1": {"kernel": get(b + "mlp.fc1.weight").T},
                "gate": {"kernel": get(b + "mlp.gate.weight").T},
                "fc2": {"kernel": get(b + "mlp.fc2.weight").T}}})
  if scan:
    import jax  # local: keeps this module importable without initialising jax backends
    return {"blocks": jax.tree.map(lambda *xs: np.stack(xs), *blocks)}
  return {f"blocks_{i}": blk for i, blk in enumerate(blocks)}


def convert_gae(state_dict: Mapping[str, Any], *, num_heads: Optional[int] = None,
                decoder_num_heads: Optional[int] = None, scan: bool = False,
                expect: Optional[Mapping[str, int]] = None) -> tuple[dict, dict]:
  """The authors' Lightning state_dict -> (GAE params, model_kwargs).

  model_kwargs: width, depth, num_heads, decoder_width, decoder_depth, decoder_num_heads,
  patch_size, latent_dim, image_size (the encoder's input size, from the pos-embed length).
  `expect` (optional, same keys) pins sizes, e.g. from a config; a disagreement is an error.
  Raises ValueError naming missing keys, or the key and both shapes for a mismatch.
  """
  prefix = _find_prefix(state_dict)
  sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  ignored = sorted({k.split(".")[0] for k in sd
                    if not (k.startswith(ENC) or k.startswith(DEC) or k == ADAPTER)})
  ignored += sorted({k.split(".")[0] for k in state_dict if not k.startswith(prefix)})
  if ignored:
    logging.info("convert_gae: ignoring keys under %s (loss / discriminator / teacher)",
                 ", ".join(f"{g}.*" for g in ignored))
  kw = infer_model_kwargs(sd, num_heads, decoder_num_heads)
  for k, v in (expect or {}).items():
    if k in kw and kw[k] != v:
      raise ValueError(f"GAE checkpoint has {k}={kw[k]} (inferred from tensor shapes) but "
                       f"{v} was expected")
  shapes = _expected_shapes(kw)
  missing = [k for k in shapes if k not in sd]
  if missing:
    more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
    raise ValueError(f"GAE checkpoint is missing {len(missing)} keys: "
                     f"{', '.join(missing[:8])}{more}")
  unexpected = sorted(k for k in sd if (k.startswith(ENC) or k.startswith(DEC))
                      and k not in shapes)
  if unexpected:
    raise ValueError(f"GAE checkpoint has keys this GAE has no place for (e.g. grouped-query "
                     f"attention, norm weights or biases): {', '.join(unexpected[:8])}")
  for k, s in shapes.items():
    got = tuple(np.shape(sd[k]))
    if got != s:
      raise ValueError(f"GAE checkpoint key {k!r} has shape {got}, expected {s} "
                       f"(model sizes inferred: {kw})")

  get = lambda k: _to_numpy(sd[k])  # noqa: E731
  params = {
      "encoder": {
          "patch_embed": {"kernel": get(ENC + "patch_embed.weight").transpose(2, 3, 1, 0)},
          "pos_embed": get(ENC + "pos_embed"),
          "transformer": _blocks_to_flax(get, ENC, kw["depth"], kw["num_heads"], scan),
          "head": {"kernel": get(ENC + "proj_out.weight").T}},
      "projector": {"kernel": get(ADAPTER).T},
      "decoder": {
          "embed": {"kernel": get(DEC + "z_proj.weight").T},
          "pos_embed": get(DEC + "pos_embed"),
          "transformer": _blocks_to_flax(get, DEC, kw["decoder_depth"],
                                         kw["decoder_num_heads"], scan),
          "head": {"kernel": get(DEC + "linear_out.weight").T}},
  }
  return params, kw


def _blocks_from_flax(tree: dict) -> list[dict]:
  if "blocks" in tree:  # nn.scan layout: leading layers axis
    stacked = tree["blocks"]
    depth = np.shape(stacked["attn"]["qkv"]["kernel"])[0]
    import jax
    return [jax.tree.map(lambda x, i=i: np.asarray(x)[i], stacked) for i in range(depth)]
  names = sorted((k for k in tree if k.startswith("blocks_")), key=lambda k: int(k[7:]))
  return [tree[k] for k in names]


def export_gae(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """GAE params (boxed or not, scanned or not) -> the authors' state_dict layout (numpy)."""
  p = nn.meta.unbox(params)
  if "params" in p and "encoder" not in p:
    p = p["params"]
  a = lambda x: np.asarray(x, dtype=np.float32)  # noqa: E731
  out = {}
  enc, dec = p["encoder"], p["decoder"]
  out[ENC + "patch_embed.weight"] = a(enc["patch_embed"]["kernel"]).transpose(3, 2, 0, 1)
  out[ENC + "pos_embed"] = a(enc["pos_embed"])
  for prefix, tree in ((ENC, enc), (DEC, dec)):
    for i, blk in enumerate(_blocks_from_flax(tree["transformer"])):
      b = f"{prefix}blocks.{i}."
      qkv = a(blk["attn"]["qkv"]["kernel"])  # (W, 3, H, D)
      out[b + "attn.qkv.weight"] = qkv.reshape(qkv.shape[0], -1).T
      proj = a(blk["attn"]["proj"]["kernel"])  # (H, D, W)
      out[b + "attn.proj.weight"] = proj.reshape(-1, proj.shape[-1]).T
      for name in ("fc1", "gate", "fc2"):
        out[b + f"mlp.{name}.weight"] = a(blk["mlp"][name]["kernel"]).T
    if prefix == ENC:
      out[ENC + "proj_out.weight"] = a(enc["head"]["kernel"]).T
  out[ADAPTER] = a(p["projector"]["kernel"]).T
  out[DEC + "z_proj.weight"] = a(dec["embed"]["kernel"]).T
  out[DEC + "pos_embed"] = a(dec["pos_embed"])
  out[DEC + "linear_out.weight"] = a(dec["head"]["kernel"]).T
  return {k: np.ascontiguousarray(v) for k, v in out.items()}
