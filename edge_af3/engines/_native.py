"""Lifetime of objects that own native (C) handles: `with` blocks, and a close at collection."""

from __future__ import annotations


class NativeResource:
    """Mixin: the subclass defines an idempotent `close()`, which these call."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
