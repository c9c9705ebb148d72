"""Tasks read through Hugging Face `datasets` specs over local files (mftk.train.hf_data): the
config keys and their errors, the same rendering as file records (jsonl / csv / parquet, the mftk
and mftcoder templates), located row errors, streaming that reads only the rows training draws
(an IterableDataset), the stream's resumable position, and short training runs."""

import copy
import json
import os

import pytest
import yaml

pytest.importorskip("datasets")
import datasets  # noqa: E402
import pandas as pd  # noqa: E402

import mftk.train.hf_data as hf_data  # noqa: E402
from mftk.train.config import ConfigError, config_from_dict  # noqa: E402
from mftk.train.data import DataError, SampleStream, build_task_data, load_examples  # noqa: E402
from mftk.train.loop import Trainer  # noqa: E402
from mftk.train.tiny_model import train_tokenizer  # noqa: E402

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "tiny")
PAIRS = [{"prompt": f"def f{i}(x):\n", "completion": f"    return x + {i}\n"} for i in range(30)]
CHATS = [
    {
        "chat_rounds": [
            {"role": "system", "content": "You document code."},
            {"role": "human", "content": f"def g{i}(): pass"},
            {"role": "bot", "content": f"Return nothing ({i})."},
        ]
    }
    for i in range(12)
]


@pytest.fixture(scope="module")
def tok():
    text = [json.dumps(r) for r in PAIRS + CHATS] * 3 + ["<s>human\n<s>bot\n<s>system\n"]
    return train_tokenizer(text, 300)


def write(path, records, fmt):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif fmt == "parquet":
        pd.DataFrame(records).to_parquet(path)
    else:
        pd.DataFrame(records).to_csv(path, index=False)
    return str(path)


def cfg_of(tmp_path, tasks, stages=None, **data):
    raw = {
        "tasks": tasks,
        "model": {"tiny": {}},
        "train": {"steps": 1},
        "data": {"eval_fraction": 0.2, "eval_max_samples": 4, **data},
    }
    if stages is not None:
        raw["stages"] = stages
    return config_from_dict(raw, str(tmp_path))


def spec(files, source, **kw):
    return {"source": source, "data_files": files, "cache_dir": "hf_cache", **kw}


def segments(parts):
    return [[(ex.segments, ex.label) for ex in exs] for exs in parts]


@pytest.mark.parametrize("template", ["mftk", "mftcoder"])
def test_rows_render_as_file_records(tmp_path, template):
    tasks = []
    for fmt, source in (("jsonl", "json"), ("parquet", "parquet"), ("csv", "csv")):
        f = write(tmp_path / f"pairs.{fmt}", PAIRS, fmt)
        tasks.append({"name": f"pairs_{fmt}", "data": spec(f, source)})
    for fmt, source in (("jsonl", "json"), ("parquet", "parquet")):
        f = write(tmp_path / f"chats.{fmt}", CHATS, fmt)
        tasks.append({"name": f"chats_{fmt}", "data": spec(f, source)})
    tasks.append({"name": "pairs_file", "data": "pairs.jsonl"})
    tasks.append({"name": "chats_file", "data": "chats.jsonl"})
    cfg = cfg_of(tmp_path, tasks, template=template)
    trains, evals, _ = load_examples(cfg, "<s>", "</s>")
    # the task index (the split's seed) differs: compare the rows' rendering, sorted
    every = [sorted(map(repr, tr + ev)) for tr, ev in zip(segments(trains), segments(evals))]
    assert every[0] == every[1] == every[2] == every[5]
    assert every[3] == every[4] == every[6]
    assert len(evals[0]) == 4 and len(trains[0]) == 26  # data.eval_max_samples of 30 * 0.2
    assert trains[1][0].where.startswith("tasks[1].data (parquet split 'train'):row ")


def test_errors_name_the_row(tmp_path):
    rows = PAIRS[:5] + [{"prompt": "p", "completion": ""}] + PAIRS[5:9]
    f = write(tmp_path / "bad.parquet", rows, "parquet")
    cfg = cfg_of(tmp_path, [{"name": "t", "data": spec(f, "parquet")}])
    with pytest.raises(DataError, match=r"^tasks\[0\]\.data \(parquet split 'train'\):row 5: "):
        load_examples(cfg, "<s>", "</s>")
    cfg = cfg_of(tmp_path, [{"name": "t", "data": spec(f, "parquet")}], skip_bad_lines=True)
    trains, evals, skipped = load_examples(cfg, "<s>", "</s>")
    assert len(trains[0]) + len(evals[0]) == 9 and skipped[0] == {"empty 'completion'": 1}
    f = write(tmp_path / "keys.jsonl", [{"prompt": "p", "answer": "a"}] * 3, "jsonl")
    cfg = cfg_of(tmp_path, [{"name": "t", "data": spec(f, "json", streaming=True)}], [_mix("t")])
    with pytest.raises(DataError, match=r"split 'train'\):row 0: missing key 'completion'"):
        load_examples(cfg, "<s>", "</s>")
    (tmp_path / "broken.jsonl").write_text(json.dumps(PAIRS[0]) + "\n{not json\n")
    cfg = cfg_of(tmp_path, [{"name": "t", "data": spec("broken.jsonl", "json")}])
    with pytest.raises(DataError, match=r"^tasks\[0\]\.data \(json split 'train'\): cannot load"):
        load_examples(cfg, "<s>", "</s>")


