"""A model's chat template rendered in a separate process, bounded in time, memory and output.

A chat template is Jinja code from the model directory. Rendered in-process, a loop of 10^10
empty iterations holds the caller for good (nothing interrupts a running render) and
`{{ 'x' * 10**9 }}` can exhaust the memory of the process serving the model. So templates
render in worker processes: each started on first need (at most POOL_SIZE, one per render at a
time, so threads render side by side), importing only jinja2 and the standard library (not
torch), in the sandbox transformers uses. The caller waits at most RENDER_SECONDS; a worker may
grow MEMORY_HEADROOM past its size at start (RLIMIT_AS: more is a MemoryError in the worker);
a rendering is at most OUTPUT_CHARS plus twice the conversation's text. A worker that overruns
the time is killed, one that dies is replaced, and the next render gets a fresh one. Requests
and replies cross the pipes as length-prefixed JSON (never pickle: a worker runs the template's
code, so its replies are not trusted). Workers end with the interpreter, or within a second of
a parent killed outright (they watch their parent).

render() is safe from any thread; every failure, the template's or the worker's, is one
QkvError naming it.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import IO, Any

from qkv.errors import QkvError

RENDER_SECONDS = 2.0
MEMORY_HEADROOM = 512 << 20  # bytes of address space a worker may add to its size at start
OUTPUT_CHARS = 4 << 20  # characters of rendering, plus twice those of the conversation
POOL_SIZE = 4
START_SECONDS = 60.0  # to start a worker (python, jinja2): slow on a loaded machine, once
MESSAGE_CHARS = 300  # of a template's own error message, quoted in ours
FIX = "the template is broken or hostile: fix chat_template in the model directory"
_HEADER = 8  # bytes of big-endian length before each JSON message


def render(
    template: str, messages: list[dict[str, str]], add_generation_prompt: bool,
    tokens: dict[str, str],
) -> str:  # fmt: skip
    """`template` rendered over `messages` with add_generation_prompt and the special `tokens`
    it names (bos_token, ...), as transformers renders it, in a worker process within the
    bounds above; a QkvError for a template that fails, refuses or overruns them."""
    limit = OUTPUT_CHARS + 2 * sum(len(message.get("content", "")) for message in messages)
    request = {"template": template, "messages": messages, "limit": limit,
               "add_generation_prompt": add_generation_prompt, "tokens": tokens}  # fmt: skip
    reply = _pool().render(_encode(request), reply_bytes=6 * limit + 4096)
    if "text" in reply:
        return reply["text"]
    kind, message = reply["error"], reply["message"]
    if kind == "refused":
        raise QkvError(f"the model's chat template refuses this conversation: {message}")
    if kind == "recursion":
        raise QkvError(f"the model's chat template recurses too deeply (a macro that calls "
                       f"itself without end?); {FIX}")  # fmt: skip
    if kind == "memory":
        raise QkvError(f"the model's chat template needs more than {MEMORY_HEADROOM >> 20} MiB "
                       f"of memory to render this conversation; {FIX}")  # fmt: skip
    if kind == "size":
        raise QkvError(f"the model's chat template rendered more than {limit:,} characters for "
                       f"this conversation (4 Mi plus twice its text); {FIX}")  # fmt: skip
    raise QkvError(f"the model's chat template failed: {message}")


class _Broken(Exception):
    """A worker that died or spoke out of protocol: killed, not reused."""


class _Late(_Broken):
    """A worker that overran RENDER_SECONDS."""


class _Unsent(_Broken):
    """A worker found dead when given a request (it died idle): the request never reached it."""


class _Worker:
    """One worker process and the parent's ends of its pipes."""

    def __init__(self) -> None:
        # -I: no PYTHON* variables, no current directory on the path; the parent's path
        # instead (where jinja2 and qkv are), this package's source first.
        path = [str(Path(__file__).resolve().parents[1]), *(p for p in sys.path if p)]
        boot = "import sys; sys.path[:] = sys.argv[1:]; import qkv.template_sandbox; "
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-c", boot + "qkv.template_sandbox.serve()", *path],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                start_new_session=True, bufsize=0,
            )  # fmt: skip
        except OSError as err:
            raise QkvError(f"cannot start a process to render chat templates with "
                           f"{sys.executable!r} ({err}); run qkv with a Python executable"
                           ) from None  # fmt: skip
        self.stdin: IO[bytes] = self.process.stdin  # type: ignore[assignment]
        self.stdout: IO[bytes] = self.process.stdout  # type: ignore[assignment]
        self.poll = select.poll()
        self.poll.register(self.stdout.fileno(), select.POLLIN)
        try:
            if self.receive(time.monotonic() + START_SECONDS, 64) != {"ready": True}:
                raise _Broken("it sent a malformed reply")
        except _Broken as err:
            self.kill()
            raise QkvError(f"the process that renders chat templates did not start ({err}); "
                           f"check that {sys.executable} can import jinja2") from None  # fmt: skip

    def render(self, request: bytes, reply_bytes: int) -> dict[str, Any]:
        """The worker's reply to `request`, within RENDER_SECONDS of sending it."""
        try:
            sent = memoryview(request)
            while sent:
                sent = sent[os.write(self.stdin.fileno(), sent) :]
        except OSError:  # its reading end closed: it had died
            raise _Unsent(self.ended()) from None
        reply = self.receive(time.monotonic() + RENDER_SECONDS, reply_bytes)
        keys = ("text",) if isinstance(reply, dict) and "text" in reply else ("error", "message")
        if isinstance(reply, dict) and all(isinstance(reply.get(key), str) for key in keys):
            return reply
        raise _Broken("it sent a malformed reply")

    def receive(self, deadline: float, most: int) -> Any:
        """The next message from the worker, by `deadline`, at most `most` bytes."""
        size = int.from_bytes(self.read(_HEADER, deadline), "big")
        if size > most:
            raise _Broken(f"it sent {size:,} bytes, more than the {most:,} expected")
        try:
            return json.loads(self.read(size, deadline).decode("utf-8", "surrogatepass"))
        except ValueError:
            raise _Broken("it sent a malformed reply") from None

    def read(self, size: int, deadline: float) -> bytes:
        """Exactly `size` bytes of the worker's output; _Late at the deadline, _Broken at its
        end."""
        data = bytearray()
        while len(data) < size:
            left = deadline - time.monotonic()
            if left <= 0 or not self.poll.poll(left * 1000):
                raise _Late("it did not answer in time")
            try:
                chunk = os.read(self.stdout.fileno(), min(size - len(data), 1 << 20))
            except (OSError, ValueError):  # the pipe closed under us: the pool closing at exit
                raise _Broken("its output was closed") from None
            if not chunk:
                raise _Broken(self.ended())
            data += chunk
        return bytes(data)

    def ended(self) -> str:
        """How the worker ended (its pipe closed): the signal that killed it, or its exit code."""
        try:
            code = self.process.wait(1.0)
        except subprocess.TimeoutExpired:
            return "it closed its output"
        if code < 0:
            return f"it was killed by {signal.Signals(-code).name}"
        return f"it exited with code {code}"

    def kill(self) -> None:
        """End the worker now and reap it (no zombie), closing the pipes."""
        self.process.kill()
        self.process.wait()
        self.stdin.close()
        self.stdout.close()

    def close(self) -> None:
        """End an idle worker: it exits when its input ends, else it is killed after 1 s."""
        try:
            self.stdin.close()
            self.process.wait(1.0)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        self.stdout.close()


