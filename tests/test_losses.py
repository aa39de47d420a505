"""Each vision-language loss term against a hand computation on small tensors; MLM masking; the NNS
queue; EDA; gather-with-gradient on 2 torchrun ranks equals one process on the whole batch."""

from __future__ import annotations

import math
import os
import random
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import PYTHON, REPO
from foundation.data.eda import eda, random_deletion, random_insertion, random_swap, synonyms
from foundation.losses import LOSSES
from foundation.losses.infonce import infonce, multi_view_infonce, one_way_infonce
from foundation.losses.mlm import IGNORE, mask_tokens, mlm_loss, special_token_mask
from foundation.losses.nns import NearestNeighbourQueue
from foundation.losses.simsiam import SimSiamHead, simsiam_loss

TORCHRUN = str(Path(PYTHON).parent / "torchrun")


def hand_ce(rows: list[list[float]], target: list[int]) -> float:
    """Mean cross-entropy with plain floats: -log softmax(row)[target]."""
    total = 0.0
    for row, t in zip(rows, target):
        total += -(row[t] - math.log(sum(math.exp(v) for v in row)))
    return total / len(rows)


def dot_rows(a: torch.Tensor, b: torch.Tensor, scale: float) -> list[list[float]]:
    return [[scale * sum(x * y for x, y in zip(ra.tolist(), rb.tolist())) for rb in b] for ra in a]


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_infonce_matches_hand_computation():
    img, txt, s = unit(3, 4, 0), unit(3, 4, 1), 7.5
    expected = (hand_ce(dot_rows(img, txt, s), [0, 1, 2]) + hand_ce(dot_rows(txt, img, s), [0, 1, 2])) / 2
    assert infonce(img, txt, torch.tensor(s)).item() == pytest.approx(expected, rel=1e-5)
    assert one_way_infonce(img, txt, torch.tensor(s)).item() == pytest.approx(hand_ce(dot_rows(img, txt, s), [0, 1, 2]), rel=1e-5)
    assert LOSSES["infonce"] is infonce


def test_multi_view_infonce_is_mean_of_the_four_pairs():
    i1, i2, t1, t2, s = unit(4, 5, 2), unit(4, 5, 3), unit(4, 5, 4), unit(4, 5, 5), torch.tensor(3.0)
    pairs = [infonce(i, t, s).item() for i in (i1, i2) for t in (t1, t2)]
    assert multi_view_infonce([i1, i2], [t1, t2], s).item() == pytest.approx(sum(pairs) / 4, rel=1e-6)


def test_simsiam_loss_and_stop_gradient():
    p1, z1, p2, z2 = (torch.randn(3, 4, generator=torch.Generator().manual_seed(k), requires_grad=True) for k in range(4))

    def cos(a, b):
        a, b = a.tolist(), b.tolist()
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    expected = -(sum(cos(p1[i], z2[i]) for i in range(3)) / 3 + sum(cos(p2[i], z1[i]) for i in range(3)) / 3) / 2
    loss = simsiam_loss(p1, z1, p2, z2)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert z1.grad is None and z2.grad is None  # stop-gradient on the projections
    assert p1.grad is not None and p1.grad.abs().sum() > 0
    head = SimSiamHead(8)  # DeCLIP's defaults: projector 3 x (Linear + BN), predictor 1024 -> 512 -> 1024
    linears = [m for m in head.projector if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 1024), (1024, 1024), (1024, 1024)]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in head.projector) == 3
    assert [(m.in_features, m.out_features) for m in head.predictor if isinstance(m, nn.Linear)] == [(1024, 512), (512, 1024)]
    assert not isinstance(head.predictor[-1], nn.BatchNorm1d)


SOT, EOT, MASK, ORDINARY = 49406, 49407, 49408, 49406


