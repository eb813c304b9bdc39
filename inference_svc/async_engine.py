"""The bridge between asyncio (the gRPC server) and the single-threaded `LLMEngine`.

One engine thread owns the engine: it builds it, then loops - run every queued command (add a
request, abort one, a residency command), then one `step()` if there is work, else sleep until a
command arrives. Commands come from any thread through one FIFO inbox, so they run between steps
in the order they were sent. Each step's outputs cross back to the event loop in a single callback
that routes them to per-request asyncio queues, which the Generate streams read. The engine owns
each request's lifecycle; `_streams` here is only where a request's outputs go, and whether a step
ran comes from the step's record (`LLMEngine.run_step`).

Prompts are never tokenized on the engine thread: `generate` encodes a prompt on a small pool of
tokenizer threads (the engine's `PromptEncoder`, which refuses text too long to fit before
tokenizing and releases the GIL while it does), then queues the ids; a huge prompt stalls no step.

Adapter files are never read on the engine thread: the engine's loader thread reads them, and its
completion posts a no-op command so a waiting engine thread wakes and installs the result.
`load_adapter` awaits a read here, on the event loop, then installs it with a command.

A stream that ends before its request finished (client cancel, deadline, error) aborts the request
on its way out, which frees the request's KV blocks and slot reference before the next step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Protocol, TypeVar

from inference_svc import errors
from inference_svc.adapter_cache import ResidentAdapter
from inference_svc.engine import EngineStep, LLMEngine, RequestEvent, RequestOutput
from inference_svc.sampling import SamplingParams
from inference_svc.tokenizer import PromptEncoder

log = logging.getLogger(__name__)

T = TypeVar("T")
Command = tuple[Callable[[LLMEngine], object], "concurrent.futures.Future | None"]

# Seconds the engine thread waits for a command when requests are queued but none could be
# scheduled and no adapter read is in flight to wake it; avoids spinning on empty steps.
BLOCKED_POLL_S = 0.005

# Threads that tokenize prompts (tokenizers releases the GIL, so they run in parallel).
TOKENIZER_THREADS = 4

STARTING, READY, DRAINING, STOPPED = "starting", "ready", "draining", "stopped"
_STOP = object()


# Between a request id's namespace and the id (a control character: no valid id holds one).
NAMESPACE_SEP = "\x1f"


class EngineObserver(Protocol):
    """Watches the engine from its thread (metrics); must be cheap and must not raise."""

    def after_commands(self, engine: LLMEngine, events: list[RequestEvent]) -> None:
        """A batch of commands (adds, aborts, residency commands) has run; `events`: what
        happened to requests meanwhile (queued, aborted)."""

    def after_step(self, engine: LLMEngine, step: EngineStep) -> None:
        """One `engine.run_step()` has run and returned `step`."""


class AsyncEngine:
    """Runs an `LLMEngine` on its own thread and serves it to coroutines on one event loop.

    Args:
        build: called on the engine thread to construct the engine (model loading happens there,
            so the event loop stays responsive while the server starts).
        on_crash: called on the event loop if the engine thread dies of an unexpected error
            (in-flight streams then end with UNAVAILABLE and new calls are refused).
        observer: told, on the engine thread, after each batch of commands and each step.
    """

    def __init__(
        self,
        build: Callable[[], LLMEngine],
        on_crash: Callable[[BaseException], None] | None = None,
        observer: EngineObserver | None = None,
    ):
        self._build = build
        self._on_crash = on_crash or (lambda error: None)
        self._observer = observer
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue] = {}  # request id -> its outputs (loop side)
        self._no_streams: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._encoder: PromptEncoder | None = None  # the engine's, set once it is built
        self._tokenizers = concurrent.futures.ThreadPoolExecutor(TOKENIZER_THREADS, "tokenize")
        self.state = STARTING

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Build the engine on its thread and start serving; raises whatever building raised."""
        self._loop = asyncio.get_running_loop()
        self._no_streams = asyncio.Event()
        self._no_streams.set()
        built: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(built,), name="engine", daemon=True)
        self._thread.start()
        try:
            await asyncio.wrap_future(built)
        except BaseException:
            self.state = STOPPED
            raise
        self.state = READY

    async def drain(self, timeout: float) -> int:
        """Refuse new requests; wait up to `timeout` s for in-flight ones, then abort the rest.

        Aborted streams end with `Draining` (UNAVAILABLE). Returns how many were aborted.
        """
        if self.state == READY:
            self.state = DRAINING
        if self._no_streams is None:  # never started
            return 0
        try:
            await asyncio.wait_for(self._no_streams.wait(), timeout)
            return 0
        except TimeoutError:
            pending = list(self._streams.values())
            for q in pending:
                q.put_nowait(errors.Draining("the server is shutting down; request aborted"))
            return len(pending)

    async def stop(self) -> None:
        """Stop the engine thread: requests still in the engine are aborted, queued commands fail."""
        if self._thread is None or self.state == STOPPED:
            self.state = STOPPED
            return
        self.state = STOPPED
        self._inbox.put(_STOP)
        await asyncio.to_thread(self._thread.join)
        self._tokenizers.shutdown(wait=False, cancel_futures=True)

    @property
    def accepting(self) -> bool:
        return self.state == READY

    # --- commands -------------------------------------------------------------------------

    def submit(self, fn: Callable[[LLMEngine], T]) -> concurrent.futures.Future[T]:
        """Run `fn(engine)` on the engine thread between steps. Thread-safe.

        Raises Draining once the engine has stopped. Cancelling the future before it runs skips it.
        """
        if self.state == STOPPED:
            raise errors.Draining("the engine has stopped")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put((fn, future))
        return future

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """`submit` and await the result (or the exception `fn` raised)."""
        if self.state == STARTING:
            raise errors.Draining("the engine is starting")
        return await asyncio.wrap_future(self.submit(fn))

    async def load_adapter(
        self, adapter_id: str, to_slot: bool = False, pin: bool | None = None
    ) -> ResidentAdapter:
        """`LLMEngine.load_adapter` without reading files on the engine thread.

        The loader thread reads and validates the files while this coroutine waits; a command then
        installs them between steps (taking a slot with `to_slot`, pinning with `pin`). Raises what
        the load raised (AdapterNotFound, InvalidAdapter ..., NoEvictableSlot).
        """
        while True:
            read = await self.call(lambda engine: engine.adapters.prefetch(adapter_id))
            if read is not None:  # None: already in the host cache
                await _finished(read)  # its error, if any, is raised by the install below
            resident = await self.call(
                lambda engine: engine.load_adapter(adapter_id, to_slot, pin, wait=False)
            )
            if resident is not None:  # None: evicted and read again meanwhile
                return resident

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        adapter_id: str | None = None,
        request_id: str | None = None,
        namespace: str = "",
    ) -> AsyncIterator[list[RequestOutput]]:
        """Queue one request and yield its outputs, in batches of whatever has arrived.

        `request_id` is unique within `namespace` (a tenant's): the same id in two namespaces
        names two requests, and RequestAlreadyExists is raised only within one. The outputs carry
        the engine's key for it (`<namespace>\x1f<request_id>`, or the bare id without one).

        The last batch ends with the finished output. Raises the engine's typed errors
        (InvalidRequest, AdapterNotFound, QueueFull, ...) before the first batch, a failed
        request's error after it, and Draining when the server takes no new requests. Use it under
        `contextlib.aclosing` so an early exit aborts the request at once.
        """
        if not self.accepting:
            raise errors.Draining(f"the server is {self.state} and accepts no new requests")
        shown = request_id or uuid.uuid4().hex
        request_id = f"{namespace}{NAMESPACE_SEP}{shown}" if namespace else shown
        if request_id in self._streams:
            raise errors.RequestAlreadyExists(f"request {shown!r} is already in flight")
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = outputs
        self._no_streams.clear()
        finished = False  # True once the engine itself has retired the request
        try:
            ids = await asyncio.wrap_future(self._tokenizers.submit(self._encoder.encode, prompt))
            await self.call(lambda engine: engine.add_request(request_id, ids, params, adapter_id))
            while not finished:
                arrived = [await outputs.get()]
                while not outputs.empty():
                    arrived.append(outputs.get_nowait())
                batch = []
                for item in arrived:
                    error = item if isinstance(item, Exception) else item.error
                    if error is not None:
                        finished = not isinstance(error, errors.Draining)
                        if batch:
                            yield batch
                        raise error
                    batch.append(item)
                    finished = item.finished
                yield batch
        finally:
            del self._streams[request_id]
            if not self._streams:
                self._no_streams.set()
            if not finished and self.state != STOPPED:
                self._inbox.put((lambda engine: engine.abort_request(request_id), None))

    # --- the engine thread ----------------------------------------------------------------

    def _run(self, built: concurrent.futures.Future) -> None:
        try:
            engine = self._build()
        except BaseException as e:
            built.set_exception(e)
            return
        engine.adapters.loader.on_done = lambda: self._inbox.put((_wake_up, None))
        self._encoder = engine.prompt_encoder
        built.set_result(None)
        try:
            self._serve(engine)
        except BaseException as e:  # a bug outside a step: nothing can run any more
            log.critical("the engine thread crashed; the engine is stopped", exc_info=e)
            self.state = STOPPED
            self._loop.call_soon_threadsafe(self._on_crash, e)
        finally:
            self._shut_down(engine)

    def _serve(self, engine: LLMEngine) -> None:
        """Commands, then a step, until told to stop."""
        blocked = False  # the last step scheduled nothing although requests are queued
        while True:
            idle = not engine.has_unfinished_requests()
            reading = blocked and bool(engine.adapters.loading)  # its completion wakes the inbox
            commands, stop = self._take_commands(
                block=idle or blocked, timeout=None if idle or reading else BLOCKED_POLL_S
            )
            for fn, future in commands:
                self._execute(engine, fn, future)
            if commands:
                events = engine.take_events()
                self._observe(lambda observer, events=events: observer.after_commands(engine, events))
            if stop:
                return
            blocked = engine.has_unfinished_requests() and not self._step(engine)

    def _take_commands(self, block: bool, timeout: float | None) -> tuple[list[Command], bool]:
        """Everything in the inbox (waiting up to `timeout` for the first if `block`), and stop?"""
        commands = []
        try:
            item = self._inbox.get(timeout=timeout) if block else self._inbox.get_nowait()
            while item is not _STOP:
                commands.append(item)
                item = self._inbox.get_nowait()
            return commands, True
        except queue.Empty:
            return commands, False

    @staticmethod
    def _execute(engine: LLMEngine, fn: Callable, future: concurrent.futures.Future | None) -> None:
        if future is None:
            fn(engine)  # fire-and-forget (aborts): nothing to report to
            return
        if not future.set_running_or_notify_cancel():
            return  # the caller gave up before it ran: skipping it leaks nothing
        try:
            future.set_result(fn(engine))
        except Exception as e:
            future.set_exception(e)

    def _step(self, engine: LLMEngine) -> bool:
        """One engine step; False when it scheduled nothing (requests are blocked)."""
        try:
            step = engine.run_step()
        except Exception as e:  # a bug: fail every request rather than hang their streams
            log.exception("engine step failed; aborting all in-flight requests")
            self._loop.call_soon_threadsafe(self._fail_streams, engine.abort_all(), e)
            return True
        self._observe(lambda observer: observer.after_step(engine, step))
        if step.outputs:
            self._loop.call_soon_threadsafe(self._deliver, step.outputs)
        return step.ran

    def _observe(self, notify: Callable[[EngineObserver], None]) -> None:
        if self._observer is None:
            return
        try:
            notify(self._observer)
        except Exception:  # an observer's bug must not stop the engine
            log.exception("engine observer failed")

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:  # None: the stream ended first and aborted the request
                stream.put_nowait(out)

    def _fail_streams(self, request_ids: list[str], error: Exception) -> None:
        for request_id in request_ids:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.put_nowait(error)

    def _shut_down(self, engine: LLMEngine) -> None:
        engine.adapters.close()
        aborted = engine.abort_all()
        if aborted:
            error = errors.Draining("the engine stopped; request aborted")
            self._loop.call_soon_threadsafe(self._fail_streams, aborted, error)
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                self._fail_commands([item])

    @staticmethod
    def _fail_commands(commands: list[Command]) -> None:
        for _, future in commands:
            if future is not None and future.set_running_or_notify_cancel():
                future.set_exception(errors.Draining("the engine stopped before running the command"))


def _wake_up(engine: LLMEngine) -> None:
    """The command an adapter read posts when it finishes: running any command wakes the loop."""


async def _finished(future: concurrent.futures.Future) -> None:
    """Wait for a thread's `future` without taking its result or its error."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    future.add_done_callback(lambda _: loop.call_soon_threadsafe(done.set))
    await done.wait()
