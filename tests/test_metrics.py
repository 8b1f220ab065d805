"""The runner's continual-learning metrics against continuum's implementation (continuum.metrics), which takes
per-sample predictions: each accuracy matrix is turned into predictions that continuum reads back."""
import numpy as np
import pytest

from clfast.experiments import metrics

cm = pytest.importorskip("continuum.metrics.metrics")

N = 40  # test samples per task: accuracies are multiples of 1/N


def _matrix(T, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, N + 1, (T, T)) / N


def _predictions(rows, task_of=None):
    """continuum's (all_preds, all_targets, all_tasks) for evaluations whose per-task accuracies are ``rows``;
    ``task_of`` renumbers the tasks (-1 drops one)."""
    T = len(rows[0])
    task_of = list(range(T)) if task_of is None else task_of
    preds, targets, tasks = [], [], []
    for row in rows:
        p, y, t = [], [], []
        for j, a in enumerate(row):
            if task_of[j] < 0:
                continue
            labels = np.full(N, j)
            right = int(round(a * N))
            p.append(np.where(np.arange(N) < right, labels, labels + 1))
            y.append(labels)
            t.append(np.full(N, task_of[j]))
        preds.append(np.concatenate(p))
        targets.append(np.concatenate(y))
        tasks.append(np.concatenate(t))
    return preds, targets, tasks


@pytest.mark.parametrize("T, seed", [(2, 0), (5, 1), (10, 2)])
def test_continuum_reads_back_the_accuracy_matrix_and_the_average_accuracy(T, seed):
    R = _matrix(T, seed)
    preds, targets, tasks = _predictions(R)
    assert [[cm._get_R_ij(i, j, preds, targets, tasks) for j in range(T)] for i in range(T)] == pytest.approx(R)
    assert metrics.average_accuracy(R) == pytest.approx(cm.accuracy(preds[-1], targets[-1]))
    for i in range(T):  # tasks seen so far: continuum's accuracy on the evaluation restricted to them
        seen = _predictions(R[i:i + 1], [j if j <= i else -1 for j in range(T)])
        assert metrics.seen_accuracy(R)[i] == pytest.approx(cm.accuracy(seen[0][0], seen[1][0]))


@pytest.mark.parametrize("T, seed", [(2, 3), (5, 4), (10, 5)])
def test_backward_transfer_is_gems_through_continuum(T, seed):
    """continuum's backward_transfer on three evaluations (after task j, any, after the last task) with only task
    j kept, as continuum's task 0, is (R[T-1][j] - R[j][j]) / 3: GEM's terms, one task at a time."""
    R = _matrix(T, seed)
    terms = []
    for j in range(T - 1):
        keep = [0 if k == j else -1 for k in range(T)]
        p, y, t = _predictions([R[j], R[j], R[-1]], keep)
        terms.append(3 * cm.backward_transfer(p, y, t))
    assert metrics.backward_transfer(R) == pytest.approx(np.mean(terms))


@pytest.mark.parametrize("T, seed", [(2, 6), (5, 7), (10, 8)])
def test_forgetting_is_chaudhrys_through_continuum(T, seed):
    """continuum 1.2.7's forgetting leaves out the last task pair; given the last evaluation twice it covers every
    pair, averaged over one task too many."""
    R = _matrix(T, seed)
    p, y, t = _predictions([*R, R[-1]])
    assert metrics.forgetting(R) == pytest.approx(cm.forgetting(p, y, t) * T / (T - 1))


@pytest.mark.parametrize("T, seed", [(2, 9), (5, 10), (10, 11)])
def test_forward_transfer_is_gems_through_continuum(T, seed):
    """R[j-1][j] and the untrained model's b[j], each read by continuum from predictions."""
    R, base = _matrix(T, seed), np.round(np.random.default_rng(seed).random(T) * N) / N
    gains = []
    for j in range(1, T):
        p, y, t = _predictions([R[j - 1], base])
        gains.append(cm._get_R_ij(0, j, p, y, t) - cm._get_R_ij(1, j, p, y, t))
    assert metrics.forward_transfer(R, base) == pytest.approx(np.mean(gains))


def test_the_release_formulas_are_what_continuum_computes():
    """What continuum 1.2.7's backward_transfer and forgetting compute from R: the published formulas without the
    last task pair. This fails when a continuum release fixes them, which is when the runner can call them."""
    for T, seed in ((3, 12), (6, 13)):
        R = _matrix(T, seed)
        p, y, t = _predictions(R)
        bwt = sum(R[i, j] - R[j, j] for i in range(1, T) for j in range(i - 1)) / (T * (T - 1) / 2)
        forget = sum(max(R[k, j] for k in range(j, T - 2)) - R[-1, j] for j in range(T - 2)) / (T - 1)
        assert cm.backward_transfer(p, y, t) == pytest.approx(bwt)
        assert cm.forgetting(p, y, t) == pytest.approx(forget)


def test_one_task_has_no_transfer_and_mean_std_is_the_sample_std():
    R = np.array([[0.7]])
    assert metrics.summary(R, [0.1]) == {"average_accuracy": 0.7, "bwt": 0.0, "forgetting": 0.0, "fwt": 0.0}
    assert metrics.mean_std([0.5]) == {"mean": 0.5, "std": 0.0, "n": 1}
    assert metrics.mean_std([0.2, 0.4, 0.9])["std"] == pytest.approx(np.std([0.2, 0.4, 0.9], ddof=1))
    assert metrics.mean_std([]) is None