def token_batch(n: int = 400, length: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    tokens = torch.zeros(n, length, dtype=torch.long)
    for i in range(n):
        k = int(torch.randint(3, length - 1, (), generator=g))
        tokens[i, 0] = SOT
        tokens[i, 1 : k + 1] = torch.randint(0, 1000, (k,), generator=g)
        tokens[i, 1] = 0  # id 0 ("!") is also open_clip's padding id: a real token here, padding after EOT
        tokens[i, k + 1] = EOT
    return tokens


def test_mlm_masking_proportions_and_special_tokens():
    tokens = token_batch()
    special = special_token_mask(tokens, SOT, EOT)
    assert special[:, 0].all() and not special[:, 1].any()  # SOT special; a leading 0 before EOT is text
    masked, labels = mask_tokens(tokens, mask_id=MASK, sot_id=SOT, eot_id=EOT, num_ordinary=ORDINARY,
                                 mask_prob=0.15, generator=torch.Generator().manual_seed(1))
    selected = labels != IGNORE
    assert not (selected & special).any()  # SOT, EOT and padding are never selected
    assert torch.equal(masked[special], tokens[special])  # ... nor changed
    assert torch.equal(labels[selected], tokens[selected])
    eligible = (~special).sum().item()
    assert selected.sum().item() / eligible == pytest.approx(0.15, abs=0.015)
    n = selected.sum().item()
    to_mask = (masked == MASK) & selected
    unchanged = (masked == tokens) & selected
    assert to_mask.sum().item() / n == pytest.approx(0.8, abs=0.04)
    # random replacements: ordinary ids only; a draw can hit the original id (counted as unchanged)
    replaced = selected & ~to_mask & ~unchanged
    assert (masked[replaced] < ORDINARY).all()
    assert replaced.sum().item() / n == pytest.approx(0.1, abs=0.03)
    assert unchanged.sum().item() / n == pytest.approx(0.1, abs=0.03)
    assert ((masked == MASK) == to_mask).all()  # the mask token appears only where a token was masked


def test_mlm_loss_matches_hand_computation():
    head = nn.Linear(2, 3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        head.bias.zero_()
    features = torch.tensor([[[1.0, 2.0], [0.5, -1.0], [3.0, 0.0]]])  # (1, L=3, width=2)
    labels = torch.tensor([[IGNORE, 2, 0]])
    expected = hand_ce([[0.5, -1.0, -0.5], [3.0, 0.0, 3.0]], [2, 0])
    assert mlm_loss(features, labels, head).item() == pytest.approx(expected, rel=1e-6)
    none = mlm_loss(features, torch.full_like(labels, IGNORE), head)
    assert none.item() == 0.0 and none.requires_grad


def test_queue_fifo_order_and_nearest_neighbour():
    q = NearestNeighbourQueue(size=5, dim=2)
    assert q.nearest(torch.ones(1, 2)) is None  # empty
    angles = torch.arange(7, dtype=torch.float32) * 0.4
    vecs = torch.stack([angles.cos(), angles.sin()], dim=1) * 3.0  # normalised on push
    q.push(vecs[:2])
    q.push(vecs[2:4])
    assert torch.allclose(q.ordered(), F.normalize(vecs[:4], dim=-1))
    q.push(vecs[4:7])  # overflows by 2: the two oldest go
    assert int(q.filled) == 5 and int(q.ptr) == 2
    assert torch.allclose(q.ordered(), F.normalize(vecs[2:7], dim=-1))
    query = torch.stack([vecs[5] + 0.01, vecs[2] * 10])
    assert torch.allclose(q.nearest(query), F.normalize(vecs[[5, 2]], dim=-1))
    big = NearestNeighbourQueue(size=3, dim=2)
    big.push(vecs)  # more than fits at once: the newest 3, oldest first
    assert torch.allclose(big.ordered(), F.normalize(vecs[4:], dim=-1))
    assert set(q.state_dict()) == {"embeddings", "tags", "ptr", "filled"}  # buffers: saved with the task


def test_eda_operations():
    rng = random.Random(0)
    words = "a photo of a small red ankle boot".split()
    swapped = random_swap(words, 2, rng)
    assert sorted(swapped) == sorted(words) and swapped != words
    assert len(random_deletion(words, 0.5, rng)) < len(words)
    assert random_deletion(["one"], 0.9, rng) == ["one"]
    assert random_deletion(words, 1.0, rng)  # never empty
    for seed in range(10):
        inserted = random_insertion(words, 2, random.Random(seed))
        it = iter(inserted)
        assert all(w in it for w in words)  # the original words stay, in order: insertion moves nothing
        added = Counter(inserted) - Counter(words)
        assert sum(added.values()) == 2  # exactly two new words, each a word of the caption or its synonym
        assert set(added) <= set(words) | {s for w in words for s in synonyms(w)}
    a, b = eda("a photo of a bag", 0.2, random.Random(3)), eda("a photo of a bag", 0.2, random.Random(3))
    assert a == b  # seeded
    assert {eda("a photo of a bag", 0.2, random.Random(s)) for s in range(20)} != {"a photo of a bag"}


@pytest.mark.slow
def test_gather_with_grad_two_ranks_equals_one_process(tmp_path):
    """2 torchrun ranks (gloo), each with half the batch, local-loss InfoNCE through all_gather_with_grad,
    gradients averaged as DDP does == one process on the whole batch (checked inside the driver)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node=2", str(REPO / "tests" / "gather_driver.py"), str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-5000:])
    for rank in (0, 1):
        assert (tmp_path / f"ok.rank{rank}").read_text() == "ok"
