"""How every ``gptfast.patch`` family switches a module: a subclass with another ``forward``.

:func:`switched_class` makes (once per original class and kind) a subclass of the module's
class, with the same name, whose ``forward`` is the family's; switching ``module.__class__``
keeps the module's identity, Parameters, hooks and state_dict keys. What the new forward
needs is stored on the module as ``_gptfast_*`` attributes; :func:`restore` drops them and
puts the original class back. Switched modules survive deepcopy and pickling (the forward
is pickled by reference, so unpickling imports the family that made it).
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from ..nn import CausalSelfAttention, LayerNorm

_CLASSES: dict = {}  # (original class, kind) -> switched class


def switched_class(original: type, kind: str, forward: Callable) -> type:
    """A subclass of ``original`` (same name and module) whose forward is ``forward``."""
    switched = _CLASSES.get((original, kind))
    if switched is None:
        switched = type(original.__name__, (original,), {
            "forward": forward, "__reduce_ex__": _reduce_switched,
            "_gptfast_original_class": original, "_gptfast_kind": kind,
            "__module__": original.__module__, "__qualname__": original.__qualname__,
        })
        _CLASSES[(original, kind)] = switched
    return switched


def _rebuild_switched(original: type, kind: str, forward: Callable) -> nn.Module:
    return object.__new__(switched_class(original, kind, forward))


def _reduce_switched(self, protocol):
    cls = type(self)
    return (_rebuild_switched, (cls._gptfast_original_class, cls._gptfast_kind, cls.forward),
            self.__getstate__())


def original_class(cls: type) -> type:
    """The class a switched class replaced (``cls`` itself when not switched)."""
    return getattr(cls, "_gptfast_original_class", cls)


def kind_of(module) -> Optional[str]:
    """The kind a module was switched as, or None."""
    return getattr(type(module), "_gptfast_kind", None)


def runs_on_gptfast(module: nn.Module) -> bool:
    """gptfast's own modules, and modules an earlier patch switched."""
    return (isinstance(module, (LayerNorm, CausalSelfAttention))
            or getattr(type(module), "_gptfast_original_class", None) is not None
            or bool(getattr(module, "_gptfast_attention", False)))


def switch_to_layer_norm(module: nn.LayerNorm) -> None:
    """An exact ``torch.nn.LayerNorm`` becomes a :class:`gptfast.nn.LayerNorm` (no new state)."""
    module._gptfast_replaced_class = type(module)  # for restore
    module.__class__ = LayerNorm


def restore(module: nn.Module) -> bool:
    """Puts back the class a patch replaced and drops its ``_gptfast_*`` attributes; False
    when the module carries no mark of a patch."""
    state = vars(module)
    marks = [name for name in state if name.startswith("_gptfast_")]
    original = getattr(type(module), "_gptfast_original_class", None)
    original = original or state.get("_gptfast_replaced_class")
    if original is None and not marks:
        return False
    if original is not None:
        module.__class__ = original
    for name in marks:
        delattr(module, name)
    return True
