"""What every stage task shares: open the store, wait for or take the compute lease, write the
artifact with provenance, and return its reference.

A stage body is idempotent: if its artifact is already complete it returns the reference without
computing, so a Prefect cache miss on a finished stage (a lost result record, a new store for the
records) costs one metadata read.
"""

from __future__ import annotations

import json
import logging
import platform
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from typing import Any

import fsspec
import numpy as np
import zarr
from prefect.context import TaskRunContext
from pydantic import ValidationError

from reelflow.core.cost import PeakMemory
from reelflow.schemas.calls import StageCall, StoreSpec
from reelflow.schemas.errors import ArtifactMismatch, LeaseHeld
from reelflow.schemas.kinds import Attrs, kind_attrs
from reelflow.schemas.refs import ArtifactRef
from reelflow.schemas.settings import Settings
from reelflow.storage.keys import canonical_json
from reelflow.storage.leases import Leases, default_holder, renewing
from reelflow.storage.store import ArtifactStore, ArtifactWriter
from reelflow.tasks.artifacts import KEEP_PNG_BYTES, as_jpeg, picture_markdown
from reelflow.tasks.cards import Card, card_title
from reelflow.tasks.models import load_role, resolve_device, role_json
from reelflow.tasks.progress import Progress
from reelflow.tasks.views import StepStrip, thumbnails

_LIBRARIES = ("reelflow", "torch", "diffusers", "transformers", "zarr", "numpy", "av", "prefect")
_POLL_SECONDS = 0.5


@dataclass
class StageContext:
    """What a stage body gets: its call, the store, the writer of its output and a progress reporter.

    A body reads its inputs through :meth:`input`, :meth:`array` and :meth:`attrs` (the input kind's
    attrs model), its models through :meth:`model`, its sources through :meth:`open_source`, and returns
    the attrs model of the kind it produces; :meth:`record` adds informational attrs for people.
    """

    call: StageCall
    store: ArtifactStore
    writer: ArtifactWriter
    progress: Progress
    settings: Settings
    extras: dict[str, Any] = field(default_factory=dict)
    sections: list[str] = field(default_factory=list)
    steps: StepStrip = field(default_factory=StepStrip)  # a sampler's latents a few steps apart, for the card

    def input(self, slot: str) -> zarr.Group:
        ref = self.call.inputs[slot]
        return self.store.open(ref.stage, ref.key)

    def array(self, slot: str, name: str, dtype: str | None = None) -> np.ndarray:
        """The whole array ``name`` of the input ``slot``, read into memory (optionally cast)."""
        return np.asarray(self.input(slot)[name][:], dtype=dtype)

    def attrs(self, slot: str) -> Attrs:
        """What the producer of ``slot`` left for this stage: its kind's attrs model."""
        ref = self.call.inputs[slot]
        path = self.store.artifact_path(ref.stage, ref.key)
        try:
            return kind_attrs(ref.kind).read(self.store.read_attrs(path))
        except ValidationError as exc:
            raise ArtifactMismatch(
                f"the {ref.kind} artifact {self.store.url_of(path)!r} does not hold what {self.call.stage.tag} reads "
                f"({exc.error_count()} problems, first at {'.'.join(map(str, exc.errors()[0]['loc']))}); if another "
                "version of its stage wrote it, remove it and rerun"
            ) from None

    def model(self, role: str, component: str | None = None, **options: Any) -> Any:
        """The model filling ``role`` (a component of it, e.g. its ``tokenizer``), loaded on this worker's device."""
        return load_role(self.call.models.get(role), role, component, self.settings, **options)

    def model_config(self, role: str, component: str | None = None, name: str = "config.json") -> dict[str, Any] | None:
        """The JSON file ``name`` of the model filling ``role``, read without loading weights (as a preflight reads it)."""
        return role_json(self.call.models, role, component, name, self.settings, self.call.stage_id)

    def open_source(self, slot: str) -> Any:
        """The source file read through ``slot``, opened for binary reading (use it as a context manager)."""
        source = self.call.sources[slot]
        return fsspec.open(source.url, "rb", **source.storage_options)

    def record(self, **values: Any) -> None:
        """Informational attrs (timings, sizes) stored beside the kind's attrs."""
        self.extras.update(values)

    def picture(self, name: str, png: bytes) -> str:
        """Markdown showing ``png``, saved beside this stage's artifact (see tasks.artifacts); put it in :meth:`publish`.
        A picture over KEEP_PNG_BYTES (frames of real footage) is kept as a JPEG, a fraction of the bytes."""
        if len(png) > KEEP_PNG_BYTES:
            return picture_markdown(self.store, self.call.stage_type, self.call.key, name, as_jpeg(png), suffix="jpeg")
        return picture_markdown(self.store, self.call.stage_type, self.call.key, name, png)

    def publish(self, markdown: str) -> None:
        """Add a section (notes, tables, :meth:`picture` markdown) to this stage's card, shown when it finishes and
        again by every run that finds it cached (see tasks.cards)."""
        self.sections.append(markdown)


