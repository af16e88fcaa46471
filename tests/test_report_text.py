"""Report wording: DMTG announces groups only once the assignment is decided, counts are
pluralised, and curves too short to be seen as lines get markers."""
from __future__ import annotations

from taskfold.trainer.methods.dmtg import DECIDED, groups_summary
from taskfold.trainer.report import line_style, plural


def decision(probabilities: dict[str, list[float]]) -> dict:
    assignment = {n: max(range(len(p)), key=p.__getitem__) for n, p in probabilities.items()}
    groups = [[n for n in assignment if assignment[n] == k] for k in sorted(set(assignment.values()))]
    return {"assignment": assignment, "groups": groups, "probabilities": probabilities}


def test_near_uniform_assignment_is_not_announced_as_groups_found():
    lines = groups_summary(decision({"seg": [0.52, 0.48], "depth": [0.49, 0.51]}), "learned")
    assert not lines[0].startswith("Groups found") and "No grouping found yet: 2 of 2 tasks" in lines[0]
    assert lines[-2].endswith("| near uniform |") and lines[-1].endswith("| near uniform |")


def test_decided_assignment_is_announced_with_each_task_state():
    lines = groups_summary(decision({"seg": [DECIDED + 0.01, 0.04], "depth": [0.01, 0.99]}), "learned")
    assert lines[0].startswith("Groups found: {seg}; {depth}")
    assert all(line.endswith("| decided |") for line in lines[-2:])
    fixed = groups_summary(decision({"seg": [0.5, 0.5], "depth": [0.5, 0.5]}), "random")
    assert fixed[0].startswith("Groups (random assignment, not searched)")


def test_counts_and_short_curves():
    assert (plural(1, "epoch"), plural(2, "epoch")) == ("1 epoch", "2 epochs")
    assert line_style(1)["marker"] == "o" and line_style(50) == {}
