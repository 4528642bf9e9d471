"""Which implementation runs an op: the backend setting and the rules of "auto".

Backends:
- ``"reference"``: plain PyTorch (``gptfast.reference``). Always available.
- ``"triton"``: the kernels in ``gptfast.kernels``. CUDA tensors, or CPU tensors when
  ``TRITON_INTERPRET=1`` (how the CPU tests run the real kernels). Forcing it where the
  kernel cannot run raises :class:`BackendUnavailable` saying why.
- ``"auto"`` (default): triton when the tensors are on CUDA, triton imports, a kernel is
  registered for the op and it supports the case; otherwise reference, silently.
  ``gptfast info`` prints the reason for each op.

The default comes from the ``GPTFAST_BACKEND`` environment variable (else "auto").
:func:`use_backend` changes it, as a plain call or as a context manager.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Callable, Optional

BACKENDS = ("auto", "triton", "reference")


class BackendUnavailable(RuntimeError):
    """Raised when the "triton" backend is forced for a case it cannot run."""


def _check_name(name) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name.lower()


# The setting in force: None until use_backend() is called (then GPTFAST_BACKEND, read at
# import, applies). A plain module global, not a ContextVar or thread-local: torch.compile
# (dynamo in torch 2.11 and 2.13) cannot trace ContextVar.get, while it reads a module global at
# trace time and guards on its value, so a compiled function recompiles when the setting
# changes instead of running the backend it was traced with.
_setting: Optional[str] = None
_ENV_DEFAULT = os.environ.get("GPTFAST_BACKEND", "auto")


def get_backend() -> str:
    """The backend in force: the last :func:`use_backend`, else ``GPTFAST_BACKEND``, else auto."""
    if _setting is not None:
        return _setting
    return _default_from_env()


def _default_from_env() -> str:
    try:
        return _check_name(_ENV_DEFAULT)
    except ValueError:
        raise ValueError(
            f"GPTFAST_BACKEND must be one of {BACKENDS}, got {_ENV_DEFAULT!r}") from None


class use_backend:
    """Select the backend for every op: ``use_backend("triton")`` or ``with use_backend(...):``.

    As a call it changes the setting until changed again; as a context manager it restores
    the previous setting on exit. The setting is process-wide (like ``torch.backends``
    flags), not per thread.

    Under ``torch.compile`` the setting is read when a function is traced: the compiled code
    runs the backend that was in force then, and dynamo guards on the setting, so calling
    the compiled function under another backend recompiles it. A ``with use_backend(...)``
    block inside a compiled function is traced as well (dynamo replays the global's changes).
    """

    def __init__(self, name: str):
        global _setting
        self.name = _check_name(name)
        self._previous = _setting
        _setting = self.name

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _setting
        _setting = self._previous
        return False

    def __repr__(self):
        return f"use_backend({self.name!r})"


_TRITON_IMPORT = {}  # "error" -> None or the reason, once checked


def triton_import_error() -> Optional[str]:
    """None when triton imports, else why not (checked once, on first use)."""
    if "error" not in _TRITON_IMPORT:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _TRITON_IMPORT["error"] = None
        except Exception as err:  # ImportError, or a broken install raising anything
            _TRITON_IMPORT["error"] = f"triton does not import ({type(err).__name__}: {err})"
    return _TRITON_IMPORT["error"]


def interpreter_enabled() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclasses.dataclass
class Kernel:
    """A Triton implementation of one op.

    ``entry`` is "module:function", imported on first use so that ``import gptfast`` never
    imports triton. ``unsupported(*args, **kwargs)`` returns None when the kernel handles
    the call, else a short reason (e.g. "head dim 512 > 256").
    """

    entry: str
    unsupported_entry: Optional[str] = None
    # Filled by load(). Attributes of this object, not a shared dict: torch.compile reads an
    # object's attribute live when first touched, so it sees what a constant-result call
    # (_environment_reason, run eagerly during tracing) loaded a moment before.
    _function: Optional[Callable] = dataclasses.field(default=None, repr=False)
    _unsupported: Optional[Callable] = dataclasses.field(default=None, repr=False)

    def load(self) -> None:
        """Import the kernel module (and so triton) and keep its entry points."""
        if self._function is None:
            self._function = _import(self.entry)
            if self.unsupported_entry is not None:
                self._unsupported = _import(self.unsupported_entry)

    @property
    def function(self) -> Callable:
        if self._function is None:
            self.load()
        return self._function

    def unsupported(self, *args, **kwargs) -> Optional[str]:
        if self.unsupported_entry is None:
            return None
        if self._unsupported is None:
            self.load()
        return self._unsupported(*args, **kwargs)


def _import(entry: str) -> Callable:
    module_name, _, name = entry.partition(":")
    return getattr(importlib.import_module(module_name), name)


_KERNELS: dict[str, Kernel] = {}


def register_kernel(op: str, entry: str, unsupported: Optional[str] = None) -> None:
    """Declare the Triton kernel of ``op`` (one line per op in ``gptfast.functional``).

    ``entry`` and ``unsupported`` are "module:function" strings, imported only when a call
    could run on triton (CUDA tensors, or the interpreter). ``entry`` takes the arguments
    of the reference op; ``unsupported`` takes the same and returns None or a reason.
    """
    _KERNELS[op] = Kernel(entry, unsupported)


def registered_kernel(op: str) -> Optional[Kernel]:
    return _KERNELS.get(op)


def _device_reason(device_type: str) -> Optional[str]:
    """Why triton cannot run on tensors of this device type (None if it can)."""
    if device_type == "cuda":
        return None
    if device_type == "cpu" and interpreter_enabled():
        return None
    if device_type == "cpu":
        return "tensors are on the CPU (set TRITON_INTERPRET=1 to run the kernels there)"
    return f"tensors are on {device_type}, triton kernels need CUDA"


def _environment_reason(op: str, device_type: str) -> Optional[str]:
    """Why the kernel of ``op`` cannot run on this device type at all, whatever the call.

    It imports triton and the kernel module, which torch.compile cannot trace; marked as a
    constant result, dynamo runs it eagerly once while tracing and keeps the answer, so the
    dispatch never breaks a graph, even on a first, cold call.
    """
    kernel = _KERNELS.get(op)
    if kernel is None:
        return f"no Triton kernel for {op} yet"
    reason = _device_reason(device_type) or triton_import_error()
    if reason is None:
        try:
            kernel.load()
        except Exception as err:
            return f"the kernel module of {op} failed to import ({type(err).__name__}: {err})"
    return reason


# What torch.compiler.assume_constant_result(fn) does (torch 2.0 to 2.14), written out
# because calling it imports torch._dynamo, which imports triton: `import gptfast` must not.
_environment_reason._dynamo_marked_constant = True


def triton_unavailable(op: str, device, args=(), kwargs=None, check_case=True) -> Optional[str]:
    """None if the Triton kernel of ``op`` can run this call, else the reason it cannot.

    With ``check_case=False`` only the device, triton and the kernel's import are checked.
    """
    reason = _environment_reason(op, device.type)
    if reason is None and check_case:
        reason = _KERNELS[op].unsupported(*args, **(kwargs or {}))
    return reason


def choose(op: str, device, args=(), kwargs=None) -> tuple[str, Optional[str]]:
    """(backend that runs ``op`` on tensors of ``device`` for this call, why not triton).

    Under "auto", triton is chosen only for CUDA tensors; CPU tensors use reference even
    when the interpreter is on (forcing "triton" is how the interpreter is reached).
    """
    setting = get_backend()
    if setting == "reference":
        return "reference", "backend 'reference' selected"
    if setting == "auto" and device.type != "cuda":
        return "reference", "auto uses triton only for CUDA tensors"
    reason = triton_unavailable(op, device, args, kwargs)
    if setting == "triton":
        if reason is not None:
            raise BackendUnavailable(
                f"gptfast.{op}: backend 'triton' was forced but cannot run: {reason}. "
                "Use gptfast.use_backend('auto') to fall back to the reference ops."
            )
        return "triton", None
    return ("triton", None) if reason is None else ("reference", reason)


def describe(op: str, device) -> str:
    """One line for ``gptfast info``: what "auto" picks for ``op`` on ``device`` and why."""
    if op not in _KERNELS:
        return f"reference (no Triton kernel for {op} yet)"
    if device.type != "cuda":
        return ("reference (no CUDA device; to run the kernel on CPU, set TRITON_INTERPRET=1 "
                "and use_backend('triton'))")
    reason = triton_unavailable(op, device, check_case=False)
    if reason is None:
        return "triton (falls back to reference per call where a case is unsupported)"
    return f"reference ({reason})"
