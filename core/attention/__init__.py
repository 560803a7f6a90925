"""Attention processors: cross-frame self-attention and explicit probabilities for controllers."""
