"""Sharing one model between callers: widgets, notebook cells and threads of your own.

A TransformerLens model is one object, and patching works by hooking it: a sweep attaches
hooks to the model for the length of a forward pass (paste this slice, record that
activation, stop here), and the hooks are the model's, not the caller's. Two forward passes
at the same time on one model would each run through the other's hooks: a notebook cell's
``pw.patch`` during a widget's sweep would paste the widget's activations, or fail on shapes
it never asked for. This module is the rule that keeps every caller apart:

* **Every forward pass patchwidgets runs is made inside** :func:`exclusive`: a per-model lock
  that also covers the hooks attached for that pass. It is held *per pass* (one chunk of a
  sweep, one unpatched run, one attention-pattern run), never for a whole sweep, so a call
  that meets a long sweep waits about one chunk, not the whole sweep.
* **The lock is fair**: waiting callers get it in the order they asked, so a sweep that
  releases the lock after a chunk and asks again right away goes behind the notebook call
  that was waiting, instead of starving it.
* **Nothing a sweep needs between passes lives on the model.** The engine keeps the target
  run's recordings in its own object; the one thing a sweep attaches for its whole length,
  the :class:`~patchwidgets.watch.SweepWatch` (cancel and progress, block by block), is
  attached anew at every pass this thread makes and removed at its end (:func:`watched`),
  so other callers' passes never see it.
* **Waiting can be seen and cancelled.** :func:`waiting_notice` tells a caller (the widget)
  when it has to wait, and a sweep waiting for the lock notices its cancel event.

The lock is re-entrant: an entry point that holds it may call another that takes it again.

Your own code that runs the model (``model(tokens)``, ``model.run_with_hooks(...)``) while a
widget on the same model may be sweeping should do the same::

    with pw.exclusive(model):
        logits, cache = model.run_with_cache(tokens)
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections import deque
from typing import Any, Callable, Iterator, Protocol

__all__ = ["exclusive", "watched", "waiting_notice", "ModelLock"]


class Watcher(Protocol):
    """What :func:`watched` attaches at every pass: a sweep's block hooks, and its cancel check."""

    def attach(self, model: Any) -> list: ...   # hook handles, removed when the pass ends

    def check(self) -> None: ...                 # raises when the sweep was cancelled


class ModelLock:
    """A fair, re-entrant lock: threads get it in the order they asked for it.

    ``threading.RLock`` hands the lock to whichever thread runs first after a release, and
    the releasing thread usually runs first: a sweep that releases after every chunk and asks
    again at once would keep it for its whole length while a notebook call waits.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._owner_name = ""
        self._depth = 0
        self._queue: deque[int] = deque()   # waiting threads, in the order they asked

    @property
    def depth(self) -> int:
        """How many times the calling thread holds the lock (0: not at all)."""
        return self._depth if self._owner == threading.get_ident() else 0

    def acquire(self, on_wait: Callable[[str], Any] | None = None,
                check: Callable[[], None] | None = None) -> None:
        """Take the lock, waiting in line if another thread holds it.

        ``on_wait(holder)`` is called (outside the lock) if the caller has to wait, with the
        name of the thread holding it, and ``on_wait("")`` once it has the lock; ``check()`` is
        called every 0.1 s of waiting and may raise (a cancelled sweep stops waiting).
        """
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return
            if self._owner is None and not self._queue:
                self._take(me)
                return
            self._queue.append(me)
            holder = self._owner_name
        try:
            if on_wait is not None:
                on_wait(holder)
            with self._cond:
                while self._owner is not None or self._queue[0] != me:
                    if check is not None:
                        self._cond.release()   # (check may call back into code that takes locks)
                        try:
                            check()
                        finally:
                            self._cond.acquire()
                    self._cond.wait(0.1)
                self._queue.popleft()
                self._take(me)
        except BaseException:
            with self._cond:
                if me in self._queue:
                    self._queue.remove(me)
                self._cond.notify_all()
            if on_wait is not None:
                on_wait("")
            raise
        if on_wait is not None:
            try:
                on_wait("")
            except BaseException:
                self.release()
                raise

    def _take(self, me: int) -> None:
        self._owner, self._depth = me, 1
        self._owner_name = threading.current_thread().name

    def release(self) -> None:
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("ModelLock released by a thread that does not hold it")
            self._depth -= 1
            if self._depth == 0:
                self._owner, self._owner_name = None, ""
                self._cond.notify_all()


_LOCKS: "weakref.WeakKeyDictionary[Any, ModelLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def lock_of(model: Any) -> ModelLock:
    """The model's lock (made on first use; it lives as long as the model)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = ModelLock()
        return lock


class _ThreadState(threading.local):
    """What this thread has asked for: its active watchers and its waiting notice, per model."""

    def __init__(self) -> None:
        self.watchers: dict[int, list[Watcher]] = {}        # id(model) -> stack, innermost last
        self.attached: dict[int, list] = {}                 # id(model) -> hook handles of this pass
        self.notice: list[Callable[[str], Any]] = []


_THREAD = _ThreadState()


def _attach(model: Any) -> None:
    stack = _THREAD.watchers.get(id(model))
    if stack and id(model) not in _THREAD.attached:
        _THREAD.attached[id(model)] = stack[-1].attach(model)


def _detach(model: Any) -> None:
    for handle in _THREAD.attached.pop(id(model), []):
        handle.remove()


@contextlib.contextmanager
def exclusive(model: Any) -> Iterator[None]:
    """Run the body as the only user of ``model``: take its lock (waiting in line), attach
    this thread's active watcher for the pass, and undo both at the end.

    Wrap each forward pass (with the hooks it attaches) in this, not a whole sweep: other
    callers get their turn between passes.
    """
    lock = lock_of(model)
    stack = _THREAD.watchers.get(id(model))
    check = stack[-1].check if stack else None
    notice = _THREAD.notice[-1] if _THREAD.notice else None
    lock.acquire(on_wait=notice, check=check)
    try:
        if lock.depth == 1:
            _attach(model)
        yield
    finally:
        if lock.depth == 1:
            _detach(model)
        lock.release()


@contextlib.contextmanager
def watched(model: Any, watcher: Watcher) -> Iterator[None]:
    """While the body runs, every pass this thread makes on ``model`` (inside
    :func:`exclusive`) has ``watcher``'s hooks attached; other threads' passes never do."""
    key = id(model)
    stack = _THREAD.watchers.setdefault(key, [])
    holding = lock_of(model).depth > 0
    if holding:          # (entered inside a pass: swap the hooks now)
        _detach(model)
    stack.append(watcher)
    if holding:
        _attach(model)
    try:
        yield
    finally:
        if holding:
            _detach(model)
        stack.remove(watcher)
        if not stack:
            del _THREAD.watchers[key]
        elif holding:
            _attach(model)


@contextlib.contextmanager
def waiting_notice(notice: Callable[[str], Any]) -> Iterator[None]:
    """While the body runs, ``notice(holder)`` is called whenever this thread has to wait for
    a model another thread is using (``holder``: that thread's name). The widget uses it to
    say "waiting for another computation on this model"."""
    _THREAD.notice.append(notice)
    try:
        yield
    finally:
        _THREAD.notice.remove(notice)
