"""The reelflow error tree.

One root, :class:`ReelflowError`. Every leaf also inherits the builtin it resembles, so callers
that already catch ``ValueError`` or ``FileNotFoundError`` keep working. Messages say what was
wrong, the offending value, and what to do about it.
"""

from __future__ import annotations


class ReelflowError(Exception):
    """Root of every error reelflow raises on purpose."""


class SpecError(ReelflowError, ValueError):
    """A pipeline spec, a stage's params or a CLI override is invalid."""


class GraphError(SpecError):
    """The stage graph is invalid: unknown stage, unwired input, duplicate id or a cycle."""


class SourceError(ReelflowError, ValueError):
    """A named source file (video, image, audio, mask) is missing, empty, unreadable or of the wrong kind."""


class InputVideoError(SourceError):
    """The source video cannot be used: missing, empty, not a video, truncated, no video stream."""


class RegistryError(ReelflowError, RuntimeError):
    """The stage registries disagree: a declaration without an implementation, or the reverse, or a
    method package that cannot be loaded. Raised at import, never inside a flow."""


class StoreError(ReelflowError, OSError):
    """The artifact store cannot be reached or written."""


class ArtifactNotFound(ReelflowError, FileNotFoundError):
    """No artifact exists under the given key or URL."""


class ArtifactIncomplete(ArtifactNotFound):
    """An artifact exists but has no ``complete`` marker: it was never finished, so it is not read."""


class ArtifactMismatch(ReelflowError, ValueError):
    """An artifact's attrs do not hold what the reading stage expects (another version of its stage wrote it)."""


class LeaseHeld(ReelflowError, TimeoutError):
    """Another live run holds the lease on an artifact and did not release it in time."""


class ModelError(ReelflowError, ValueError):
    """A model cannot be found or loaded: unknown id, missing weights, wrong layout."""


class StageFailed(ReelflowError, RuntimeError):
    """A stage of a pipeline run failed; the message names the stage and the cause."""
