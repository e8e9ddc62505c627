"""jaxmerge: multi-task vision models by merging LoRA adapters, in pure JAX."""

__version__ = "0.1.0"
