"""The gate's decision on paired per-prompt verdicts, its error rates, and the judges' handling of
bias, garbage and failure. (The LLM judge against the real engine: tests/test_serving.py; the
whole gate on trained candidates: tests/test_loop_e2e.py and tests/test_gate_audit.py.)"""

from __future__ import annotations

import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from loop.config import ConfigError, GateConfig
from loop import config as configuration
from loop.evaluation import judges
from loop.evaluation.gate import confidence_bounds, decide, prompt_scores
from loop.evaluation.judges import JudgeUnavailable, LLMJudge, both_orders, parse_letter

CFG = GateConfig()


def draw(rng: random.Random, prompts: int, samples: int, win: float, tie: float) -> list[list[str]]:
    """verdicts[sample][prompt], each "a" with probability `win`, "tie" with `tie`, else "b"."""
    def one() -> str:
        u = rng.random()
        return "a" if u < win else "tie" if u < win + tie else "b"

    return [[one() for _ in range(prompts)] for _ in range(samples)]


def test_a_prompts_score_is_the_mean_of_its_samples_and_invalid_ones_are_left_out():
    scores, invalid = prompt_scores([["a", "b", "tie", "invalid"], ["a", "tie", "tie", "invalid"]])
    assert scores == [1.0, 0.25, 0.5] and invalid == 2


def test_the_bounds_widen_with_spread_and_shrink_with_prompts():
    mean, lower, upper = confidence_bounds([1.0, 0.0] * 16, alpha=0.05)
    assert mean == 0.5 and lower < 0.5 < upper and upper - 0.5 == pytest.approx(0.5 - lower)
    _, lower_more, _ = confidence_bounds([1.0, 0.0] * 64, alpha=0.05)
    assert lower < lower_more < 0.5
    assert confidence_bounds([0.75] * 30, alpha=0.05) == (0.75, 0.75, 0.75)  # no spread


def test_the_gate_says_which_win_rate_its_prompts_could_detect():
    from loop.evaluation.gate import detectable

    spread = [1.0, 0.0, 0.5, 0.5] * 16  # 64 prompts, sd ~0.36
    assert 0.6 < detectable(spread, 0.05, 0.5) < 0.7 < detectable(spread[:16], 0.05, 0.5)
    d = decide([["a"] * 48 + ["b"] * 16], 1.0, CFG)
    assert d.stats["detectable_win_rate"] > 0.5


def test_a_point_estimate_above_the_old_margin_is_not_enough():
    # 64 prompts, 36 wins and 28 losses: 0.5625 would have passed the old rule (> 0.55)
    verdicts = [["a"] * 36 + ["b"] * 28]
    d = decide(verdicts, 1.0, CFG)
    assert d.outcome == "reject" and d.stats["win_rate"] == pytest.approx(0.5625)
    assert d.stats["win_rate_lower"] < 0.5 < d.stats["win_rate_upper"]
    assert "lower bound is not above 0.500" in d.reason and "90% interval" in d.reason


def test_a_clear_win_is_promoted_within_the_kl_budget_and_rejected_beyond_it():
    verdicts = [["a"] * 48 + ["b"] * 8 + ["tie"] * 8] * 2
    assert decide(verdicts, 3.0, CFG).outcome == "promote"
    d = decide(verdicts, CFG.kl_budget + 1, CFG)
    assert d.outcome == "reject" and "over the budget" in d.reason


def test_too_few_prompts_or_a_judge_answering_garbage_hold_the_candidate():
    d = decide([["a"] * 10], 1.0, CFG)
    assert d.outcome == "hold" and "fewer than gate.min_prompts" in d.reason
    d = decide([["invalid"] * 40 + ["a"] * 24], 1.0, CFG)
    assert d.outcome == "hold" and "no usable verdict in 40 of 64" in d.reason
    assert decide([["tie"] * 64] * 2, 1.0, CFG).outcome == "reject"  # a judge that sees no difference