@lru_cache(maxsize=16)
def _cached_store(url: str, options: str) -> ArtifactStore:
    return ArtifactStore(url, json.loads(options))


def open_store(spec: StoreSpec) -> ArtifactStore:
    """One ArtifactStore per (url, options) per process."""
    return _cached_store(spec.url, canonical_json(spec.storage_options))


Body = Callable[["StageContext"], "Attrs | None"]


def run_stage(call: StageCall, body: Body, *, resumable: bool = False) -> ArtifactRef:
    """Return the stage's artifact, computing it with ``body`` unless it is already complete.

    A ``resumable`` body writes its output in parts (steps, windows) and marks each done with
    ``ctx.writer.mark_done``; a crashed attempt's parts are kept, and the next attempt at the same key
    skips the parts marked done (``ctx.writer.is_done``). The artifact still commits atomically, its
    provenance listing the parts an earlier attempt stored (``resumed_parts``).
    """
    store = open_store(call.store)
    if store.is_complete(call.stage_type, call.key):
        return store.ref(call.stage_type, call.key)
    settings = Settings()
    with compute_lease(store, call, settings.lease_seconds) as lease:
        if not store.is_complete(call.stage_type, call.key):
            card = Card(call, store, settings)
            try:
                with _model_slot(call, settings):
                    sections = _compute(call, store, settings, body, lease, resumable, card)
            except BaseException as exc:
                card.fail(exc)
                raise
            card.finish(sections)  # the artifact is committed: nothing here may fail it
    return store.ref(call.stage_type, call.key)


@contextmanager
def _model_slot(call: StageCall, settings: Settings) -> Iterator[None]:
    """A slot of the global concurrency limit ``REELFLOW_GPU_LIMIT`` around a model stage, if one is set.

    Taken after the compute lease, so a run waiting for another run's artifact never sits on a GPU slot.
    The slot is a lease the server renews while held; a crashed holder's slot expires.
    """
    if settings.gpu_limit is None or not call.stage.needs_model:
        yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(settings.gpu_limit, occupy=1, strict=True):
        yield


def _compute(
    call: StageCall,
    store: ArtifactStore,
    settings: Settings,
    body: Body,
    lease: LeaseGuard,
    resumable: bool,
    card: Card,
) -> list[str]:
    """Run the body into the artifact and commit it; returns the sections the body published for its card."""
    started = time.time()
    attrs_in = {"provenance": provenance(call, store, settings)}
    progress = Progress(card, title=card_title(call), description=f"{call.clip} {call.pipeline} {call.stage_id}".strip(),
                        label=(call.clip, call.pipeline, call.stage_id))  # fmt: skip
    with progress, store.write(call.stage_type, call.key, attrs_in, resumable=resumable) as writer:  # done once committed
        ctx = StageContext(call, store, writer, progress, settings)
        with PeakMemory() as peak:
            attrs = _kind_attrs(call, body(ctx))
        progress.finish()
        lease.check()
        done = {**ctx.extras, **attrs.model_dump(mode="json"), "seconds": round(time.time() - started, 4),
                "peak_memory": peak.rss, **({"peak_gpu_memory": peak.gpu} if peak.gpu is not None else {})}  # fmt: skip
        if resumable:  # which parts an earlier, interrupted attempt stored
            done["provenance"] = {**attrs_in["provenance"], "resumed_parts": list(writer.resumed_parts)}
        writer.update_attrs(done)
        ctx.sections += _views(ctx)  # with the kind's attrs written: frame labels read them
    return ctx.sections


