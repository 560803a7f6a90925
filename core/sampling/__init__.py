"""Deterministic samplers that walk a latent from noise back to data, one file per algorithm."""
