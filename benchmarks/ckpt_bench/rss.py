"""RSS sampling: this process's resident set size (and with its children), peak over a region."""

from __future__ import annotations

import contextlib
import threading

from typing_extensions import Self


class RssSampler:
    """Samples this process's RSS (and with children, e.g. a process-mode writer) every 5 ms."""

    def __init__(self, interval: float = 0.005) -> None:
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.start_rss = self.peak_rss = self.peak_tree_rss = 0

    def rss(self) -> int:
        return self._proc.memory_info().rss

    def tree_rss(self) -> int:
        total = self.rss()
        for c in self._proc.children(recursive=True):
            with contextlib.suppress(Exception):  # a child may exit between listing and reading
                total += c.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self._interval)

    def _sample(self) -> None:
        self.peak_rss = max(self.peak_rss, self.rss())
        self.peak_tree_rss = max(self.peak_tree_rss, self.tree_rss())

    def __enter__(self) -> Self:
        self.start_rss = self.peak_rss = self.rss()
        self.peak_tree_rss = self.tree_rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self._sample()
