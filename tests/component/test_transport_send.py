"""transport.h2.send_within_window: the one flow-control wait, against a real h2 peer in memory."""

from __future__ import annotations

import h2.events
import h2.settings
import pytest
import trio
import trio.testing
from h2.config import H2Configuration
from h2.connection import H2Connection

from tunnel_lab.transport.h2 import TunnelH2Connection, send_within_window

REQUEST = [(b":method", b"POST"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"a.test")]


class Peer:
    """A client (plain h2) with stream 1 open to our server connection; it reads what we flush."""

    def __init__(self, window: int) -> None:
        self.ours = TunnelH2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.ours.initiate_connection()
        self.theirs = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.theirs.initiate_connection()
        self.theirs.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.theirs.send_headers(1, REQUEST, end_stream=True)
        self.ours.receive_data(self.theirs.data_to_send())
        self.theirs.receive_data(self.ours.data_to_send())
        self.ours.receive_data(self.theirs.data_to_send())
        self.ours.send_headers(1, [(b":status", b"200")])
        self.received = bytearray()
        self.flushes = 0
        self.ended = False
        self.frames: list[int] = []
        self.lot = trio.lowlevel.ParkingLot()

    async def flush(self) -> None:
        self.flushes += 1
        await trio.lowlevel.checkpoint()
        for event in self.theirs.receive_data(self.ours.data_to_send()):
            if isinstance(event, h2.events.DataReceived):
                self.received += event.data
                self.frames.append(len(event.data))
            elif isinstance(event, h2.events.StreamEnded):
                self.ended = True

    def open_window(self, n: int) -> None:
        self.theirs.increment_flow_control_window(n, 1)
        self.theirs.increment_flow_control_window(n)
        self.ours.receive_data(self.theirs.data_to_send())
        self.lot.unpark_all()


async def test_waits_for_the_window_and_flushes_what_fitted_first() -> None:
    peer = Peer(window=1000)
    payload = bytes(range(256)) * 10  # 2560 bytes: 1000 fit, the rest waits for window
    async with trio.open_nursery() as nursery:
        done = trio.Event()

        async def send() -> None:
            await send_within_window(peer.ours, 1, payload, end_stream=True, flush=peer.flush,
                                     wait_for_window=peer.lot.park, closed=RuntimeError)
            await peer.flush()
            done.set()

        nursery.start_soon(send)
        with trio.fail_after(5):
            while len(peer.received) < 1000:
                await trio.testing.wait_all_tasks_blocked()
        assert bytes(peer.received) == payload[:1000]  # flushed before parking
        assert not done.is_set()
        peer.open_window(2000)
        with trio.fail_after(5):
            await done.wait()
    assert bytes(peer.received) == payload and peer.ended


async def test_frames_stay_within_max_frame_size() -> None:
    peer = Peer(window=100_000)
    await send_within_window(peer.ours, 1, b"x" * 40000, end_stream=False, flush=peer.flush,
                             wait_for_window=peer.lot.park, closed=RuntimeError)
    await peer.flush()
    assert peer.frames == [16384, 16384, 40000 - 2 * 16384] and not peer.ended


async def test_empty_data_with_end_is_one_empty_frame() -> None:
    peer = Peer(window=0)
    queued = await send_within_window(peer.ours, 1, b"", end_stream=True, flush=peer.flush,
                                      wait_for_window=peer.lot.park, closed=RuntimeError)
    await peer.flush()
    assert queued == 0 and peer.frames == [0] and peer.ended


async def test_a_closed_stream_and_a_failed_check_stop_it() -> None:
    peer = Peer(window=1000)
    peer.ours.reset_stream(1)
    with pytest.raises(KeyError, match="closed"):
        await send_within_window(peer.ours, 1, b"x", end_stream=False, flush=peer.flush,
                                 wait_for_window=peer.lot.park, closed=lambda exc: KeyError("closed"))

    def check() -> None:
        raise ValueError("reset")

    with pytest.raises(ValueError, match="reset"):
        await send_within_window(Peer(window=1000).ours, 1, b"x", end_stream=False, flush=peer.flush,
                                 wait_for_window=peer.lot.park, closed=RuntimeError, check=check)
