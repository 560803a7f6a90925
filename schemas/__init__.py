"""Pydantic models only: pipeline specs, stage params, artifact references, settings, errors.

Imports neither torch nor prefect, so a spec validates anywhere.
"""
