"""Attention-editing operators that fuse source-time attention maps into an editing pass."""
