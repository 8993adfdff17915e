"""Which OAP layers and kinds to export: ``KIND[:LAYERS]`` specs (``instance``, ``semantic:-1``,
``all:0-2``) parsed, then resolved against a generator's layers and kinds."""
from __future__ import annotations

import re
from typing import List, Optional, Sequence, Tuple, Union

__all__ = ["KINDS", "parse_level_specs", "resolve_levels"]

#: the two mask levels of an OAP layer (MaskCut fills only ``instance``)
KINDS = ("instance", "semantic")

_RANGE = re.compile(r"^(\d+)-(\d+)$")
_INT = re.compile(r"^-?\d+$")


def parse_level_specs(specs: Union[str, Sequence[str]]) -> List[Tuple[str, Optional[Tuple[int, ...]]]]:
    """Parse ``KIND[:LAYERS]`` items (``KIND``: ``instance``, ``semantic`` or ``all``; ``LAYERS``:
    ``all``, an index, a comma list, ``a-b`` (inclusive), negative indices from the end), e.g.
    ``["instance"]``, ``["instance:0,2", "semantic:-1"]``, ``["all:1-3"]``. Returns
    ``(kind, layers)`` pairs, ``kind`` possibly ``"all"``; ``LAYERS`` omitted = every layer
    (``None``)."""
    if isinstance(specs, str):
        specs = specs.split()
    if not specs:
        raise ValueError("no level given (use e.g. 'instance', 'semantic:-1', 'all')")
    out: List[Tuple[str, Optional[Tuple[int, ...]]]] = []
    for spec in specs:
        kind, _, layers = str(spec).strip().partition(":")
        kind = kind.strip().lower()
        if kind not in KINDS + ("all",):
            raise ValueError(f"level {spec!r}: kind must be 'instance', 'semantic' or 'all', got {kind!r}")
        idx: Optional[Tuple[int, ...]] = None
        layers = layers.strip()
        if layers and layers.lower() != "all":
            vals: List[int] = []
            for part in layers.split(","):
                part = part.strip()
                m = _RANGE.match(part)
                if m:
                    a, b = int(m.group(1)), int(m.group(2))
                    if b < a:
                        raise ValueError(f"level {spec!r}: empty layer range {part!r}")
                    vals.extend(range(a, b + 1))
                elif _INT.match(part):
                    vals.append(int(part))
                else:
                    raise ValueError(f"level {spec!r}: cannot read layer {part!r} (use e.g. 0, -1, 0,2 or 1-3)")
            idx = tuple(vals)
        out.append((kind, idx))
    return out


def resolve_levels(parsed, num_layers: int, kinds: Sequence[str] = KINDS,
                   method: str = "oap") -> List[Tuple[str, int]]:
    """``(kind, layer)`` pairs, layer ascending then instance before semantic, no duplicates.

    ``kinds``: the kinds the generator fills (MaskCut: ``("instance",)``). An explicitly
    requested kind it lacks, or a layer outside ``[-num_layers, num_layers)``, raises
    ``ValueError``; ``all`` quietly keeps only the kinds present.
    """
    chosen = set()
    for kind, layers in parsed:
        if kind == "all":
            use = [k for k in KINDS if k in kinds]
        elif kind not in kinds:
            raise ValueError(f"method {method!r} has no {kind} level (it has: {', '.join(kinds)})")
        else:
            use = [kind]
        for i in (range(num_layers) if layers is None else layers):
            if not -num_layers <= i < num_layers:
                raise ValueError(f"layer {i} does not exist: method {method!r} has {num_layers} "
                                 f"layer{'s' if num_layers != 1 else ''} (0..{num_layers - 1}, or -1 for the last)")
            for k in use:
                chosen.add((k, i % num_layers))
    return sorted(chosen, key=lambda kl: (kl[1], KINDS.index(kl[0])))
