"""The naive baseline: a trio TCP byte relay that parses nothing.

    python labs/naive_relay.py --listen 127.0.0.1:6000 --target 127.0.0.1:5432

Every accepted client gets a fresh connection to the target and two pumps copying bytes
(receive_some / send_all) until either side closes. It is the yardstick that
labs/bench_proxy.py compares connmgr against: the cost of "just trio in the middle".
"""

import argparse
from functools import partial

import trio


def host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
    """Copy bytes from src to dst until src reaches EOF, then close dst for writing."""
    while data := await src.receive_some(65536):
        await dst.send_all(data)
    await dst.send_eof()


async def relay(client: trio.SocketStream, target: tuple[str, int]) -> None:
    try:
        async with client, await trio.open_tcp_stream(*target) as server:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, client, server)
                nursery.start_soon(pump, server, client)
    except* (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # one side went away: the connection is over


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listen", type=host_port, required=True, help="HOST:PORT")
    parser.add_argument("--target", type=host_port, required=True, help="HOST:PORT")
    args = parser.parse_args()
    host, port = args.listen
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(trio.serve_tcp, partial(relay, target=args.target), port, host=host)
        )
        print(
            f"naive relay listening on {host}:{port} -> {args.target[0]}:{args.target[1]}",
            flush=True,
        )


if __name__ == "__main__":
    try:
        trio.run(main)
    except KeyboardInterrupt:
        pass
