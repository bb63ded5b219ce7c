"""A conversation as a causal tree: who handed what to whom, and when."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from mesh.observability.tap import TapLine


def causal_tree(lines: Iterable[TapLine]) -> list[tuple[int, TapLine]]:
    """Messages in causal order (parent before child), each with its depth."""
    items = sorted(lines, key=lambda line: line.sent_ns or line.seen_ns)
    ids = {line.id for line in items}
    children: dict[str, list[TapLine]] = {}
    roots: list[TapLine] = []
    for line in items:
        if line.causation and line.causation in ids and line.causation != line.id:
            children.setdefault(line.causation, []).append(line)
        else:
            roots.append(line)

    def walk(line: TapLine, depth: int, seen: set[str]) -> Iterator[tuple[int, TapLine]]:
        yield depth, line
        seen.add(line.id)
        for child in children.get(line.id, []):
            if child.id not in seen:
                yield from walk(child, depth + 1, seen)

    out: list[tuple[int, TapLine]] = []
    seen: set[str] = set()
    for root in roots:
        out.extend(walk(root, 0, seen))
    return out


def render_tree(lines: Iterable[TapLine]) -> str:
    """A text tree with, per message, its time since the conversation began and since its cause."""
    tree = causal_tree(lines)
    if not tree:
        return "(no messages)"
    start = min(line.sent_ns or line.seen_ns for _, line in tree)
    by_id = {line.id: line for _, line in tree}
    rows = []
    for depth, line in tree:
        t = line.sent_ns or line.seen_ns
        parent = by_id.get(line.causation)
        step = (
            f" (+{(t - (parent.sent_ns or parent.seen_ns)) / 1e6:.1f} ms after its cause)" if parent else ""
        )
        flag = f"  DEAD LETTER: {line.dead_letter}" if line.dead_letter else ""
        if line.gathers:
            flag += f"  (joins {len(line.gathers)} answers)"
        indent = "   " * depth + "└─ "
        rows.append(
            f"{(t - start) / 1e6:9.1f} ms  {indent}{line.sender} → {line.receiver}  [{line.type}]{step}{flag}"
        )
    return "\n".join(rows)
