"""The training recipe's extras: EMA of the weights, gradient clipping, early stopping (docs/recipes.md).

In-process checks against hand computations (fp64), clipping with accumulation under DDP on 2 real gloo
ranks against a 1-process reference, then one uninterrupted 2-rank run under torchrun with all three on
(EMA with warm-up every 2 steps evaluated, clipping that clips, accumulation, an early stop after
epoch 3 of 5), which a SIGTERM + ``resume=auto`` run and a run resumed from the middle of epoch 3 (its
early-stop counter at 1) must repeat bit for bit; eval, predict and demo read either weights of it.
"""

from __future__ import annotations

import copy
import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddp_train.commands.demo import info_html, run_info
from ddp_train.config import ConfigError, load_config
from ddp_train.persistence.weights import WeightsError, load_trained
from ddp_train.training.clipping import GradClip
from ddp_train.training.ema import ModelEma
from ddp_train.training.engine import StepOptions, train_step
from ddp_train.training.stopping import EarlyStopping

from .helpers import TINY, assert_ok, run_cli, spawn


@pytest.mark.parametrize("override, message", [
    ("train.ema_decay=1", "train.ema_decay: expected 0 (off) or a number in (0, 1)"),
    ("train.ema_decay=-0.5", "train.ema_decay: expected 0 (off) or a number in (0, 1)"),
    ("train.ema_every_steps=0", "train.ema_every_steps: expected an integer >= 1"),
    ("train.eval_weights=ema", "train.eval_weights: expected trained unless train.ema_decay > 0"),
    ("train.clip_grad_norm=0", "train.clip_grad_norm: expected null (off) or a number > 0"),
    ("train.clip_grad_norm=.inf", "train.clip_grad_norm: expected a finite number"),
    ("train.early_stop_patience=-1", "train.early_stop_patience: expected an integer >= 0"),
    ("train.early_stop_min_delta=-0.1", "train.early_stop_min_delta: expected a number >= 0"),
    ("train.early_stop_metric=acc", "train.early_stop_metric: expected one of valid_loss, valid_acc"),
    ("train.early_stop_patience=1.5", "train.early_stop_patience: expected an integer"),
    ("train.ema_warmup=maybe", "train.ema_warmup: expected true or false"),
    ("train.eval_weights=best", "train.eval_weights: expected one of trained, ema"),
])
def test_recipe_keys_refuse_bad_values_with_one_line(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("scaled", [False, True])
def test_clipping_runs_once_per_step_on_the_whole_batch_gradient(scaled):
    """4 micro-batches per step: one clipping per step, of the whole batch's gradient (a hand computation
    in fp64: plain SGD on the clipped full-batch gradient); clipping each micro-batch would differ.
    ``scaled``: under a loss scaler (fp16's, here on fp64: a power of two scales exactly) the gradient is
    unscaled before it is measured and clipped, so the step is the same as without one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).double()  # no BN: micro-batches sum to the batch gradient
    hand = copy.deepcopy(model)
    x, y = torch.randn(8, 3, 2, 2, dtype=torch.float64), torch.randint(0, 5, (8,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    clip = GradClip(0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=scaled)
    norms = []
    for _ in range(3):
        train_step(model, x, y, optimizer, StepOptions(torch.float64, 0.0, scaler, micro_batch_size=2, clip=clip))
        grads = torch.autograd.grad(F.cross_entropy(hand(x), y), list(hand.parameters()))
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        norms.append(float(norm))
        with torch.no_grad():
            for p, g in zip(hand.parameters(), grads):
                p -= 0.5 * g * min(1.0, 0.05 / (float(norm) + 1e-6))  # clip_grad_norm_'s coefficient
        assert abs(float(clip.last) - float(norm)) < 1e-12 * float(norm)
    assert clip.calls == 3
    assert min(norms) > 0.05  # it did clip
    for a, b in zip(model.parameters(), hand.parameters()):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-15), (a - b).abs().max()
    assert abs(clip.take_epoch() - sum(norms) / 3) < 1e-12 and float(clip.count) == 0  # the epoch's mean, reset


CLIP = 0.05


def _clip_problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A model without BN (micro-batches and shards sum to the batch gradient) and a global batch of 8, fp64."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).double()
    return model, torch.randn(8, 3, 2, 2, dtype=torch.float64), torch.randint(0, 5, (8,))


def _clip_on_ranks(rank: int, world: int) -> tuple[list[float], dict[str, torch.Tensor], int]:
    """3 steps of DDP over ``world`` gloo ranks, 2 micro-batches of 2 per rank, clipped: (norms, weights, clips)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, x, y = _clip_problem()
    ddp = DDP(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.5)
    clip = GradClip(CLIP)
    norms = []
    for _ in range(3):  # rank r's share of the global batch: samples r, r + W, ... (the sampler's striding)
        train_step(ddp, x[rank::world], y[rank::world], optimizer,
                   StepOptions(torch.float64, 0.0, None, micro_batch_size=2, clip=clip))
        norms.append(float(clip.last))
    return norms, {k: v.clone() for k, v in model.state_dict().items()}, clip.calls


def test_clipping_under_ddp_with_accumulation_is_the_same_on_every_rank_and_equals_one_process():
    """2 real gloo ranks, 2 micro-batches each: each rank measures the norm of the all-reduced global gradient
    (bit-identical on both ranks), clips once per step, and the weights equal one process's on the whole batch
    (fp64, 1e-12). Clipping a rank's own gradient, or a micro-batch's, would give other norms on each rank."""
    ranks = spawn(_clip_on_ranks, 2)
    model, x, y = _clip_problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    clip = GradClip(CLIP)
    expected = []
    for _ in range(3):
        train_step(model, x, y, optimizer, StepOptions(torch.float64, 0.0, None, clip=clip))
        expected.append(float(clip.last))
    assert min(expected) > CLIP  # every step clips
    (norms0, weights0, calls0), (norms1, weights1, calls1) = ranks
    assert norms0 == norms1 and calls0 == calls1 == 3
    assert all(torch.equal(weights0[k], weights1[k]) for k in weights0)
    assert all(abs(a - b) < 1e-12 * b for a, b in zip(norms0, expected)), (norms0, expected)
    for k, v in model.state_dict().items():
        assert torch.allclose(weights0[k], v, rtol=1e-12, atol=1e-15), k


def test_ema_follows_its_formula_with_warmup_every_n_steps_and_bn_buffers():
    """decay min(d, 1 - (1 + t)^(-2/3)) at update t, an update every 2nd step; BN running statistics averaged,
    num_batches_tracked copied; the model's own weights untouched by evaluating the EMA."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).double()
    ema = ModelEma(model, 0.9, every=2, warmup=True, evaluated=True)
    ema.begin()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    updates = 0
    for step in range(1, 7):
        model(torch.randn(4, 1, 5, 5, dtype=torch.float64)).pow(2).mean().backward()  # BN stats move too
        optimizer.step()
        optimizer.zero_grad()
        ema.step()
        if step % 2 == 0:
            decay = min(0.9, 1 - (1 + updates) ** (-2 / 3))
            for k, v in model.state_dict().items():
                expected[k] = decay * expected[k] + (1 - decay) * v if v.is_floating_point() else v.clone()
            updates += 1
    assert ema.steps == 6 and ema.updates == 3
    for k, v in expected.items():
        assert torch.allclose(ema.weights[k], v, rtol=1e-12, atol=0), k
    assert int(ema.weights["1.num_batches_tracked"]) == 6
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.applied() as applied:
        assert torch.equal(applied.state_dict()["1.running_mean"], ema.weights["1.running_mean"])
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())


def test_early_stopping_counts_epochs_without_an_improvement_beyond_min_delta():
    early = EarlyStopping(2, min_delta=0.1, metric="valid_acc")  # higher is better
    # 0.65 and 0.76 improve by more than 0.1, 0.7 does not; two 0.8s after 0.76 end it.
    assert [early.update(v, e) for e, v in enumerate([0.5, 0.65, 0.7, 0.76, 0.8, 0.8], 1)] == [
        False, False, False, False, False, True]
    assert early.best == 0.76 and early.best_epoch == 4 and "early stop after epoch 6" in early.reason
    loss = EarlyStopping(1, metric="valid_loss")  # lower is better; min_delta 0: any decrease counts
    assert [loss.update(v, e) for e, v in enumerate([2.0, 1.9, 1.9], 1)] == [False, False, True]


# --------------------------------------------------------------------------- 2 ranks under torchrun

STEPS_PER_EPOCH = 5  # 160 training samples / global batch 32
CFG = [*TINY, "data.augment=true", "train.epochs=5", "checkpoint.every_steps=2", "checkpoint.keep=100",
       "train.micro_batch_size=8", "train.ema_decay=0.8", "train.ema_every_steps=2", "train.ema_warmup=true",
       "train.eval_weights=ema", "train.clip_grad_norm=0.5",
       # Every epoch after the first fails to improve by 10: the run stops after epoch 3, whatever the losses.
       "train.early_stop_patience=2", "train.early_stop_min_delta=10", "dist.hang_timeout_s=60"]
STOP_LINE = "early stop after epoch 3: valid_loss has not improved by more than 10 for 2 epochs"


def _checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)


def _history(run: Path) -> list[dict]:
    rows = json.loads((run / "metrics.json").read_text())["history"]
    return [{k: v for k, v in r.items() if k not in ("epoch_s", "img_per_s")} for r in rows]  # timings differ


def _assert_same_run(run: Path, ref: Path) -> None:
    """Bit for bit: the trained and EMA weights, the recipe's parts, the history and the test."""
    a, b = _checkpoint(run), _checkpoint(ref)
    assert a["global_step"] == b["global_step"] == 3 * STEPS_PER_EPOCH
    for key in ("model", "grad_norm"):
        different = [k for k in b[key] if not torch.equal(a[key][k], b[key][k])]
        assert not different, f"{key} differs from the uninterrupted run in {different[:5]}"
    different = [k for k in b["ema"]["weights"] if not torch.equal(a["ema"]["weights"][k], b["ema"]["weights"][k])]
    assert not different, f"EMA weights differ from the uninterrupted run in {different[:5]}"
    assert (a["ema"]["steps"], a["ema"]["updates"]) == (b["ema"]["steps"], b["ema"]["updates"])
    assert a["early_stop"] == b["early_stop"]
    assert _history(run) == _history(ref)
    tests = [json.loads((r / "metrics.json").read_text())["test"] for r in (run, ref)]
    assert tests[0] == tests[1]


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("recipes")
    res = run_cli([*CFG, f"out_dir={out}", "run_name=ref"], nproc=2)
    assert_ok(res)
    return out / "ref", res.stdout


@pytest.mark.slow
def test_the_recipe_run_stops_early_tests_the_ema_weights_and_exports_them(ref):
    run, stdout = ref
    history = _history(run)
    assert [r["epoch"] for r in history] == [1, 2, 3]  # both ranks stopped there: the launch ended with 0
    assert history[-1]["stopped"].startswith(STOP_LINE) and all("stopped" not in r for r in history[:-1])
    assert f"{STOP_LINE}" in stdout and "| best EMA weights" in stdout
    assert all(r["grad_norm"] > 0.5 for r in history)  # the norm before clipping, and clipping happened
    ckpt = _checkpoint(run)
    assert ckpt["ema"]["steps"] == 15 and ckpt["ema"]["updates"] == 7 and ckpt["ema"]["evaluated"]
    assert ckpt["early_stop"]["bad_epochs"] == 2 and ckpt["early_stop"]["best_epoch"] == 1
    test = json.loads((run / "metrics.json").read_text())["test"]
    assert test["weights"] == "best EMA"
    # model.pth holds the evaluated (EMA) weights of the best epoch, not the trained ones.
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    exported = torch.load(run / "checkpoints" / "model.pth", weights_only=True)
    assert all(torch.equal(exported[k], best["ema"]["weights"][k]) for k in exported)
    assert any(not torch.equal(exported[k], best["model"][k]) for k in exported if exported[k].is_floating_point())
    # eval reads them: the run's own test result, from model.pth alone.
    res = run_cli(["eval", "--checkpoint", str(run / "checkpoints" / "model.pth"), "--json"])
    assert_ok(res)
    assert json.loads(res.stdout)["acc"] == test["acc"] and abs(json.loads(res.stdout)["loss"] - test["loss"]) < 1e-6
    assert json.loads(res.stdout)["weights"] == "EMA"
    # The norm before clipping reaches TensorBoard at the logged step (log_every_steps 10 of 15 steps).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = []
    for file in (run / "tb").rglob("events.out.tfevents.*"):  # training's, and eval's beside it
        events = EventAccumulator(str(file), size_guidance={"scalars": 0})
        events.Reload()
        logged += events.Scalars("train/grad_norm") if "train/grad_norm" in events.Tags()["scalars"] else []
    assert [e.step for e in logged] == [10] and 0.5 < logged[0].value < float("inf")


def _eval(checkpoint: Path, *args: str) -> dict:
    res = run_cli(["eval", "--checkpoint", str(checkpoint), "--json", *args])
    assert_ok(res)
    return json.loads(res.stdout)


@pytest.mark.slow
def test_eval_predict_and_demo_read_either_weights_and_say_which(ref, tmp_path):
    """best.pt holds both: by default the EMA ones (the run evaluated them: its test result again), with
    --weights trained its "model" ones (what a copy of best.pt without its EMA entry gives); asking a file for
    weights it lacks is one line (exit 2). Each command says which weights it used."""
    run, _ = ref
    best = run / "checkpoints" / "best.pt"
    test = json.loads((run / "metrics.json").read_text())["test"]
    ema, trained = _eval(best), _eval(best, "--weights", "trained")  # predict below asks for ema by name
    assert (ema["weights"], trained["weights"]) == ("EMA", "trained")
    assert abs(ema["loss"] - test["loss"]) < 1e-6 and trained["loss"] != ema["loss"]
    plain = torch.load(best, weights_only=True)
    plain["ema"] = None  # a run without EMA: its "model" weights are all there is
    (tmp_path / "checkpoints").mkdir()
    torch.save(plain, tmp_path / "checkpoints" / "best.pt")
    assert _eval(tmp_path / "checkpoints" / "best.pt")["loss"] == trained["loss"]
    res = run_cli(["eval", "--checkpoint", str(tmp_path / "checkpoints" / "best.pt"), "--weights", "ema"])
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        f"ddp_train: error: --weights ema: {tmp_path / 'checkpoints' / 'best.pt'} holds no EMA weights (its run had "
        "train.ema_decay 0); use --weights trained"], res.stderr
    with pytest.raises(WeightsError, match=r"^--weights trained: .*model.pth holds the run's EMA weights only; "
                                           r"pass the run's checkpoints/best.pt or last.pt, which hold both$"):
        load_trained(run / "checkpoints" / "model.pth", choice="trained")
    assert load_trained(run / "checkpoints" / "model.pth", choice="ema").kind == "EMA"
    # predict: the same choice, said in its JSON; the two kinds give other probabilities.
    image = tmp_path / "x.npy"
    np.save(image, np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    out = {}
    for kind in ("ema", "trained"):
        res = run_cli(["predict", "--checkpoint", str(best), "--json", "--weights", kind, str(image), "--top-k", "10"])
        assert_ok(res)
        out[kind] = json.loads(res.stdout)
    assert (out["ema"]["weights"], out["trained"]["weights"]) == ("EMA", "trained")
    assert out["ema"]["results"][0]["top_k"] != out["trained"]["results"][0]["top_k"]
    # demo: the page says which weights it serves.
    for kind, word in (("trained", "trained"), (None, "EMA")):
        info = run_info(load_trained(best, choice=kind))
        assert info["weights"] == word and f"{word} weights</p>" in info_html(info)


@pytest.mark.slow
def test_resumed_mid_epoch_3_the_early_stop_counter_continues_exactly(ref, tmp_path):
    """From step 12 (epoch 3, one epoch without improvement counted): it must stop after epoch 3 again."""
    run, _ = ref
    res = run_cli([*CFG, f"out_dir={tmp_path}", "run_name=r",
                   f"resume={run / 'checkpoints' / 'step-00000012.pt'}"], nproc=2)
    assert_ok(res)
    assert "resumed from epoch 3 step 2 (global step 12)" in res.stdout and STOP_LINE in res.stdout
    _assert_same_run(tmp_path / "r", run)


@pytest.mark.slow
def test_resuming_a_run_that_stopped_early_tests_again_without_training(ref, tmp_path):
    """Its last checkpoint holds the stop (the counter and the reason): no epoch 4, the same test result."""
    run, _ = ref
    res = run_cli([*CFG, f"out_dir={tmp_path}", "run_name=r", f"resume={run / 'checkpoints' / 'last.pt'}"], nproc=2)
    assert_ok(res)
    assert "resumed from epoch 4 step 0 (global step 15)" in res.stdout and "epoch   4 |" not in res.stdout
    assert _history(tmp_path / "r") == _history(run)
    tests = [json.loads((r / "metrics.json").read_text())["test"] for r in (tmp_path / "r", run)]
    assert tests[0] == tests[1]


@pytest.mark.slow
def test_sigterm_then_resume_auto_repeats_the_run_bit_for_bit(ref, tmp_path):
    from .test_resume import _start, _wait_for

    args = [*CFG, "data.num_workers=2", f"out_dir={tmp_path}", "run_name=r"]  # loader workers: slower steps
    proc = _start(args)
    _wait_for(tmp_path / "r" / "checkpoints" / "step-00000002.pt", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert "ddp_train: stopped by SIGTERM; checkpoint" in err, err[-3000:]
    res = run_cli([*args, "resume=auto"], nproc=2)
    assert_ok(res)
    assert "resumed from epoch" in res.stdout
    _assert_same_run(tmp_path / "r", ref[0])
