"""A stage's card: its one markdown artifact in the Prefect UI, updated in place.

While the stage runs the card shows its progress (done of total in the stage's unit, the rate, the
time left); when it finishes, what the stage published (its pictures and notes), then its stored
arrays and timing. The finished card's markdown is kept in the store beside the stage's pictures
(``pictures/<stage>/<key>/card.md``, pictures named by their place in the store), so a run that
finds the stage cached publishes the same card again, with fresh picture URLs and a line naming the
run that computed it. Cards are keyed by clip, pipeline, place in the pipeline and stage id (see
:func:`~reelflow.tasks.artifacts.card_key`).

Publishing is best effort: the UI is a view of the work, so an API hiccup is logged, never raised.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any
from uuid import UUID

from prefect.artifacts import create_markdown_artifact

from reelflow.schemas.calls import StageCall
from reelflow.schemas.settings import Settings
from reelflow.storage.files import human_bytes, put_atomic
from reelflow.storage.store import PICTURES, ArtifactStore
from reelflow.tasks.artifacts import (PICTURE_SCHEME, artifact_summary, card_key, in_run, resolve_pictures, stage_summary,
                                      summary_path)

CARD = "card.md"
_PAGE = 50  # card keys looked up a request (the server returns at most 200 artifacts)
_SHOWN: dict[tuple[str, str], UUID] = {}  # (run id, card key) -> the card's artifact id
_log = logging.getLogger(__name__)


def card_title(call: StageCall) -> str:
    tag = f" ({call.stage.tag})" if call.stage.tag != call.stage_id else ""
    clip = f"{call.clip} · " if call.clip else ""
    return f"### {clip}{call.pipeline} · {call.position + 1}. `{call.stage_id}`{tag}"


def card_links(calls: dict[str, StageCall]) -> dict[str, str]:
    """The URL of each stage's card in the Prefect UI, where the UI's address is known: the card this flow run
    showed (its artifact's page), else the card's key page (its newest version)."""
    base = ui_url()
    if not base:
        return {}
    keys = {name: card_key(call) for name, call in calls.items()}
    shown = _shown_cards(sorted(set(keys.values())))
    return {name: f"{base}/artifacts/artifact/{shown[key]}" if key in shown else f"{base}/artifacts/key/{key}"
            for name, key in keys.items()}  # fmt: skip


def _shown_cards(keys: list[str]) -> dict[str, UUID]:
    """The cards with these keys that this flow run (its tasks included) showed, by key."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None or not keys:
        return {}
    shown: dict[str, UUID] = {}
    try:
        with get_client(sync_client=True) as client:
            for start in range(0, len(keys), _PAGE):  # newest first: a retry's card over an earlier attempt's
                found = client.read_artifacts(artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=keys[start : start + _PAGE]),
                    flow_run_id=ArtifactFilterFlowRunId(any_=[context.flow_run.id])), sort=ArtifactSort.UPDATED_DESC,
                    limit=200)  # fmt: skip
                for artifact in found:
                    shown.setdefault(artifact.key, artifact.id)
    except Exception as exc:  # noqa: BLE001  (the key pages still lead there)
        _log.warning("could not look up this run's cards: %s", exc)
    return shown


def ui_url() -> str | None:
    from prefect.settings import PREFECT_UI_URL

    try:
        value = PREFECT_UI_URL.value()
    except Exception:  # noqa: BLE001
        return None
    return str(value).rstrip("/") if value else None


def card_description(call: StageCall) -> str:
    return f"{call.clip or 'clip'} · {call.pipeline} · {call.stage_id}"


