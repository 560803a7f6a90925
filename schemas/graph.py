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
    models: Mapping[str, str] = field(default_factory=dict)  # role -> name in the pipeline's `models`
    sources: Mapping[str, str] = field(default_factory=dict)  # source slot -> name of a pipeline source

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


def resolve_graph(
    stages: Sequence[StageSpec], models: Mapping[str, str | None], sources: Mapping[str, str]
) -> Graph:
    """Wire ``stages``; ``models`` maps model names to their family (None: not stated), ``sources``
    maps source names to their kind."""
    by_id = _unique_ids(stages)
    nodes = {s.id: Node(s, _wire(s, by_id), _pick_models(s, models), _pick_sources(s, sources)) for s in stages}
    _check_same_models(nodes)
    return _expand(Graph({i: nodes[i] for i in _topological(nodes)}))


def _check_same_models(nodes: Mapping[str, Node]) -> None:
    for node in nodes.values():
        for slot in node.spec.same_model_slots:
            if slot not in node.inputs:
                continue  # an optional input left unwired
            source = nodes[node.inputs[slot]]
            for role in sorted(set(node.models) & set(source.models)):
                if source.models[role] != node.models[role]:
                    raise GraphError(
                        f"stage {node.id!r} uses model {node.models[role]!r} as its {role} but reads {slot!r} from "
                        f"{source.id!r}, which used {source.models[role]!r}; they must share it (set the same "
                        f"`models: {{{role}: ...}}` on both)"
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
    return Node(spec, inputs, node.models, node.sources)


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
            f"stage {spec.id!r} ({spec.tag}) has no input {sorted(unknown)[0]!r}; "
            f"its inputs are: {', '.join(spec.slots) or 'none'}"
        )
    wired = {slot: _producer(spec, slot, kinds, by_id) for slot, kinds in spec.slots.items()
             if slot in spec.inputs or slot not in spec.optional_slots or (spec.wires(slot) and _fitting(spec, kinds, by_id))}  # fmt: skip
    try:
        spec.check_inputs({slot: by_id[src] for slot, src in wired.items()})
    except ValueError as exc:
        raise GraphError(f"stage {spec.id!r}: {exc}") from None
    return wired


def _fitting(spec: StageSpec, kinds: tuple[str, ...], by_id: Mapping[str, StageSpec]) -> list[str]:
    return [s.id for s in by_id.values() if s.produces in kinds and s.id != spec.id]


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
                f"stage {spec.id!r} ({spec.tag}) input {slot!r} needs {' or '.join(kinds)}, but {source!r} "
                f"({by_id[source].tag}) produces {by_id[source].produces}; wire it to a stage that produces "
                f"{' or '.join(kinds)}"
            )
        return source
    candidates = _fitting(spec, kinds, by_id)
    if len(candidates) == 1:
        return candidates[0]
    hint = f"candidates: {', '.join(candidates)}" if candidates else f"add a stage that produces {' or '.join(kinds)}"
    raise GraphError(
        f"stage {spec.id!r} ({spec.tag}) input {slot!r} is not wired; set `inputs: {{{slot}: <stage id>}}` ({hint})"
    )


def _pick_models(spec: StageSpec, models: Mapping[str, str | None]) -> dict[str, str]:
    """Role -> model name: ``models:`` of the stage, else its ``model:``, else the one model that fits (of several, the
    one named like the role); a role the stage does not fill as configured (:meth:`StageSpec.fills`), none."""
    unknown = set(spec.models) - set(spec.roles)
    if unknown:
        raise GraphError(
            f"stage {spec.id!r} ({spec.tag}) has no model role {sorted(unknown)[0]!r}; "
            f"its roles are: {', '.join(spec.roles) or 'none'}"
        )
    unused = sorted(role for role in spec.models if not spec.fills(role))
    if unused:
        raise GraphError(f"stage {spec.id!r} ({spec.tag}) names a model as its {unused[0]}, which it does not use with "
                         f"these params; drop {unused[0]!r} from its `models`")  # fmt: skip
    return {role: _pick_model(spec, role, models) for role in spec.roles if spec.fills(role)}


def _pick_model(spec: StageSpec, role: str, models: Mapping[str, str | None]) -> str:
    families = spec.roles[role].families
    name = spec.models.get(role) or spec.model
    if name is not None:
        if name not in models:
            raise GraphError(f"stage {spec.id!r} uses model {name!r} as its {role}, which is not in `models` "
                             f"({', '.join(models) or 'empty'})")  # fmt: skip
        if models[name] is not None and models[name] not in families:
            raise GraphError(f"stage {spec.id!r} needs a {' or '.join(families)} model as its {role}, but {name!r} "
                             f"is {models[name]}; map the role to another model with `models: {{{role}: ...}}`")  # fmt: skip
        return name
    fits = [n for n, family in models.items() if family is None or family in families]
    if len(fits) == 1:
        return fits[0]
    if role in fits:  # of several that fit, the one named after the role
        return role
    fix = "add one under `models`" if not fits else f"set `models: {{{role}: <name>}}` to one of {', '.join(fits)}"
    raise GraphError(f"stage {spec.id!r} ({spec.tag}) needs a {' or '.join(families)} model as its {role}: {fix}")


def _pick_sources(spec: StageSpec, sources: Mapping[str, str]) -> dict[str, str]:
    """Source slot -> the pipeline source it reads (by default the source named like the slot)."""
    readable = {**spec.reads, **spec.optional_reads}
    unknown = set(spec.sources) - set(readable)
    if unknown:
        raise GraphError(
            f"stage {spec.id!r} ({spec.tag}) reads no source {sorted(unknown)[0]!r}; "
            f"its sources are: {', '.join(readable) or 'none'}"
        )
    picked = {}
    for slot, kind in readable.items():
        name = spec.sources.get(slot, slot)
        if slot in spec.optional_reads and slot not in spec.sources and name not in sources:
            continue  # an optional source the pipeline does not give
        if name not in sources:
            raise GraphError(
                f"stage {spec.id!r} ({spec.tag}) reads the {kind} source {name!r}, which the pipeline does not "
                f"declare; add `sources: {{{name}: {{kind: {kind}}}}}` (declared: {', '.join(sources)})"
            )
        if sources[name] != kind:
            raise GraphError(f"stage {spec.id!r} ({spec.tag}) reads {slot!r} as a {kind}, but the source {name!r} "
                             f"is declared with kind {sources[name]!r}")  # fmt: skip
        picked[slot] = name
    return picked


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
