"""Pictures for what people would rather see than read (matplotlib: the optional extra `plot`).

- `plot_inspection`: an adapter's rank and ‖ΔW‖_F as heatmaps, layer × module type, so an
  uneven fine-tune (one layer doing all the work, a module type left at zero) shows at a glance;
  a diffusion transformer's architecture (`inspect`'s line) is under the title, its block stacks
  (double, single, video blocks, text encoders) are the rows' groups.
- `plot_diff`: how far each module moved between two adapter versions (relative change and the
  overlap of the column spaces), layer × module type, so where a new version differs shows at once.
- `SpectrumRecorder` + `plot_spectra`: the singular values of each ΔW that `extract` factors,
  per module type, with the chosen rank and the energy kept marked, so the rank the fine-tune
  needs can be read off the knee of the curves.

Figures are drawn on a bare `matplotlib.figure.Figure` (no pyplot, no global state, no GUI
backend) and written atomically; an existing picture is replaced, as `savefig` does.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UsageError
from .extras import require_extra
from .io.atomic import atomic_output, ensure_distinct
from .patterns import natural_key

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

    from .inspection import Inspection
    from .ops.diff import AdapterDiff
    from .ops.extract_report import ExtractReport

_NUM = re.compile(r"^\d+$")
DPI = 100
ANNOTATE_MAX_CELLS = 300  # beyond this the numbers in the cells become unreadable
LEGEND_MAX_LAYERS = 6  # more lines than this are read by colour (early layers dark, late ones yellow)
SPECTRUM_MIN = 64  # singular values recorded per module at least (or all, for smaller matrices)


@dataclass(frozen=True)
class Grid:
    """Module paths laid out as rows (layers: the path's numbers) × columns (module types: the rest)."""

    rows: tuple[str, ...]
    columns: tuple[str, ...]
    cells: dict[str, tuple[int, int]]  # module path → (row, column)


def grid(modules: Iterable[str]) -> Grid:
    """Rows are blocks, columns module types, split after the path's last block index.

    `model.layers.3.self_attn.q_proj` → row `3`, column `self_attn.q_proj`; a UNet's
    `unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0` → row
    `down_blocks.1.attentions.0.transformer_blocks.0`, column `attn1.to_out.0`; no index → row `-`.
    Rows keep the model's order: down blocks, the mid block, up blocks, each by number.
    """
    split = {path: _split(path.split(".")) for path in modules}
    blocks = [b for b, _ in split.values() if b]
    common = _common_prefix([[p for p in b if not _NUM.match(p)] for b in blocks])
    # One stack of numbered layers (an LLM): the number is the whole label.
    plain = len({tuple(p for p in b if not _NUM.match(p)) for b in blocks}) == 1 and all(
        sum(bool(_NUM.match(p)) for p in b) == 1 for b in blocks
    )
    first_seen: dict[str, int] = {}
    placed = {}
    for path, (block, column) in split.items():
        if not block:
            row = "-"
        elif plain:
            row = next(p for p in block if _NUM.match(p))
        else:
            row = ".".join(block[common:])
        first_seen.setdefault(_stack(row), len(first_seen))
        placed[path] = (row, column)
    rows = sorted({r for r, _ in placed.values()}, key=lambda r: _row_key(r, first_seen))
    columns = sorted({c for _, c in placed.values()}, key=natural_key)
    cells = {p: (rows.index(r), columns.index(c)) for p, (r, c) in placed.items()}
    return Grid(tuple(rows), tuple(columns), cells)


def _split(parts: list[str]) -> tuple[list[str], str]:
    """The block (the path up to its last index that a name follows) and the module type after it."""
    k = max((i for i in range(len(parts) - 1) if _NUM.match(parts[i]) and not _NUM.match(parts[i + 1])), default=-1)
    return (parts[: k + 1], ".".join(parts[k + 1 :])) if k >= 0 else ([], ".".join(parts))


def _common_prefix(names: list[list[str]]) -> int:
    """How many leading parts (`unet`, `model`) every block path shares: they say nothing per row."""
    if not names:
        return 0
    n = 0
    while all(len(x) > n + 1 and x[n] == names[0][n] for x in names):
        n += 1
    return n


def _stack(row: str) -> str:
    """The named stack a row belongs to (`down_blocks`, `single_transformer_blocks`); '' for bare numbers."""
    return next((p for p in row.split(".") if not _NUM.match(p)), "")


_STAGES = {"down": 0, "input": 0, "mid": 1, "middle": 1, "up": 2, "output": 2}  # UNet order


def _row_key(row: str, first_seen: dict[str, int]) -> tuple[int, int, tuple[tuple[int, int | str], ...]]:
    if row == "-":
        return (-1, 0, ())
    head = _stack(row)
    stage = next((v for k, v in _STAGES.items() if head.startswith(k)), None)
    return (0, stage if stage is not None else 3 + first_seen[head], natural_key(row))


def plot_inspection(report: Inspection, path: str | Path) -> Path:
    """Write rank and ‖ΔW‖_F heatmaps (layer × module type) of an inspected adapter as a PNG.

    Raises:
        UsageError: the report has no stats (inspect with stats=True), or matplotlib is missing.
    """
    if report.stats is None:
        raise UsageError("the ‖ΔW‖ heatmap needs the adapter's data", hint="inspect with stats=True (--stats)")
    check_plot(path, [report.info.path, *report.info.files])
    modules = report.info.modules
    layout = grid(modules)
    panels = [("‖ΔW‖_F", _matrix(layout, {n: s.delta_norm for n, s in report.stats.items()}), "{:.2g}")]
    ranks = {m.rank for m in modules.values()}
    if len(ranks) > 1:  # one rank everywhere is a constant panel: said in the title instead
        panels.insert(0, ("rank", _matrix(layout, {n: float(m.rank) for n, m in modules.items()}), "{:.0f}"))
    label_width = max((len(r) for r in layout.rows), default=1)
    width = len(panels) * (2.2 + 0.07 * label_width + 0.55 * len(layout.columns))
    title = inspection_title(report, chars=max(40, int(width * 11)))
    fig = _figure(width=width, height=2.4 + 0.32 * len(layout.rows) + 0.2 * title.count("\n"))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for axis, (title, values, fmt) in zip(axes, panels, strict=True):
        _heatmap(fig, axis, layout, values, title, fmt)
    fig.suptitle(title)
    return _save(fig, path)


def inspection_title(report: Inspection, chars: int = 100) -> str:
    """The picture's title: the file, its modules and, for a diffusion transformer, the architecture line `inspect`
    prints (its double / single / video blocks, what is outside them, the text encoders), wrapped to `chars`."""
    import textwrap

    from .inspection import architecture_line

    modules = report.info.modules
    ranks = {m.rank for m in modules.values()}
    rank_note = f", rank {next(iter(ranks))} everywhere" if len(ranks) == 1 else ""
    title = f"{report.info.path.name}: {len(modules)} modules ({report.info.format}){rank_note}"
    arch = report.architecture
    return title if arch is None else title + "\n" + textwrap.fill(architecture_line(arch), chars)


def plot_diff(result: AdapterDiff, path: str | Path, *, title: str = "", inputs: Sequence[str | Path] = ()) -> Path:
    """Write heatmaps (layer × module type) of each common module's relative change and column-space overlap.

    `inputs` are paths the picture must not replace (the adapters compared).
    """
    check_plot(path, inputs)
    layout = grid(m.module for m in result.modules)
    change = _matrix(layout, {m.module: math.nan if m.change is None else m.change for m in result.modules})
    overlap = _matrix(layout, {m.module: m.overlap for m in result.modules})
    fig = _figure(width=2 * (2.2 + 0.55 * len(layout.columns)), height=2.4 + 0.32 * len(layout.rows))
    panels = ("‖ΔW_A − ΔW_B‖ / ‖ΔW_A‖", "column-space overlap (mean cos²)")
    for axis, values, name in zip(fig.subplots(1, 2), (change, overlap), panels, strict=True):
        _heatmap(fig, axis, layout, values, name, "{:.2g}")
    fig.suptitle(title or f"diff: {len(result.modules)} common modules")
    return _save(fig, path)


def _matrix(layout: Grid, values: dict[str, float]) -> list[list[float]]:
    out = [[math.nan] * len(layout.columns) for _ in layout.rows]
    for name, value in values.items():
        r, c = layout.cells[name]
        out[r][c] = value
    return out


def _heatmap(fig: Figure, axis: Any, layout: Grid, values: list[list[float]], title: str, fmt: str) -> None:
    image = axis.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
    axis.set_title(title)
    axis.set_xticks(range(len(layout.columns)), layout.columns, rotation=35, ha="right", fontsize=8)
    axis.set_yticks(range(len(layout.rows)), layout.rows, fontsize=8)
    axis.set_ylabel("block" if any(not r.isdigit() and r != "-" for r in layout.rows) else "layer")
    fig.colorbar(image, ax=axis, shrink=0.8)
    if len(layout.rows) * len(layout.columns) > ANNOTATE_MAX_CELLS:
        return
    for r, row in enumerate(values):
        for c, v in enumerate(row):
            if not math.isnan(v):
                bright = image.norm(v) > 0.6  # viridis turns yellow: dark text reads better there
                axis.text(
                    c, r, fmt.format(v), ha="center", va="center", fontsize=7, color="black" if bright else "white"
                )


@dataclass
class SpectrumRecorder:
    """Keeps the leading singular values of each ΔW; pass `observe` to `extract(..., observe=)`.

    `limit` values per module (at least `SPECTRUM_MIN`, all of a smaller matrix) are enough to show
    the knee and the chosen rank; computing them costs about one more truncated SVD per module.
    """

    limit: int = SPECTRUM_MIN
    values: dict[str, list[float]] = field(default_factory=dict)

    def observe(self, module: str, m: torch.Tensor) -> None:
        from .ops import linalg

        k = min(max(self.limit, SPECTRUM_MIN), *m.shape)
        self.values[module] = linalg.truncated_svd(m, k).S.double().tolist()


def plot_spectra(
    spectra: SpectrumRecorder, report: ExtractReport, path: str | Path, *, inputs: Sequence[str | Path] = ()
) -> Path:
    """Write the singular-value spectra of ΔW per module type, with each module's chosen rank marked.

    Each panel holds one line per layer (σᵢ on a log scale), a dot at the rank kept, and on the
    right axis the share of ‖ΔW‖²_F kept by the first i values for the whole module type.
    `inputs` are paths the picture must not replace (the checkpoints, the adapter written).
    """
    check_plot(path, inputs)
    reports = {m.module: m for m in report.modules if m.module in spectra.values}
    if not reports:
        raise UsageError("no extracted module to plot", hint="the plot needs at least one factored module")
    layout = grid(reports)
    fig = _figure(width=4.2 * min(3, len(layout.columns)), height=3.2 * math.ceil(len(layout.columns) / 3))
    axes = fig.subplots(math.ceil(len(layout.columns) / 3), min(3, len(layout.columns)), squeeze=False).ravel()
    for c, column in enumerate(layout.columns):
        names = sorted((n for n, (_, col) in layout.cells.items() if col == c), key=lambda n: layout.cells[n][0])
        panel = [(spectra.values[n], reports[n], layout.rows[layout.cells[n][0]]) for n in names]
        _spectrum_panel(axes[c], column, panel, len(layout.rows))
    for axis in axes[len(layout.columns) :]:
        axis.set_visible(False)
    totals = report.totals()
    fig.suptitle(f"ΔW spectra: {totals['modules']} modules, energy kept {totals['energy']:.2%}")
    return _save(fig, path)


def _spectrum_panel(axis: Any, title: str, modules: Sequence[tuple[list[float], Any, str]], layers: int) -> None:
    from matplotlib import colormaps

    colors = colormaps["viridis"]
    kept = [0.0] * max(len(s) for s, _, _ in modules)
    for i, (sigma, rep, layer) in enumerate(modules):
        color = colors(i / max(layers - 1, 1))
        shown = [(k + 1, s) for k, s in enumerate(sigma) if s > 0]
        axis.plot([k for k, _ in shown], [s for _, s in shown], color=color, linewidth=1, label=f"layer {layer}")
        if rep.rank <= len(sigma) and sigma[rep.rank - 1] > 0:
            axis.plot([rep.rank], [sigma[rep.rank - 1]], "o", color=color, markersize=4)
        for k, s in enumerate(sigma):
            kept[k] += s * s
    axis.set_yscale("log")
    axis.set_xlabel("singular value index i")
    axis.set_ylabel("σᵢ")
    if len(modules) <= LEGEND_MAX_LAYERS:
        axis.legend(fontsize=7, loc="lower left")
    delta = sum(rep.delta_sq for _, rep, _ in modules)
    energy = sum(rep.energy * rep.delta_sq for _, rep, _ in modules) / delta if delta else 1.0
    ranks = sorted({rep.rank for _, rep, _ in modules})
    if len(ranks) == 1:
        axis.axvline(ranks[0], color="gray", linestyle="--", linewidth=1)
    rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"
    axis.set_title(f"{title}\nrank {rank_text}, energy kept {energy:.2%}", fontsize=9)
    share = axis.twinx()
    curve = [min(c / delta, 1.0) if delta else 1.0 for c in itertools.accumulate(kept)]
    share.plot(range(1, len(curve) + 1), curve, color="tab:red", linestyle=":", linewidth=1.2)
    share.axhline(energy, color="tab:red", linewidth=0.6, alpha=0.5)
    share.set_ylim(0, 1.02)
    share.set_ylabel("energy kept (cumulative)", color="tab:red", fontsize=8)


def check_plot(path: str | Path, inputs: Sequence[str | Path]) -> None:
    """Raise `UsageError` when matplotlib is missing or `path` would replace an input: call it before long work."""
    require_extra("plot", purpose="--plot")
    ensure_distinct(path, list(inputs))


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(min(width, 24.0), min(height, 24.0)), dpi=DPI, layout="constrained")


def _save(fig: Figure, path: str | Path) -> Path:
    with atomic_output(path, force=True) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)
