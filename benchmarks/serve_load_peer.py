"""The peer server of `serve_load.py --peer transformers`: `transformers serve --continuous-batching` on loopback.

    .venv/bin/python benchmarks/serve_load.py --route chat --chat-model tiny-llm --peer transformers
    .venv/bin/python benchmarks/serve_load_peer.py .raybooth/models/tiny-llm     # start it alone, Ctrl-C stops

`start_peer` runs `<python> -m transformers.cli.transformers serve <folder> --continuous-batching --host
127.0.0.1 --port <free port> --device <device>` as a subprocess, pinned to the model folder (the positional
`force_model`, so the request's `model` must be that same folder path), and waits for `GET /health`.
Flags and routes are those of the installed transformers CLI (`transformers/cli/serve.py`,
`cli/serving/server.py`). What the peer does with a request (`cli/serving/chat_completion.py`, `utils.py`):
- a text-only model (`LlamaForCausalLM`, tiny-llm) runs in its continuous-batching worker (paged attention);
  per request it honours `max_tokens` and the EOS id; temperature/top_p are those of the first request
  (its TODO: no per-request generation config in CB), which is the same for every request here;
- a VLM (tiny-vlm, `LlavaForConditionalGeneration`) is a `VLM` modality, which its CB refuses ("does not
  support continuous batching. Falling back to sequential generation"): one `generate` at a time;
- `stream_options` is ignored with a warning; the last chunk carries `usage` anyway; `seed` sets torch's
  global seed.
`OMP_NUM_THREADS` is set to `threads` (default 1: the raybooth chat replica's one Ray CPU, where Ray sets
`OMP_NUM_THREADS=1`), so both servers decode on the same number of torch threads.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from raybooth.cluster.runtime import free_port


class PeerError(RuntimeError):
    """The peer could not be started; the message says why (and the tail of its log)."""


@dataclass
class Peer:
    process: subprocess.Popen
    url: str
    model: str  # the `model` field requests must carry (the pinned folder)
    log_path: Path

    def log_tail(self, chars: int = 1500) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def peer_command(python: str, folder: str, port: int, device: str) -> list[str]:
    return [python, "-m", "transformers.cli.transformers", "serve", folder, "--continuous-batching",
            "--host", "127.0.0.1", "--port", str(port), "--device", device, "--log-level", "warning"]  # fmt: skip


def start_peer(python: str, folder: str, device: str, threads: int, wait_s: float = 300) -> Peer:
    """Start the peer on a free loopback port and return once `/health` answers 200."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1"}  # no network here
    if threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)
    log = Path(tempfile.mkstemp(prefix="transformers-serve-", suffix=".log")[1])
    with log.open("wb") as out:
        process = subprocess.Popen(
            peer_command(python, folder, port, device), stdout=out, stderr=subprocess.STDOUT, env=env
        )
    peer = Peer(process, f"http://127.0.0.1:{port}", folder, log)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PeerError(f"transformers serve exited with {process.returncode}: {peer.log_tail()}")
        try:
            if httpx.get(f"{peer.url}/health", timeout=2).status_code == 200:
                return peer
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop_peer(peer)
    raise PeerError(f"transformers serve did not answer /health within {wait_s:.0f}s: {peer.log_tail()}")


def stop_peer(peer: Peer) -> None:
    peer.process.terminate()
    try:
        peer.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        peer.process.kill()
        peer.process.wait(timeout=20)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", help="a local model folder (e.g. a built preset)")
    p.add_argument("--python", default=sys.executable, help="the interpreter that has transformers[serving]")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the peer (0: leave unset)")
    args = p.parse_args(argv)
    peer = start_peer(args.python, str(Path(args.folder).resolve()), args.device, args.threads)
    print(f"{peer.url} serving {peer.model} (log {peer.log_path}); Ctrl-C stops it", flush=True)
    try:
        peer.process.wait()
    except KeyboardInterrupt:
        stop_peer(peer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
