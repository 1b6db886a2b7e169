"""`polymodal serve` as it is, but on the static-slot batcher that the paged one replaced (its source at
`bench_batcher.BASELINE`), for bench_serving's side by side: the same HTTP server, prompt builder and answer
streaming, only the batcher differs (it takes the same `Request`s).

    python benchmarks/serve_static.py CHECKPOINT_DIR --slots 64 --port 8001
"""

from __future__ import annotations

import argparse
import gc
import threading

import uvicorn

from bench_batcher import static_batcher_class  # benchmarks/bench_batcher.py, beside this script
from polymodal.serve.app import Server, create_app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("directory")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args()
    server = Server(args.directory, slots=1, max_queue=args.max_queue)  # its paged batcher is replaced below
    static, _ = static_batcher_class()
    server.batcher = static(server.model, slots=args.slots, max_len=server.context, max_waiting=args.max_queue)
    server.thread = threading.Thread(target=server.batcher.run, name="batcher", daemon=True)
    print(f"serving {server.name} on the static batcher, {args.slots} slots", flush=True)
    gc.freeze()  # as `polymodal serve` does
    uvicorn.run(create_app(server), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
