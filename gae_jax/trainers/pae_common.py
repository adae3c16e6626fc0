"""Pieces PAE's two training stages share: the frozen VFM and stage 0's refined targets.

Not a trainer. `trainers/pae_refine.py` (stage 0) writes <workdir>/refine.json (kind
'pae_refine': the refiner's sizes, the VFM it ran on, the low-pass settings) beside its
checkpoint; `trainers/pae.py` (stage 1) reads both through `read_refiner` and computes the
targets on the fly from the same frozen VFM tokens:
  Z_T   = P_t(H_vfm)                       semantic target, (B, g, g, d)
  H_ref = low_pass(H_vfm, sigma, strength) structural target, (B, g, g, D)

The VFM is DINOv2 (models/dinov2.py) from a user's weights file, or -- when no file is
given (tests, `:runlocal`) -- a seeded random-weight stand-in of the configured sizes,
which both stages rebuild identically from refine.json's seed. Either way its final
LayerNorm has no affine unless config.vfm.final_norm_affine (PAE_SPEC §2.2).
"""

import dataclasses
import functools
import json
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gae_jax import losses
from gae_jax import paths
from gae_jax.models import dinov2 as dinov2_lib
from gae_jax.models import pae as pae_lib
from gae_jax.models import pae_refine as refine_lib

REFINE_JSON = "refine.json"


@dataclasses.dataclass(frozen=True, eq=False)
class VFMSpec:
  """The frozen VFM's static side: module, its kwargs (info), input size, provenance."""
  module: dinov2_lib.DinoV2
  info: dict
  image_size: int
  weights: Optional[str]
  seed: int
  final_norm_affine: bool

  @property
  def width(self) -> int:
    return self.module.config["width"]

  @property
  def grid(self) -> int:
    return self.image_size // self.info.get("patch_size", 14)

  @property
  def fields(self) -> dict:
    """JSON-able description (refine.json / config checks)."""
    return dict(name="dinov2", info=self.info, image_size=self.image_size,
                weights=self.weights, seed=None if self.weights else self.seed,
                final_norm_affine=self.final_norm_affine)


def resolve_vfm(vfm_config, dtype=jnp.float32, *, abstract: bool = False) -> VFMSpec:
  """VFMSpec from `config.vfm`; reads only the weights file's shapes (not with abstract=True
  when the file is absent: the --dry_run plan sizes the VFM from `variant`)."""
  v = vfm_config
  if v.get("name", "dinov2") != "dinov2":
    raise ValueError(f"config.vfm.name={v.name!r}: PAE's VFM is 'dinov2' (with registers)")
  weights = v.get("weights")
  if weights and (not abstract or os.path.isfile(os.path.expanduser(weights))):
    weights = os.path.abspath(os.path.expanduser(weights))
    info = _load_dinov2(weights)[1]
  else:
    info = refine_lib.vfm_info(v)
  info = {k: a for k, a in info.items() if k != "final_norm_affine"}
  size = int(v.image_size)
  patch = int(info.get("patch_size", 14))
  if size % patch:
    raise ValueError(f"config.vfm.image_size={size} is not a multiple of the VFM patch {patch}")
  affine = bool(v.get("final_norm_affine", False))
  module = refine_lib.vfm_module(info, dtype, v.get("attention_impl"), affine)
  module.config  # validates the sizes (ValueError naming the field)
  return VFMSpec(module=module, info=_jsonable(info), image_size=size,
                 weights=weights or None, seed=int(v.get("seed", 0)),
                 final_norm_affine=affine)


@functools.lru_cache(maxsize=2)
def _load_dinov2(weights: str) -> tuple[dict, dict]:
  """(params, info) of a DINOv2 weights file, read once per process."""
  from gae_jax.convert import dinov2 as convert_dinov2  # pylint: disable=g-import-not-at-top
  return convert_dinov2.load_dinov2_params(paths.local_copy(weights))


