"""A Jupyter kernel the grader drives one piece of code at a time, each with a time limit.

The grader needs three things nbclient does not give it together: run a cell and get its
status back within a deadline, interrupt a cell that runs too long and carry on with the
next, and notice at once (not at the deadline) when the kernel dies. So it talks to the kernel
through jupyter_client directly: send ``execute``, then wait on the reply one second at a
time, checking between waits that the kernel is still alive. Outputs are drained and dropped:
the grader reads nothing a cell prints.
"""

from __future__ import annotations

import queue
import subprocess
import time
from dataclasses import dataclass


class CellTimeout(Exception):
    """The code ran past its deadline (the kernel has been interrupted)."""


class KernelDied(BaseException):
    """The kernel process exited while running the code. A BaseException, like the other
    failures of the grader's machinery, so that the ``except Exception`` that turns the
    learner's errors into messages (``_common.call_learner``) does not blame the learner for it."""


@dataclass
class Reply:
    status: str  # "ok" or "error"
    ename: str = ""
    evalue: str = ""


class KernelSession:
    """One kernel, started in ``cwd``; use as a context manager so it is always shut down."""

    def __init__(self, kernel_name: str = "python3", cwd: str | None = None):
        from jupyter_client import KernelManager

        self.km = KernelManager(kernel_name=kernel_name)
        # The kernel process's own stderr (start-up warnings) is not the notebook's output.
        self.km.start_kernel(cwd=cwd, stderr=subprocess.DEVNULL)
        self._connect()

    def _connect(self) -> None:
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=120)

    def __enter__(self) -> "KernelSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.kc.stop_channels()
        finally:
            if self.km.has_kernel:
                self.km.shutdown_kernel(now=True)

    def run(self, code: str, timeout: float) -> Reply:
        """Execute ``code``; raise :class:`CellTimeout` (after interrupting) or :class:`KernelDied`."""
        msg_id = self.kc.execute(code, store_history=False, allow_stdin=False, stop_on_error=False)
        deadline = time.monotonic() + timeout
        while True:
            self._drain_outputs()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.km.interrupt_kernel()
                raise CellTimeout(f"ran longer than {timeout:.0f} s")
            try:
                msg = self.kc.get_shell_msg(timeout=min(1.0, remaining))
            except queue.Empty:
                if not self.km.is_alive():
                    raise KernelDied("the kernel died") from None
                continue
            if msg["parent_header"].get("msg_id") == msg_id:
                content = msg["content"]
                return Reply(content.get("status", "error"), content.get("ename", ""), content.get("evalue", ""))

    def _drain_outputs(self) -> None:
        while True:
            try:
                self.kc.get_iopub_msg(timeout=0)
            except queue.Empty:
                return

    def responsive(self, timeout: float = 10) -> bool:
        """Whether the kernel answers a trivial request (after an interrupt, say)."""
        try:
            return self.run("None", timeout).status == "ok"
        except (CellTimeout, KernelDied):
            return False

    def restart(self) -> None:
        """A fresh kernel process: everything the notebook defined is gone."""
        self.kc.stop_channels()
        self.km.restart_kernel(now=True)
        self._connect()
