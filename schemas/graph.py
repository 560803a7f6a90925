"""Resolve a pipeline's stages into a wired, topologically ordered graph, or say what is wrong.

Pure validation: it runs inside :class:`schemas.pipeline.PipelineSpec` so a spec with an unknown
input, an unwired slot or a cycle never validates, long before any model is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from reelflow.schemas.errors import GraphError
from reelflow.schemas.stages import StageSpec


@dataclass(frozen=True)
class Node:
    """One stage with its inputs resolved to producer ids and its model resolved to a name."""

    spec: StageSpec
    inputs: Mapping[str, str]
    model: str | None

    @property
    def id(self) -> str:
        return self.spec.id


@dataclass(frozen=True)
class Graph:
    """Stages in a topological order (ties keep the spec's order)."""

    nodes: Mapping[str, Node] = field(default_factory=dict)

    def order(self) -> list[Node]:
        return list(self.nodes.values())

    def descendants(self, stage_id: str) -> set[str]:
        """Ids of every stage that reads, directly or not, the output of ``stage_id``."""
        found: set[str] = set()
        for node in self.order():
            if any(src == stage_id or src in found for src in node.inputs.values()):
                found.add(node.id)
        return found


def resolve_graph(stages: Sequence[StageSpec], model_names: Sequence[str]) -> Graph:
    by_id = _unique_ids(stages)
    nodes = {s.id: Node(s, _wire(s, by_id), _pick_model(s, model_names)) for s in stages}
    _check_same_models(nodes)
    return _expand(Graph({i: nodes[i] for i in _topological(nodes)}))


def _check_same_models(nodes: Mapping[str, Node]) -> None:
    for node in nodes.values():
        for slot in node.spec.same_model_slots:
            source = nodes[node.inputs[slot]]
            if source.model != node.model:
                raise GraphError(
                    f"stage {node.id!r} uses model {node.model!r} but reads {slot!r} from {source.id!r}, which used "
                    f"{source.model!r}; they must share one model (set the same `model:` on both)"
                )


def _expand(graph: Graph) -> Graph:
    """Replace each stage with ``each`` entries by its copies, and repeat its descendants per copy."""
    copies: dict[str, list[str]] = {}  # original id -> ids of its copies, for fanned-out stages
    origin: dict[str, str] = {}  # original id -> the `each` stage its copies follow
    expanded: dict[str, Node] = {}
    for node in graph.order():
        fanned = sorted({origin[src] for src in node.inputs.values() if src in origin})
        if node.spec.each and fanned:
            raise GraphError(f"stage {node.id!r} has `each` but also reads copies of {fanned[0]!r}; keep one `each` per path")
        if len(fanned) > 1:
            raise GraphError(f"stage {node.id!r} reads copies of both {fanned[0]!r} and {fanned[1]!r}; keep one `each` per path")
        if node.spec.each:
            variants = [_variant(node, i, entry, {}) for i, entry in enumerate(node.spec.each)]
            origin[node.id] = node.id
        elif fanned:
            count = len(copies[next(src for src in node.inputs.values() if src in origin)])
            variants = [_variant(node, i, {}, copies) for i in range(count)]
            origin[node.id] = fanned[0]
        else:
            expanded[node.id] = node
            continue
        copies[node.id] = [v.id for v in variants]
        expanded.update({v.id: v for v in variants})
        for variant in variants:
            _check_variant(variant, expanded)
    if len(expanded) != len(set(expanded)):
        raise GraphError("stage ids collide after expanding `each`; rename the stages")
    return Graph(expanded)


def _check_variant(variant: Node, nodes: Mapping[str, Node]) -> None:
    try:
        variant.spec.check_inputs({slot: nodes[src].spec for slot, src in variant.inputs.items()})
    except ValueError as exc:
        raise GraphError(f"stage {variant.id!r}: {exc}") from None


def _variant(node: Node, index: int, override: dict, copies: Mapping[str, list[str]]) -> Node:
    data = node.spec.model_dump(exclude={"each"})
    data["id"] = f"{node.id}_{index}"
    data["params"] = {**data["params"], **override}
    inputs = {slot: copies[src][index] if src in copies else src for slot, src in node.inputs.items()}
    data["inputs"] = inputs
    try:
        spec = type(node.spec).model_validate(data)
    except ValueError as exc:
        first = exc.errors()[0] if hasattr(exc, "errors") else {"loc": (), "msg": str(exc)}
        where = ".".join(str(p) for p in first["loc"])
        raise GraphError(f"stage {node.id!r} each[{index}]: {where}: {first['msg']} (entry {override!r})") from None
    return Node(spec, inputs, node.model)


def _unique_ids(stages: Sequence[StageSpec]) -> dict[str, StageSpec]:
    by_id: dict[str, StageSpec] = {}
    for spec in stages:
        if spec.id in by_id:
            raise GraphError(f"two stages have the id {spec.id!r}; give each an `id` of its own")
        by_id[spec.id] = spec
    return by_id


def _wire(spec: StageSpec, by_id: Mapping[str, StageSpec]) -> dict[str, str]:
    unknown = set(spec.inputs) - set(spec.slots)
    if unknown:
        raise GraphError(
            f"stage {spec.id!r} ({spec.stage}) has no input {sorted(unknown)[0]!r}; "
            f"its inputs are: {', '.join(spec.slots) or 'none'}"
        )
    wired = {slot: _producer(spec, slot, kinds, by_id) for slot, kinds in spec.slots.items()}
    try:
        spec.check_inputs({slot: by_id[src] for slot, src in wired.items()})
    except ValueError as exc:
        raise GraphError(f"stage {spec.id!r}: {exc}") from None
    return wired


def _producer(spec: StageSpec, slot: str, kinds: tuple[str, ...], by_id: Mapping[str, StageSpec]) -> str:
    if slot in spec.inputs:
        source = spec.inputs[slot]
        if source not in by_id:
            raise GraphError(
                f"stage {spec.id!r} reads {slot!r} from {source!r}, which is not a stage of this pipeline; "
                f"stages are: {', '.join(by_id)}"
            )
        if by_id[source].produces not in kinds:
            raise GraphError(
                f"stage {spec.id!r} input {slot!r} needs {' or '.join(kinds)}, but {source!r} "
                f"({by_id[source].stage}) produces {by_id[source].produces}"
            )
        return source
    candidates = [s.id for s in by_id.values() if s.produces in kinds and s.id != spec.id]
    if len(candidates) == 1:
        return candidates[0]
    hint = f"candidates: {', '.join(candidates)}" if candidates else f"add a stage that produces {' or '.join(kinds)}"
    raise GraphError(
        f"stage {spec.id!r} ({spec.stage}) input {slot!r} is not wired; set `inputs: {{{slot}: <stage id>}}` ({hint})"
    )


def _pick_model(spec: StageSpec, model_names: Sequence[str]) -> str | None:
    if not spec.needs_model:
        return None
    if spec.model is not None:
        if spec.model not in model_names:
            raise GraphError(
                f"stage {spec.id!r} uses model {spec.model!r}, which is not in `models` "
                f"({', '.join(model_names) or 'empty'})"
            )
        return spec.model
    if len(model_names) == 1:
        return model_names[0]
    raise GraphError(
        f"stage {spec.id!r} ({spec.stage}) needs a model: "
        + ("add one under `models`" if not model_names else f"set `model:` to one of {', '.join(model_names)}")
    )


def _topological(nodes: Mapping[str, Node]) -> list[str]:
    """Kahn's algorithm; ties are broken by the order stages appear in the spec."""
    pending = {i: set(n.inputs.values()) for i, n in nodes.items()}
    ordered: list[str] = []
    while pending:
        ready = [i for i, deps in pending.items() if not deps - set(ordered)]
        if not ready:
            raise GraphError(f"the stages {', '.join(_cycle(pending))} form a cycle; break it by rewiring `inputs`")
        ordered.append(ready[0])
        del pending[ready[0]]
    return ordered


def _cycle(pending: Mapping[str, set[str]]) -> list[str]:
    path: list[str] = [next(iter(pending))]
    while True:
        nxt = next(d for d in pending[path[-1]] if d in pending)
        if nxt in path:
            return path[path.index(nxt):] + [nxt]
        path.append(nxt)