def _mix(*names, steps=1):
    return {"steps": steps, "mix": {n: 1 for n in names}}


def test_config_errors_name_the_key(tmp_path):
    f = write(tmp_path / "a.jsonl", PAIRS, "jsonl")

    def err(task, match, stages=None, **top):
        raw = {"tasks": [{"name": "t", **task}], "model": {"tiny": {}}, "train": {"steps": 1}}
        raw.update(stages=stages or [_mix("t")], **top)
        with pytest.raises(ConfigError, match=match):
            config_from_dict(raw, str(tmp_path))

    err({"data": {"sourc": "json", "data_files": f}}, r"^tasks\[0\]\.data\.sourc: unknown key; "
        "did you mean 'source'")  # fmt: skip
    err({"data": {"data_files": f}}, r"^tasks\[0\]\.data\.source: required key is missing")
    err({"data": spec(f, "bigcode/the-stack")}, r"^tasks\[0\]\.data\.source: 'bigcode")
    err({"data": spec(["a.jsonl", "no/*.jsonl"], "json")}, r"^tasks\[0\]\.data\.data_files\[1\]")
    err({"data": spec({"train": f}, "json", split="test")}, r"^tasks\[0\]\.data\.split: 'test'")
    err({"data": spec(f, "json", eval_split="validation")}, r"^tasks\[0\]\.data\.eval_split: ne")
    err({"data": spec(f, "json"), "format": "csv"}, r"^tasks\[0\]\.format: csv reads files")
    err({"data": spec(f, "json", shuffle_buffer=-1)}, r"^tasks\[0\]\.data\.shuffle_buffer")
    stream = {"data": spec(f, "json", streaming=True)}
    mix = r"^stages\[0\]\.mix: a streamed dataset \(tasks\[0\]\.data\.streaming: true\)"
    err(stream, mix, [{"steps": 1}])
    err(stream, r"^train\.epochs: a streamed", [{"steps": 0}], train={"epochs": 1})
    err(stream, r"^output\.save_every_epoch", output={"save_every_epoch": True})
    err(stream, r"^stages\[0\]\.noise_kind: swap_answer", [{**_mix("t"), "noise": 0.1}],
        data={"noise_kind": "swap_answer"})  # fmt: skip
    classify = {"type": "classify", "labels": ["a", "b"], **stream}
    err(classify, r"^tasks\[0\]\.data\.streaming: not for a classify task")
    cfg = config_from_dict(
        {"tasks": [{"name": "t", "data": spec({"train": "a.jsonl", "dev": f}, "json",
                                              eval_split="dev")}],
         "model": {"tiny": {}}, "train": {"steps": 1}}, str(tmp_path))  # fmt: skip
    assert cfg.tasks[0].data.data_files == {"train": [f], "dev": [f]}
    assert cfg.tasks[0].data.cache_dir == str(tmp_path / "hf_cache")


class Counting:
    """An IterableDataset's rows, counted as they are read."""

    def __init__(self, ds):
        self.ds, self.read = ds, 0

    def __iter__(self):
        for row in self.ds:
            self.read += 1
            yield row


def streamed(tmp_path, monkeypatch, tok, n_rows=5000, buffer=50, **kw):
    rows = [{"prompt": f"def f{i}(x):\n", "completion": f"    return {i}\n"} for i in range(n_rows)]
    f = write(tmp_path / "big.parquet", rows, "parquet")
    opened = []

    def load(task, index, split):
        ds = real(task, index, split)
        opened.append(Counting(ds))
        return opened[-1]

    real = hf_data.load_split
    monkeypatch.setattr(hf_data, "load_split", load)
    data = spec(f, "parquet", streaming=True, shuffle_buffer=buffer)
    cfg = cfg_of(tmp_path, [{"name": "big", "data": data}], [_mix("big")], **kw)
    (td,) = build_task_data(cfg, tok)
    return td, opened


