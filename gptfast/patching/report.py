"""The report every ``gptfast.patch`` family fills: :class:`PatchReport`.

A family names what it replaces with a *kind* (``"LayerNorm"``, ``"GPT2Attention"``,
``"nanochat loss"``...) and declares, once, what the kind counts as in the summary line
(:func:`declare_kind`: a norm, an attention module or a loss).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Optional

NORM, ATTENTION, LOSS = "norm", "attention", "loss"
_CATEGORIES: dict = {}  # kind -> NORM, ATTENTION or LOSS


def declare_kind(kind: str, category: str) -> str:
    """Declares ``kind`` (a family's name for what it replaces) as a NORM, ATTENTION or LOSS
    for the summary line; returns ``kind``."""
    if category not in (NORM, ATTENTION, LOSS):
        raise ValueError(f"category must be {NORM!r}, {ATTENTION!r} or {LOSS!r}, got {category!r}")
    _CATEGORIES[kind] = category
    return kind


@dataclasses.dataclass
class PatchReport:
    """What ``gptfast.patch`` did: qualified names replaced (with their kind), names skipped
    with why.

    ``kinds`` maps each replaced name to its kind (``"LayerNorm"``, ``"nanoGPT attention"``,
    ``"GPT2Attention"``, ``"HF attention"``, ``"nanochat norm (module global)"``,
    ``"nanochat attention"``, ``"nanochat loss"``); ``already`` lists the modules that ran on
    gptfast before the call (gptfast's own modules, or patched by an earlier call);
    ``checked`` says what the probes found; ``process_wide`` lists the changes that reach
    beyond this model (nanochat's module-level norm).
    """

    replaced: list = dataclasses.field(default_factory=list)
    skipped: dict = dataclasses.field(default_factory=dict)
    kinds: dict = dataclasses.field(default_factory=dict)
    already: list = dataclasses.field(default_factory=list)  # ran on gptfast before this call
    checked: dict = dataclasses.field(default_factory=dict)  # name -> what the probe found
    process_wide: list = dataclasses.field(default_factory=list)

    def names(self, kind: str) -> list:
        """The replaced names of one kind, in module order."""
        return [name for name in self.replaced if self.kinds.get(name) == kind]

    def _add(self, name: str, kind: str, found: Optional[str] = None) -> None:
        self.replaced.append(name)
        self.kinds[name] = kind
        if found is not None:
            self.checked[name] = found

    def __str__(self):
        counts = collections.Counter(self.kinds[name] for name in self.replaced)

        def total(category):
            return sum(n for kind, n in counts.items()
                       if _CATEGORIES.get(kind, ATTENTION) == category)

        norms = [f"{n} {kind}(s)" for kind, n in counts.items() if _CATEGORIES.get(kind) == NORM]
        parts = [" and ".join(norms or ["0 LayerNorm(s)"]), f"{total(ATTENTION)} attention module(s)"]
        if total(LOSS):
            parts.append(f"{total(LOSS)} fused loss(es)")
        lines = [f"gptfast.patch: {' and '.join(parts)} now run on gptfast, "
                 f"{len(self.already)} already did, {len(self.skipped)} skipped"]
        lines += [f"  process-wide: {what}" for what in self.process_wide]
        lines += [f"  skipped {name or '<root>'}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)
