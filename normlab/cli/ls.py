"""``normlab ls``: the registry as a table with traits and paper."""

from __future__ import annotations

import argparse

from normlab.registry import list_norms

NAME = "ls"
HELP = "list the registered norms with their traits and papers"


def add_arguments(p: argparse.ArgumentParser) -> None:
    for trait in ("has_running_stats", "batch_dependent", "foldable", "custom_backward"):
        p.add_argument(f"--{trait.replace('_', '-')}", dest=trait, action="store_true", help=f"only norms with {trait}")


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    traits = {
        t: True
        for t in ("has_running_stats", "batch_dependent", "foldable", "custom_backward")
        if getattr(args, t, False)
    }
    specs = list_norms(**traits)
    yn = {True: "yes", False: "-"}
    rows = [["name", "class", "layout", "running", "batch-dep", "foldable", "custom-bwd", "paper"]]
    for s in specs:
        paper = f"{s.paper.title} {s.paper.url}" if s.paper else "-"
        rows.append(
            [
                s.name,
                s.cls.__name__,
                s.layout,
                yn[s.has_running_stats],
                yn[s.batch_dependent],
                yn[s.foldable],
                yn[s.custom_backward],
                paper,
            ]
        )
    print(format_table(rows))
    print(f"\n{len(specs)} norms")
    return 0
