"""The labelling app (labeling_ui/) driven headlessly by Streamlit's AppTest against a real gateway
with no engine: sign-in, every choice, undo, conflicts, the arena's error, dashboard, admin split."""

import itertools
from pathlib import Path

import httpx
import pytest
from streamlit.testing.v1 import AppTest

from tests.serving import free_port
from tests.ui_gateway import running

APP = str(Path(__file__).parent.parent / "labeling_ui" / "app.py")
names = (f"user{i}" for i in itertools.count())


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    with running(tmp_path_factory.mktemp("ui-gateway"), pairs=40) as g:
        yield g


@pytest.fixture
def app(gateway, monkeypatch):
    """Sign in with a token; returns the AppTest, on the Label page."""
    monkeypatch.setenv("ALIGNLOOP_GATEWAY_URL", gateway.url)

    def sign_in(token: str) -> AppTest:
        at = AppTest.from_file(APP, default_timeout=30).run()
        at.text_input(key="token_input").input(token)
        at.button(key="FormSubmitter:sign-in-Sign in").click().run()
        assert not at.exception
        return at

    return sign_in


def labeller(gateway) -> tuple[str, str]:
    name = next(names)
    return name, gateway.add_user(name)


def shown(at: AppTest) -> dict:
    return at.session_state["pair"]


def test_a_bad_token_shows_the_gateways_message_and_nothing_else(app):
    at = app("not-a-token")
    assert "unknown or malformed token" in at.error[0].value
    assert not any(b.label == "A is better" for b in at.button)
    with pytest.raises(ValueError, match="Could not find a navigation page"):
        at.switch_page("views/label.py")


def reload(session: str) -> AppTest:
    """The page loaded again with `?session=...` in its address, as a browser's reload does."""
    at = AppTest.from_file(APP, default_timeout=30)
    at.query_params["session"] = session
    return at.run()


def test_a_reload_keeps_the_sign_in_until_sign_out_or_a_new_token(app, gateway):
    """Streamlit forgets a tab when it reloads: the id in the address brings its user back, not the token."""
    name, token = labeller(gateway)
    sid = app(token).query_params["session"]
    assert token not in sid
    at = reload(sid)
    assert at.session_state["user"]["name"] == name and "pair" in at.session_state  # on the Label page
    next(b for b in at.button if b.label == "Sign out").click().run()
    assert "session" not in at.query_params
    assert "user" not in reload(sid).session_state  # signed out: the id signs nobody in
    assert "user" not in reload("made-up").session_state
    sid = app(token).query_params["session"]
    httpx.post(f"{gateway.url}/api/users/{name}/token",
               headers={"Authorization": f"Bearer {gateway.admin_token}"}).raise_for_status()
    at = reload(sid)  # the old token no longer works: neither does its id
    assert "user" not in at.session_state and "session" not in at.query_params


def test_an_unreachable_gateway_is_said_plainly(app, monkeypatch):
    monkeypatch.setenv("ALIGNLOOP_GATEWAY_URL", f"http://127.0.0.1:{free_port()}")
    at = app("whatever")
    assert "cannot reach the gateway" in at.error[0].value and "Traceback" not in at.error[0].value


def test_each_choice_is_stored_and_the_next_pair_comes_at_once(app, gateway):
    name, token = labeller(gateway)
    at = app(token)
    assert at.session_state["user"]["name"] == name
    expected = []
    for choice in ("first", "second", "tie", "both_bad", "skip"):
        pair = shown(at)
        texts = [m.value for m in at.markdown]
        assert pair["first"] in texts and pair["second"] in texts
        a_first = pair["first"].startswith("It is")  # reply a is the good one in ui_gateway's pairs
        stored = {"first": "a" if a_first else "b", "second": "b" if a_first else "a"}.get(choice, choice)
        rationale = f"because {choice}" if choice == "tie" else None
        if rationale:
            at.text_input(key=f"label-why-{pair['pair_id']}").input(rationale)
        at.button(key=f"label-{choice}-{pair['pair_id']}").click().run()
        assert not at.exception and not at.warning
        assert shown(at)["pair_id"] != pair["pair_id"]
        expected.append((pair["pair_id"], stored, rationale))
    labels = gateway.labels(name)
    assert [(p, c, r) for p, c, r, _ in labels] == expected
    assert all(s is not None and s >= 0 for *_, s in labels)
    assert at.session_state["progress"]["done_today"] == 4  # the skip is no label
    assert "**4** labelled today" in at.markdown[0].value


