"""FSDP2's pieces checked in one process, without torchrun (mftk/train/distributed.py): the per-rank
loss shares sum to the global loss's gradient (float64, every loss mode, router losses), the global
micro-batch is split across ranks deterministically, each rank's dropout seed and RNG loading, the
`distributed:` config section, and examples/deepseek33b/config.yaml validates."""

import copy
import os

import pytest
import torch
import yaml
from test_distributed import EXAMPLE, ROOT, tiny_raw

import mftk.train.distributed as D
from mftk.train.config import ConfigError, config_from_dict
from mftk.train.data import IGNORE, Sample
from mftk.train.loop import Trainer
from mftk.train.losses import mft_loss, router_losses
from mftk.train.packing import MultiTaskSampler
from mftk.train.statefile import save_state


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("dist_cache"))


def _simulated_ranks(monkeypatch, fn, shards):
    """Run fn(shard) for every shard as if each were a rank: a first pass records the values
    each would all-reduce, a second pass answers with their sum. returns the second pass."""
    seen = []
    monkeypatch.setattr(D, "_all_reduce", lambda t: seen.append(t.detach().double()) or t.double())
    for s in shards:
        fn(s)
    total = torch.stack(seen).sum(0)
    monkeypatch.setattr(D, "_all_reduce", lambda t: total.clone())
    return [fn(s) for s in shards]


@pytest.mark.parametrize(
    "mode", ["token", "sample", "balanced", "task_sample", "focal", "coba", "coba_eval"]
)
def test_rank_shares_sum_to_global_gradient(monkeypatch, mode):
    b, s, v, t = 5, 7, 11, 3
    logits = torch.randn(b, s, v, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (b, s))
    targets[torch.rand(b, s) < 0.3] = IGNORE
    seq = torch.arange(s).expand(b, s) // 3  # packed samples of up to 3 tokens, one task each
    task_ids = torch.randint(-1, t, (b, s)).gather(1, seq * 3)
    task_ids[:, :3] = 2  # task 2 only in ranks' first samples; task 1 absent from rows 0-1
    task_ids[:2][task_ids[:2] == 1] = 0
    weights = torch.tensor([0.5, 1.0, 2.0])
    want, _, _ = mft_loss(logits, targets, task_ids, weights, mode, 1.5, seq_ids=seq)
    (g_want,) = torch.autograd.grad(want, logits)
    rows = [slice(0, 2), slice(2, 5)]  # uneven ranks

    def share(r):
        tl = torch.nn.functional.cross_entropy(
            logits[r].reshape(-1, v), targets[r].reshape(-1), ignore_index=IGNORE, reduction="none"
        ).view(targets[r].shape)
        n = int((task_ids[r] >= 0).sum())
        return D.global_task_loss(tl, targets[r], task_ids[r], weights, mode, 1.5, n, seq[r])

    outs = _simulated_ranks(monkeypatch, share, rows)
    (g_got,) = torch.autograd.grad(sum(o[0] for o in outs), logits)
    err = (g_got - g_want).abs().max().item()
    assert err < 1e-6, f"max grad error {err:.3g}"
    assert all(abs(o[1] - want.item()) < 1e-6 for o in outs)
    assert outs[0][4] == int((task_ids >= 0).sum())


def test_router_rank_shares_sum_to_global_gradient(monkeypatch):
    n, t, layers = 13, 4, 3
    zs = [torch.randn(n, t, dtype=torch.float64, requires_grad=True) for _ in range(layers)]
    ids = torch.randint(-1, t, (n,))
    want = router_losses(zs, ids)
    total_want = want["balance"] * 0.3 + want["supervision"]
    g_want = torch.autograd.grad(total_want, zs)
    parts = [slice(0, 6), slice(6, n)]
    outs = _simulated_ranks(
        monkeypatch, lambda p: D.global_router_losses([z[p] for z in zs], ids[p]), parts
    )
    g_got = torch.autograd.grad(sum(o["balance"] * 0.3 + o["supervision"] for o in outs), zs)
    for a, b in zip(g_got, g_want):
        assert (a - b).abs().max().item() < 1e-6
    for o in outs:
        assert abs(o["balance_value"] - want["balance"].item()) < 1e-6
        assert abs(o["supervision_value"] - want["supervision"].item()) < 1e-6
        assert abs(o["accuracy"] - want["accuracy"].item()) < 1e-6