class _Pool:
    """Up to POOL_SIZE workers, each serving one render at a time; started as threads need
    them, kept idle for the next render, closed at exit."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.idle: list[_Worker] = []
        self.busy: set[_Worker] = set()
        self.starting = 0

    def render(self, request: bytes, reply_bytes: int, retry: bool = True) -> dict[str, Any]:
        """A worker's reply to `request`: a worker that breaks is killed and the render is one
        QkvError; one found dead (it died idle) is replaced, once, before giving up."""
        worker = self.take()
        try:
            reply = worker.render(request, reply_bytes)
        except _Broken as err:
            self.drop(worker)
            if isinstance(err, _Unsent) and retry:
                return self.render(request, reply_bytes, retry=False)
            if isinstance(err, _Late):
                raise QkvError(f"the model's chat template took longer than {RENDER_SECONDS:g} "
                               f"s to render this conversation; {FIX}") from None  # fmt: skip
            raise QkvError(f"the process rendering the model's chat template failed ({err}); "
                           f"{FIX}") from None  # fmt: skip
        except BaseException:  # KeyboardInterrupt mid-render: its reply would come late
            self.drop(worker)
            raise
        self.give_back(worker)
        return reply

    def take(self) -> _Worker:
        """An idle worker, a new one if there are fewer than POOL_SIZE, else wait for one."""
        with self.changed:
            while not self.idle and len(self.busy) + self.starting >= POOL_SIZE:
                self.changed.wait()
            if self.idle:
                worker = self.idle.pop()
                self.busy.add(worker)
                return worker
            self.starting += 1
        try:
            worker = _Worker()
        finally:
            with self.changed:
                self.starting -= 1
                self.changed.notify()
        with self.changed:
            self.busy.add(worker)
        return worker

    def give_back(self, worker: _Worker) -> None:
        with self.changed:
            self.busy.discard(worker)
            self.idle.append(worker)
            self.changed.notify()

    def drop(self, worker: _Worker) -> None:
        """Kill a worker that cannot serve again, freeing its place."""
        worker.kill()
        with self.changed:
            self.busy.discard(worker)
            self.changed.notify()

    def close(self) -> None:
        """End every worker (at exit): idle ones as they exit, busy ones killed."""
        with self.changed:
            idle, busy = self.idle, list(self.busy)
            self.idle, self.busy = [], set()
        for worker in idle:
            worker.close()
        for worker in busy:
            worker.kill()


_POOL: _Pool | None = None
_POOL_LOCK = threading.Lock()
_INHERITED: list[_Pool] = []  # a parent's pool in a forked child: kept, never used or closed


def _pool() -> _Pool:
    """The process's pool, made on first use; closed at exit."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = _Pool()
            atexit.register(_POOL.close)
        return _POOL