def test_undo_hands_the_last_pair_back_and_says_when_there_is_nothing_left(app, gateway):
    name, token = labeller(gateway)
    at = app(token)
    at.button(key="label-undo").click().run()
    assert at.info[0].value == "nothing to undo"
    first = shown(at)["pair_id"]
    at.button(key=f"label-first-{first}").click().run()
    assert len(gateway.labels(name)) == 1
    at.button(key="label-undo").click().run()
    assert shown(at)["pair_id"] == first and gateway.labels(name) == []
    at.button(key=f"label-both_bad-{first}").click().run()
    assert [c for _, c, *_ in gateway.labels(name)] == ["both_bad"]


def test_a_pair_labelled_elsewhere_shows_the_conflict_and_moves_on(app, gateway):
    import httpx

    name, token = labeller(gateway)
    at = app(token)
    pair_id = shown(at)["pair_id"]
    httpx.post(f"{gateway.url}/api/label", json={"pair_id": pair_id, "choice": "tie"},
               headers={"Authorization": f"Bearer {token}"}).raise_for_status()  # e.g. from a second tab
    at.button(key=f"label-first-{pair_id}").click().run()
    assert "labelled pair" in at.warning[0].value
    assert shown(at)["pair_id"] != pair_id
    assert [c for _, c, *_ in gateway.labels(name)] == ["tie"]


def test_the_arena_without_an_engine_shows_the_gateways_message(app, gateway):
    at = app(labeller(gateway)[1])
    at.switch_page("views/arena.py").run()
    at.chat_input[0].set_value("Tell me a joke").run()
    assert not at.exception
    assert "engine is unavailable" in at.error[0].value


def test_after_asking_the_arena_leaves_the_question_box_so_the_vote_keys_work(app, gateway, monkeypatch):
    """The question box kept the focus after sending, so the 1-5 keys shown under the answers were
    typed into it (seen in a real browser on a real engine: no vote was recorded)."""
    from labeling_ui import api

    name, token = labeller(gateway)
    handed = httpx.get(f"{gateway.url}/api/label/next", headers={"Authorization": f"Bearer {token}"}).json()["pair"]
    monkeypatch.setattr(api, "arena", lambda *a: {"pair": handed})  # the engine's two answers, as a pair
    at = app(token)
    at.switch_page("views/arena.py").run()
    at.chat_input[0].set_value("Tell me a joke").run()
    assert not at.exception and at.session_state["arena_pair"]["pair_id"] == handed["pair_id"]
    blur = [e for e in at.get("html") if "activeElement?.blur()" in e.proto.body]
    assert len(blur) == 1 and f"pair {handed['pair_id']}" in blur[0].proto.body  # once per new pair
    at.button(key=f"arena-first-{handed['pair_id']}").click().run()
    assert "Vote recorded" in at.success[0].value and [p for p, *_ in gateway.labels(name)] == [handed["pair_id"]]


def test_the_dashboard_plots_what_the_store_holds(app, gateway):
    at = app(labeller(gateway)[1])
    at.button(key=f"label-first-{shown(at)['pair_id']}").click().run()
    at.switch_page("views/dashboard.py").run()
    assert not at.exception and not at.error
    assert len(at.get("vega_lite_chart")) == 3  # labels per day, per labeller, seconds per label
    assert "No retrain runs yet." in [i.value for i in at.info]


def test_a_labeller_has_no_admin_page(app, gateway):
    at = app(labeller(gateway)[1])
    assert at.session_state["user"]["role"] == "labeller"
    with pytest.raises(ValueError, match="Could not find a navigation page"):
        at.switch_page("views/admin.py")


