"""The hang watchdog's decision, on exact heartbeats: who is stuck and why, who reports, which ranks
the reporter kills, and the words of its line. tests/test_watchdog.py proves the wiring end to end
(real torchrun jobs with a frozen rank, a rank stuck in data loading).
"""

from __future__ import annotations

from pathlib import Path

from ddp_train.resilience.watchdog import (
                                           ALL_WAITING,
                                           NOT_RESPONDING,
                                           NOT_WAITING,
                                           Beat,
                                           Verdict,
                                           beat_words,
                                           decide,
                                           hang_summary,
                                           silent_here,
                                           store_down_line,
                                           )

from .helpers import ROOT


def beat(seq: int, step: int = 7, phase: str = "compute", waiting: bool = True, host: str = "vm",
         pid: int = 100) -> Beat:
    return Beat(seq, step, phase, waiting, host, pid)


def moved(before: dict[int, Beat], **changes: object) -> dict[int, Beat]:
    """Every rank's next beat: the sequence number moved by 2, the rest as ``changes`` say (default the same)."""
    return {r: Beat(**{**b.__dict__, "seq": b.seq + 2, **changes}) for r, b in before.items()}


# ----------------------------------------------------------------- who is stuck


def test_a_rank_whose_sequence_number_did_not_move_is_not_responding():
    before = {0: beat(3), 1: beat(5), 2: beat(4)}
    after = {**moved(before), 1: beat(5)}  # rank 1 published nothing between the reads
    assert decide(before, after, 3, me=0) == Verdict((0, 2), (1,), NOT_RESPONDING)


def test_a_rank_that_never_beat_is_not_responding():
    before = {0: beat(3), 1: beat(3)}
    assert decide(before, moved(before), 3, me=1) == Verdict((0, 1), (2,), NOT_RESPONDING)


def test_a_rank_first_seen_in_the_second_read_is_not_responding():
    # One beat does not show that it moves; by hang_timeout_s every live rank has beaten many times.
    before = {0: beat(3)}
    assert decide(before, {**moved(before), 1: beat(1)}, 2, me=0) == Verdict((0,), (1,), NOT_RESPONDING)


def test_several_ranks_not_responding_are_all_named_and_outweigh_a_busy_one():
    before = {r: beat(3) for r in range(4)}
    after = {**moved(before), 1: beat(3), 3: beat(3)}
    after[2] = beat(5, phase="data", waiting=False)  # busy, but a silent rank explains the others' wait
    assert decide(before, after, 4, me=2) == Verdict((0, 2), (1, 3), NOT_RESPONDING)


def test_the_deciding_rank_always_responds():
    # Its own beat is current (it runs this code) even when the store gave nothing the first time.
    after = {0: beat(3), 1: beat(3)}
    assert decide({}, after, 2, me=1) == Verdict((1,), (0,), NOT_RESPONDING)
    assert decide({1: beat(3)}, after, 2, me=1).responding == (1,)


def test_a_rank_busy_in_its_own_work_while_the_others_wait_is_named():
    before = {r: beat(3) for r in range(3)}
    after = {**moved(before), 1: beat(5, phase="data", waiting=False)}
    assert decide(before, after, 3, me=0) == Verdict((0, 1, 2), (1,), NOT_WAITING)
    # Two busy ranks: both, whatever their steps.
    after[2] = beat(5, step=9, phase="checkpoint", waiting=False)
    assert decide(before, after, 3, me=0) == Verdict((0, 1, 2), (1, 2), NOT_WAITING)


def test_when_every_rank_waits_the_lowest_step_is_named():
    before = {0: beat(3, step=7), 1: beat(3, step=6), 2: beat(3, step=6)}
    assert decide(before, moved(before), 3, me=0) == Verdict((0, 1, 2), (1, 2), ALL_WAITING)
    same = {r: beat(3, step=7) for r in range(2)}
    assert decide(same, moved(same), 2, me=1) == Verdict((0, 1), (0, 1), ALL_WAITING)


def test_one_process_stuck_in_its_own_work_is_named():
    # No store: the only beat is its own.
    assert decide({}, {0: beat(1, phase="data", waiting=False)}, 1, me=0) == Verdict((0,), (0,), NOT_WAITING)


def test_the_reporter_is_the_lowest_responding_rank():
    before = {r: beat(3) for r in range(4)}
    after = {**moved(before), 0: beat(3)}
    verdict = decide(before, after, 4, me=3)
    assert verdict.reporter == 1 and verdict.silent == (0,)
    assert decide(before, moved(before), 4, me=3).reporter == 0
    assert Verdict((0, 1), (1,), NOT_WAITING).silent == ()  # a busy rank is not silent


def test_the_reporter_kills_only_the_silent_ranks_on_its_own_machine():
    beats = {0: beat(5, host="a"), 1: beat(3, host="a"), 2: beat(3, host="b"), 3: beat(5, host="a")}
    verdict = Verdict((0, 3), (1, 2, 4), NOT_RESPONDING)  # rank 4 never beat: no host, no pid
    assert silent_here(verdict, beats, "a") == [1]
    assert silent_here(verdict, beats, "b") == [2]
    assert silent_here(Verdict((0, 1, 2, 3), (1,), NOT_WAITING), beats, "a") == []


