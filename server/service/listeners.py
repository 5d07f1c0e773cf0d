"""Push, not polling: whoever streams something that changes on other threads (a job, a dataset) listens,
and every change wakes it on its own event loop."""

from __future__ import annotations

import asyncio


class Listeners:
    def __init__(self):
        self._events: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def listen(self) -> asyncio.Event:
        """An event on this event loop, set whenever the thing changes (clear it before reading the thing)."""
        event = asyncio.Event()
        self._events.append((asyncio.get_running_loop(), event))
        return event

    def unlisten(self, event: asyncio.Event) -> None:
        self._events[:] = [(loop, e) for loop, e in self._events if e is not event]

    def changed(self) -> None:
        """From any thread: wake the listeners (no cost without any)."""
        for loop, event in tuple(self._events):
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop has closed
                pass
