"""BMTAS report pieces: the derived tree as a picture, and MAdds vs Δm across λ next to the
single-task and shared baselines (a table and a scatter plot).

The tree picture puts the layers on the x axis (stem at 0, block l at l+1) and gives every task
a lane on the y axis; a node sits at the mean lane of its tasks, so a shared trunk runs down the
middle and splits where tasks branch off. Line width grows with the number of tasks sharing a
node. Task names are written on their own lanes, joined to their last node by a thin line, so
tasks that never branch apart do not print their names on top of each other.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from taskfold.trainer.report import REPORT_SECTIONS, pyplot
from taskfold.trainer.rundir import RunDir


def plot_tree(tree: list[list[list[str]]], path: str | Path, title: str = "") -> Path:
    """Draw a branching tree (one grouping of task names per layer) into a PNG."""
    tasks = [name for group in tree[0] for name in group]
    lane = {name: i for i, name in enumerate(tasks)}
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(tree), 0.8 + 0.6 * len(tasks)))
    previous = {name: (len(tasks) - 1) / 2 for name in tasks}  # every task leaves the stem
    for layer, grouping in enumerate(tree):
        current = {}
        for group in grouping:
            y = sum(lane[n] for n in group) / len(group)
            start = previous[group[0]]
            ax.plot([layer, layer + 1], [start, y], color="tab:blue", linewidth=1.5 + 2.0 * (len(group) - 1),
                    solid_capstyle="round")
            ax.plot([layer + 1], [y], "o", color="tab:blue", markersize=4)
            current.update({n: y for n in group})
        previous = current
    for name in tasks:  # each label on its own lane (tasks sharing a last node would overlap at its y)
        ax.plot([len(tree), len(tree) + 0.25], [previous[name], lane[name]], color="grey", linewidth=0.8)
        ax.annotate(name, (len(tree) + 0.3, lane[name]), va="center")
    ax.plot([0], [(len(tasks) - 1) / 2], "s", color="black")
    ax.set_xticks(range(len(tree) + 1), ["stem"] + [f"block {i}" for i in range(len(tree))], rotation=30)
    ax.set_yticks([])
    ax.set_xlim(-0.3, len(tree) + 1.4)
    ax.set_ylim(-0.7, len(tasks) - 0.3)
    ax.set_title(title or "BMTAS branching tree")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


@dataclass
class TradeoffRow:
    """One model on the efficiency/performance plane."""

    name: str
    macs: int  # whole inference graph (encoder + heads), from the compiled bundle
    delta_m: float  # % vs the single-task models (positive = better)
    branches_per_layer: list[int] | None = None  # BMTAS only: nodes at each encoder layer


def tradeoff_table(rows: list[TradeoffRow]) -> str:
    """A Markdown table: model, MMACs, Δm, nodes per layer."""
    lines = ["| model | MMACs | Δm [%] | nodes per layer |", "|---|---:|---:|---|"]
    for r in rows:
        nodes = " ".join(map(str, r.branches_per_layer)) if r.branches_per_layer else "—"
        lines.append(f"| {r.name} | {r.macs / 1e6:.1f} | {r.delta_m:+.2f} | {nodes} |")
    return "\n".join(lines)


def plot_tradeoff(rows: list[TradeoffRow], path: str | Path) -> Path:
    """Scatter of MAdds (x) against Δm (y), each point labelled with its model."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for r in rows:
        marker = "o" if r.branches_per_layer else "s"
        ax.plot(r.macs / 1e6, r.delta_m, marker, markersize=7)
        ax.annotate(r.name, (r.macs / 1e6, r.delta_m), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("MMACs (compiled bundle)")
    ax.set_ylabel("Δm vs single-task [%]")
    ax.set_title("BMTAS: MAdds vs Δm")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


@REPORT_SECTIONS.register("bmtas_retrain")
def report_section(run: RunDir, records: list[dict]) -> list[str]:
    """The retrained tree as a picture, with the search run's expected MAdds beside it."""
    tree = run.load_arch().decision["tree"]
    plot_tree(tree, run.path / "tree.png", title="BMTAS branching tree")
    lines = ["## Branching tree (BMTAS)", "", "![tree](tree.png)", ""]
    search = run.path.parent
    if (search / "arch.json").is_file():
        decision = RunDir(search).load_arch().decision
        if "expected_encoder_macs" in decision:
            lines += [f"Search run: `{search}`; expected encoder MAdds at read-off "
                      f"{decision['expected_encoder_macs'] / 1e6:.2f} M.", ""]
    return lines