@pytest.mark.parametrize("tie", [0.0, 0.3, 0.7])
def test_a_neutral_candidate_is_promoted_at_most_alpha_of_the_time(tie):
    # The same version against itself: wins and losses equally likely, whatever the tie rate.
    rng = random.Random(7)
    trials = 2000
    promoted = sum(decide(draw(rng, 64, 2, (1 - tie) / 2, tie), 1.0, CFG).outcome == "promote"
                   for _ in range(trials))
    # alpha = 0.05; the binomial standard error of the estimate over 2000 trials is ~0.005
    assert promoted / trials <= CFG.alpha + 0.015


def test_a_truly_better_candidate_is_promoted_at_least_nine_times_in_ten():
    # What the demo's DPO candidates measure against the base: win rate ~0.75-0.78 (ties half)
    rng = random.Random(11)
    promoted = sum(decide(draw(rng, 64, 2, 0.6, 0.3), 1.0, CFG).outcome == "promote" for _ in range(500))
    assert promoted / 500 >= 0.9
    worse = sum(decide(draw(rng, 64, 2, 0.3, 0.2), 1.0, CFG).outcome == "promote" for _ in range(500))
    assert worse == 0


def test_letters_and_both_orders():
    assert [parse_letter(t) for t in ("A", " b.", "T", "tie", "**A**", "", None, "A is better", "C")] == \
        ["a", "b", "tie", "tie", "a", "invalid", "invalid", "invalid", "invalid"]
    assert both_orders("a", "b") == "a"  # A first, then B when swapped: the same answer
    assert both_orders("b", "a") == "b"
    assert both_orders("a", "a") == "tie"  # always the first reply: position bias, a tie
    assert both_orders("tie", "tie") == "tie"
    assert both_orders("a", "invalid") == "invalid"


def test_the_demo_rule_and_a_url_are_refused_as_judges_with_a_clear_error():
    with pytest.raises(ConfigError, match="demo's rule is the simulated people"):
        configuration.load(None, ["gate.judge=demo"])
    with pytest.raises(ConfigError, match="put the URL in judge_url"):
        configuration.load(None, ["gate.judge=http://127.0.0.1:9000/v1"])
    with pytest.raises(ConfigError, match="needs judge_url and judge_model"):
        configuration.load(None, ["gate.judge=llm"])
    assert configuration.Config().gate.judge == "auto"
    assert not configuration.Config().gate.uses_llm()
    assert configuration.load(None, ["gate.judge_url=http://x/v1", "gate.judge_model=m"]).gate.uses_llm()


def test_a_reward_model_judges_only_above_its_floor_on_enough_held_out_pairs():
    judge, why = judges.choose(CFG, None)
    assert judge is None and "no reward model" in why
    judge, why = judges.choose(CFG, {"path": "/nowhere", "accuracy": 0.9, "metrics": {"heldout_pairs": 5}})
    assert judge is None and "fewer than gate.reward_min_heldout = 16" in why
    judge, why = judges.choose(CFG, {"path": "/nowhere", "accuracy": 0.6, "metrics": {"heldout_pairs": 30}})
    assert judge is None and "under gate.reward_floor = 0.65" in why
    with pytest.raises(FileNotFoundError):  # trusted on paper, but not there: the caller holds the run
        judges.choose(CFG, {"path": "/nowhere", "accuracy": 0.9, "metrics": {"heldout_pairs": 30}})


class FakeJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible judge that answers by `mode`: always 'A' (position bias), an essay
    (garbage), not JSON, or only after a long pause."""

    mode = "A"
    asked: list[str] = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        FakeJudge.asked.append(body["messages"][0]["content"])
        if self.mode == "slow":
            time.sleep(2)
        text = {"A": "A", "essay": "Both replies have merits, but"}.get(self.mode, "A")
        out = b"<html>" if self.mode == "html" else json.dumps(
            {"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # the slow mode's client hangs up first: expected
        pass


@pytest.fixture
def fake_judge():
    server = QuietServer(("127.0.0.1", 0), FakeJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    FakeJudge.asked = []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


PROMPTS = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Question {i}?"}] for i in range(4)]


def test_the_llm_judge_asks_both_orders_and_a_position_bias_becomes_ties(fake_judge):
    FakeJudge.mode = "A"
    verdicts = LLMJudge(fake_judge, "judge", timeout_s=5).verdicts(PROMPTS, ["cand"] * 4, ["serv"] * 4)
    assert verdicts == ["tie"] * 4
    assert len(FakeJudge.asked) == 8
    firsts = [q.index("cand") < q.index("serv") for q in FakeJudge.asked]
    assert firsts.count(True) == 4 and firsts.count(False) == 4  # each comparison in both orders
    assert all("system: Be brief." in q for q in FakeJudge.asked)  # the whole conversation is shown


@pytest.mark.parametrize("mode", ["essay", "html"])
def test_an_llm_judge_answering_garbage_gives_invalid_verdicts_and_the_gate_holds(fake_judge, mode):
    FakeJudge.mode = mode
    verdicts = LLMJudge(fake_judge, "judge", timeout_s=5).verdicts(PROMPTS * 8, ["c"] * 32, ["s"] * 32)
    assert verdicts == ["invalid"] * 32
    assert decide([verdicts], 1.0, CFG).outcome == "hold"


def test_a_slow_or_unreachable_llm_judge_is_unavailable(fake_judge):
    FakeJudge.mode = "slow"
    with pytest.raises(JudgeUnavailable, match="Timeout"):
        LLMJudge(fake_judge, "judge", timeout_s=0.5).verdicts(PROMPTS[:1], ["c"], ["s"])
    from tests.serving import free_port

    with pytest.raises(JudgeUnavailable, match="ConnectError"):
        LLMJudge(f"http://127.0.0.1:{free_port()}/v1", "judge", timeout_s=2).verdicts(PROMPTS[:1], ["c"], ["s"])


def test_shadow_prompts_are_the_newest_live_ones_since_the_last_cycle_in_no_training_pair(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from loop.evaluation.gate import newest_prompt_id, shadow_prompts

    def msg(text):
        return [{"role": "user", "content": text}]

    pairs = [{"prompt": msg("trained"), "split": "train"}, {"prompt": msg("held"), "split": "heldout"}]
    prompts = [{"id": i, "prompt": msg(t), "source": s} for i, (t, s) in enumerate(
        [("old", "live"), ("trained", "live"), ("new 1", "live"), ("imported", "dataset:hh"), ("new 2", "live"),
         ("held", "live"), ("new 2", "live")], start=1)]
    pq.write_table(pa.Table.from_pylist(pairs), tmp_path / "pairs.parquet")
    pq.write_table(pa.Table.from_pylist(prompts), tmp_path / "prompts.parquet")
    assert shadow_prompts(tmp_path, 10, since_id=1, exclude=[msg("held")]) == [msg("new 2"), msg("new 1")]
    assert shadow_prompts(tmp_path, 1, since_id=0, exclude=[]) == [msg("new 2")]
    assert shadow_prompts(tmp_path, 10, since_id=7, exclude=[]) == []
    assert newest_prompt_id(tmp_path) == 7


def test_each_set_of_prompts_gets_its_own_win_rate_and_the_decision_is_on_all():
    verdicts = [["a"] * 40 + ["b"] * 24 + ["b"] * 20 + ["a"] * 12]
    d = decide(verdicts, 1.0, CFG, {"heldout": 64, "shadow": 32})
    assert d.stats["win_rate_heldout"] == pytest.approx(40 / 64)
    assert d.stats["win_rate_shadow"] == pytest.approx(12 / 32)
    assert d.stats["win_rate"] == pytest.approx(52 / 96) and d.stats["shadow_prompts"] == 32


def test_peoples_votes_count_once_there_are_enough():
    few = decide([], 1.0, CFG, None, [1.0] * 8 + [0.0] * 2)
    assert few.outcome == "hold" and few.stats["people_votes"] == 10 and few.stats["win_rate_people"] == 0.8
    enough = decide([], 1.0, CFG, None, [1.0] * 24 + [0.0] * 6)
    assert enough.outcome == "promote" and enough.stats["judged_prompts"] == 30
    # beside a judge that sees no difference, 40 votes of people who do tip the decision
    with_judge = decide([["tie"] * 64], 1.0, CFG, {"heldout": 64}, [1.0] * 36 + [0.0] * 4)
    assert with_judge.outcome == "promote" and with_judge.stats["win_rate_heldout"] == 0.5
