"""Data formats (prompt/completion jsonl, chat_rounds, csv), loss masking, malformed lines."""

import json

import pytest

from mftk.train.config import config_from_dict
from mftk.train.data import IGNORE, DataError, build_task_data, load_examples, split_eval, tokenize
from mftk.train.tiny_model import train_tokenizer

TEXT = [
    "def add(a, b):\n    return a + b\n",
    "<s>human\nWrite a docstring\n<s>bot\n",
    "Is there a bug?",
    "Return the sum of a and b.",
    "system user assistant ok bug: off by one",
    "code verdict",
] * 20


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXT, 300)


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def make_cfg(tmp_path, tasks, **data):
    return config_from_dict(
        {
            "tasks": tasks,
            "model": {"tiny": {}},
            "train": {"steps": 1},
            "data": {"eval_fraction": 0.3, **data},
        },
        str(tmp_path),
    )


def decode_loss_part(tok, sample):
    return tok.decode([t for t, lab in zip(sample.input_ids, sample.labels) if lab != IGNORE])


def test_prompt_completion_masks_prompt(tmp_path, tok):
    write_jsonl(
        tmp_path / "a.jsonl",
        [{"prompt": f"def add(a, b):\n    {i}", "completion": "return a + b"} for i in range(5)],
    )
    cfg = make_cfg(tmp_path, [{"name": "gen", "data": "a.jsonl"}])
    (td,) = build_task_data(cfg, tok)
    assert len(td.train) + len(td.eval) == 5
    for s in td.train + td.eval:
        assert s.input_ids[0] == tok.bos_token_id and s.labels[0] == IGNORE
        assert s.input_ids[-1] == tok.eos_token_id and s.labels[-1] == tok.eos_token_id
        assert decode_loss_part(tok, s) == "return a + b</s>"
        n_prompt = len(tok("<s>" + "def add(a, b):\n    0", add_special_tokens=False)["input_ids"])
        assert all(lab == IGNORE for lab in s.labels[:n_prompt])
        assert [x for x, lab in zip(s.input_ids, s.labels) if lab != IGNORE] == [
            lab for lab in s.labels if lab != IGNORE
        ]


def test_chat_rounds_only_bot_turns_carry_loss(tmp_path, tok):
    recs = [
        {
            "chat_rounds": [
                {"role": "system", "content": "be brief"},
                {"role": "human", "content": "Write a docstring"},
                {"role": "bot", "content": "Return the sum."},
                {"role": "human", "content": "again"},
                {"role": "bot", "content": "ok"},
            ]
        },
        {
            "chat_rounds": [
                {"role": "user", "content": "Write a docstring"},
                {"role": "assistant", "content": "Return a."},
            ]
        },
    ] * 2
    write_jsonl(tmp_path / "c.jsonl", recs)
    cfg = make_cfg(
        tmp_path, [{"name": "doc", "data": "c.jsonl", "format": "chat_rounds"}], eval_fraction=0.25
    )
    trains, evals, _ = load_examples(cfg, "<s>", "</s>")
    samples, dropped = tokenize(trains[0] + evals[0], tok, 256)
    assert dropped == 0
    by_text = {tok.decode(s.input_ids): s for s in samples}
    two = by_text[
        "<s>system\nbe brief\n<s>human\nWrite a docstring\n<s>bot\nReturn the sum.</s>"
        "<s>human\nagain\n<s>bot\nok</s>"
    ]
    assert decode_loss_part(tok, two) == "Return the sum.</s>ok</s>"
    one = by_text["<s>human\nWrite a docstring\n<s>bot\nReturn a.</s>"]
    assert decode_loss_part(tok, one) == "Return a.</s>"


def test_chat_rounds_gpt_role_is_bot(tmp_path, tok):
    recs = [{"chat_rounds": [{"role": "human", "content": "a"}, {"role": "gpt", "content": "ok"}]}]
    write_jsonl(tmp_path / "c.jsonl", recs * 2)
    cfg = make_cfg(tmp_path, [{"name": "doc", "data": "c.jsonl"}], eval_fraction=0.5)
    trains, evals, _ = load_examples(cfg, "<s>", "</s>")
    assert trains[0][0].segments == [
        ("<s>human\na\n", False),
        ("<s>bot\n", False),
        ("ok</s>", True),
    ]


def test_csv_template_and_columns(tmp_path, tok):
    (tmp_path / "b.csv").write_text(
        'code,verdict\n"def f(a):\n    return a",ok\nx,bug: off by one\ny,ok\n'
    )
    cfg = make_cfg(
        tmp_path,
        [
            {
                "name": "bugs",
                "data": "*.csv",
                "prompt_template": "Is there a bug?\n{code}\n",
                "completion": "verdict",
            }
        ],
    )
    trains, evals, _ = load_examples(cfg, "<s>", "</s>")
    exs = sorted(trains[0] + evals[0], key=lambda e: e.where)
    assert [e.where.rsplit(":", 1)[1] for e in exs] == ["2", "4", "5"]  # line of each record start
    assert exs[0].segments == [
        ("<s>Is there a bug?\ndef f(a):\n    return a\n", False),
        ("ok</s>", True),
    ]
    cfg2 = make_cfg(
        tmp_path, [{"name": "bugs", "data": "*.csv", "prompt": "code", "completion": "verdict"}]
    )
    tr2, ev2, _ = load_examples(cfg2, "", "</s>")
    assert sorted(e.segments[0][0] for e in tr2[0] + ev2[0]) == [
        "def f(a):\n    return a",
        "x",
        "y",
    ]