def _forget_after_fork() -> None:
    """In a forked child: the parent's workers are the parent's; the child starts its own."""
    global _POOL, _POOL_LOCK
    if _POOL is not None:
        atexit.unregister(_POOL.close)
        _INHERITED.append(_POOL)
    _POOL, _POOL_LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


def _encode(message: Any) -> bytes:
    """A message on the pipe: its length (8 bytes, big-endian), then it as JSON in UTF-8 (lone
    surrogates, which a Python string may hold, passed through)."""
    data = json.dumps(message, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return len(data).to_bytes(_HEADER, "big") + data


# The worker side: the code below runs in the worker process.


class _Refused(Exception):
    """raise_exception(message) called by a chat template."""


def _raise_exception(message: str) -> None:
    raise _Refused(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:  # fmt: skip
    """json.dumps without Jinja's HTML escaping (as transformers' templates expect)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)  # fmt: skip


@lru_cache(maxsize=8)
def _compiled(template: str) -> Any:
    """`template` compiled in the sandbox transformers uses: immutable, trim_blocks and
    lstrip_blocks, loop controls, raise_exception, strftime_now and a plain tojson."""
    import jinja2.sandbox

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _one_line(text: str) -> str:
    """A template's error message as one line of at most MESSAGE_CHARS characters."""
    text = " ".join(text.split())
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 3] + "..."


def _rendered(request: dict[str, Any]) -> dict[str, Any]:
    """The reply to one request: {"text"}, or {"error": kind, "message"}."""
    import jinja2

    try:
        template = _compiled(request["template"])
        pieces, size, limit = [], 0, request["limit"]
        variables = {**request["tokens"], "messages": request["messages"],
                     "add_generation_prompt": request["add_generation_prompt"]}  # fmt: skip
        for piece in template.generate(variables):
            size += len(piece)
            if size > limit:
                return {"error": "size", "message": ""}
            pieces.append(piece)
        return {"text": "".join(pieces)}
    except _Refused as refused:
        return {"error": "refused", "message": _one_line(str(refused))}
    except RecursionError:
        return {"error": "recursion", "message": ""}
    except MemoryError:
        return {"error": "memory", "message": ""}
    except jinja2.TemplateSyntaxError as err:
        return {"error": "failed", "message": _one_line(f"{err.message} (line {err.lineno})")}
    except Exception as err:  # the template's own error, whatever it is: one line
        return {"error": "failed", "message": _one_line(str(err) or type(err).__name__)}


def _limit_memory() -> None:
    """Let this process grow by MEMORY_HEADROOM at most (where /proc tells its size)."""
    import resource

    try:
        pages = int(Path("/proc/self/statm").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    limit = pages * os.sysconf("SC_PAGE_SIZE") + MEMORY_HEADROOM
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(resource.RLIMIT_AS, (min(limit, hard) if hard >= 0 else limit, hard))


def _exit_with_parent(parent: int) -> None:
    """End this worker within half a second of its parent's end (even mid-render)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def serve() -> None:
    """The worker's loop: read a request, write its reply, until the input ends."""
    import jinja2.sandbox  # noqa: F401  (before the memory limit and the ready message)

    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    _limit_memory()
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    stdout.write(_encode({"ready": True}))
    stdout.flush()
    while len(header := stdin.read(_HEADER)) == _HEADER:
        request = json.loads(
            stdin.read(int.from_bytes(header, "big")).decode("utf-8", "surrogatepass")
        )
        stdout.write(_encode(_rendered(request)))
        stdout.flush()
