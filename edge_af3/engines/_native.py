"""Lifetime of objects that own native (C) handles: `with` blocks, and a close at collection."""

from __future__ import annotations


class NativeResource:
    """Subclasses implement an idempotent `close()`."""

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
