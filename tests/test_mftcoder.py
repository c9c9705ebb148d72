"""Coming from MFTCoder: its data formats rendered token for token (data.template: mftcoder), its
role checks, over-long samples dropped. Its training configs (converted key by key or refused by
name, `mftk convert-config`, `mftk train CONFIG.json`) are in test_mftcoder_config.py.

The expected token ids are built here from MFTCoder's template as its code writes it (markers
`<s>system\\n`, `<s>human\\n`, `<s>bot\\n`; every content + "\\n"; each piece tokenized on its own,
then the eos id; after a bot turn a separate "\\n" without loss), with a tokenizer trained here.
"""

import json

import pytest

from mftk.train.config import ConfigError, config_from_dict
from mftk.train.data import DROP_OVERLONG, IGNORE, build_task_data
from mftk.train.mftcoder_format import DEFAULT_MARKERS, inference_prompt
from mftk.train.records import DataError
from mftk.train.tiny_model import train_tokenizer

SYS, HUMAN, BOT = "<s>system\n", "<s>human\n", "<s>bot\n"
TEXT = [
    "def add(a, b):\n    return a + b\n",
    "<s>system\nYou are a coder\n<s>human\nWrite add\n<s>bot\n",
    "Explain the code. It adds a and b. ok\n\n",
    "instruction output question response query answer text",
] * 20
CHAT = [
    {"role": "system", "content": "You are a coder"},
    {"role": "human", "content": "Write add"},
    {"role": "bot", "content": "def add(a, b):\n    return a + b"},
    {"role": "user", "content": "Explain\xa0the code"},
    {"role": "assistant", "content": "It adds a and b."},
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXT, 300)


def expected(tok, pieces):
    """(ids, labels) of MFTCoder's pieces: (text, loss) or (None, loss) for the eos id."""
    ids, labels = [], []
    for text, loss in pieces:
        seg = [tok.eos_token_id] if text is None else tok.encode(text, add_special_tokens=False)
        ids += seg
        labels += seg if loss else [IGNORE] * len(seg)
    return ids, labels


def samples(tmp_path, tok, records, **data):
    """Every record of one mftcoder-template task as a Sample, in file order."""
    path = tmp_path / "task" / "part.jsonl"
    path.parent.mkdir(exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records * 2))
    raw = {
        "tasks": [{"name": "task", "data": str(path)}],
        "model": {"tiny": {}},
        "train": {"steps": 1},
        "data": {"template": "mftcoder", "eval_fraction": 0.5, "seq_len": 512, **data},
    }
    (td,) = build_task_data(config_from_dict(raw, str(tmp_path)), tok)
    return td, sorted(td.train + td.eval, key=lambda s: s.input_ids)


def test_multi_round_chat_equals_mftcoder_template_token_for_token(tmp_path, tok):
    _, (s, _) = samples(tmp_path, tok, [{"chat_rounds": CHAT}])
    ids, labels = expected(
        tok,
        [
            (SYS + "You are a coder\n", False),
            (HUMAN + "Write add\n" + BOT, False),
            ("def add(a, b):\n    return a + b\n", True),
            (None, True),
            ("\n", False),
            (HUMAN + "Explain the code\n" + BOT, False),  # U+00A0 becomes a space
            ("It adds a and b.\n", True),
            (None, True),
            ("\n", False),
        ],
    )
    assert s.input_ids == ids
    assert s.labels == labels
    # the same string MFTCoder's inference template (its tokenizer's chat_template) writes
    assert tok.decode(s.input_ids) == (
        "<s>system\nYou are a coder\n<s>human\nWrite add\n<s>bot\n"
        "def add(a, b):\n    return a + b\n</s>\n<s>human\nExplain the code\n<s>bot\n"
        "It adds a and b.\n</s>\n"
    )


def test_prompt_answer_with_and_without_system_and_text(tmp_path, tok):
    recs = [
        {"system": "You are a coder", "prompt": "Write add", "answer": "return a + b"},
        {"instruction": "Write add", "output": "return a + b"},
        {"text": "def add(a, b):\n    return a + b"},
    ]
    _, got = samples(tmp_path, tok, recs)
    want = [
        expected(
            tok,
            [
                (SYS + "You are a coder\n" + HUMAN + "Write add\n" + BOT, False),
                ("return a + b\n", True),
                (None, True),
            ],
        ),
        expected(
            tok, [(HUMAN + "Write add\n" + BOT, False), ("return a + b\n", True), (None, True)]
        ),
        expected(tok, [("def add(a, b):\n    return a + b\n", True), (None, True)]),
    ]
    assert sorted((s.input_ids, s.labels) for s in got[::2]) == sorted(want)
    # MFTCoder's inference prompt is the training text up to the answer
    prompt = inference_prompt("Write add", DEFAULT_MARKERS, "You are a coder")
    assert prompt + "return a + b\n</s>" in [tok.decode(s.input_ids) for s in got]


