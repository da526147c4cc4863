"""Agreement and ranking math against hand-computed numbers."""

import pytest

from loop.evaluation import ranking


def test_fleiss_kappa_by_hand():
    # P_bar = (1 + 1 + 0 + 1) / 4 = 0.75; p_a = 5/8, p_b = 3/8, P_e = 0.53125; kappa = 0.21875 / 0.46875
    items = [["a", "a"], ["b", "b"], ["a", "b"], ["a", "a"]]
    assert ranking.fleiss_kappa(items) == pytest.approx(0.21875 / 0.46875)
    assert ranking.fleiss_kappa([["a", "a"], ["b", "b"]]) == pytest.approx(1.0)
    assert ranking.fleiss_kappa([["a"]]) is None and ranking.fleiss_kappa([["a", "a"]]) is None


def test_cohen_kappa_by_hand():
    # p_o = 0.75; rater 1: a 3, b 1; rater 2: a 2, b 2; p_e = (3*2 + 1*2) / 16 = 0.5; kappa = 0.5
    assert ranking.cohen_kappa([("a", "a"), ("b", "b"), ("a", "b"), ("a", "a")]) == pytest.approx(0.5)
    assert ranking.cohen_kappa([]) is None


def test_bradley_terry_recovers_a_three_to_one_record():
    results = [(1, 0, 1.0)] * 3 + [(1, 0, 0.0)]
    strengths = ranking.bradley_terry(results)
    assert strengths[1] / strengths[0] == pytest.approx(3.0, rel=1e-2)
    assert sum(strengths.values()) == pytest.approx(1.0)


def test_elo_one_game_between_equals():
    assert ranking.elo([(1, 0, 1.0)]) == {1: 1008.0, 0: 992.0}


def test_outcomes_and_win_rates():
    results = ranking.outcomes([(0, 1, "b"), (1, 0, "a"), (0, 1, "tie"), (0, 1, "both_bad"), (1, 1, "a")])
    assert results == [(0, 1, 0.0), (1, 0, 1.0), (0, 1, 0.5)]
    assert ranking.win_rates(results) == {(1, 0): (pytest.approx(2.5 / 3), 3)}
