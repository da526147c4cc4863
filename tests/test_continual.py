"""The continual run's table (the run itself is end to end in tests/test_loop_e2e.py and measured in
ops/bench/continual.py)."""

from loop.demo import continual
from loop.demo.continual import table


def record(night, **kw):
    base = {"night": night, "labels": 0, "labels_total": 0, "decision": None, "kl_to_base": None, "serving": "base",
            "good": 0.3, "win_over_base": (0.5, 0.5, 0.5), "win_over_previous": None}
    return {**base, **kw}


def test_the_table_has_a_row_a_night_with_what_is_unknown_as_a_dash():
    rows = table([record(0), record(1, labels=200, labels_total=200, decision="promoted", kl_to_base=1.234,
                                    serving="v1", good=0.61, win_over_base=(0.7, 0.65, 0.75),
                                    win_over_previous=(0.7, 0.65, 0.75), candidate="v1", candidate_good=0.61,
                                    candidate_over_before=(0.7, 0.65, 0.75)),
                  record(2, decision="rejected", serving="v1", candidate="v2", candidate_good=0.655,
                         candidate_over_before=(0.52, 0.47, 0.57))]).splitlines()
    assert len(rows) == 5
    assert rows[2] == "| 0 | 0 (0) | - | - | base | 0.300 | 0.500 (0.500-0.500) | - | - | - |"
    assert rows[3] == ("| 1 | 200 (200) | promoted | 1.23 | v1 | 0.610 | 0.700 (0.650-0.750) | 0.700 (0.650-0.750) "
                       "| 0.610 | 0.700 (0.650-0.750) |")
    assert rows[4].endswith("| rejected | - | v1 | 0.300 | 0.500 (0.500-0.500) | - | 0.655 | 0.520 (0.470-0.570) |")


def test_a_night_grades_its_candidate_whatever_the_gate_decided(monkeypatch):
    """A rejected candidate is graded against what served before the night, so a rejection the
    simulated people disagree with shows in the table."""
    asked = []
    monkeypatch.setattr(continual, "good_share", lambda client, model, cache: asked.append(("good", model)) or 0.9)
    monkeypatch.setattr(continual, "win_rate",
                        lambda client, model, against, cache: asked.append((model, against)) or (0.6, 0.55, 0.65))
    assert continual.candidate_grades(None, 3, "v2", {}) == {
        "candidate": "v3", "candidate_good": 0.9, "candidate_over_before": (0.6, 0.55, 0.65)}
    assert asked == [("good", "v3"), ("v3", "v2")]
    assert continual.candidate_grades(None, None, "v2", {})["candidate"] is None  # no run, or a skipped one: none


def test_each_night_gets_the_label_budget_it_was_given(monkeypatch):
    """The budget reached each night as the store's label count at the start (a shadowed name), so a
    fresh store's run labelled nothing at all, night after night: `simulate --nights` and the bench."""
    budgets = []
    monkeypatch.setattr(continual, "standing", lambda client: ("base", 17, 40))  # 17 labels in the store
    monkeypatch.setattr(continual, "grades", lambda *a: {})
    monkeypatch.setattr(continual, "night", lambda *a: budgets.append(a[-1]) or {"serving": "base"})
    records = continual.nights(None, None, 2, pairs=10, labels=None)
    assert budgets == [None, None] and records[0]["labels_total"] == 17  # None: label the queue empty
    budgets.clear()
    continual.nights(None, None, 1, pairs=10, labels=25)
    assert budgets == [25]