def _views(ctx: StageContext) -> list[str]:
    """The card's views of what the body stored: thumbnails of its frames or latents, its sampler's steps."""
    views = []
    for name, draw in (("thumbnails", lambda: thumbnails(ctx.writer.group, ctx.store, ctx.picture)),
                       ("step strip", lambda: [strip] if (strip := ctx.steps.markdown(ctx.picture)) else [])):  # fmt: skip
        try:
            views += draw()
        except Exception as exc:  # noqa: BLE001  (a view must never fail a stage that has done its work)
            logging.getLogger(__name__).warning("no %s for %s: %s", name, ctx.call.stage_id, exc)
    return views


def _kind_attrs(call: StageCall, returned: Attrs | None) -> Attrs:
    """The attrs model of the stage's kind, as its body returned it (None is fine for kinds without attrs)."""
    expected = kind_attrs(call.stage.produces)
    if returned is None and not expected.model_fields:
        return expected()
    if not isinstance(returned, expected):
        raise TypeError(
            f"the body of stage {call.stage.tag} must return {expected.__name__}, the attrs of the kind "
            f"{call.stage.produces!r} it produces; it returned {type(returned).__name__}"
        )
    return returned


@dataclass
class LeaseGuard:
    """Whether this run still holds its compute lease; checked before the artifact is committed."""

    call: StageCall
    lost: bool = False

    def renewed(self, still_held: bool) -> None:
        self.lost = self.lost or not still_held

    def check(self) -> None:
        if self.lost:
            raise LeaseHeld(
                f"stage {self.call.stage_id!r} lost its lease on key {self.call.key[:12]} to another run while "
                f"computing (it stalled past REELFLOW_LEASE_SECONDS); its output was discarded, the other run's is kept"
            )


@contextmanager
def compute_lease(store: ArtifactStore, call: StageCall, ttl: float) -> Iterator[LeaseGuard]:
    """Hold the compute lease on the stage key, renewing it from a thread while the body runs.

    If another live run holds it, wait until that run completes the artifact (then the caller
    finds it complete) or its lease dies (then this run takes over).
    """
    leases = Leases(store)
    holder = f"{default_holder()}:{call.run_id}:{threading.get_ident()}"
    guard = LeaseGuard(call)
    deadline = time.time() + ttl * 4
    while not leases.acquire(call.key, holder, ttl):
        if store.is_complete(call.stage_type, call.key):
            yield guard
            return
        if time.time() > deadline:
            raise LeaseHeld(
                f"stage {call.stage_id!r} key {call.key[:12]} stays leased by "
                f"{getattr(leases.read(call.key), 'holder', '?')} ({leases.store.url_of(f'leases/{call.key}')}); "
                "wait for that run, or delete the lease if that run is gone"
            )
        time.sleep(_POLL_SECONDS)
    try:
        with renewing(lambda: guard.renewed(leases.renew(call.key, holder, ttl)), ttl / 3):
            yield guard
    finally:
        leases.release(call.key, holder)


def provenance(call: StageCall, store: ArtifactStore, settings: Settings) -> dict[str, Any]:
    """Where an artifact came from, stored in its attrs: enough to recompute or audit it."""
    inputs = {
        slot: {"stage": ref.stage, "key": ref.key, "url": store.url_of(store.artifact_path(ref.stage, ref.key))}
        for slot, ref in call.inputs.items()
    }
    for slot, source in call.sources.items():
        inputs[f"source:{slot}"] = {"kind": source.kind, "key": source.key, "url": source.url}
    return {
        "pipeline": call.pipeline,
        "stage": call.stage_type,
        "method": call.stage.method,
        "stage_id": call.stage_id,
        "version": call.stage.version,
        "key": call.key,
        "params": call.stage.params.model_dump(mode="json"),
        "inputs": inputs,
        "models": {role: model.model_dump(mode="json") for role, model in call.models.items()},
        "seed": call.seed if call.stage.seeded() else None,
        "run_id": call.run_id,
        "task_run_id": _task_run_id(),
        "device": resolve_device(settings),
        "host": platform.node(),
        "libraries": library_versions(),
    }


def _task_run_id() -> str:
    context = TaskRunContext.get()
    return str(context.task_run.id) if context is not None else ""


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
