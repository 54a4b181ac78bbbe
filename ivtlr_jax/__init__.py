"""ivtlr-jax: IVT-LR (interleaved vision-text latent reasoning) in JAX/Flax."""

__version__ = "0.1.0"