def _jsonable(d: dict) -> dict:
  return json.loads(json.dumps(d, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def load_vfm_variables(spec: VFMSpec) -> dict:
  """{'params': ...} of the frozen VFM as float32 numpy: the weights file, or the seeded
  random init (the same on every call, in both stages and in tokenizers/pae.py). Without
  the final-norm affine (spec.final_norm_affine False) no `norm` parameters are kept."""
  if spec.weights:
    params, info = _load_dinov2(spec.weights)
    info = {k: a for k, a in info.items() if k != "final_norm_affine"}
    if _jsonable(info) != spec.info:
      raise ValueError(f"{spec.weights}: DINOv2 sizes {info} differ from {spec.info}")
    if spec.final_norm_affine and "norm" not in params:
      raise ValueError(f"{spec.weights} has no final LayerNorm weight/bias: set "
                       "config.vfm.final_norm_affine=False")
  else:
    x = jnp.zeros((1, spec.image_size, spec.image_size, 3), jnp.float32)
    module = spec.module.clone(dtype=jnp.float32)
    params = nn.meta.unbox(jax.jit(module.init)(jax.random.key(spec.seed), x))["params"]
  if not spec.final_norm_affine:
    params = {k: a for k, a in params.items() if k != "norm"}
  return {"params": jax.tree.map(lambda a: np.asarray(a, np.float32), params)}


def vfm_param_count(spec: VFMSpec) -> int:
  x = jax.ShapeDtypeStruct((1, spec.image_size, spec.image_size, 3), jnp.float32)
  shapes = jax.eval_shape(lambda: spec.module.init(jax.random.key(0), jnp.zeros(x.shape)))
  return int(sum(np.prod(a.shape) for a in jax.tree.leaves(nn.meta.unbox(shapes)["params"])))


def vfm_tokens(spec: VFMSpec, variables: dict, images_m11: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
  """([-1, 1] NHWC images) -> (x_vfm (B, S, S, 3) VFM-normalised input, H_vfm (B, N, D)
  float32 behind stop_gradient), through models/pae.py `vfm_inputs` / `vfm_tokens`."""
  x_vfm = pae_lib.vfm_inputs((images_m11.astype(jnp.float32) + 1.0) * 0.5, spec.image_size)
  return x_vfm, pae_lib.vfm_tokens(spec.module, variables["params"], x_vfm)


def to_m11(out: jax.Array) -> jax.Array:
  """PAE decoder output (VFM-normalised) -> [-1, 1] (unclipped)."""
  return pae_lib.denormalize(out) * 2.0 - 1.0


def structural_target(h_vfm: jax.Array, sigma: float, strength: float) -> jax.Array:
  """H_ref (B, g, g, D) from the VFM tokens (B, N, D): losses.low_pass (AnyUp fallback)."""
  return losses.low_pass(refine_lib.token_grid(h_vfm), sigma, strength)


def write_refine_json(workdir: str, fields: dict) -> str:
  path = paths.join(workdir, REFINE_JSON)
  if jax.process_index() == 0:
    paths.write_text(path, json.dumps({"kind": "pae_refine", "model": fields}, indent=2))
  return path


def refine_fields(path: str) -> dict:
  """The `model` section of a stage-0 workdir's refine.json (ValueError naming the file)."""
  f = paths.join(os.fspath(path), REFINE_JSON)
  if not paths.path(f).exists():
    raise ValueError(f"config.refine.init_from={path}: no {REFINE_JSON} (not a pae_refine "
                     "workdir; train one with configs/pae_refine.py)")
  d = json.loads(paths.path(f).read_text())
  if d.get("kind") != "pae_refine" or "model" not in d:
    raise ValueError(f"{f}: kind {d.get('kind')!r}, expected 'pae_refine' with a 'model' "
                     "section")
  return d["model"]


def read_refiner(path: str) -> tuple[dict, dict]:
  """(refine.json fields, {'params': refiner params} as numpy) of a stage-0 workdir."""
  from gae_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  fields = refine_fields(path)
  state = ckpt_lib.restore_params(paths.join(os.fspath(path), "checkpoints"),
                                  keys=("params",))
  return fields, {"params": state["params"]}


def param_counts(tree: Any) -> dict:
  tree = nn.meta.unbox(tree)
  return {k: int(sum(np.prod(np.shape(a)) for a in jax.tree.leaves(v)))
          for k, v in tree.items()}
