"""A toy method package for reelflow's plugin tests (see pyproject.toml)."""
