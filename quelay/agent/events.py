"""Fan-out of agent events to control-socket subscribers, with bounded queues."""

from __future__ import annotations

import logging
from typing import Any

import trio

log = logging.getLogger("quelay.events")

SUBSCRIBER_QUEUE = 4096


class Subscription:
    def __init__(self, hub: EventHub) -> None:
        self._hub = hub
        self._send, self.receive = trio.open_memory_channel[dict[str, Any]](SUBSCRIBER_QUEUE)
        self.overflowed = False

    def _offer(self, event: dict[str, Any]) -> None:
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            # A subscriber that cannot keep up is cut off rather than growing memory.
            self.overflowed = True
            self._send.close()
            self._hub.unsubscribe(self)
        except trio.ClosedResourceError:
            self._hub.unsubscribe(self)

    def close(self) -> None:
        self._send.close()
        self._hub.unsubscribe(self)


class EventHub:
    def __init__(self) -> None:
        self._subs: list[Subscription] = []

    def subscribe(self) -> Subscription:
        sub = Subscription(self)
        self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)

    def publish(self, name: str, data: dict[str, Any]) -> None:
        event = {"event": name, "data": data}
        for sub in list(self._subs):
            sub._offer(event)
