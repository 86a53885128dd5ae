"""Runnable stages of foa-jax (`python -m experiments.<stage>`); importing the package tunes the host allocator."""

from experiments.host import tune_allocator

ALLOCATOR_TUNED = tune_allocator()
