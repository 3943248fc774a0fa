"""The action grammar and its strict parser, the task suites, the WebGym loader and the screenshot store."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncwebrl import load, suites

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


def test_miniwob_suite_slices_and_out_of_distribution_split():
    tasks = suites.miniwob_tasks()
    assert len(tasks) == 130
    assert {t.difficulty for t in tasks} == {"easy", "medium", "hard"}
    train = {t.family for t in tasks if t.split == "train"}
    test = {t.family for t in tasks if t.split == "test"}
    assert train and test and not train & test  # test task types are never seen in training
    assert {t.difficulty for t in tasks if t.split == "test"} == {"easy", "medium", "hard"}
    assert suites.task_family("click-tab-2-hard") == "click-tab"
    by_name = {t.id: t for t in tasks}
    assert by_name["miniwob/click-button"].difficulty == "easy"
    assert by_name["miniwob/login-user"].difficulty == "medium"
    assert by_name["miniwob/book-flight"].difficulty == "hard"
    assert by_name["miniwob/click-button"].max_steps == 10  # k of the Easy slice
    with pytest.raises(ValueError, match="no-such-task"):
        suites.miniwob_tasks(names=["no-such-task"])


WEBGYM_ROWS = [
    {"task_id": "a1", "task_name": "Find the price of the red mug", "website": "shop.example.com",
     "difficulty": 2, "domain": "shopping", "subdomain": "kitchen",
     "evaluator_reference": [{"id": 1, "description": "price", "facts": ["$12", "red mug"]}]},
    {"task_id": "a2", "task_name": "List the opening hours", "website": "https://museum.example.org/visit",
     "difficulty": 7, "evaluator_reference": [{"id": 1, "description": "hours", "facts": ["9am OR 9:00", "5pm"]},
                                              {"id": 2, "description": "days", "facts": ["Monday"]}]},
    {"task_id": "a3", "task_name": "Legacy rubric", "website": "http://old.example.net",
     "evaluator_reference": "the answer names the author"},
]


def test_webgym_loader_reads_the_format(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in WEBGYM_ROWS) + "\n\n")
    tasks = suites.load_webgym_tasks(path)
    assert [t.id for t in tasks] == ["webgym/a1", "webgym/a2", "webgym/a3"]
    assert [t.difficulty for t in tasks] == ["easy", "hard", "medium"]  # 2 facts, 7 facts, default 5
    assert [t.split for t in tasks] == ["test"] * 3  # from the file name
    assert [t.max_steps for t in tasks] == [30, 70, 50]  # the paper's test horizons
    assert tasks[0].url == "https://shop.example.com" and tasks[0].family == "shop.example.com"
    assert tasks[1].rubric == (("9am OR 9:00", "5pm"), ("Monday",))
    assert tasks[2].rubric == (("the answer names the author",),)
    listed = tmp_path / "train.json"
    listed.write_text(json.dumps(WEBGYM_ROWS[:1]))
    assert suites.load_webgym_tasks(listed)[0].split == "train"


def test_rubric_keywords_judge():
    task = env.Task(
        id="t", url="http://x", goal="g", judge="rubric_keywords", difficulty="easy", split="train", family="x",
        rubric=(("9am OR 9:00", "5pm"), ("Monday",)))
    judge = env.JUDGES["rubric_keywords"]
    assert judge(task, "Open Monday 9:00 to 5pm", []) == 1.0
    assert judge(task, "Open Monday 9:00", []) == 0.0


@pytest.mark.parametrize("content, message", [
    ('{"task_name": "x", "evaluator_reference": ["f"]}', r"bad\.jsonl:1: field 'website'"),
    ('{"website": "a.com", "evaluator_reference": ["f"]}\n', r"bad\.jsonl:1: field 'task_name'"),
    ('{"task_name": "x", "website": "a.com"}', r"bad\.jsonl:1: field 'evaluator_reference' is missing"),
    ('{"task_name": "x", "website": "a.com", "evaluator_reference": []}', r"evaluator_reference"),
    ('{"task_name": "x", "website": "a.com", "evaluator_reference": ["f"], "difficulty": "hard"}',
     r"bad\.jsonl:1: field 'difficulty'"),
    ('\n{"task_name": "x", "website": "a.com", "evaluator_reference": [{"facts": [3]}]}', r"bad\.jsonl:2: .*fact"),
    ("{not json", r"bad\.jsonl:1: Expecting property name"),
    ("[1, 2]", r"bad\.jsonl:1: expected a JSON object"),
    ("[{]", r"bad\.jsonl: cannot read tasks"),  # a JSON list that does not parse has no rows to skip
    ('{"task_name": "x", "website": "a.com", "evaluator_reference": ' + "[" * 50000 + "\n", r"bad\.jsonl:1: nested too deeply"),
    ("", r"bad\.jsonl: no tasks"),
])
def test_bad_task_file_names_the_file_and_the_field(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(suites.TaskFileError, match=message):  # strict: the first bad row is the error
        suites.load_webgym_tasks(path, strict=True)
    with pytest.raises(suites.TaskFileError, match=r"bad\.jsonl"):  # lenient: no row loads, so still an error
        suites.load_webgym_tasks(path, warn=lambda m: None)


def test_released_shapes_load_as_the_released_loader_reads_them(tmp_path):
    rubric = [{"id": 1, "description": "hours", "facts": ["9am", "5pm"]}]
    rows = [dict(task_name="t", website="a.com", evaluator_reference=ref, difficulty=d, task_id=n)
            for n, (ref, d) in enumerate([
                (json.dumps(rubric), 2),  # the rubric stored as its JSON text (a table column)
                (rubric, "7"), (rubric, 4.9), (rubric, 0), (rubric, None), (rubric, ""),  # int(d) if d else 5
                ([{"description": "the shop opens at 9am", "difficulty": 1}], 1),  # items with a description only
                (["fact a", "fact b"], 2), ("[not json, free text]", 1), (rubric[0], 3)])]
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    tasks = suites.load_webgym_tasks(path, strict=True)
    assert [t.difficulty for t in tasks] == ["easy", "hard", "medium", "medium", "medium", "medium", "easy", "easy",
                                             "easy", "easy"]
    assert tasks[0].rubric == tasks[1].rubric == tasks[9].rubric == (("9am", "5pm"),)
    assert tasks[6].rubric == (("the shop opens at 9am",),)
    assert tasks[7].rubric == (("fact a",), ("fact b",))
    assert tasks[8].rubric == (("[not json, free text]",),)


def test_bad_rows_are_reported_with_their_line_skipped_and_counted(tmp_path):
    good = json.dumps(dict(task_name="t", website="a.com", evaluator_reference=["f"]))
    lines = [good, "{oops", good, json.dumps(dict(task_name="t", website="a.com")), "", good,
             json.dumps(dict(task_name="t", website="a.com", evaluator_reference=["f"], difficulty="hard"))]
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(lines))
    said = []
    tasks = suites.load_webgym_tasks(path, warn=said.append)
    assert [t.id for t in tasks] == ["webgym/1", "webgym/3", "webgym/6"]  # the line number stands in for task_id
    assert [m.split(": ", 1)[0] for m in said[:3]] == [f"{path}:2", f"{path}:4", f"{path}:7"]
    assert "evaluator_reference" in said[1] and "difficulty" in said[2]
    assert said[3] == f"{path}: 3 tasks loaded, 3 bad rows skipped" and len(said) == 4
    with pytest.raises(suites.TaskFileError, match=r"tasks\.jsonl:2: "):
        suites.load_webgym_tasks(path, strict=True)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                    max_leaves=12)
ROW = st.fixed_dictionaries({}, optional=dict(task_name=JSON | st.text(max_size=20), website=JSON | st.text(max_size=20),
                                              evaluator_reference=JSON, difficulty=JSON, task_id=JSON))


@settings(max_examples=300, deadline=2000)
@given(st.lists(ROW | JSON, min_size=1, max_size=5), st.booleans())
def test_any_task_file_loads_or_says_why_in_one_typed_error(tmp_path_factory, rows, as_list):
    """Adversarial rows (any JSON): every row loads as a valid Task or is reported; nothing else ever escapes."""
    path = tmp_path_factory.mktemp("tf") / "tasks.jsonl"
    path.write_text(json.dumps(rows) if as_list else "\n".join(json.dumps(r) for r in rows))
    said = []
    try:
        tasks = suites.load_webgym_tasks(path, warn=said.append)
    except suites.TaskFileError as e:
        assert str(e).startswith(str(path))
        return
    reported = [m for m in said if m.endswith("(row skipped)")]
    assert len(tasks) + len(reported) == len(rows)  # every row accounted for: loaded or reported, once
    for t in tasks:
        assert t.goal.strip() and t.url and t.difficulty in ("easy", "medium", "hard") and t.max_steps > 0
        assert t.rubric and all(group and all(isinstance(f, str) and f.strip() for f in group) for group in t.rubric)


@settings(max_examples=200, deadline=2000)
@given(st.binary(max_size=300))
def test_any_bytes_as_a_task_file_load_or_give_one_typed_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("tf") / "tasks.jsonl"
    path.write_bytes(data)
    try:
        suites.load_webgym_tasks(path, warn=lambda m: None)
    except suites.TaskFileError:
        pass


def test_missing_task_file_is_a_clear_error(tmp_path):
    with pytest.raises(suites.TaskFileError, match="nothere.jsonl"):
        suites.load_webgym_tasks(tmp_path / "nothere.jsonl")


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
