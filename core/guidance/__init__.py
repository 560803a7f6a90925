"""Guidance rules that combine several network predictions into one (classifier-free, temporal)."""
