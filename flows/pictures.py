"""A small read-only HTTP server over a local store's ``pictures/`` directory.

The Prefect UI shows a markdown image only if the browser can load its URL; a ``file://`` path
never loads. Run ``reelflow serve-pictures`` on the machine that holds the store and set
``REELFLOW_PICTURES_URL`` to its address on the workers: the stages then link their pictures
there. Object stores need no server: their pictures get presigned URLs.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

from reelflow.schemas.errors import StoreError
from reelflow.storage.store import PICTURES, ArtifactStore


class _Handler(SimpleHTTPRequestHandler):
    def list_directory(self, path):  # noqa: ANN001, ANN201  (pictures only, no browsing of the store)
        self.send_error(404, "no directory listings")

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def end_headers(self) -> None:
        # Keyed by stage key, but a recompute of the same key rewrites them: cache only briefly.
        self.send_header("Cache-Control", "public, max-age=60")
        super().end_headers()


@contextmanager
def serve_pictures(store: ArtifactStore, host: str = "127.0.0.1", port: int = 8765) -> Iterator[str]:
    """Serve ``<store>/pictures`` at the yielded base URL until the block ends."""
    if not store.atomic_rename:
        raise StoreError(
            f"serve-pictures serves local stores only; {store.url!r} is an object store, whose pictures "
            "the stages link with presigned URLs (leave REELFLOW_PICTURES_URL unset)"
        )
    root = store.abspath(PICTURES)
    store.fs.makedirs(root, exist_ok=True)
    server = ThreadingHTTPServer((host, port), functools.partial(_Handler, directory=root))
    thread = threading.Thread(target=server.serve_forever, name="reelflow-pictures", daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
