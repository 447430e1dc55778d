"""Result rows and the table the harness prints."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Row:
    tier: str
    workload: str
    cycles: int = 0
    states: int = 0  # distinct crash states checked (model tier), bad files (bad-file tier), ...
    violations: int = 0
    seconds: float = 0.0
    note: str = ""
    extra: int = 0  # a second count a tier reports in its note (crash states with lock-owner variants)
    examples: list[str] = field(default_factory=list)

    def violation(self, message: str) -> None:
        self.violations += 1
        if len(self.examples) < 40:
            self.examples.append(message)


HEADER = ("tier", "workload", "cycles", "crash states", "violations", "seconds", "notes")


def format_table(rows: list[Row]) -> str:
    cells = [HEADER] + [
        (r.tier, r.workload, str(r.cycles), str(r.states), str(r.violations), f"{r.seconds:.1f}", r.note) for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("| " + " | ".join(c.ljust(w) if i in (0, 1, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def format_examples(rows: list[Row]) -> str:
    lines = []
    for r in rows:
        for example in r.examples:
            lines.append(f"  [{r.tier}/{r.workload}] {example}")
    return "\n".join(lines)
