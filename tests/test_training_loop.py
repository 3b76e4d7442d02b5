"""The pieces every training loop shares (pipeline/training/loop.py), and the benchmark suite timing the fit loop's own
step rather than a copy of it. Fast: tiny heads, no stores."""

from __future__ import annotations

import pytest
import torch

from pipeline.tools.bench import _bench_head, _train_step
from pipeline.training.distributed import pair_encoder
from pipeline.training.fit import FitStep
from pipeline.training.loop import BestEpoch, TrainConfig, TrainingError, build_scheduler, train_epoch

DIMS = {"image": 6, "text": 5}
SMALL_UP = {"width": 16, "blocks": 1, "heads": 2}


def _batch(seed: int) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(4, 3, DIMS["image"], generator=gen), torch.ones(4, 3, dtype=torch.bool)
    text = torch.randn(4, 2, DIMS["text"], generator=gen), torch.ones(4, 2, dtype=torch.bool)
    return image, text


def test_the_bench_step_is_the_fit_loop_step(one_thread):
    bench_head = _bench_head(DIMS, "cpu", SMALL_UP)
    model, loss_fn, optimizer = _bench_head(DIMS, "cpu", SMALL_UP)  # same seed: the same weights
    scheduler = build_scheduler(optimizer, TrainConfig(), total_steps=2)
    step = FitStep(pair_encoder(model, "image", "text", "cpu"), loss_fn, optimizer, "cpu", scheduler=scheduler)
    for seed in (1, 2):
        torch.manual_seed(seed)  # the same dropout masks for both
        _train_step(bench_head, _batch(seed), "cpu")
        torch.manual_seed(seed)
        step(_batch(seed), 4, f"at step {seed}")
    for ours, theirs in ((bench_head[0], model), (bench_head[1], loss_fn)):
        theirs_state = theirs.state_dict()
        assert all(torch.equal(v, theirs_state[k]) for k, v in ours.state_dict().items())
    assert bench_head[2].param_groups[0]["betas"] == optimizer.param_groups[0]["betas"] == (0.9, 0.95)


def test_the_bench_step_stops_on_a_non_finite_loss_like_the_fit_loop(one_thread):
    head = _bench_head(DIMS, "cpu", SMALL_UP)
    before = {k: v.clone() for k, v in head[0].state_dict().items()}
    (image, mask), text = _batch(0)
    image[0, 0, 0] = float("nan")
    with pytest.raises(TrainingError, match="loss became nan"):
        _train_step(head, ((image, mask), text), "cpu")
    assert all(torch.equal(before[k], v) for k, v in head[0].state_dict().items())  # the weights are untouched


def test_train_epoch_weights_the_mean_by_batch_size_and_names_the_failing_step():
    seen = []

    def step(batch: tuple[float, int], where: str) -> tuple[float, int]:
        seen.append(where)
        if batch[0] != batch[0]:
            raise TrainingError(f"loss became nan {where}")
        return batch

    assert train_epoch([(1.0, 3), (3.0, 1)], step, "at epoch 2") == pytest.approx(1.5)
    assert seen == ["at epoch 2, step 1", "at epoch 2, step 2"]
    with pytest.raises(TrainingError, match="at epoch 5, step 2$"):
        train_epoch([(1.0, 3), (float("nan"), 1)], step, "at epoch 5")


def test_best_epoch_keeps_the_first_of_equal_scores():
    best = BestEpoch()
    assert [best.offer(score, epoch) for epoch, score in enumerate([0.5, 0.7, 0.7, 0.6], 1)] == [True, True, False,
                                                                                                  False]
    assert (best.epoch, best.score) == (2, 0.7)


def test_best_epoch_with_a_tolerance_keeps_the_latest_epoch_within_it_of_the_best():
    # mean-rank-1se: scores are minus the mean rank, the tolerance is the best epoch's standard error.
    best = BestEpoch()
    offers = [(-3.0, 0.5), (-2.0, 0.3), (-2.2, 0.4), (-2.4, 0.2), (-2.3, 0.1), (-2.0, 0.0)]
    kept = [best.offer(score, epoch, tolerance) for epoch, (score, tolerance) in enumerate(offers, 1)]
    # Epoch 3 is within 0.3 of epoch 2's -2.0, epoch 4 is not; epoch 5 is, against epoch 2's tolerance, not its own.
    assert kept == [True, True, True, False, True, True] and best.epoch == 6  # a tie keeps the later epoch
    assert (best.score, best.tolerance) == (-2.0, 0.3)  # the best itself stays epoch 2's
