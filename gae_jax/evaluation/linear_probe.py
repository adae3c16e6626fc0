"""Linear probing of frozen latents (paper App. I).

Heads on latents z (B, h, w, d):
  flatten: logits = W vec(z) + b, W in R^{C x (h w d)} (the paper's d x 16 x 16 -> 1000);
  GAP:     logits = W mean_{h,w}(z) + b, W in R^{C x d}.
Trained with plain SGD (no momentum), constant lr 0.008, no weight decay, softmax
cross-entropy, zero-initialised weights (the problem is convex, so the init only fixes
the start); top-1 accuracy on the validation latents. The paper uses batch 2048 and 100
epochs; both are arguments. Every example of an epoch is used: the last batch is padded
and masked (the loss is the mean over the real examples), so any dataset size works.

Latents come from memory (`ArrayLatents`: computed on the fly by `encode_split`) or from
a latent cache written by the `cache_latents` stage (`CachedLatents`). The step runs
data-parallel over a mesh (params replicated, batch sharded).
"""

import dataclasses
import functools
from typing import Any, Iterator, Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gae_jax import sharding as sharding_lib
from gae_jax.evaluation import features as features_lib

HEADS = ("flatten", "GAP")


class LinearHead(nn.Module):
  """flatten | GAP -> Dense(num_classes), zero init."""
  num_classes: int
  head: str = "flatten"

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    if z.ndim != 4:
      raise ValueError(f"linear probe expects latents (B, h, w, d), got {z.shape}")
    z = z.astype(jnp.float32)
    if self.head == "flatten":
      x = z.reshape(z.shape[0], -1)
    elif self.head == "GAP":
      x = jnp.mean(z, axis=(1, 2))
    else:
      raise ValueError(f"unknown linear-probe head {self.head!r}; expected one of {HEADS}")
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros,
                    precision=jax.lax.Precision.HIGHEST, name="fc")(x)


