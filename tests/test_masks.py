import pytest
import torch

from compress.config import Pattern
from compress.pruning import masks


def _slow_nm(score, n, m):
    keep = torch.zeros_like(score, dtype=torch.bool)
    for r in range(score.shape[0]):
        for g in range(0, score.shape[1], m):
            order = sorted(range(m), key=lambda j: float(score[r, g + j]), reverse=True)
            for j in order[:n]:
                keep[r, g + j] = True
    return keep


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_nm_matches_slow_reference_and_counts(n, m):
    score = torch.rand(12, 64, generator=torch.Generator().manual_seed(n * 10 + m))
    keep = masks.select(score, Pattern.parse(pattern=f"{n}:{m}"))
    assert torch.equal(keep, _slow_nm(score, n, m))
    assert (keep.reshape(12, 64 // m, m).sum(-1) == n).all()


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.7, 0.93])
def test_row_scope_prunes_exact_count_per_row_lowest_first(sparsity):
    score = torch.rand(9, 50, generator=torch.Generator().manual_seed(1))
    keep = masks.select(score, Pattern(sparsity), "row")
    k = round(50 * sparsity)
    assert (keep.sum(1) == 50 - k).all()
    for r in range(9):  # every pruned weight scores at most every kept one in its row
        assert score[r][~keep[r]].max() <= score[r][keep[r]].min()


def test_matrix_scope_is_one_global_ranking():
    score = torch.rand(8, 40, generator=torch.Generator().manual_seed(2))
    score[0] *= 0.01  # row 0 is uniformly small: a global ranking prunes all of it first
    keep = masks.select(score, Pattern(0.25), "matrix")
    assert int((~keep).sum()) == 80
    assert not keep[0].any()
    assert score[~keep].max() <= score[keep].min()


@pytest.mark.parametrize("ties", [False, True])
def test_prune_lowest_selection_matches_topk_with_and_without_ties(ties):
    """The k-th-value shortcut drops exactly the k lowest of each row; ties at the threshold fall back to
    topk and still drop exactly k."""
    gen = torch.Generator().manual_seed(3)
    score = torch.randint(0, 40, (6, 300), generator=gen).float() if ties else torch.rand(6, 300, generator=gen)
    for k in (1, 150, 299):
        keep = masks.prune_lowest(score, k)
        assert (keep.sum(-1) == 300 - k).all()
        slow = torch.ones_like(keep)
        slow.scatter_(-1, torch.sort(score, dim=-1, stable=True).indices[:, :k], False)
        if not ties:
            assert torch.equal(keep, slow)
        for r in range(6):
            assert score[r][~keep[r]].max() <= score[r][keep[r]].min()
    assert not masks.prune_lowest(score, 300).any() and masks.prune_lowest(score, 0).all()


def test_nm_refuses_indivisible_columns():
    with pytest.raises(ValueError, match="divisible by 4, got 10"):
        masks.select(torch.rand(3, 10), Pattern.parse(pattern="2:4"))


@pytest.mark.parametrize("kwargs,message", [
    (dict(sparsity=1.5), "outside"), (dict(sparsity=0.0), "outside"), (dict(pattern="4:2"), "0 < N < M"),
    (dict(pattern="2-4"), "neither N:M nor gG"), (dict(sparsity=0.5, pattern="2:4"), "exactly one"), ({}, "exactly one"),
])
def test_pattern_parse_errors_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Pattern.parse(**kwargs)