@pytest.mark.parametrize(
    "line, reason",
    [
        ('{"prompt": "a", "completion": ', "invalid JSON"),
        ('["a", "b"]', "expected a JSON object"),
        ('{"prompt": "a"}', "missing key 'completion'"),
        ('{"prompt": "a", "completion": 3}', "'completion' must be a string"),
        ('{"prompt": "a", "completion": "  "}', "empty 'completion'"),
        ('{"chat_rounds": [{"role": "robot", "content": "x"}]}', "chat_rounds[0].role: 'robot'"),
        ('{"chat_rounds": [{"role": "human", "content": "x"}]}', "no bot/assistant turn"),
        ('{"chat_rounds": "hi"}', "'chat_rounds' must be a non-empty list"),
    ],
)
def test_malformed_jsonl_line_reported_with_file_and_line(tmp_path, tok, line, reason):
    good = json.dumps({"prompt": "a", "completion": "b"})
    write_jsonl(tmp_path / "a.jsonl", [good, good, "", line, good])
    cfg = make_cfg(tmp_path, [{"name": "gen", "data": "a.jsonl"}])
    with pytest.raises(DataError) as e:
        load_examples(cfg, "<s>", "</s>")
    assert str(e.value).startswith(f"{tmp_path / 'a.jsonl'}:4: ")
    assert reason in str(e.value)
    cfg = make_cfg(tmp_path, [{"name": "gen", "data": "a.jsonl"}], skip_bad_lines=True)
    trains, evals, skipped = load_examples(cfg, "<s>", "</s>")
    assert len(trains[0]) + len(evals[0]) == 3 and sum(skipped[0].values()) == 1


def test_malformed_csv(tmp_path):
    (tmp_path / "b.csv").write_text("code,verdict\nx,ok\ny,ok,extra\nz,\nw,ok\n")
    cfg = make_cfg(
        tmp_path, [{"name": "bugs", "data": "b.csv", "prompt": "code", "completion": "verdict"}]
    )
    with pytest.raises(DataError, match=r"b\.csv:3: expected 2 fields, got 3"):
        load_examples(cfg, "", "</s>")
    cfg = make_cfg(
        tmp_path,
        [{"name": "bugs", "data": "b.csv", "prompt": "code", "completion": "verdict"}],
        skip_bad_lines=True,
    )
    trains, evals, skipped = load_examples(cfg, "", "</s>")
    assert len(trains[0]) + len(evals[0]) == 2 and sum(skipped[0].values()) == 2
    bad = make_cfg(
        tmp_path, [{"name": "bugs", "data": "b.csv", "prompt": "source", "completion": "verdict"}]
    )
    with pytest.raises(DataError, match=r"b\.csv:1: missing column 'source'"):
        load_examples(bad, "", "</s>")


def test_unreadable_or_empty_files(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"prompt": "\xff\xfe", "completion": "x"}\n')
    cfg = make_cfg(tmp_path, [{"name": "gen", "data": "a.jsonl"}])
    with pytest.raises(DataError, match=r"a\.jsonl: not UTF-8 text"):
        load_examples(cfg, "", "</s>")
    write_jsonl(tmp_path / "a.jsonl", ["", '{"prompt": 1}'])
    cfg = make_cfg(tmp_path, [{"name": "gen", "data": "a.jsonl"}], skip_bad_lines=True)
    with pytest.raises(DataError, match=r"tasks\[0\] \(gen\): no usable records"):
        load_examples(cfg, "", "</s>")
    (tmp_path / "e.csv").write_text("")
    cfg = make_cfg(tmp_path, [{"name": "b", "data": "e.csv"}])
    with pytest.raises(DataError, match=r"e\.csv:1: empty csv file"):
        load_examples(cfg, "", "</s>")


def test_truncation_drops_samples_without_answer(tmp_path, tok):
    write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"prompt": "def add(a, b): " * 20, "completion": "ok"},
            {"prompt": "a", "completion": "return a + b"},
            {"prompt": "b", "completion": "ok"},
        ],
    )
    cfg = make_cfg(tmp_path, [{"name": "gen", "data": "a.jsonl"}], seq_len=16)
    trains, evals, _ = load_examples(cfg, "<s>", "</s>")
    samples, dropped = tokenize(trains[0] + evals[0], tok, 16)
    assert dropped == 1 and len(samples) == 2 and all(len(s) <= 16 for s in samples)


def test_split_is_deterministic_and_disjoint():
    items = list(range(50))
    tr, ev = split_eval(items, 0.2, 100, seed=3)
    assert len(ev) == 10 and sorted(tr + ev) == items
    assert split_eval(items, 0.2, 100, seed=3) == (tr, ev)
    assert (
        split_eval(items, 0.2, 4, seed=3)[1] != ev
        and len(split_eval(items, 0.2, 4, seed=3)[1]) == 4
    )
    with pytest.raises(ValueError, match="at least 2 records"):
        split_eval([1], 0.5, 10, 0)