@pytest.mark.parametrize(
    "rounds",
    [
        [{"role": "human", "content": "Write add"}, {"role": "gpt", "content": "ok"}],
        [{"role": "human", "content": "Write add"}, {"role": "bot", "content": ""}],
        [
            {"role": "user", "content": "Write add"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "again"},
        ],
    ],
)
def test_roles_mftcoder_accepts(tmp_path, tok, rounds):
    td, got = samples(tmp_path, tok, [{"chat_rounds": rounds}])
    assert len(got) == 2 and not td.skipped
    assert tok.decode([t for t, lab in zip(got[0].input_ids, got[0].labels) if lab != IGNORE]) in (
        "ok\n</s>",
        "\n</s>",  # an empty bot turn still learns its newline and eos, as in MFTCoder
    )


@pytest.mark.parametrize(
    "rounds, reason",
    [
        ([{"role": "bot", "content": "hi"}], "chat_rounds[0].role: 'bot' where a human/user"),
        (
            [{"role": "human", "content": "a"}, {"role": "bot", "content": "b"}]
            + [{"role": "bot", "content": "c"}],
            "chat_rounds[2].role: 'bot' where a human/user",
        ),
        (
            [{"role": "human", "content": "a"}, {"role": "human", "content": "b"}],
            "chat_rounds[1].role: 'human' where a bot/assistant",
        ),
        (
            [{"role": "human", "content": "a"}, {"role": "system", "content": "b"}],
            "chat_rounds[1].role: 'system' only as the first turn",
        ),
        (
            [{"role": "human", "content": "a"}, {"role": "robot", "content": "b"}],
            "chat_rounds[1].role: 'robot' not supported",
        ),
        ([{"role": "human", "content": 3}], "chat_rounds[0].content must be a string"),
    ],
)
def test_roles_mftcoder_rejects_with_file_and_line(tmp_path, tok, rounds, reason):
    with pytest.raises(DataError) as err:
        samples(tmp_path, tok, [{"prompt": "a", "answer": "b"}, {"chat_rounds": rounds}])
    assert str(err.value).startswith(f"{tmp_path / 'task' / 'part.jsonl'}:2: ")
    assert reason in str(err.value)


def test_overlong_dropped_as_mftcoder_or_truncated_with_a_count(tmp_path, tok):
    long = {"prompt": "Write add", "answer": "return a + b " * 30}
    short = {"prompt": "Write add", "answer": "ok"}
    n_short = len(expected(tok, [(HUMAN + "Write add\n" + BOT, 0), ("ok\n", 1), (None, 1)])[0])
    td, got = samples(tmp_path, tok, [long, short, short], seq_len=n_short)
    assert len(got) == 4 and td.skipped == {DROP_OVERLONG: 2} and td.truncated == 0
    assert got[0].input_ids[-1] == tok.eos_token_id  # a kept sample keeps its eos
    td, got = samples(tmp_path, tok, [long, short, short], seq_len=n_short, overlong="truncate")
    assert len(got) == 6 and not td.skipped and td.truncated == 2
    assert max(len(s) for s in got) == n_short


def test_mftk_template_points_to_mftcoder_for_its_records(tmp_path, tok):
    (tmp_path / "a.jsonl").write_text(json.dumps({"system": "s", "prompt": "a", "answer": "b"}))
    raw = {"tasks": [{"name": "t", "data": "a.jsonl"}], "model": {"tiny": {}}}
    raw["train"] = {"steps": 1}
    with pytest.raises(DataError, match=r"a\.jsonl:1: missing key 'completion' \(an MFTCoder.*"):
        build_task_data(config_from_dict(raw, str(tmp_path)), tok)
    for bad, msg in [
        ({"template": "chatml"}, "data.template: 'chatml' is not one of"),
        ({"overlong": "cut"}, "data.overlong: 'cut' is not one of"),
        ({"role_markers": {"user": "U"}}, "data.role_markers: only with data.template: mftcoder"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            config_from_dict({**raw, "data": bad}, str(tmp_path))


def test_role_markers(tmp_path, tok):
    markers = {"system": "### System:\n", "user": "### Instruction:\n", "assistant": "### R:\n"}
    _, (s, _) = samples(
        tmp_path, tok, [{"prompt": "Write add", "answer": "ok"}], role_markers=markers
    )
    assert (s.input_ids, s.labels) == expected(
        tok, [("### Instruction:\nWrite add\n### R:\n", False), ("ok\n", True), (None, True)]
    )
