"""The response writes of one loop turn leave as one: head and body in one segment."""

import asyncio

from service.frontend.http_protocol import _CoalescingTransport


class _Recorder(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 8000) if name == "sockname" else default


def test_writes_of_one_turn_go_out_together_and_in_order():
    async def scenario() -> list[bytes]:
        recorder = _Recorder()
        transport = _CoalescingTransport(recorder, asyncio.get_running_loop())
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        transport.write(b"body")
        assert recorder.writes == []  # held until the turn ends
        await asyncio.sleep(0)
        transport.write(b"next")
        await asyncio.sleep(0)
        assert transport.get_extra_info("sockname") == ("127.0.0.1", 8000)  # the rest is the transport's
        return recorder.writes

    assert asyncio.run(scenario()) == [b"HTTP/1.1 200 OK\r\n\r\nbody", b"next"]


def test_close_sends_what_is_held_first():
    async def scenario() -> _Recorder:
        recorder = _Recorder()
        transport = _CoalescingTransport(recorder, asyncio.get_running_loop())
        transport.write(b"last words")
        transport.close()
        await asyncio.sleep(0)
        return recorder

    recorder = asyncio.run(scenario())
    assert recorder.writes == [b"last words"] and recorder.closed
