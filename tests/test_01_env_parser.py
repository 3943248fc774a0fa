"""01_env.py without a browser: the action grammar and its strict parser, the screenshot store, the task server."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncwebrl import load

env = load("01_env")
Action, parse_action, ActionParseError = env.Action, env.parse_action, env.ActionParseError

VALID = {
    "click(#3)": Action("click", mark=3),
    "click( 12 ,  999 )": Action("click", x=12, y=999),
    'type(#0, "hello")': Action("type", mark=0, text="hello"),
    'type("say \\"hi\\"\\n")': Action("type", text='say "hi"\n'),
    'press("Enter")': Action("press", text="Enter"),
    "scroll(down)": Action("scroll", text="down"),
    "scroll(up)": Action("scroll", text="up"),
    "go_back()": Action("go_back"),
    'answer("42 apples")': Action("answer", text="42 apples"),
    'answer("")': Action("answer", text=""),
}
INVALID = {
    "": "empty", "   ": "empty", "click": "syntax", "click(#3": "syntax", "Memory: x": "syntax",
    "jump(#1)": "unknown_action", "eval(\"1\")": "unknown_action", "click()": "bad_arguments",
    "click(#1, #2)": "bad_arguments", 'click("x")': "bad_arguments", "type(#1)": "bad_arguments",
    "go_back(1)": "bad_arguments", "click(1001, 5)": "out_of_range", "click(-1, 5)": "out_of_range",
    "scroll(left)": "out_of_range", 'press("F13")': "out_of_range", "click(#1,)": "syntax",
    "click(#1 #2)": "syntax", "click(#1) click(#2)": "syntax", "type(#1, 'x')": "syntax",
    f'answer("{"a" * 201}")': "out_of_range",
}


@pytest.mark.parametrize("text", VALID)
def test_every_grammar_form_parses_and_round_trips(text):
    action = parse_action(text)
    assert action == VALID[text]
    assert parse_action(str(action)) == action


@pytest.mark.parametrize("text", INVALID)
def test_malformed_text_gives_a_typed_error(text):
    with pytest.raises(ActionParseError) as err:
        parse_action(text)
    assert err.value.kind == INVALID[text]


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=60) | st.from_regex(r"[a-z_]{1,8}\(.{0,20}\)", fullmatch=True))
def test_parser_never_raises_anything_but_its_typed_error(text):
    try:
        action = parse_action(text)
    except ActionParseError as e:
        assert e.kind in {"empty", "syntax", "unknown_action", "bad_arguments", "out_of_range"}
    else:
        assert parse_action(str(action)) == action


actions = st.one_of(
    st.builds(lambda m: Action("click", mark=m), st.integers(0, 99)),
    st.builds(lambda x, y: Action("click", x=x, y=y), st.integers(0, 1000), st.integers(0, 1000)),
    st.builds(lambda m, t: Action("type", mark=m, text=t), st.integers(0, 99), st.text(max_size=env.MAX_TEXT)),
    st.builds(lambda t: Action("type", text=t), st.text(max_size=env.MAX_TEXT)),
    st.builds(lambda k: Action("press", text=k), st.sampled_from(sorted(env.KEYS))),
    st.builds(lambda d: Action("scroll", text=d), st.sampled_from(["up", "down"])),
    st.just(Action("go_back")),
    st.builds(lambda t: Action("answer", text=t), st.text(max_size=env.MAX_TEXT)))


@settings(max_examples=300, deadline=None)
@given(actions)
def test_any_action_round_trips_through_its_text(action):
    assert parse_action(str(action)) == action


def test_screenshot_store_deduplicates_and_frees():
    store = env.ScreenshotStore()
    a = store.put("ep1", b"x" * 1000)
    assert store.put("ep1", b"x" * 1000) == a  # an unchanged page is stored once per episode
    b = store.put("ep1", b"y" * 500)
    c = store.put("ep2", b"x" * 1000)
    assert len({a, b, c}) == 3 and store.nbytes == 2500
    assert sorted(store.keys("ep1")) == sorted([a, b]) and store.get(b) == b"y" * 500
    assert store.free("ep1") == 1500
    assert store.nbytes == 1000 and len(store) == 1
    with pytest.raises(KeyError):
        store.get(a)
    assert store.free("ep2") == 1000 and store.nbytes == 0 and store.free("ep2") == 0


def test_task_server_is_quiet_when_a_page_hangs_up_but_not_on_real_errors(capsys):
    """A browser page closed mid-download (BrokenPipe) is routine: no traceback in the training log. Other
    errors in a request still print."""
    with env.TaskServer() as server:
        for error, printed in ((BrokenPipeError(32, "Broken pipe"), False), (ValueError("bug"), True)):
            try:
                raise error
            except Exception:
                server._httpd.handle_error(None, ("127.0.0.1", 1))
            assert (type(error).__name__ in capsys.readouterr().err) == printed