def answer(tok, smp):
    return tok.decode([t for t, lab in zip(smp.input_ids, smp.labels) if lab != -100])


def test_streaming_reads_only_what_training_draws(tmp_path, monkeypatch, tok):
    td, (counter,) = streamed(tmp_path, monkeypatch, tok)
    assert isinstance(counter.ds, datasets.IterableDataset)
    assert isinstance(td.train, SampleStream) and len(td.eval) == 4
    assert [answer(tok, s) for s in td.eval] == [f"    return {i}\n</s>" for i in range(4)]
    read_at_setup = counter.read
    assert read_at_setup < 200  # eval rows, then one chunk checked: not the 5000
    for _ in range(100):
        td.train.next()
    assert counter.read - read_at_setup < 300  # 100 samples: their chunks and the buffer


def test_stream_passes_are_shuffled_complete_and_resumable(tmp_path, monkeypatch, tok):
    td, _ = streamed(tmp_path, monkeypatch, tok, n_rows=150, buffer=20)
    stream = td.train
    first = [answer(tok, stream.next()) for _ in range(146)]  # one pass: rows 4..149
    assert sorted(first) == sorted(f"    return {i}\n</s>" for i in range(4, 150))
    assert first != sorted(first, key=lambda a: int(a.split()[1]))  # shuffled
    second = [answer(tok, stream.next()) for _ in range(146)]
    assert sorted(second) == sorted(first) and second != first  # a new order each pass
    for k in (0, 1, 63, 64, 100, 146, 200):
        fresh, _ = streamed(tmp_path, monkeypatch, tok, n_rows=150, buffer=20)
        for _ in range(k):
            fresh.train.next()
        state = json.loads(json.dumps(fresh.train.state_dict()))
        again, _ = streamed(tmp_path, monkeypatch, tok, n_rows=150, buffer=20)
        again.train.load_state_dict(state)
        assert [answer(tok, again.train.next()) for _ in range(20)] == (first + second)[k : k + 20]


def raw_run(tmp_path, data_spec, steps=6, **over):
    with open(os.path.join(EXAMPLE, "config.yaml")) as f:
        raw = yaml.safe_load(f)
    raw["tasks"] = raw["tasks"][:2] + [{"name": "big", "data": data_spec}]
    raw["model"]["pretrain"]["steps"] = 10
    raw["model"]["cache_dir"] = str(tmp_path / "cache")
    raw["data"]["eval_max_samples"] = 6
    raw["train"].update(eval_every=3, log_every=100, warmup_steps=0, threads=1, batch_size=3)
    raw["stages"] = [{"name": "s", "steps": steps, "mix": {"completion": 1, "bugs": 1, "big": 2}}]
    raw["output"] = {"dir": str(tmp_path / "out"), "save_every": 3}
    raw.update(over)
    return raw


def train(raw, **kw):
    cfg = config_from_dict(copy.deepcopy(raw), EXAMPLE)
    return Trainer(cfg, progress=False, log=lambda m: None, **kw).train()


def test_training_from_a_stream_resumes_exactly(tmp_path):
    rows = [
        {"prompt": f"def h{i}(y):\n", "completion": f"    return y * {i}\n"} for i in range(400)
    ]
    data = spec(write(tmp_path / "s.parquet", rows, "parquet"), "parquet", streaming=True)
    data["cache_dir"] = str(tmp_path / "hf_cache")
    full = train(raw_run(tmp_path / "a", data))
    assert full["samples"]["big"] == {"train": None, "eval": 6}
    assert full["eval_after"]["big"] < full["eval_before"]["big"]
    raw = raw_run(tmp_path / "b", data)
    train(raw, max_steps=4)
    resumed = train(raw, resume=True)
    assert resumed["resumed_from"].endswith("step-000004")
    assert resumed["history"]["loss"] == full["history"]["loss"]
    assert resumed["eval_after"] == full["eval_after"]


def test_training_from_a_loaded_dataset(tmp_path):
    rows = [{"prompt": f"def h{i}(y):\n", "completion": f"    return y * {i}\n"} for i in range(60)]
    files = {"train": write(tmp_path / "t.jsonl", rows[:50], "jsonl"),
             "validation": write(tmp_path / "v.jsonl", rows[50:], "jsonl")}  # fmt: skip
    data = spec(files, "json", eval_split="validation")
    data["cache_dir"] = str(tmp_path / "hf_cache")
    metrics = train(raw_run(tmp_path, data, steps=3))
    assert metrics["samples"]["big"] == {"train": 50, "eval": 6}  # eval_split's first 6 rows
    assert metrics["eval_after"]["big"] < metrics["eval_before"]["big"]
