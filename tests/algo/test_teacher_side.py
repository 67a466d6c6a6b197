"""`calibrate_advantages` against the authors' release (github WenjinHou/Uni-OPD @08fcec0).

Hand-computed cases for each point where uniopd used to differ from the release, a
check that the new path equals the old clip-first path when nothing new is switched
on, and an independent reference written as straight loops from the release's code:
miles/backends/training_utils/loss.py (OPD branch of compute_advantages_and_returns and
of policy_loss_function), Uni_OPD_utils/margin_calibration/margin_shift.py and
margin_mask_greedy.py, miles/backends/training_utils/log_utils.py
(_collect_correctness_advantages).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from uniopd.algo import calibration as C
from uniopd.algo.advantages import reverse_kl_advantages
from uniopd.algo.calibration import margin_mask
from uniopd.algo.teacher_side import calibrate_advantages, outcome_advantage_means

T, F = True, False
DELTA = 0.5


def run(adv, student, teacher, mask, correct, ids, **kw):
    kw.setdefault("enabled", True)
    kw.setdefault("method", "shift")
    kw.setdefault("delta", DELTA)
    return calibrate_advantages(adv, student, teacher, mask, correct, ids, **kw)


def clip_case():
    """Two rollouts of one group, two tokens each; adv = teacher − student.

    row 0 correct:   student [-2, -1],  teacher [-1, -13]  -> adv [1, -12],  gaps [1, 12]
    row 1 incorrect: student [-1, -1],  teacher [-0.5, -1.5] -> adv [0.5, -0.5], gaps [0.5, 0.5]
    """
    student = torch.tensor([[-2.0, -1.0], [-1.0, -1.0]])
    teacher = torch.tensor([[-1.0, -13.0], [-0.5, -1.5]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    return teacher - student, student, teacher, mask, torch.tensor([T, F]), torch.tensor([0, 0])


# ------------------------------------------------------------ 1. order of the clip


def test_item1_returns_use_all_tokens_then_clip():
    adv, s, t, mask, correct, ids = clip_case()
    # Release: G0 = (1 - 12) / 2 = -5.5, G1 = 0; minmax m = -5.5 < 0.5, lambda = 6.0,
    # correct_up: row 0 -> [7, -6]; then token (0, 1) (gap 12 >= 10) leaves the loss.
    res = run(adv, s, t, mask, correct, ids, logratio_clip=10.0)
    assert res.adv_BT.tolist() == [[7.0, 0.0], [0.5, -0.5]]
    assert res.loss_mask_BT.tolist() == [[T, F], [T, T]]
    assert res.keep_B.tolist() == [T, T]
    assert res.metrics["calib/mean_margin"] == -5.5  # before calibration, G over all tokens
    assert res.metrics["calib/order_consistency_rate"] == 0.0
    assert res.metrics["calib/mean_shift"] == 6.0
    assert res.metrics["calib/shifted_group_frac"] == 1.0
    # After calibration, unclipped: row 0 mean (7 - 6) / 2 = 0.5, row 1 mean 0.
    assert res.metrics["advantages/correct"] == 0.5
    assert res.metrics["advantages/incorrect"] == 0.0
    assert res.metrics["advantages/correct_minus_incorrect"] == 0.5
    # The old clip-first order would see G0 = 1 and m = 1 >= 0.5: no shift at all.
    clipped = C.clip_token_mask(s, t, mask, clip_range=10.0)
    old = C.margin_shift(torch.where(clipped, adv, torch.zeros_like(adv)), clipped, correct, ids,
                         delta=DELTA)
    assert old.tolist() == [[1.0, 0.0], [0.5, -0.5]]


def test_item1_clip_can_also_prevent_a_shift():
    adv, s, t, mask, correct, ids = clip_case()
    # Flip the sign of the outlier: row 0 adv [1, 12], G0 = 6.5 >= 0.5: no shift, yet
    # clip-first would see G0 = 1 ... and with delta 2 shift it by 1.5.
    t = torch.tensor([[-1.0, 11.0], [-0.5, -1.5]])
    adv = t - s
    res = run(adv, s, t, mask, correct, ids, delta=2.0, logratio_clip=10.0)
    assert res.adv_BT.tolist() == [[1.0, 0.0], [0.5, -0.5]]
    assert res.metrics["calib/mean_shift"] == 0.0


def test_item1_greedy_mask_sees_all_tokens():
    # correct rows 0, 1 and incorrect row 2; row 0 has a clipped outlier (-30 + ...).
    s = torch.zeros(3, 2)
    t = torch.tensor([[1.0, -21.0], [2.0, 2.0], [0.0, 0.0]])  # G = [-10, 2, 0]
    adv, mask = t - s, torch.ones(3, 2, dtype=torch.bool)
    correct, ids = torch.tensor([T, T, F]), torch.zeros(3, dtype=torch.long)
    res = run(adv, s, t, mask, correct, ids, method="mask", mask_strategy="greedy",
              logratio_clip=10.0)
    # m = -10 - 0; the single incorrect cannot go; dropping row 0 gives m = 2: drop it.
    assert res.keep_B.tolist() == [F, T, T]
    assert res.loss_mask_BT.tolist() == [[T, F], [T, T], [T, T]]
    assert res.adv_BT.tolist() == [[1.0, 0.0], [2.0, 2.0], [0.0, 0.0]]
    # Masked row 0 and the all-zero row 2 are left out of the advantage means.
    assert res.metrics["advantages/correct"] == 2.0
    assert "advantages/incorrect" not in res.metrics
    assert res.metrics["calib/masked_rollout_frac"] == pytest.approx(1 / 3)


# --------------------------------------------------------------- 2. mask scope


def one_token(values, correct, ids):
    adv = torch.tensor(values)[:, None]
    return adv, torch.ones_like(adv, dtype=torch.bool), torch.tensor(correct), torch.tensor(ids)


def test_item2_mask_scope():
    # group 0: correct 2.0, incorrect 0.0 (m = 2); group 1: correct 1.0, incorrect 1.5
    # (m = -0.5). Global: min correct 1.0 - max incorrect 1.5 = -0.5.
    adv, mask, correct, ids = one_token([2.0, 0.0, 1.0, 1.5], [T, F, T, F], [0, 0, 1, 1])
    kw = dict(delta=DELTA)
    assert margin_mask(adv, mask, correct, ids, **kw).tolist() == [T, T, F, F]
    assert margin_mask(adv, mask, correct, ids, scope="global", **kw).tolist() == [F] * 4
    # Greedy, group: one rollout per side, nothing may go. Global: floors 1 per side;
    # drop correct 1.0 -> 2.0 - 1.5 = 0.5, drop incorrect 1.5 -> 1.0 - 0.0 = 1.0: row 3.
    assert margin_mask(adv, mask, correct, ids, strategy="greedy", **kw).all()
    keep = margin_mask(adv, mask, correct, ids, strategy="greedy", scope="global", **kw)
    assert keep.tolist() == [T, T, T, F]
    res = run(adv, adv * 0, adv * 0, mask, correct, ids, method="mask", mask_strategy="greedy",
              scope="global")
    assert res.keep_B.tolist() == [T, T, T, F]
    assert res.metrics["calib/masked_group_frac"] == 0.5
    with pytest.raises(ValueError, match="scope"):
        margin_mask(adv, mask, correct, ids, scope="batch", **kw)


# ----------------------------------------------------------- 3. greedy-mask ties


def test_item3_tie_drops_the_correct_rollout():
    # correct [0, 3], incorrect [1, -2]: m = 0 - 1 = -1; dropping correct 0 gives
    # 3 - 1 = 2, dropping incorrect 1 gives 0 - (-2) = 2: a tie, and 2 >= delta stops.
    adv, mask, correct, ids = one_token([0.0, 3.0, 1.0, -2.0], [T, T, F, F], [5, 5, 5, 5])
    for scope in ("group", "global"):
        res = run(adv, adv * 0, adv * 0, mask, correct, ids, method="mask",
                  mask_strategy="greedy", scope=scope)
        assert res.keep_B.tolist() == [F, T, T, T]


# ---------------------------------------------- 7. unknown outcomes, teacher failure


def test_item7_unknown_rows_stay_out_of_margins_and_shifts():
    # row 2 (unknown, G = 5) would be the max incorrect if it counted.
    adv, mask, correct, ids = one_token([1.0, 0.0, 5.0], [T, F, F], [0, 0, 0])
    known = torch.tensor([T, T, F])
    res = run(adv, adv * 0, adv * 0, mask, correct, ids, direction="both", known_B=known)
    # m = 1 - 0 = 1 >= 0.5: nothing moves; without known_B m = 1 - 5 = -4.
    assert res.adv_BT.flatten().tolist() == [1.0, 0.0, 5.0]
    assert res.metrics["calib/mean_margin"] == 1.0
    res = run(adv, adv * 0, adv * 0, mask, correct, ids, direction="both", delta=3.0,
              known_B=known)
    # lambda = 3 - 1 = 2: correct +1, incorrect -1, unknown untouched.
    assert res.adv_BT.flatten().tolist() == [2.0, -1.0, 5.0]
    assert res.metrics["advantages/correct"] == 2.0
    assert res.metrics["advantages/incorrect"] == -1.0
    assert res.metrics["advantages/correct_minus_incorrect"] == 3.0
    res = run(adv, adv * 0, adv * 0, mask, correct, ids, method="mask",
              mask_strategy="greedy", min_retain_ratio=0.0, known_B=known)
    assert res.keep_B.all()  # never a candidate, and m = 1 >= 0.5 anyway


def test_item7_known_b_in_pass_rate_stats():
    adv, mask, correct, ids = one_token([0.0] * 5, [T, F, F, T, F], [0, 0, 0, 1, 1])
    known = torch.tensor([T, T, F, T, F])
    stats = C.calibration_stats(adv, mask, correct, ids, delta=DELTA, known_B=known)
    # group 0: pass rate 1/2 over known rows; group 1: 1/1. Both groups count.
    assert stats["num_groups"] == 2.0 and stats["share_all_correct"] == 0.5
    assert stats["pass_rate_hist_2"] == 0.5 and stats["pass_rate_hist_4"] == 0.5
    assert stats["num_two_outcome_groups"] == 1.0


def test_item7_teacher_failure_zeroes_the_row_but_keeps_g0_in_margins():
    # row 1 (incorrect) has a failed teacher: adv -> 0, G = 0, as the release's
    # (t - s) * (t != -100). It is the max incorrect: m = 0.25 - 0 = 0.25 < 0.5 -> +0.25.
    s = torch.zeros(3, 2)
    t = torch.tensor([[0.5, 0.0], [-100.0, -100.0], [-1.0, -1.0]])
    adv, mask = t - s, torch.ones(3, 2, dtype=torch.bool)
    correct, ids = torch.tensor([T, F, F]), torch.zeros(3, dtype=torch.long)
    ok = torch.tensor([T, F, T])
    res = run(adv, s, t, mask, correct, ids, teacher_ok_B=ok)
    assert res.adv_BT.tolist() == [[0.75, 0.25], [0.0, 0.0], [-1.0, -1.0]]
    assert res.loss_mask_BT.tolist() == [[T, T], [F, F], [T, T]]
    assert res.metrics["calib/mean_margin"] == 0.25
    # The failed row's advantages stay all 0 (incorrect side is not shifted): left out.
    assert res.metrics["advantages/incorrect"] == -1.0
    # To leave a failed row out of margins as well, mark its outcome unknown.
    res = run(adv, s, t, mask, correct, ids, teacher_ok_B=ok, known_B=ok)
    assert res.metrics["calib/mean_margin"] == 1.25
    assert res.adv_BT[0].tolist() == [0.5, 0.0]


def test_outcome_advantage_means_is_per_sample():
    # row 0: 3 tokens mean 1; row 1: 1 token 3 -> per-sample mean 2 (a token mean is 1.5).
    adv = torch.tensor([[1.0, 1.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[T, T, T], [T, F, F], [T, T, T], [T, T, F]])
    out = outcome_advantage_means(adv, mask, torch.tensor([T, T, F, F]))
    assert out == {"advantages/correct": 2.0, "advantages/incorrect": -0.5,
                   "advantages/correct_minus_incorrect": 2.5}
    out = outcome_advantage_means(adv, mask, torch.tensor([T, T, F, F]),
                                  keep_B=torch.tensor([T, F, T, F]))
    assert out == {"advantages/correct": 1.0}


def test_disabled_still_clips_and_reports():
    adv, s, t, mask, correct, ids = clip_case()
    res = run(adv, s, t, mask, correct, ids, enabled=False, logratio_clip=10.0)
    assert res.adv_BT.tolist() == [[1.0, 0.0], [0.5, -0.5]]
    assert res.keep_B.all() and "calib/mean_shift" not in res.metrics
    assert res.metrics["advantages/correct"] == -5.5
    with pytest.raises(ValueError, match="method"):
        run(adv, s, t, mask, correct, ids, method="clip")


# ------------------------------------- old clip-first path, bit for bit (clip None)


def old_calibrate(adv_BT, mask_BT, correct_B, ids_B, cfg):
    """uniopd/calibrate.py before this change, with logratio_clip=None."""
    stats = C.calibration_stats(adv_BT, mask_BT, correct_B, ids_B, delta=cfg["delta"], mode=cfg["mode"])
    metrics = {(f"balance/{k}" if k.startswith(("pass_rate_hist", "share_all")) else f"calib/{k}"): float(v)
               for k, v in stats.items()}
    keep_B = torch.ones(len(correct_B), dtype=torch.bool)
    if not cfg["enabled"]:
        return adv_BT, keep_B, metrics
    if cfg["method"] == "shift":
        shifted = C.margin_shift(adv_BT, mask_BT, correct_B, ids_B, delta=cfg["delta"], mode=cfg["mode"],
                                 direction=cfg["direction"], scope=cfg["scope"])
        delta_B = (C.sequence_returns(shifted, mask_BT) - C.sequence_returns(adv_BT, mask_BT)).abs()
        moved_B = delta_B > 1e-7
        metrics["calib/shifted_group_frac"] = len(ids_B[moved_B].unique()) / max(len(ids_B.unique()), 1)
        metrics["calib/mean_shift"] = float(delta_B[moved_B].mean()) if moved_B.any() else 0.0
        return shifted, keep_B, metrics
    keep_B = C.margin_mask(adv_BT, mask_BT, correct_B, ids_B, delta=cfg["delta"], mode=cfg["mode"],
                           strategy=cfg["mask_strategy"], min_retain_ratio=cfg["min_retain_ratio"])
    metrics["calib/masked_group_frac"] = len(ids_B[~keep_B].unique()) / max(len(ids_B.unique()), 1)
    metrics["calib/masked_rollout_frac"] = float((~keep_B).float().mean())
    return adv_BT, keep_B, metrics


CONFIGS = (
    [dict(enabled=False, method="shift", scope="group", direction="correct_up", mask_strategy="group")]
    + [dict(enabled=True, method="shift", scope=sc, direction=d, mask_strategy="group")
       for sc in ("group", "global") for d in ("correct_up", "incorrect_down", "both")]
    # the old path had no mask scope (item 2), so only scope="group" can match it
    + [dict(enabled=True, method="mask", scope="group", direction="correct_up", mask_strategy=ms)
       for ms in ("group", "greedy")]
)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("mode", ["minmax", "mean"])
def test_clip_none_equals_old_path_bitwise(seed, mode):
    g = torch.Generator().manual_seed(seed)
    b, t = 24, 7
    student = -4 * torch.rand(b, t, generator=g)
    teacher = student + torch.randn(b, t, generator=g)
    lengths = torch.randint(0, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    correct = torch.rand(b, generator=g) < 0.5
    ids = torch.randint(0, 6, (b,), generator=g) * 3
    adv = reverse_kl_advantages(student, teacher, mask, kl_coef=1.0)
    for cfg in CONFIGS:
        cfg = dict(cfg, delta=0.3, mode=mode, min_retain_ratio=0.25)
        old_adv, old_keep, old_metrics = old_calibrate(adv, mask, correct, ids, cfg)
        res = calibrate_advantages(adv, student, teacher, mask, correct, ids, logratio_clip=None, **cfg)
        assert torch.equal(res.adv_BT, old_adv), cfg
        assert torch.equal(res.keep_B, old_keep), cfg
        assert torch.equal(res.loss_mask_BT, mask)
        for key, value in old_metrics.items():
            assert res.metrics[key] == value or (math.isnan(value) and math.isnan(res.metrics[key])), key
        assert set(res.metrics) - set(old_metrics) <= {
            "advantages/correct", "advantages/incorrect", "advantages/correct_minus_incorrect",
            "calib/mean_margin_after", "calib/order_consistency_rate_after"}


# -------------------------------------------- the release's rules, written out


def _gap(cor, inc, mode):  # margin_mask_greedy.py: _compute_gap
    if not cor or not inc:
        return float("inf")
    if mode == "mean":
        return sum(cor) / len(cor) - sum(inc) / len(inc)
    return min(cor) - max(inc)


def release_reference(rows, *, method, mode, direction, scope, delta, ratio, clip):
    """Effective token advantages and the advantages/* metrics, per the release.

    rows: dicts with adv (list, response tokens), s, t (log-probs), outcome
    (True / False / None), gid, ok (teacher call succeeded).
    One deliberate departure, uniopd's: an empty row (the release's mean is NaN) takes
    no part in margins.
    """
    # loss.py, compute_advantages_and_returns: adv = (t - s) * (t != sentinel)
    adv = [[x if r["ok"] else 0.0 for x in r["adv"]] for r in rows]
    mean = [sum(a) / len(a) if a else None for a in adv]  # adv.mean()
    idx = range(len(rows))
    if scope == "global":
        groups = [list(idx)]
    else:
        groups = [[i for i in idx if rows[i]["gid"] == g] for g in sorted({r["gid"] for r in rows})]

    def side(rs, want):
        return [i for i in rs if rows[i]["outcome"] is want and mean[i] is not None]

    masked = set()
    for rs in groups:
        cor, inc = side(rs, True), side(rs, False)
        if not cor or not inc:
            continue
        if method == "shift":  # margin_shift.py
            cv, iv = [mean[i] for i in cor], [mean[i] for i in inc]
            if mode == "mean":
                c_stat, i_stat = sum(cv) / len(cv), sum(iv) / len(iv)
            else:
                c_stat, i_stat = min(cv), max(iv)
            if c_stat - i_stat >= delta:
                continue
            shift = (i_stat - c_stat) + delta
            for i in rs:
                if direction == "correct_up" and i in cor:
                    adv[i] = [x + shift for x in adv[i]]
                elif direction == "incorrect_down" and i in inc:
                    adv[i] = [x - shift for x in adv[i]]
                elif direction == "both" and i in cor:
                    adv[i] = [x + shift / 2.0 for x in adv[i]]
                elif direction == "both" and i in inc:
                    adv[i] = [x - shift / 2.0 for x in adv[i]]
        else:  # margin_mask_greedy.py: _greedy_mask_local
            cw = sorted([(i, mean[i]) for i in cor], key=lambda x: x[1])
            iw = sorted([(i, mean[i]) for i in inc], key=lambda x: -x[1])
            min_c, min_i = max(1, int(len(cw) * ratio)), max(1, int(len(iw) * ratio))
            ac, ai = [v for _, v in cw], [v for _, v in iw]
            gap = _gap(ac, ai, mode)
            while gap < delta:
                can_c, can_i = len(ac) > min_c, len(ai) > min_i
                if not can_c and not can_i:
                    break
                best, action = gap, None
                if can_c and _gap(ac[1:], ai, mode) > best:
                    best, action = _gap(ac[1:], ai, mode), "c"
                if can_i and _gap(ac, ai[1:], mode) > best:
                    best, action = _gap(ac, ai[1:], mode), "i"
                if action is None:
                    break
                if action == "c":
                    masked.add(cw.pop(0)[0])
                    ac.pop(0)
                else:
                    masked.add(iw.pop(0)[0])
                    ai.pop(0)
                gap = best
    for i in masked:
        adv[i] = [0.0] * len(adv[i])

    # log_utils.py, _collect_correctness_advantages
    sums = {True: [0.0, 0], False: [0.0, 0]}
    for i in idx:
        o = rows[i]["outcome"]
        if o is None or all(x == 0 for x in adv[i]):
            continue
        sums[o][0] += sum(adv[i]) / len(adv[i])
        sums[o][1] += 1
    metrics = {}
    for o, name in ((True, "correct"), (False, "incorrect")):
        if sums[o][1]:
            metrics[f"advantages/{name}"] = sums[o][0] / sums[o][1]
    if len(metrics) == 2:
        metrics["advantages/correct_minus_incorrect"] = (
            metrics["advantages/correct"] - metrics["advantages/incorrect"])

    # loss.py, policy_loss_function: pg_loss * teacher_valid_mask * (|s - t| < clip)
    effective = []
    for i, r in enumerate(rows):
        effective.append([
            0.0 if (not r["ok"] or abs(s - t) >= clip) else a
            for a, s, t in zip(adv[i], r["s"], r["t"])
        ])
    return effective, metrics


def random_rows(seed, t_max):
    rng = random.Random(seed)
    rows = []
    for gid in range(rng.randint(1, 5)):
        kind = rng.choice(["mixed", "mixed", "mixed", "correct", "incorrect"])
        for _ in range(rng.randint(1, 7)):
            if kind == "mixed":
                outcome = rng.choice([True, False, True, False, None])
            else:
                outcome = rng.choice([kind == "correct"] * 4 + [None])
            n = rng.choice([0] + list(range(1, t_max + 1)))
            s = [rng.uniform(-8.0, 0.0) for _ in range(n)]
            t = [x + rng.gauss(0.0, 4.0) for x in s]
            rows.append(dict(s=s, t=t, adv=[b - a for a, b in zip(s, t)], outcome=outcome,
                             gid=10 * gid + 3, ok=rng.random() > 0.1))
    rng.shuffle(rows)
    return rows


def to_tensors(rows, t_max):
    b = len(rows)
    s, t = torch.zeros(b, t_max, dtype=torch.float64), torch.zeros(b, t_max, dtype=torch.float64)
    mask = torch.zeros(b, t_max, dtype=torch.bool)
    for i, r in enumerate(rows):
        n = len(r["s"])
        s[i, :n], t[i, :n], mask[i, :n] = torch.tensor(r["s"], dtype=torch.float64), torch.tensor(
            r["t"], dtype=torch.float64), True
    adv = reverse_kl_advantages(s, t, mask)
    correct = torch.tensor([r["outcome"] is True for r in rows])
    known = torch.tensor([r["outcome"] is not None for r in rows])
    ids = torch.tensor([r["gid"] for r in rows])
    ok = torch.tensor([r["ok"] for r in rows])
    return adv, s, t, mask, correct, ids, known, ok


SETTINGS = (
    [dict(method="shift", mode=m, direction=d, scope=sc)
     for m in ("minmax", "mean") for d in ("correct_up", "incorrect_down", "both")
     for sc in ("group", "global")]
    + [dict(method="mask", mode=m, scope=sc, ratio=r)
       for m in ("minmax", "mean") for sc in ("group", "global") for r in (0.25, 0.5)]
)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("clip", [10.0, 3.0])
def test_against_release_rules_written_out(seed, clip):
    t_max = 6
    rows = random_rows(seed, t_max)
    adv, s, t, mask, correct, ids, known, ok = to_tensors(rows, t_max)
    for setting in SETTINGS:
        ratio = setting.get("ratio", 0.25)
        delta = 0.7
        ref_eff, ref_metrics = release_reference(
            rows, method=setting["method"], mode=setting["mode"], direction=setting.get("direction"),
            scope=setting["scope"], delta=delta, ratio=ratio, clip=clip)
        res = calibrate_advantages(
            adv, s, t, mask, correct, ids, enabled=True, method=setting["method"], delta=delta,
            mode=setting["mode"], direction=setting.get("direction", "correct_up"),
            scope=setting["scope"], mask_strategy="greedy", min_retain_ratio=ratio,
            logratio_clip=clip, known_B=known, teacher_ok_B=ok)
        eff = torch.where(res.loss_mask_BT & res.keep_B[:, None], res.adv_BT, 0.0)
        expected = torch.zeros_like(eff)
        for i, row in enumerate(ref_eff):
            expected[i, : len(row)] = torch.tensor(row, dtype=torch.float64)
        torch.testing.assert_close(eff, expected, rtol=0, atol=1e-9, msg=str(setting))
        assert set(res.metrics) >= set(ref_metrics)
        for key, value in ref_metrics.items():
            assert res.metrics[key] == pytest.approx(value, abs=1e-9), (setting, key)
        assert not ({k for k in res.metrics if k.startswith("advantages/")} - set(ref_metrics))


def test_random_batches_cover_the_edge_cases():
    seen = set()
    for seed in range(8):
        rows = random_rows(seed, 6)
        by_group = {}
        for r in rows:
            by_group.setdefault(r["gid"], set()).add(r["outcome"])
            seen |= {"empty"} if not r["s"] else set()
            seen |= {"failed"} if not r["ok"] else set()
            seen |= {"unknown"} if r["outcome"] is None else set()
            seen |= {"clipped"} if any(abs(a - b) >= 10 for a, b in zip(r["s"], r["t"])) else set()
        seen |= {"one-sided"} if any(len(o - {None}) == 1 for o in by_group.values()) else set()
    assert seen == {"empty", "failed", "unknown", "clipped", "one-sided"}


# ---------------------------------------------- margins after calibration (metrics)


def test_margin_after_calibration_is_reported_for_shift_and_mask():
    # One group, one token each, minmax: correct [0, 3], incorrect [1, -2] -> m = 0 - 1 = -1.
    adv, mask, correct, ids = one_token([0.0, 3.0, 1.0, -2.0], [T, T, F, F], [5, 5, 5, 5])
    # Shift, direction both: each side moves by (δ - m) / 2 = 0.75, so m after = δ exactly.
    res = run(adv, adv * 0, adv * 0, mask, correct, ids, mode="minmax", direction="both")
    assert res.metrics["calib/mean_margin"] == pytest.approx(-1.0)
    assert res.metrics["calib/mean_margin_after"] == pytest.approx(DELTA)
    assert res.metrics["calib/order_consistency_rate"] == 0.0
    assert res.metrics["calib/order_consistency_rate_after"] == 1.0
    # Greedy mask drops the correct 0 (the tie rule): kept correct [3], incorrect [1, -2] -> m = 2.
    res = run(adv, adv * 0, adv * 0, mask, correct, ids, method="mask", mode="minmax", mask_strategy="greedy")
    assert res.metrics["calib/mean_margin_after"] == pytest.approx(2.0)
    # On random batches a shift puts every two-outcome group at δ or above, rounding included.
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        r_adv = torch.randn(32, 5, generator=g)
        r_ids = torch.randint(0, 4, (32,), generator=g)
        r_correct = torch.rand(32, generator=g) < 0.5
        res = run(r_adv, r_adv * 0, r_adv * 0, torch.ones_like(r_adv, dtype=torch.bool), r_correct, r_ids,
                  mode="mean", direction="both", delta=0.4)
        assert res.metrics["calib/order_consistency_rate_after"] == 1.0
    # Disabled: no "after" keys (nothing moved).
    res = run(adv, adv * 0, adv * 0, mask, correct, ids, enabled=False)
    assert "calib/mean_margin_after" not in res.metrics
