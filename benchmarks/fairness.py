"""Fair share under load: a flooder with 16 greedy streams beside a normal user with one, today and fair.

``python benchmarks/fairness.py [--quick]`` starts 2 servers of the default model (0:15, 15:30), and:

- through the Python client (each user its own process, so its own peer): the normal user alone, the
  flooder alone and both at once, on servers with ``--fair-share off`` and then on new ones with it on;
- through the API (two keys: the flooder's and the normal user's), with ``--fair-share off`` and ``on``.

Each user is a process of this script (``--role python|api``) that, after a warm-up generation of one
token per stream, prints one JSON line per finished generation (its tokens and the time of each); the
flooder loops until its stdin closes. The normal user's
tokens/s is its tokens over the seconds of its generations; the flooder's is the tokens it received while
the normal user ran (alone: within a window of the same length). Tokens must stay exact: every stream's
tokens equal those of the same prompt run alone. Servers run with ``--max-batch-tokens`` (8 here: a server
at capacity) and room for 3x the flooder's streams in sessions per peer (16 streams plus the sessions still
closing exceed the default 16), the API with ``--shared-round-requests`` (4).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("GOMP_SPINCOUNT", "20000")  # before torch loads libgomp, here and in every child: short spins

from benchmarks.common import load_average, start_time_limit  # noqa: E402
from swarm.tools.localswarm import LocalSwarm  # noqa: E402

TOPICS = ["bees", "rivers", "volcanoes", "owls", "ships", "forests", "comets", "bridges", "deserts", "glaciers",
          "lighthouses", "trains", "coral reefs", "castles", "tigers", "clocks", "a garden"]  # fmt: skip
NORMAL = len(TOPICS) - 1  # the normal user's prompt


def prompt(index: int) -> str:
    return f"Write a long, detailed story about {TOPICS[index]}."


def chat(index: int) -> list[dict]:
    """The prompt as a chat (an instruct model given the bare text may answer with its end token at once)."""
    return [{"role": "user", "content": prompt(index)}]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: fewer tokens and streams")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per generation")
    p.add_argument("--streams", type=int, default=16, help="the flooder's concurrent streams")
    p.add_argument("--runs", type=int, default=2, help="the normal user's generations per measurement")
    p.add_argument("--num-threads", type=int, default=1, help="torch threads in every process")
    p.add_argument("--max-batch-tokens", type=int, default=8, help="the servers' decode batch capacity")
    p.add_argument("--shared-round-requests", type=int, default=4, help="the API's round size while keys share")
    p.add_argument("--only", choices=["python", "api"], help="measure only through this kind of client")
    p.add_argument("--time-limit", type=int, default=1800)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--role", choices=["python", "api"], help=argparse.SUPPRESS)  # a user process
    p.add_argument("--target", nargs="+", help=argparse.SUPPRESS)  # initial peers, or the API's URL
    p.add_argument("--key", default="", help=argparse.SUPPRESS)
    p.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)  # the first prompt's index
    p.add_argument("--loop", action="store_true", help=argparse.SUPPRESS)  # until stdin closes
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.streams, args.runs = min(args.tokens, 12), min(args.streams, 6), 1
    return args


# ---- user processes ---------------------------------------------------------------------------------------


_REPORTING = threading.Lock()  # a flooder's streams report from many threads: one whole line at a time


def report(record: dict) -> None:
    """One JSON line on stdout for the measuring process (print writes the text and its newline apart)."""
    with _REPORTING:
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()


def emit(index: int, tokens: list, stamps: list[float], started: float) -> None:
    report({"stream": index, "tokens": tokens, "stamps": stamps, "start": started, "end": time.time()})


def failed(index: int, error: Exception) -> None:
    """A generation that failed (the swarm answered an error): reported, and a flooder carries on."""
    report({"stream": index, "error": f"{type(error).__name__}: {error}"[:300]})


def python_user(args: argparse.Namespace, stop: threading.Event) -> None:
    import torch
    from transformers import AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    from client import AutoDistributedModelForCausalLM
    from swarm.models.modelpath import resolve_model

    torch.set_num_threads(args.num_threads)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
    model = AutoDistributedModelForCausalLM.from_pretrained(None, initial_peers=args.target)

    class Stamps(BaseStreamer):
        def __init__(self):
            self.stamps: list[float] = []

        def put(self, value) -> None:
            self.stamps.append(time.time())

        def end(self) -> None:
            pass

    def stream(index: int) -> None:
        ids = tokenizer(prompt(index), return_tensors="pt")["input_ids"]
        with contextlib.suppress(Exception):  # warm-up: routes found, connections open
            model.generate(ids, max_new_tokens=1, do_sample=False)
        while True:
            streamer, started = Stamps(), time.time()
            try:
                output = model.generate(ids, max_new_tokens=args.tokens, do_sample=False, streamer=streamer)
                emit(index, output[0, ids.shape[1] :].tolist(), streamer.stamps[1:], started)
            except Exception as exc:
                failed(index, exc)
            if not args.loop or stop.is_set():
                return

    run_streams(args, stream)
    model.shutdown()


def api_user(args: argparse.Namespace, stop: threading.Event) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{args.target[0]}/v1", api_key=args.key, max_retries=0, timeout=600)
    model = client.models.list().data[0].id

    def stream(index: int) -> None:
        with contextlib.suppress(Exception):  # warm-up
            client.chat.completions.create(model=model, messages=chat(index), max_tokens=1, temperature=0)
        while True:
            started, stamps, pieces = time.time(), [], []
            try:
                chunks = client.chat.completions.create(
                    model=model, messages=chat(index), max_tokens=args.tokens, temperature=0, stream=True
                )
                for chunk in chunks:
                    if chunk.choices and chunk.choices[0].delta.content:
                        stamps.append(time.time())
                        pieces.append(chunk.choices[0].delta.content)
                emit(index, pieces, stamps, started)
            except Exception as exc:
                failed(index, exc)
            if not args.loop or stop.is_set():
                return

    run_streams(args, stream)


def run_streams(args: argparse.Namespace, stream) -> None:
    count = args.streams if args.loop else 1
    with ThreadPoolExecutor(count) as pool:
        list(pool.map(stream, range(args.first, args.first + count)))


def user_main(args: argparse.Namespace) -> int:
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    (python_user if args.role == "python" else api_user)(args, stop)
    return 0


# ---- the measurement ----------------------------------------------------------------------------------------


class User:
    """A user process and the generations it reported."""

    def __init__(self, args: argparse.Namespace, role: str, target: list[str], key: str, flood: bool):
        command = [sys.executable, __file__, "--role", role, "--target", *target, "--key", key]
        command += ["--tokens", str(args.tokens), "--num-threads", str(args.num_threads)]
        command += ["--streams", str(args.streams), "--loop"] if flood else ["--first", str(NORMAL)]
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     start_new_session=True)  # fmt: skip
        self.lines: queue.Queue[dict] = queue.Queue()
        self.results: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.lines.put(json.loads(line))
                if '"error"' in line:
                    print(f"!! a generation failed: {line.strip()}", flush=True)

    def next(self, timeout: float = 600) -> dict:
        result = self.lines.get(timeout=timeout)
        self.results.append(result)
        return result

    def finish(self, timeout: float = 600) -> list[dict]:
        """Close its stdin (a flooder ends its generations), wait for it, and return everything it reported."""
        self.proc.stdin.close()
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=30)  # it ends when it has read the pipe to its end
        while not self.lines.empty():
            self.results.append(self.lines.get())
        return self.results

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)


def normal_rate(results: list[dict]) -> float | None:
    done = [r for r in results if "error" not in r]
    return sum(len(r["tokens"]) for r in done) / sum(r["end"] - r["start"] for r in done) if done else None


def tokens_within(results: list[dict], start: float, end: float) -> int:
    return sum(start <= stamp <= end for result in results for stamp in result.get("stamps", ()))


def measure(args, role: str, target: list[str], keys: tuple[str, str], with_flood: bool, with_normal: bool):
    """One measurement: (normal user's tokens/s or None, flooder's tokens/s or None, every result)."""
    users = []
    try:
        flooder = User(args, role, target, keys[0], flood=True) if with_flood else None
        users += [flooder] if flooder else []
        if flooder:
            flooder.next()  # its streams are going
        window_start = time.time()
        normal_results = []
        if with_normal:
            normal = User(args, role, target, keys[1], flood=False)
            users.append(normal)
            normal_results = [normal.next()]
            normal.finish()
            for _ in range(args.runs - 1):
                again = User(args, role, target, keys[1], flood=False)
                users.append(again)
                normal_results.append(again.next())
                again.finish()
            done = [r for r in normal_results if "error" not in r] or [{"start": window_start, "end": time.time()}]
            window = (done[0]["start"], done[-1]["end"])
        else:
            time.sleep(args.tokens * args.runs / 4)  # about as long as the normal user would take
            window = (window_start, time.time())
        flood_results = flooder.finish() if flooder else []
    finally:
        for user in users:
            user.kill()
    flood_rate = tokens_within(flood_results, *window) / (window[1] - window[0]) if flooder else None
    return (normal_rate(normal_results) if normal_results else None), flood_rate, normal_results + flood_results


def check_exact(results: list[dict], reference: dict[int, list]) -> int:
    """Streams whose tokens differ from the same prompt's first run (recorded in ``reference``)."""
    done = [result for result in results if "error" not in result]
    return sum(result["tokens"] != reference.setdefault(result["stream"], result["tokens"]) for result in done)


