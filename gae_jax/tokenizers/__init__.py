"""Tokenizers: image <-> latent handles behind one interface (GAE, PAE, KL ablation).

`base.Tokenizer` is the interface every family implements; `gae.py` holds the GAE (and
KL) handle, `pae.py` the PAE handle. Users open any tokenizer with
`gae_jax.pretrained.open_tokenizer(path)`; stages use `.encode_fn` / `.decode_fn` /
`.latent_shape` and never ask for the family.
"""

from gae_jax.tokenizers.base import FAMILIES, Tokenizer  # noqa: F401