class ArrayLatents:
  """In-memory latents [N, h, w, d] + labels [N] (every process holds all of them)."""

  def __init__(self, latents: np.ndarray, labels: np.ndarray):
    latents, labels = np.asarray(latents, np.float32), np.asarray(labels, np.int32)
    if latents.ndim != 4 or labels.shape != (latents.shape[0],):
      raise ValueError(f"latents {latents.shape} / labels {labels.shape}: expected "
                       "[N, h, w, d] and [N]")
    self.latents, self.labels = latents, labels

  @property
  def shape(self) -> tuple[int, ...]:
    return self.latents.shape[1:]

  def __len__(self) -> int:
    return self.latents.shape[0]

  def batches(self, batch_size: int, *, epoch: int | None, seed: int = 0
              ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """This process's share of each global batch; epoch None: in order, else shuffled."""
    n = len(self)
    order = np.arange(n) if epoch is None else np.random.default_rng([seed, epoch]).permutation(n)
    pi, pc = jax.process_index(), jax.process_count()
    for s in range(0, n, batch_size):
      idx = order[s:s + batch_size]
      per = -(-len(idx) // pc)
      mine = idx[pi * per:(pi + 1) * per]
      yield self.latents[mine], self.labels[mine]

  def num_batches(self, batch_size: int) -> int:
    return -(-len(self) // batch_size)


class CachedLatents:
  """Latents of a `cache_latents` directory (unflipped z = mu), streamed with grain."""

  def __init__(self, cache_dir: str, *, flip: bool = False, max_examples: int = -1):
    from gae_jax.data import latents as latents_lib  # pylint: disable=g-import-not-at-top
    self.cache_dir, self.flip = cache_dir, flip
    manifest = latents_lib.load_manifest(cache_dir)
    total = int(manifest["num_records"])
    self.num_classes = manifest.get("num_classes")
    self.n = total if max_examples < 0 else min(total, max_examples)
    self._shape = tuple(manifest.get("latent_shape") or ())

  @property
  def shape(self) -> tuple[int, ...]:
    return self._shape

  def __len__(self) -> int:
    return self.n

  def num_batches(self, batch_size: int) -> int:
    return -(-self.n // batch_size)

  def batches(self, batch_size: int, *, epoch: int | None, seed: int = 0):
    from gae_jax.data import latents as latents_lib  # pylint: disable=g-import-not-at-top
    pc = jax.process_count()
    per = -(-batch_size // pc)
    it = latents_lib.make_latent_iterator(
        self.cache_dir, batch_size=per, seed=seed * 100_003 + (epoch or 0),
        shuffle=epoch is not None, repeat=False, flip=self.flip and epoch is not None,
        drop_remainder=False)
    seen = 0
    limit = -(-self.n // pc)
    for b in it:
      take = min(b["latent"].shape[0], limit - seen)
      if take <= 0:
        return
      yield np.asarray(b["latent"][:take]), np.asarray(b["label"][:take])
      seen += take


def _loss(params, model, z, y, w):
  logits = model.apply({"params": params}, z)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  wsum = jnp.maximum(jnp.sum(w), 1.0)
  return jnp.sum(ce * w) / wsum, logits


def train_step(params, opt_state, z, y, w, *, model, tx):
  (loss, logits), grads = jax.value_and_grad(_loss, has_aux=True)(params, model, z, y, w)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  correct = jnp.sum((jnp.argmax(logits, -1) == y) * w)
  return params, opt_state, {"loss": loss, "correct": correct, "count": jnp.sum(w)}


def eval_step(params, z, y, w, *, model):
  logits = model.apply({"params": params}, z)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  return {"correct": jnp.sum((jnp.argmax(logits, -1) == y) * w),
          "loss_sum": jnp.sum(ce * w), "count": jnp.sum(w)}


@dataclasses.dataclass
class ProbeResult:
  head: str
  top1: float                   # validation top-1 (fraction)
  train_top1: float             # top-1 on the training set, last epoch (running)
  val_loss: float
  loss_curve: list[float]       # mean train loss per epoch
  num_train: int
  num_val: int
  num_params: int


def train_linear_probe(train, val, *, num_classes: int, head: str = "flatten",
                       epochs: int = 100, batch_size: int = 2048, lr: float = 0.008,
                       seed: int = 0, mesh=None, eval_batch_size: int | None = None
                       ) -> ProbeResult:
  """Trains one linear head on frozen `train` latents, reports top-1 on `val`."""
  if head not in HEADS:
    raise ValueError(f"unknown linear-probe head {head!r}; expected one of {HEADS}")
  mesh = mesh if mesh is not None else features_lib.eval_mesh()
  data = features_lib.batch_sharding(mesh)
  rep = sharding_lib.replicated(mesh)
  rows = features_lib.local_batch_size(batch_size, mesh)
  eval_rows = features_lib.local_batch_size(eval_batch_size or batch_size, mesh)
  model = LinearHead(num_classes=num_classes, head=head)
  shape = tuple(train.shape)
  params = model.init(jax.random.key(seed), jnp.zeros((1, *shape), jnp.float32))["params"]
  tx = optax.sgd(lr)  # constant lr, no momentum, no weight decay (paper App. I)
  opt_state = tx.init(params)
  params, opt_state = jax.device_put((params, opt_state), rep)
  step = jax.jit(functools.partial(train_step, model=model, tx=tx),
                 in_shardings=(rep, rep, data, data, data), out_shardings=(rep, rep, rep),
                 donate_argnums=(0, 1))
  estep = jax.jit(functools.partial(eval_step, model=model),
                  in_shardings=(rep, data, data, data), out_shardings=rep)

  def put(z, y, r):
    w = np.ones((z.shape[0],), np.float32)
    return features_lib.shard_local_batch((z, y, w), r, data)

  curve = []
  train_top1 = 0.0
  for epoch in range(epochs):
    tot = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    for z, y in train.batches(batch_size, epoch=epoch, seed=seed):
      with jax.set_mesh(mesh):
        params, opt_state, m = step(params, opt_state, *put(z, y, rows))
      m = jax.device_get(m)
      c = float(m["count"])
      tot["loss"] += float(m["loss"]) * c
      tot["correct"] += float(m["correct"])
      tot["count"] += c
    curve.append(tot["loss"] / max(tot["count"], 1.0))
    train_top1 = tot["correct"] / max(tot["count"], 1.0)
    if epoch % max(1, epochs // 10) == 0 or epoch == epochs - 1:
      logging.info("linear probe %s: epoch %d loss %.4f train top-1 %.4f", head, epoch,
                   curve[-1], train_top1)

  ev = {"correct": 0.0, "loss_sum": 0.0, "count": 0.0}
  for z, y in val.batches(eval_batch_size or batch_size, epoch=None):
    with jax.set_mesh(mesh):
      m = jax.device_get(estep(params, *put(z, y, eval_rows)))
    for k in ev:
      ev[k] += float(m[k])
  if ev["count"] == 0:
    raise ValueError("linear probe: the validation set is empty")
  return ProbeResult(head=head, top1=ev["correct"] / ev["count"], train_top1=train_top1,
                     val_loss=ev["loss_sum"] / ev["count"], loss_curve=curve,
                     num_train=len(train), num_val=int(ev["count"]),
                     num_params=sharding_lib.tree_size(params))


def encode_split(encode_fn, params, batches, *, mesh=None, batch_size: int = 64
                 ) -> ArrayLatents:
  """Latents mu computed on the fly: `batches` yields this process's (float images, labels);
  all processes end with every latent (gathered)."""
  mesh = mesh if mesh is not None else features_lib.eval_mesh()
  data = features_lib.batch_sharding(mesh)
  rep = sharding_lib.replicated(mesh)
  rows = features_lib.local_batch_size(batch_size, mesh)
  fn = jax.jit(encode_fn, in_shardings=(rep, data), out_shardings=data)
  params = jax.device_put(params, rep)
  zs, ys = [], []
  for images, labels in batches:
    n = images.shape[0]
    with jax.set_mesh(mesh):
      z = fn(params, features_lib.shard_local_batch(np.asarray(images, np.float32), rows, data))
    zs.append(features_lib.local_rows(z)[:n])
    ys.append(np.asarray(labels, np.int32))
  if not zs:
    raise ValueError("encode_split got no images")
  z = features_lib.allgather_rows(np.concatenate(zs))
  y = features_lib.allgather_rows(np.concatenate(ys))
  return ArrayLatents(z, y)


def run_probes(train, val, *, num_classes: int, heads: Sequence[str] = HEADS,
               **kwargs: Any) -> dict[str, ProbeResult]:
  """One `train_linear_probe` per head."""
  return {h: train_linear_probe(train, val, num_classes=num_classes, head=h, **kwargs)
          for h in heads}