class Card:
    """The card of one stage of one run; outside a Prefect run it shows nothing."""

    def __init__(self, call: StageCall, store: ArtifactStore, settings: Settings) -> None:
        self.call, self.store, self.settings = call, store, settings
        self.key = card_key(call)
        self.enabled = in_run()

    @property
    def _id(self) -> UUID | None:
        """The card's artifact, shared by every attempt of the stage in this run (a retry updates the same card)."""
        return _SHOWN.get((self.call.run_id, self.key))

    @_id.setter
    def _id(self, value: UUID) -> None:
        if len(_SHOWN) > 4096:
            _SHOWN.clear()
        _SHOWN[self.call.run_id, self.key] = value

    def fail(self, error: BaseException) -> None:
        """The card of an attempt that failed (a transient failure is retried, and updates the same card)."""
        self.show(f"{card_title(self.call)}\n\n**failed**: {type(error).__name__}: {error}")

    def show(self, markdown: str) -> None:
        """Publish ``markdown`` (pictures resolved) as this card: created the first time, then updated in place."""
        if not self.enabled:
            return
        try:
            data = resolve_pictures(markdown, self.store, self.settings)
            if self._id is None:
                self._id = create_markdown_artifact(data, key=self.key, description=card_description(self.call))
            else:
                from prefect.client.orchestration import get_client
                from prefect.client.schemas.actions import ArtifactUpdate

                with get_client(sync_client=True) as client:
                    client.update_artifact(artifact_id=self._id, artifact=ArtifactUpdate(data=data))
        except Exception as exc:  # noqa: BLE001
            _log.warning("could not publish the card %s: %s", self.key, exc)

    def finish(self, sections: list[str]) -> None:
        """The finished card: what the stage published, its output files to open, then its arrays; kept in the
        store with the summary as JSON, then shown."""
        try:
            outputs = keep_outputs(self.call, self.store)
        except Exception as exc:  # noqa: BLE001  (the artifact is committed; nothing here may fail it)
            _log.warning("could not keep the outputs of %s to open in the browser: %s", self.call.stage_id, exc)
            outputs = []
        try:
            summary = stage_summary(keep_summary(self.call.stage_type, self.call.key, self.store))
        except Exception as exc:  # noqa: BLE001
            _log.warning("no summary for %s: %s", self.call.stage_id, exc)
            summary = ""
        body = "\n\n".join([*sections, *outputs, summary]).strip()
        try:
            put_atomic(self.store.fs, self.store.abspath(card_path(self.call.stage_type, self.call.key)), body.encode())
        except Exception as exc:  # noqa: BLE001
            _log.warning("could not keep the card of %s in the store: %s", self.call.stage_id, exc)
        self.show(f"{card_title(self.call)}\n\n{body}")


def card_path(stage: str, key: str) -> str:
    return f"{PICTURES}/{stage}/{key}/{CARD}"


def keep_summary(stage: str, key: str, store: ArtifactStore) -> dict[str, Any]:
    """The artifact's summary, also kept as JSON beside its card (the browser opens it from the card)."""
    summary = artifact_summary(store, stage, key, store.read_attrs(store.artifact_path(stage, key)))
    data = json.dumps(summary, indent=1, default=str).encode()
    put_atomic(store.fs, store.abspath(summary_path(stage, key)), data, content_type="application/json")
    return summary


def output_path(stage: str, key: str, suffix: str) -> str:
    return f"{PICTURES}/{stage}/{key}/output.{suffix}"


def keep_outputs(call: StageCall, store: ArtifactStore) -> list[str]:
    """The files the stage exports (an output video), copied beside its card so the browser can open them from
    the picture server or a presigned URL; returns the card's links to them."""
    links = []
    group = store.open(call.stage_type, call.key)
    for export in call.stage.exports:
        if export.kind == "file" and export.array in group:
            data = bytes(group[export.array][:])
            rel = output_path(call.stage_type, call.key, export.suffix)
            put_atomic(store.fs, store.abspath(rel), data, content_type=_CONTENT_TYPES.get(export.suffix, "application/octet-stream"))
            links.append(f"output: [{export.suffix.upper()} ({human_bytes(len(data))})]({PICTURE_SCHEME}{rel})")
    return links


_CONTENT_TYPES = {"mp4": "video/mp4", "webm": "video/webm", "json": "application/json", "csv": "text/csv"}


def republish_card(call: StageCall, store: ArtifactStore, settings: Settings) -> None:
    """The card of a stage this run found cached: the card its computing run kept, under this run's key, with a
    line naming that run and when it finished (built from the artifact alone when no card was kept)."""
    if not in_run():
        return
    try:
        attrs = store.read_attrs(store.artifact_path(call.stage_type, call.key))
        summary = None
        if not store.fs.exists(store.abspath(summary_path(call.stage_type, call.key))):  # computed before it was kept
            summary = keep_summary(call.stage_type, call.key, store)
            keep_outputs(call, store)
        try:
            body = store.fs.cat_file(store.abspath(card_path(call.stage_type, call.key))).decode()
        except FileNotFoundError:  # computed before cards were kept
            body = stage_summary(summary or keep_summary(call.stage_type, call.key, store))
        prov = attrs.get("provenance", {})
        when = dt.datetime.fromtimestamp(attrs.get("completed_at", 0), dt.UTC).isoformat(sep=" ", timespec="seconds")
        if prov.get("run_id") == call.run_id:  # a stage two pipelines of this run share (a comparison)
            note = f"*shared: computed in this run for `{prov.get('pipeline', '?')}` at {when} UTC*"
        else:
            note = f"*cached: computed by run `{prov.get('run_id', '?')}` ({prov.get('pipeline', '?')}) at {when} UTC*"
        card = Card(call, store, settings)
        card.show(f"{card_title(call)}\n\n{note}\n\n{body}")
    except Exception as exc:  # noqa: BLE001
        _log.warning("could not republish the card of %s: %s", call.stage_id, exc)
