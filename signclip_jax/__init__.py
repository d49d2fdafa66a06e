"""signclip-jax: SignCLIP (text <-> sign-language pose) in JAX/Flax NNX."""

__version__ = "0.1.0.dev0"