def test_an_admin_adds_a_user_sees_the_token_once_and_sees_why_an_action_failed(app, gateway):
    at = app(gateway.admin_token).switch_page("views/admin.py").run()
    assert [t.label for t in at.tabs] == ["Status", "Versions", "Users", "Guidelines", "Runs", "Queue", "Export"]
    assert not at.exception and not at.error
    queue = next(d.value for d in at.dataframe if "votes a/b" in d.value.columns)  # what labellers get next
    assert len(queue) > 0 and "score" not in queue.columns  # newest first: nothing ranked it, no empty columns
    assert any("None of these is scored yet" in c.value for c in at.caption)
    assert at.metric[0].value == "base" and at.metric[1].value == "none"  # versions by name, not by id
    waiting = httpx.get(f"{gateway.url}/api/queue", headers={"Authorization": f"Bearer {gateway.admin_token}"}).json()
    margins = [{"pair_id": p["pair_id"], "margin": 0.1 * i} for i, p in enumerate(waiting["pairs"])]
    httpx.post(f"{gateway.url}/api/queue/margins", json={"reward_model_id": None, "margins": margins},
               headers={"Authorization": f"Bearer {gateway.admin_token}"}).raise_for_status()  # as `alignloop rank` does
    at.switch_page("views/admin.py").run()
    queue = next(d.value for d in at.dataframe if "votes a/b" in d.value.columns)
    assert queue["score"].notna().all() and {"uncertainty", "disagreement", "novelty", "scored"} <= set(queue.columns)
    at.text_input(key="new_name").input("newbie")
    at.selectbox(key="new_role").select("labeller")
    at.button(key="FormSubmitter:add-user-Add user").click().run()
    token = at.code[0].value
    assert "newbie" in at.success[0].value and len(token) > 20
    at.run()
    assert not at.code  # shown once
    assert app(token).session_state["user"]["name"] == "newbie"
    people = next(d.value for d in at.dataframe if "skips" in d.value.columns)  # the Users tab lists them
    assert people.set_index("name").loc["newbie", ["role", "labels", "excluded"]].tolist() == ["labeller", 0, ""]
    assert at.button(key="exclude").disabled  # nobody chosen yet
    at.selectbox(key="exclude_who").select("newbie").run()
    at.button(key="exclude").click().run()
    assert at.success[0].value.startswith("exclude: newbie's labels, feedback and traffic are left out")
    people = next(d.value for d in at.dataframe if "skips" in d.value.columns)
    assert people.set_index("name").loc["newbie", "excluded"] != ""
    at.selectbox(key="exclude_who").select("newbie").run()
    at.button(key="include").click().run()
    assert at.success[0].value == "include: newbie is included again"

    # promoting by hand: nothing is chosen at first; one the gate did not promote needs a second yes
    assert at.button(key="promote").disabled
    vid = gateway.gw.store.add_version("/nowhere/adapter", "dpo", parent_id=0)["id"]
    gateway.gw.store.set_version_status(vid, "rejected")
    at.switch_page("views/admin.py").run()
    table = next(d.value for d in at.dataframe if "version" in d.value.columns)  # names, not raw columns
    row = table[table["version"] == f"v{vid}"].iloc[0]
    assert (row["parent"], row["status"], len(row["created"])) == ("base", "rejected", 19)
    at.selectbox(key="promote_version").select(f"v{vid}").run()
    assert "is rejected: the gate did not promote it" in at.warning[0].value and at.button(key="promote").disabled
    at.checkbox(key="promote_override").check().run()
    assert not at.button(key="promote").disabled
    at.selectbox(key="promote_version").select("base").run()
    assert not at.button(key="promote").disabled and not at.warning
    at.button(key="promote").click().run()
    assert at.success[0].value.endswith(": base was serving already")  # by name, as everywhere, not "0"

    at.button(key="rollback").click().run()
    assert at.error[0].value.startswith("roll back: nothing to roll back to")
    at.text_input(key="token_for").input("nobody")
    at.button(key="FormSubmitter:new-token-New token").click().run()
    assert at.error[0].value.startswith("new token:") and "nobody" in at.error[0].value


def test_an_admin_edits_the_guidelines_labellers_read(app, gateway):
    at = app(gateway.admin_token).switch_page("views/admin.py").run()
    at.text_area(key="guidelines_text").input("# Be kind\nPrefer the **honest** reply.")
    at.button(key="save_guidelines").click().run()
    assert at.success[0].value == "guidelines: saved"
    reader = app(labeller(gateway)[1])
    assert any("Prefer the **honest** reply." in m.value for m in reader.markdown)


def test_the_export_the_download_buttons_fetch_holds_the_labels(gateway, monkeypatch):
    from labeling_ui import api

    monkeypatch.setenv("ALIGNLOOP_GATEWAY_URL", gateway.url)
    name, token = labeller(gateway)
    pair = api.next_pair(token)["pair"]
    api.label(token, pair["pair_id"], "first")
    with pytest.raises(api.ApiError, match="needs an admin"):
        api.export(token, "pairs")
    lines = api.export(gateway.admin_token, "pairs").decode().splitlines()
    assert lines and all(line.startswith("{") for line in lines)