def errors(results: list[dict]) -> int:
    return sum("error" in result for result in results)


def scenario(args, label: str, role: str, target, keys, reference, rows: list[dict], alone: float | None) -> float:
    """The three measurements of one setting; returns the normal user's tokens/s alone."""
    if alone is None:
        alone, _, results = measure(args, role, target, keys, with_flood=False, with_normal=True)
        check_exact(results, reference)
    _, flood_alone, results = measure(args, role, target, keys, with_flood=True, with_normal=False)
    wrong, failures = check_exact(results, reference), errors(results)
    beside, flood_beside, results = measure(args, role, target, keys, with_flood=True, with_normal=True)
    wrong, failures = wrong + check_exact(results, reference), failures + errors(results)
    ratio = beside / alone if beside and alone else None
    row = {"setting": label, "normal_alone": alone, "normal_beside_flooder": beside, "ratio": ratio,
           "flooder_alone": flood_alone, "flooder_beside_normal": flood_beside, "streams_not_exact": wrong,
           "generations_failed": failures}  # fmt: skip
    rows.append(row)
    print(json.dumps(row), flush=True)
    return alone


def table(rows: list[dict]) -> str:
    lines = ["| setting | normal alone | normal beside flooder | ratio | flooder alone | flooder beside normal "
             "| not exact | failed |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    keys = ("normal_alone", "normal_beside_flooder", "ratio", "flooder_alone", "flooder_beside_normal")
    for r in rows:
        cells = [f"{r[key]:.2f}" if r[key] is not None else "-" for key in keys]
        lines.append(f"| {r['setting']} | {' | '.join(cells)} | {r['streams_not_exact']} | {r['generations_failed']} |")
    return "\n".join(lines)


def write_keys(folder: Path) -> Path:
    path = folder / "fairness-keys.json"
    path.write_text(json.dumps([{"key": "sk-flood", "name": "flooder"}, {"key": "sk-normal", "name": "normal"}]))
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role:
        return user_main(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    start_time_limit(args.time_limit)
    started = time.monotonic()
    print(f"load average at start: {load_average()}; cpus: {os.cpu_count()}; {vars(args)}", flush=True)
    # sessions per peer: the flooder's streams (or the API's requests), with room for those still closing
    threads = ("--num-threads", str(args.num_threads), "--max-batch-tokens", str(args.max_batch_tokens),
               "--max-sessions-per-peer", str(3 * args.streams))  # fmt: skip
    rows: list[dict] = []
    python_ref: dict[int, list] = {}
    api_ref: dict[int, list] = {}
    alone = None
    try:
        for fair in ("off", "on") if args.only != "api" else ("on",):
            with LocalSwarm(timeout=300) as swarm:
                server_args = (*threads, "--fair-share", fair)
                swarm.start(None, [("0:15", server_args), ("15:30", server_args)])
                peers = swarm.initial_peers
                label = f"Python client, servers --fair-share {fair}"
                if args.only != "api":
                    alone = scenario(args, label, "python", peers, ("", ""), python_ref, rows, alone)
                if fair == "on" and args.only != "python":
                    keys = write_keys(Path(os.environ.get("TMPDIR", "/tmp")))
                    api_alone = None
                    for api_fair in ("off", "on"):
                        api = swarm.start_api(None, "--num-threads", str(args.num_threads), "--api-keys", str(keys),
                                              "--fair-share", api_fair, "--max-concurrent-requests", "32",
                                              "--shared-round-requests", str(args.shared_round_requests))  # fmt: skip
                        label = f"API, --fair-share {api_fair}"
                        target = [api.url]
                        api_alone = scenario(args, label, "api", target, ("sk-flood", "sk-normal"), api_ref, rows,
                                             api_alone)  # fmt: skip
                        api.kill_group()
    except TimeoutError as exc:
        print(f"!! {exc}; reporting what was measured", flush=True)
    finally:
        signal.alarm(0)
    print(f"\nload average at end: {load_average()}; total {time.monotonic() - started:.0f} s\n")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    return 0 if len(rows) == {None: 4}.get(args.only, 2) else 2


if __name__ == "__main__":
    sys.exit(main())
