"""Xenith: sparse (Mixture-of-Experts), long-context language models in Flax/Linen."""
