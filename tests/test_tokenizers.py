"""The one tokenizer interface: `open_tokenizer` on every GAE layout, family detection,
the handle's boundary checks, and the house's import graph (issue 12 deliverable 5)."""

import ast
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gae_jax import loading  # noqa: E402
from gae_jax import pretrained  # noqa: E402
from gae_jax.convert import gae as convert_gae_lib  # noqa: E402
from gae_jax.models import gae as gae_lib  # noqa: E402
from gae_jax.tokenizers import base  # noqa: E402

SIZE, PATCH, D, WIDTH = 32, 16, 8, 64     # width 64: one 64-dim head, as inferred
ROOT = pathlib.Path(__file__).resolve().parents[1] / "gae_jax"


def _random_params(seed: int):
  model = gae_lib.GAE(width=WIDTH, depth=1, num_heads=1, patch_size=PATCH, latent_dim=D)
  x = jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32)
  shapes = nn.meta.unbox(jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x))[
      "params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(0.0, 0.1, s.shape).astype(np.float32), shapes)


def _save_orbax(ckpt_dir: pathlib.Path, state: dict) -> None:
  import orbax.checkpoint as ocp
  with ocp.CheckpointManager(ckpt_dir, item_names=("state",),
                             options=ocp.CheckpointManagerOptions(create=True)) as mngr:
    mngr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    mngr.wait_until_finished()


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
  """One GAE as the authors' .ckpt, a converted dir and an autoencoder workdir."""
  tmp = tmp_path_factory.mktemp("tok")
  ema, raw = _random_params(0), _random_params(1)
  sd = {k: torch.from_numpy(np.array(v)) for k, v in convert_gae_lib.export_gae(ema).items()}
  sd["loss.logvar"] = torch.zeros(())
  ckpt = tmp / "gae.ckpt"
  torch.save({"state_dict": sd, "epoch": 1}, ckpt)
  params, fields = pretrained.load_gae_params(str(ckpt))
  converted = loading.save_converted(str(tmp / "converted"), params, fields.to_dict(),
                                     kind="gae", source=str(ckpt))
  # The autoencoder trainer's layout: config.json (stage, model, data) + an orbax state
  # with params/generator/{gae, ...}, the EMA copy under ema_params/gae, optimizer moments.
  workdir = tmp / "run"
  workdir.mkdir()
  model_fields = {k: v for k, v in fields.to_dict().items() if k != "image_size"}
  (workdir / "config.json").write_text(json.dumps(
      {"stage": "autoencoder", "model": model_fields, "data": {"image_size": SIZE}}))
  _save_orbax(workdir / "checkpoints", {
      "step": np.int32(3),
      "params": {"generator": {"gae": raw}, "discriminator": {"w": np.ones(3, np.float32)}},
      "ema_params": {"gae": ema},
      "opt_state": {"mu": jax.tree.map(np.zeros_like, raw)}})
  return {"ckpt": str(ckpt), "converted": converted, "workdir": str(workdir)}, ema, raw


def test_every_gae_layout_opens_to_the_same_latents(layouts):
  where, ema, raw = layouts
  x = jax.random.uniform(jax.random.key(0), (2, SIZE, SIZE, 3), minval=-1.0, maxval=1.0)
  model = gae_lib.GAE(width=WIDTH, depth=1, num_heads=1, patch_size=PATCH, latent_dim=D)
  want = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False,
                                          method=gae_lib.GAE.encode)[1]["mu"])(ema, x)
  latents = {}
  for name, path in where.items():
    assert pretrained.tokenizer_family(path) == "gae", name
    tok = pretrained.open_tokenizer(path)
    assert isinstance(tok, base.Tokenizer) and tok.family == "gae"
    assert tok.latent_shape == (SIZE // PATCH, SIZE // PATCH, D) and tok.image_size == SIZE
    latents[name] = np.asarray(tok.encode(x))
    # The pure functions are what stages jit themselves: the same numbers.
    np.testing.assert_array_equal(np.asarray(jax.jit(tok.encode_fn)(tok.params, x)),
                                  latents[name])
    assert tok.decode(latents[name]).shape == (2, SIZE, SIZE, 3)
  np.testing.assert_allclose(latents["ckpt"], want, atol=1e-6)
  np.testing.assert_array_equal(latents["converted"], latents["ckpt"])
  np.testing.assert_array_equal(latents["workdir"], latents["ckpt"])   # the EMA copy
  # use_ema=False reads the raw params of the run: other latents.
  raw_tok = pretrained.open_tokenizer(where["workdir"] + "/checkpoints", use_ema=False)
  assert not np.allclose(np.asarray(raw_tok.encode(x)), latents["workdir"], atol=1e-3)


def test_family_detection_and_errors(layouts, tmp_path):
  where, _, _ = layouts
  # A released PAE file is recognised by its module prefixes (through DDP wrappers).
  pae = tmp_path / "pae.pt"
  torch.save({"model": {"module.delta_encoder.patch_embed.weight": torch.zeros(2, 3),
                        "module.decoder.norm.weight": torch.zeros(2)}}, pae)
  assert pretrained.tokenizer_family(str(pae)) == "pae"
  other = tmp_path / "dit.pt"
  torch.save({"ema": {"x_embedder.proj.weight": torch.zeros(2, 2)}}, other)
  with pytest.raises(ValueError, match=r"dit\.pt is neither a released GAE"):
    pretrained.tokenizer_family(str(other))
  # A KL autoencoder run is family "kl"; a teacher run is no tokenizer.
  for stage, kl, want in (("autoencoder", True, "kl"), ("teacher", False, None)):
    d = tmp_path / stage
    (d / "checkpoints").mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"stage": stage, "model": {"kl": kl}}))
    if want:
      assert pretrained.tokenizer_family(str(d)) == want
    else:
      with pytest.raises(ValueError, match="'teacher' checkpoint .* not a tokenizer"):
        pretrained.open_tokenizer(str(d))
  with pytest.raises(FileNotFoundError, match="nope"):
    pretrained.open_tokenizer(str(tmp_path / "nope"))
  txt = tmp_path / "notes.txt"
  txt.write_text("x")
  with pytest.raises(ValueError, match="notes.txt is a file but not a PyTorch checkpoint"):
    pretrained.open_tokenizer(str(txt))
  # Boundary checks of the handle: one-line errors naming the family and the shape.
  tok = pretrained.open_tokenizer(where["converted"])
  with pytest.raises(ValueError, match=r"GAE expects NHWC RGB images .* \(2, 32, 32\)"):
    tok.encode(np.zeros((2, SIZE, SIZE), np.float32))
  with pytest.raises(ValueError, match="float images"):
    tok.encode(np.zeros((1, SIZE, SIZE, 3), np.uint8))
  with pytest.raises(ValueError, match=r"GAE decode expects latents \(B, 2, 2, 8\)"):
    tok.decode(np.zeros((1, 2, 2, 4), np.float32))
  with pytest.raises(ValueError, match="family 'vq'"):
    base.Tokenizer(family="vq", params={}, config=None, encode_fn=None, decode_fn=None,
                   image_size=8, latent_shape=(1, 1, 1))


