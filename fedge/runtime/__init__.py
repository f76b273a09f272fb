"""Device runtime: a verified model store, local inference and a loopback HTTP server.

Entry points: :func:`fedge.runtime.store.install` / ``rollback`` / ``current``,
:func:`fedge.runtime.infer.load_installed`, :func:`fedge.runtime.serve.serve`.
"""

from fedge.runtime.store import ArtifactRefused, StoreError, current, install, rollback

__all__ = ["ArtifactRefused", "StoreError", "current", "install", "rollback"]
