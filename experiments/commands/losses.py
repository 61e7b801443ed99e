"""``tripletlab losses``: a table of every registered loss and its declared hyperparameters."""

from __future__ import annotations

from losses import list_losses, loss_info

WILDCARDS = "*?["


def configure(parser) -> None:
    parser.add_argument("pattern", nargs="?", default="*", help="shell-style wildcard, e.g. 'batch_*'")


def format_table(pattern: str = "*") -> str:
    """The table of the losses matching ``pattern``; ``ValueError`` (with suggestions) when none does."""
    rows = [("loss", "parameter", "type", "default", "valid", "search", "source / paper")]
    if any(c in pattern for c in WILDCARDS):
        names = list_losses(pattern)
        if not names:
            raise ValueError(f"no loss matches {pattern!r}; registered: {', '.join(list_losses())}")
    else:
        loss_info(pattern)  # an unknown name raises, suggesting the closest ones
        names = [pattern]
    for name in names:
        info = loss_info(name)
        ref = f"{info.source}; {info.paper}" if info.source != "tripletlab" else info.paper
        if not info.params:
            rows.append((name, "-", "", "", "", "", ref))
        for i, p in enumerate(info.params):
            rows.append(
                (
                    name if i == 0 else "",
                    p.name,
                    p.type.__name__,
                    repr(p.default),
                    p.valid_range(),
                    p.search_range(),
                    ref if i == 0 else "",
                )
            )
    widths = [max(len(str(r[c])) for r in rows) for c in range(len(rows[0]) - 1)]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(str(v).ljust(w) for v, w in zip(r, widths)) + "  " + r[-1])
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 14)
    return "\n".join(lines)


def main(args) -> int:
    print(format_table(args.pattern))
    print("\nAlso: 'pml:<ClassName>' builds any pytorch-metric-learning loss, e.g. pml:ContrastiveLoss.")
    return 0