def test_a_finished_run_shows_its_verdict_and_curve(tmp_path, monkeypatch):
    import httpx

    with running(tmp_path, pairs=2) as gateway:
        monkeypatch.setenv("ALIGNLOOP_GATEWAY_URL", gateway.url)
        admin = {"Authorization": f"Bearer {gateway.admin_token}"}
        run = httpx.post(f"{gateway.url}/api/runs", headers=admin, json={"method": "dpo"}).json()
        curve = [{"step": s, "name": "loss", "value": 1 / (s + 1)} for s in range(5)]
        httpx.post(f"{gateway.url}/api/runs/{run['id']}/heartbeat", headers=admin, json={"metrics": curve})
        httpx.post(f"{gateway.url}/api/runs/{run['id']}/finish", headers=admin, json={
            "status": "promoted", "reason": "won 61%", "metrics": {"win_rate": 0.61}}).raise_for_status()
        httpx.post(f"{gateway.url}/api/reward_models", headers=admin, json={
            "path": "/rm/1", "run_id": run["id"], "accuracy": 0.84}).raise_for_status()

        at = AppTest.from_file(APP, default_timeout=30).run()
        at.text_input(key="token_input").input(gateway.admin_token)
        at.button(key="FormSubmitter:sign-in-Sign in").click().run()
        at.switch_page("views/dashboard.py").run()
        assert not at.exception and not at.error
        assert len(at.get("vega_lite_chart")) == 3  # the run's verdict, the reward model, the training curve
        assert "won 61%" in [c.value for c in at.caption]
        assert [m.value for m in at.metric if m.label == "win_rate"] == ["0.61"]
        at.switch_page("views/admin.py").run()
        assert not at.exception and not at.error
        runs = next(d.value for d in at.dataframe if "reason" in d.value.columns)
        assert runs["reason"].tolist() == ["won 61%"]


def test_the_seconds_chart_has_a_readable_axis_when_every_median_is_zero():
    """Scripted labellers send 0 s; the axis was a column of "0.000000" ticks."""
    from labeling_ui import charts

    x = charts.seconds_per_label([{"name": "sim-0", "median_seconds": 0.0},
                                  {"name": "sim-1", "median_seconds": 0.0}]).to_dict()["encoding"]["x"]
    assert x["scale"]["domain"] == [0, 1.0] and x["axis"]["format"] == ".1~f"
    slow = charts.seconds_per_label([{"name": "ann", "median_seconds": 7.5}]).to_dict()["encoding"]["x"]
    assert slow["scale"]["domain"] == [0, 7.5]


def test_a_win_rate_over_a_parent_shows_how_many_votes_it_rests_on():
    """One arena vote drew a bar at 1.0 that looked as sure as a thousand."""
    from labeling_ui import charts

    spec = charts.win_rate_over_parent([{"version": "v1", "parent": "base", "win_rate": 1.0, "comparisons": 1},
                                        {"version": "v2", "parent": "v1", "win_rate": 0.4, "comparisons": 120}]).to_dict()
    texts = [layer for layer in spec["layer"] if layer["mark"]["type"] == "text"]
    assert len(texts) == 1 and texts[0]["encoding"]["text"]["field"] == "votes"
    rows = next(iter(spec["datasets"].values()))
    assert [r["votes"] for r in rows] == ["n=1", "n=120"]
    # titles fit a third of the page without being cut (~25 characters; subtitles ~32, a line each)
    for chart in (spec, charts.reward_model_accuracy([{"id": 1, "run_id": 1, "purpose": "judge", "accuracy": 0.8}]).to_dict(),
                  charts.run_win_rates([{"run": 1, "status": "held", "win_rate": 0.6, "lower": 0.5, "upper": 0.7}]).to_dict()):
        assert len(chart["title"]["text"]) <= 25 and max(map(len, chart["title"]["subtitle"])) <= 32, chart["title"]


def test_a_reply_cut_off_at_its_length_limit_is_marked_under_it():
    def page():
        from labeling_ui import pair

        pair.show({"pair_id": 1, "messages": [{"role": "user", "content": "Hi"}], "first": "Whole.",
                   "second": "Runs on and", "first_cut_off": False, "second_cut_off": True})

    at = AppTest.from_function(page).run()
    assert not at.exception
    from labeling_ui.pair import CUT_OFF

    assert [c.value for c in at.caption] == [CUT_OFF]
    second = at.columns[1]
    assert [c.value for c in second.caption] == [CUT_OFF] and not at.columns[0].caption
