"""Site groups for the Ray backend tests, imported by name inside the actors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from securefl.engine.messages import EvaluateRes
from securefl.engine.ray_backend import SiteHost, as_buffer
from tests.contracts.transport import EchoHandler


class EchoSites:
    """:class:`EchoHandler` sites; ``setup`` names those that fail and their delays."""

    def __init__(self, client_ids: Sequence[str], setup: Mapping[str, Any]) -> None:
        self.clients = {cid: EchoHandler(cid, fail=cid in setup.get("fail", ()),
                                         delay=setup.get("delay", {}).get(cid, 0.0))
                        for cid in client_ids}

    def announce(self) -> dict[str, bytes]:
        return {cid: cid.encode() for cid in self.clients}

    def attach(self, directory: Mapping[str, bytes]) -> None:
        self.directory = dict(directory)


def echo_sites(client_ids: Sequence[str], setup: Mapping[str, Any]) -> EchoSites:
    return EchoSites(client_ids, setup)


class RecordingSites:
    """Sites that answer ``EvaluateIns`` with the sum of its parameters as the loss and
    remember the id of each decoded request and whether its array was writable."""

    def __init__(self, client_ids: Sequence[str], setup: Mapping[str, Any]) -> None:
        self.ids: dict[str, int] = {}
        self.flags: list[bool] = []
        self.clients = {cid: _Recorder(cid, self) for cid in client_ids}

    def announce(self) -> dict[str, bytes]:
        return {}

    def attach(self, directory: Mapping[str, bytes]) -> None:
        pass

    def seen(self) -> dict[str, int]:
        return self.ids

    def writable(self) -> list[bool]:
        return self.flags


class _Recorder:
    def __init__(self, client_id: str, group: RecordingSites) -> None:
        self.client_id, self.group = client_id, group

    def handle(self, request: Any, *, round: int) -> EvaluateRes:
        self.group.ids[self.client_id] = id(request)
        self.group.flags.append(bool(request.parameters.flags.writeable))
        return EvaluateRes(num_examples=1, loss=float(request.parameters.sum()), accuracy=0.0)


def recording_sites(client_ids: Sequence[str], setup: Mapping[str, Any]) -> RecordingSites:
    return RecordingSites(client_ids, setup)


class ForgingHost(SiteHost):
    """A host whose sites answer with a frame whose declared header length overruns it."""

    def handle(self, round: int, frames: Sequence[np.ndarray], items: Sequence[tuple[str, int]],
               timeout: float | None, max_bytes: int) -> list[tuple[str, np.ndarray | str]]:
        honest = super().handle(round, frames, items, timeout, max_bytes)
        out: list[tuple[str, np.ndarray | str]] = []
        for cid, reply in honest:
            assert isinstance(reply, np.ndarray)
            frame = bytearray(reply.tobytes())
            frame[6:10] = (len(frame) * 2).to_bytes(4, "little")  # header length: u32
            out.append((cid, as_buffer(bytes(frame))))
        return out
