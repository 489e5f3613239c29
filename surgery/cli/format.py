"""What the commands print: aligned tables, a model's sites with the tensors they own, shape changes.

Shared by `inspect`, `resize` and `demo` (one site table for all three), and public for command
modules of plugins that print sites too.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], indent: str = "") -> list[str]:
    """Left-aligned columns; the last column is not padded (it may be long)."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in [list(headers), *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        padded = [c.ljust(w) for c, w in zip(cells[:-1], widths)] + [cells[-1]]
        return (indent + "  ".join(padded)).rstrip()

    return [line(headers), *(line(r) for r in rows)]


def print_lines(lines: Iterable[str]) -> None:
    for line in lines:
        print(line)


def shape_text(shape: Sequence[int] | None) -> str:
    return "absent" if shape is None else "(" + ", ".join(str(d) for d in shape) + ")"


def counts_text(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{name}={n}" for name, n in counts.items()) or "no token sites"


def allowed_text(site: Mapping[str, Any]) -> str:
    text = f"{site['min']}..{'' if site['max'] is None else site['max']}"
    return text + (f" step {site['step']}" if site["step"] != 1 else "")


def site_dicts(model: Any) -> list[dict[str, Any]]:
    """Every site of `model` as `TokenSite.to_dict`, tensors named by their state-dict keys."""
    import surgery
    from surgery.site import module_paths

    paths = module_paths(model)
    return [site.to_dict(paths) for site in surgery.sites(model).values()]


def format_sites(sites: Sequence[Mapping[str, Any]]) -> list[str]:
    """The site table every command prints: one row per site, then the tensors it owns.

    For each tensor: its state-dict key, shape ("absent" while a zero-count tensor is None), the
    token axis and the rows of that axis the site owns, and whether the rows are coupled (belong
    to another tensor's table, like positional-embedding rows of prefix tokens).
    """
    if not sites:
        return ["  (no token sites)"]
    lines: list[str] = []
    header = table(["SITE", "COUNT", "ALLOWED", "PLUGIN"],
                   [[s["name"], s["count"], allowed_text(s), s["plugin"]] for s in sites], indent="  ")
    lines.append(header[0])
    for site, row in zip(sites, header[1:]):
        lines.append(row)
        if site["description"]:
            lines.append(f"      {site['description']}")
        if site["note"]:
            lines.append(f"      note: {site['note']}")
        tensor_rows = []
        for t in site["tensors"]:
            shape = shape_text(t["shape"]) + (f" as {shape_text(t['view'])}" if t["view"] else "")
            rows = f"axis {t['axis']}, rows {t['start']}:{t['start'] + site['count']}"
            tensor_rows.append([t["key"], shape, rows, "coupled" if t["coupled"] else "own"])
        lines.extend(table(["TENSOR", "SHAPE", "TOKENS", ""], tensor_rows, indent="      ")[1:])
    return lines


def state_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def format_shape_changes(before: Mapping[str, tuple], after: Mapping[str, tuple]) -> list[str]:
    """The state-dict tensors whose shape changed (or that appeared or went away)."""
    rows = [[key, shape_text(before.get(key)), "->", shape_text(after.get(key))]
            for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)]
    return table(["TENSOR", "BEFORE", "", "AFTER"], rows, indent="    ")[1:] or ["    (no tensor changed shape)"]


def recipe_lines(steps: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per recipe step (`surgery.recipes.describe_step`): a count with only the strategy
    it used (init grows, shrink cuts), or an option with the keys that changed."""
    from surgery.recipes import describe_step  # imports torch: only once a model or file is open

    return [f"  {i}. {describe_step(s)}" for i, s in enumerate(steps, 1)]
