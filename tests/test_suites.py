"""asyncwebrl/suites.py: the MiniWoB++ suites and slices, and the WebGym task-file loader (released shapes, bad rows
reported with their line, any file in -> tasks or one typed error out)."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncwebrl import load, suites

env = load("01_env")


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
