"""Inversions that walk a clean latent up to noise, one file per algorithm.

Each inversion is the exact algebraic inverse of the matching sampler in ``core.sampling`` when the
model's prediction is the same in both directions.
"""
