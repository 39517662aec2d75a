"""A connection's read deadlines, which uvicorn does not set: a connection must send a request's headers within
`header_timeout` seconds of opening (or of its previous response), or it is closed. Without it an idle,
half-header or slowloris connection holds its socket forever, before auth. (The body's deadline is
read_body's, server/http.py: it answers 408.)"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


class _DeadlineProtocol(H11Protocol):
    header_timeout: float

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm(self.timeout_keep_alive)  # an idle keep-alive connection is uvicorn's to close first

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _arm(self, extra_s: float = 0.0) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        waiting_after = self.cycle  # the request before the one whose headers are due (None: the first)
        self._header_timer = self.loop.call_later(self.header_timeout + extra_s, self._late, waiting_after)

    def _late(self, waiting_after: Any) -> None:
        in_flight = self.cycle is not None and not self.cycle.response_complete  # (pipelined: started already)
        if self.cycle is waiting_after and not in_flight and not self.transport.is_closing():
            self.transport.close()  # no new request's headers came


def protocol_with_deadline(header_timeout: float) -> type[H11Protocol]:
    return type("DeadlineH11Protocol", (_DeadlineProtocol,), {"header_timeout": header_timeout})
