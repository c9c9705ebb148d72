"""examples/stdlib's RESULTS.md sections that judge issue 14's goal, on made-up losses: the best
mode, the better of shared's learning rates per seed, the single-task ceiling, and the share of
fine-tuning's gain a 5% cut would need. No training here."""

from __future__ import annotations

import os
import random
import sys

import pytest

HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                    "stdlib")  # fmt: skip
if HERE not in sys.path:
    sys.path.insert(0, HERE)
import stdlib_summary as summ  # noqa: E402

TASKS = ["a", "b", "c"]


def _run(losses: dict[str, float]) -> dict:
    return {"tasks": {t: {"loss": v} for t, v in losses.items()},
            "average_loss": sum(losses.values()) / len(losses)}  # fmt: skip


def _state(rng: random.Random) -> dict:
    """Three seeds; base > shared; hybrid and single below shared; shared_lowlr below shared at
    seed 1 only."""
    res: dict = {m: {} for m in ("shared", "shared_lowlr", "per_task", "hybrid", "single")}
    base = {}
    for s in "012":
        sh = {t: rng.uniform(1.0, 3.0) for t in TASKS}
        base[s] = _run({t: v * rng.uniform(1.2, 1.5) for t, v in sh.items()})
        res["shared"][s] = _run(sh)
        low = 0.9 if s == "1" else 1.05
        res["shared_lowlr"][s] = _run({t: v * low for t, v in sh.items()})
        res["per_task"][s] = _run({t: v * 0.99 for t, v in sh.items()})
        res["hybrid"][s] = _run({t: v * rng.uniform(0.96, 0.98) for t, v in sh.items()})
        res["single"][s] = _run({t: v * 0.5 for t, v in sh.items()})
    return {"results": res, "base": base}


def test_goal_picks_the_best_mode_against_the_best_shared_lr():
    state = _state(random.Random(0))
    res = state["results"]
    text = "\n".join(summ.goal_section(state, TASKS, list(res)))
    assert "The best mode by mean average loss is `hybrid`" in text  # single is not a rival
    rows = {
        ln.split(" | ")[0][2:]: ln for ln in text.splitlines() if ln[:4] in ("| 0 ", "| 1 ", "| 2 ")
    }
    assert "`shared_lowlr`" in rows["1"] and "`shared`" in rows["0"]
    # seed 1 is judged against shared_lowlr (0.9 x shared): hybrid is above it on every task
    for t in TASKS:
        want = 100 * (
            res["hybrid"]["1"]["tasks"][t]["loss"] / res["shared_lowlr"]["1"]["tasks"][t]["loss"]
            - 1
        )
        assert f"{want:+.1f}%" in rows["1"]
        assert want > 0
    wins = sum(res["hybrid"][s]["tasks"][t]["loss"] < res["shared"][s]["tasks"][t]["loss"]
               for s in "02" for t in TASKS)  # fmt: skip
    assert f"lower on {wins} of 9 task × seed pairs" in text
    assert "`single`" in text and "-50.0% against `shared` on average" in text
    assert "Even it stays short" not in text


def test_goal_needs_row_is_the_share_of_the_fine_tuning_gain():
    state = _state(random.Random(1))
    res, base = state["results"], state["base"]
    text = "\n".join(summ.goal_section(state, TASKS, list(res)))
    needs = next(ln for ln in text.splitlines() if ln.startswith("| 5% below"))
    for t, cell in zip(TASKS, needs.split(" | ")[1:]):
        want = sum(0.05 * res["shared"][s]["tasks"][t]["loss"]
                   / (base[s]["tasks"][t]["loss"] - res["shared"][s]["tasks"][t]["loss"])
                   for s in "012") / 3  # fmt: skip
        assert cell.rstrip(" |") == f"{100 * want:.1f}%"


@pytest.mark.parametrize("drop", ["shared", "base"])
def test_goal_section_without_its_inputs(drop):
    state = _state(random.Random(2))
    if drop == "shared":
        del state["results"]["shared"]
        assert summ.goal_section(state, TASKS, list(state["results"])) == []
    else:  # no base: the loss table only, no share-of-gain table
        del state["base"]
        text = "\n".join(summ.goal_section(state, TASKS, list(state["results"])))
        assert "best mode" in text and "5% below `shared` needs" not in text