def test_rank_shard_splits_the_global_batch():
    g = torch.Generator().manual_seed(1)
    tasks = [
        [Sample(k, list(range(n)), [IGNORE] * 2 + list(range(2, n))) for n in
         torch.randint(3, 30, (20,), generator=g).tolist()]
        for k in range(3)
    ]  # fmt: skip
    one = MultiTaskSampler(tasks, 0, 64)
    ranks = [D.RankShard(MultiTaskSampler(tasks, 0, 64), r, 2) for r in range(2)]
    for _ in range(5):
        want = one.next_rows(6, 40, True)
        got = [row for sh in ranks for row in sh.next_rows(3, 40, True)]
        assert [[x.input_ids for x in row] for row in got] == [
            [x.input_ids for x in row] for row in want
        ]
    assert ranks[0].state_dict() == ranks[1].state_dict() == one.state_dict()


def test_distributed_config_section(cache_dir, tmp_path, monkeypatch):
    raw = tiny_raw(cache_dir, tmp_path)
    cfg = config_from_dict(copy.deepcopy(raw), EXAMPLE)
    assert cfg.distributed.strategy == "none" and D.trainer_class(cfg) is Trainer
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="distributed.strategy: launched on 2 processes"):
        D.trainer_class(cfg)
    bad = [
        ({"strategy": "fsdp"}, "distributed.strategy"),
        ({"backend": "mpi"}, "distributed.backend"),
        ({"activation_checkpointing": True}, "distributed.activation_checkpointing"),
        ({"strategy": "fsdp2", "mixed_precision": {"param_dtype": "fp8"}}, "param_dtype"),
        ({"strategy": "fsdp2", "mixed_precision": {"reduce_dtyp": "float32"}}, "reduce_dtype"),
    ]
    for section, where in bad:
        r = copy.deepcopy(raw)
        r["distributed"] = section
        with pytest.raises(ConfigError, match=where):
            config_from_dict(r, EXAMPLE)
    r = copy.deepcopy(raw)
    r["distributed"] = {"strategy": "fsdp2"}
    assert D.trainer_class(config_from_dict(r, EXAMPLE)) is D.DistributedTrainer


def test_deepseek33b_example_config_validates(tmp_path):
    with open(os.path.join(ROOT, "examples", "deepseek33b", "config.yaml")) as f:
        raw = yaml.safe_load(f)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    raw["model"]["path"] = str(tmp_path / "model")  # the weights are not shipped
    for t in raw["tasks"]:  # nor the data
        (tmp_path / t["name"]).mkdir()
        (tmp_path / t["name"] / "a.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
        t["data"] = str(tmp_path / t["name"] / "*.jsonl")
    cfg = config_from_dict(raw, os.path.join(ROOT, "examples", "deepseek33b"))
    d = cfg.distributed
    assert (d.strategy, d.activation_checkpointing) == ("fsdp2", True)
    assert (d.mixed_precision.param_dtype, d.mixed_precision.reduce_dtype) == (
        "bfloat16",
        "float32",
    )
    assert D.trainer_class(cfg) is D.DistributedTrainer


def test_per_rank_dropout_seeds_and_rng_loading(tmp_path):
    """Rank r's training seed is train.seed + r × RANK_SEED_STRIDE (rank 0: the one-process
    seed); loading a checkpoint's RNG, a rank with its own file restores it, a rank the
    checkpoint lacks re-seeds torch from its seed and the step instead of copying rank 0's."""
    from mftk.train import checkpointing as ckpt

    cfg = config_from_dict(tiny_raw(str(tmp_path), tmp_path / "o"), EXAMPLE)
    cfg.train.seed = 5
    ranks = []
    for r in range(3):
        t = D.DistributedTrainer.__new__(D.DistributedTrainer)  # no process group needed
        t.cfg, t.rank, t.step = cfg, r, 2
        ranks.append(t)
    assert [t.dropout_seed() for t in ranks] == [
        5,
        5 + D.RANK_SEED_STRIDE,
        5 + 2 * D.RANK_SEED_STRIDE,
    ]
    one = Trainer.__new__(Trainer)
    one.cfg = cfg
    assert one.dropout_seed() == ranks[0].dropout_seed()
    torch.manual_seed(123)
    torch.rand(7)
    saved = ckpt.rng_state()
    for r in (0, 1):
        save_state(saved, str(tmp_path / f"rng-rank{r}"))
    torch.rand(3)
    ranks[1].load_rng(str(tmp_path))  # its own file
    assert torch.equal(torch.get_rng_state(), saved["torch"])
    for ext in ("json", "safetensors"):
        (tmp_path / f"rng-rank1.{ext}").unlink()
    ranks[1].load_rng(str(tmp_path))  # none: its own stream
    got = torch.get_rng_state()
    torch.manual_seed(5 + D.RANK_SEED_STRIDE + 2)
    assert torch.equal(got, torch.get_rng_state()) and not torch.equal(got, saved["torch"])
    ranks[2].load_rng(str(tmp_path))
    assert not torch.equal(torch.get_rng_state(), got)  # ranks 1 and 2 differ too