# ----------------------------------------------------------------- the line


def test_the_line_for_a_frozen_rank_on_the_reporters_machine():
    beats = {0: beat(9, step=12, host="n1"), 1: beat(4, step=12, phase="sync", host="n1"),
             2: beat(9, step=12, host="n2")}
    verdict = Verdict((0, 2), (1,), NOT_RESPONDING)
    line = hang_summary(verdict, beats, {0: "compute, waiting for other ranks, f (a.py:1)"}, 15.6, 15,
                        Path("out/r"), "n1")
    assert line == (
        "no rank completed a step for 16 s (dist.hang_timeout_s=15); stopped making progress: rank 1 (on n1, "
        "last seen at global step 12 in the step-end agreement between ranks, waiting for other ranks) - "
        "not responding (process stopped, or its node unreachable); the others: rank 0 at global step 12 in "
        "compute, waiting for other ranks, f (a.py:1), rank 2 at global step 12 in ?; "
        "stacks: out/r/hang/rank<N>.txt for ranks 0, 2; the non-responding ranks on this machine were killed; "
        "the last checkpoint is kept (resume=auto); exit code 3")
    # On another machine than the frozen rank's, nothing was killed.
    assert "killed" not in hang_summary(verdict, beats, {}, 15.6, 15, Path("out/r"), "n2")


def test_the_line_for_a_rank_that_never_beat_and_for_every_rank_waiting():
    beats = {0: beat(9, step=3)}
    line = hang_summary(Verdict((0,), (1,), NOT_RESPONDING), beats, {}, 2.4, 2.5, Path("r"), "vm")
    assert line == ("no rank completed a step for 2 s (dist.hang_timeout_s=2.5); stopped making progress: rank 1 "
                    "(no heartbeat ever) - not responding (process stopped, or its node unreachable); the others: "
                    "rank 0 at global step 3 in ?; stacks: r/hang/rank<N>.txt for ranks 0; "
                    "the last checkpoint is kept (resume=auto); exit code 3")
    beats = {0: beat(9, step=3), 1: beat(9, step=3, phase="eval")}
    line = hang_summary(Verdict((0, 1), (0, 1), ALL_WAITING), beats, {0: "w0", 1: "w1"}, 300, 300, Path("r"), "vm")
    assert line == ("no rank completed a step for 300 s (dist.hang_timeout_s=300); stopped making progress: "
                    "rank 0 (on vm, last seen at global step 3 in compute (forward, backward, optimizer step), "
                    "waiting for other ranks), rank 1 (on vm, last seen at global step 3 in evaluation, waiting for "
                    "other ranks) - every rank waits for the others; rank 0 was in w0; rank 1 was in w1; "
                    "stacks: r/hang/rank<N>.txt for ranks 0, 1; the last checkpoint is kept (resume=auto); exit code 3")


def test_the_readme_example_line_is_what_the_reporter_writes():
    # The example in docs/troubleshooting.md: "A rank stops making progress (hang watchdog)".
    example = next(line for line in (ROOT / "docs" / "troubleshooting.md").read_text().splitlines()
                   if line.startswith("ddp_train: hang: no rank completed"))
    beats = {0: beat(30, step=7), 1: beat(30, step=7, phase="data", waiting=False)}
    wheres = {0: "compute (forward, backward, optimizer step), waiting for other ranks, "
                 "_distributed_broadcast_coalesced (distributed.py:2364) from train_step (engine.py:123)",
              1: "data loading, _sleep_in_data_loading (slow_entry.py:30) from train_one_epoch (engine.py:174)"}
    verdict = decide({0: beat(28), 1: beat(28)}, beats, 2, me=0)
    assert "ddp_train: hang: " + hang_summary(verdict, beats, wheres, 11.2, 10, Path("runs/r"), "vm") == example


def test_a_beat_in_words():
    assert beat_words(None) == "no heartbeat ever"
    assert beat_words(beat(1, step=4, phase="data", waiting=False, host="n3")) == \
        "on n3, last seen at global step 4 in data loading"
    # A phase this version does not know (a newer peer's) is shown as it came.
    assert beat_words(beat(1, phase="warmup", host="n3")) == \
        "on n3, last seen at global step 7 in warmup, waiting for other ranks"


def test_the_line_when_the_store_does_not_answer():
    line = store_down_line(1, 20.5, 15, ("node0", 29400), "data loading, f (a.py:3)", Path("r/hang/rank1.txt"))
    assert line == ("ddp_train: hang: rank 1: no step completed for 20 s (dist.hang_timeout_s=15) and the rendezvous "
                    "store at node0:29400 does not answer: the rank or node hosting it (rank 0 under srun, the first "
                    "node's torchrun agent) is stuck or gone; this rank was in data loading, f (a.py:3); "
                    "stacks: r/hang/rank1.txt; exit code 3")