def test_a_released_pae_opens_through_the_same_opener(tmp_path):
  """The other family: a released-layout PAE `.pt` (random tiny weights, VFM inside) and
  its converted directory open through `open_tokenizer` to load_pae's latents, and the
  stage-side pure functions (`encode_fn` in the latent cache's encode_pair) agree."""
  pytest.importorskip("transformers")
  import torch_reference_pae as ref  # tests/ helper
  from gae_jax.convert import __main__ as convert_main
  from gae_jax.convert import pae as convert_pae
  from gae_jax.trainers import cache_latents
  _, vfm_sd = ref.random_vfm(width=64, depth=1, heads=1, patch=14, pos_image_size=56, seed=0)
  sd = ref.random_pae_state_dict(np.random.default_rng(0), width=64, heads=1, patch=14,
                                 grid=4, latent_dim=8, dam_depth=1, decoder_width=64,
                                 decoder_depth=1, decoder_patch=8)
  sd.update({convert_pae.VFM_PREFIX + k: v for k, v in vfm_sd.items()})
  src = tmp_path / "pae.pt"
  torch.save({"model": {"module." + k: torch.from_numpy(np.ascontiguousarray(v))
                        for k, v in sd.items()}}, src)
  dst = str(tmp_path / "converted")
  assert convert_main.main(["pae", "--src", str(src), "--dst", dst]) == 0
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1.0, maxval=1.0)
  want = np.asarray(pretrained.load_pae(str(src)).encode(x))
  for path in (str(src), dst):
    assert pretrained.tokenizer_family(path) == "pae"
    tok = pretrained.open_tokenizer(path)
    assert tok.family == "pae" and tok.latent_shape == (4, 4, 8) and tok.image_size == 32
    np.testing.assert_array_equal(np.asarray(tok.encode(x)), want)
    z, z_flip = jax.jit(lambda p, x: cache_latents.encode_pair(
        p, x, encode_fn=tok.encode_fn, dtype=jnp.float32))(tok.params, x)
    np.testing.assert_allclose(np.asarray(z), want, atol=1e-5)
    assert not np.allclose(np.asarray(z_flip), want, atol=1e-3)
  np.testing.assert_allclose(np.linalg.norm(want, axis=-1), np.sqrt(8), rtol=1e-4)


def _imports(path: pathlib.Path) -> set[str]:
  """Every module a source file imports (absolute names), at any depth of the file."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      out.add(node.module)
      out.update(f"{node.module}.{a.name}" for a in node.names)
  return out


def _violations(folder: str, banned: tuple[str, ...]) -> list[str]:
  bad = []
  for f in sorted((ROOT / folder).glob("*.py")):
    for name in sorted(_imports(f)):
      if any(name == b or name.startswith(b + ".") for b in banned):
        bad.append(f"{f.relative_to(ROOT.parent)} imports {name}")
  return bad


def test_import_graph():
  """Models import no converter or trainer; flow imports no tokenizer model or trainer."""
  assert _violations("models", ("gae_jax.convert", "gae_jax.trainers")) == []
  assert _violations("flow", ("gae_jax.models.gae", "gae_jax.trainers")) == []
  # The checker itself sees function-level imports (the way violations used to hide).
  probe = ROOT.parent / "tests" / "_import_probe.py"
  probe.write_text("def f():\n  from gae_jax.convert import dinov2\n")
  try:
    assert _imports(probe) >= {"gae_jax.convert", "gae_jax.convert.dinov2"}
  finally:
    probe.unlink()


def test_one_tokenizer_config_field_and_old_spelling():
  """Stages take `config.tokenizer.path` ('tokenizer=PATH'); 'gae=PATH' still fills it."""
  from gae_jax import configs_lib
  for make in (configs_lib.cache_latents_config,
               lambda a: configs_lib.eval_config(a, kind="reconstruction"),
               lambda a: configs_lib.dit_config(a, latent_dim=32, epochs=80),
               lambda a: configs_lib.dit_config("sample," + a, latent_dim=32, epochs=80)):
    assert make("tokenizer=/t")["tokenizer"].path == "/t"
    assert make("gae=/g")["tokenizer"].path == "/g"
    assert "gae" not in make("tokenizer=/t")
    with pytest.raises(ValueError, match="name the same field"):
      make("tokenizer=/t,gae=/g")
