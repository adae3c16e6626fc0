"""gae_jax: Geometric Autoencoder for Diffusion Models in JAX/Flax."""

__version__ = "0.1.0"
