"""The universality suite's pieces: retrieval metrics, RecBole's leave-one-out split, popularity, the downstream
protocol (settings chosen on valid users only), the future-behaviour labels, and the aggregate report."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from supermoe_rec import cli
from supermoe_rec.data.movielens import ML100K_GENRES, MovieLens
from supermoe_rec.evaluation import downstream as universal
from supermoe_rec.evaluation import retrieval
from supermoe_rec.evaluation.plots import PNG_SIGNATURE
from supermoe_rec.evaluation.suite import aggregate_suites
from supermoe_rec.objectives.ranking import rank_metrics

# ------------------------------------------------------------------------------------------- retrieval metrics


def test_ranks_of_a_toy_ranking() -> None:
    # Codes 0..5; code 0 (unknown) is never ranked even with the highest score.
    scores = np.array(
        [
            [9.0, 0.1, 0.7, 0.3, 0.7, 0.2],  # target 4: 0.7 ties with code 2 (smaller code ranks ahead) -> rank 2
            [9.0, 0.1, 0.7, 0.3, 0.7, 0.2],  # target 2: the tie goes its way -> rank 1
            [9.0, 0.5, 0.4, 0.3, 0.2, 0.1],  # target 5: last of five -> rank 5
        ]
    )
    targets = np.array([4, 2, 5])
    assert retrieval.ranks(scores, targets).tolist() == [2, 1, 5]
    mask = np.zeros_like(scores, dtype=bool)
    mask[0, 2] = True  # user 0 saw code 2: masked, the target moves up
    mask[2, [1, 2]] = True
    assert retrieval.ranks(scores, targets, mask).tolist() == [1, 1, 3]
    with pytest.raises(ValueError, match="a target is masked"):
        retrieval.ranks(scores, targets, np.ones_like(mask))
    metrics = rank_metrics(torch.from_numpy(retrieval.ranks(scores, targets)))
    assert metrics["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1.0 + 1 / math.log2(6)) / 3)


# ------------------------------------------------------------------------------------------- the split


def _log(rows: list[tuple[int, int, int]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])


def test_leave_one_out_split_of_a_hand_built_log() -> None:
    rows = [
        # user 7: items 11 and 12 share t=3 and keep file order (11 first); 10 at t=5; 13 last at t=7.
        (7, 10, 5),
        (7, 11, 3),
        (7, 12, 3),
        (7, 13, 7),
        # user 8: every rating at one time: file order is the time order.
        (8, 14, 1),
        (8, 12, 1),
        (8, 10, 1),
    ]
    # user 9: 60 ratings, listed newest first in the file; items 101..160 by time.
    rows += [(9, 100 + i, 1000 + i) for i in range(60, 0, -1)]
    log = _log(rows)
    items = np.array([10, 11, 12, 13, 14, *range(101, 161)])
    seqs = retrieval.user_sequences(log, items)
    code = {int(item): c + 1 for c, item in enumerate(np.sort(items))}
    assert seqs.users.tolist() == [7, 8, 9]
    assert seqs.target("valid").tolist() == [code[10], code[12], code[159]]
    assert seqs.target("test").tolist() == [code[13], code[10], code[160]]

    def rows_of(values: np.ndarray, offsets: np.ndarray) -> list[list[int]]:
        return [values[offsets[u] : offsets[u + 1]].tolist() for u in range(len(offsets) - 1)]

    test_in = rows_of(*seqs.inputs("test"))
    assert test_in[0] == [code[11], code[12], code[10]]  # the valid item is part of the test input
    assert test_in[1] == [code[14], code[12]]
    assert test_in[2] == [code[i] for i in range(110, 160)]  # the 50 items before the last, no more
    valid_in = rows_of(*seqs.inputs("valid"))
    assert valid_in[0] == [code[11], code[12]]
    assert valid_in[2] == [code[i] for i in range(109, 159)]
    assert rows_of(*seqs.seen("test"))[2] == [code[i] for i in range(101, 160)]  # masking uses the whole past
    assert sorted(seqs.train_items().tolist()) == sorted(
        [code[11], code[12], code[14], *(code[i] for i in range(101, 159))]
    )
    with pytest.raises(ValueError, match="user 3 has < 3 interactions"):
        retrieval.user_sequences(_log([(3, 10, 1), (3, 11, 2)]))
    with pytest.raises(ValueError, match="not in the item table"):
        retrieval.user_sequences(log, items[1:])


def test_movielens_frames_keep_file_order(ml100k: MovieLens) -> None:
    # The stable sort's tie-break is the ratings file's order: the frames must not reorder the file.
    first = ml100k.ratings.head(3)[["user_id", "item_id", "rating", "timestamp"]].to_numpy().tolist()
    assert first == [[196, 242, 3, 881250949], [186, 302, 3, 891717742], [22, 377, 1, 878887116]]


# ------------------------------------------------------------------------------------------- popularity


def test_popularity_is_the_train_count_and_matches_recbole(ml100k: MovieLens) -> None:
    seqs = retrieval.user_sequences(ml100k.ratings, ml100k.items["item_id"])
    assert len(seqs.users) == 943 and len(seqs.train_items()) == 100_000 - 2 * 943
    pop = retrieval.popularity_scores(seqs, 1683)
    # By hand: drop each user's two latest ratings (stable by file order on ties), count the rest per item.
    frame = ml100k.ratings.reset_index()
    frame = frame.sort_values(["user_id", "timestamp", "index"])
    from_end = frame.groupby("user_id").cumcount(ascending=False)
    counts = frame[from_end >= 2]["item_id"].value_counts()
    expected = np.zeros(1683)
    expected[counts.index.to_numpy()] = counts.to_numpy()  # ml-100k item ids are 1..1682, i.e. their codes
    assert np.array_equal(pop[1:], expected[1:]) and pop[0] == -np.inf

    test = retrieval.score_and_rank(seqs, "test", pop)
    got = {mode: {m: round(v, 4) for m, v in metrics.items()} for mode, metrics in test.items()}
    assert got == {
        "unmasked": {"hr@10": 0.0498, "ndcg@10": 0.0224, "mrr@10": 0.0142},
        "masked": {"hr@10": 0.0859, "ndcg@10": 0.0449, "mrr@10": 0.0326},
    }
    # RecBole 1.2.1's Pop (0.0498/0.0226/0.0143 and 0.0859/0.0444/0.0319) breaks ties among equally popular items
    # its own way: its figures lie between the target losing and winning every tie.
    targets = seqs.target("test")
    full = np.broadcast_to(pop, (943, 1683))
    masks = {"unmasked": None, "masked": retrieval.seen_mask(*seqs.seen("test"), 1683)}
    recbole = {"unmasked": (0.0498, 0.0226, 0.0143), "masked": (0.0859, 0.0444, 0.0319)}
    for mode, mask in masks.items():
        scores = np.array(full)
        if mask is not None:
            scores[mask] = -np.inf
        target = scores[np.arange(943), targets][:, None]
        above = (scores > target).sum(axis=1)
        tied = (scores == target).sum(axis=1) - 1
        best, worst = rank_metrics(torch.from_numpy(above + 1)), rank_metrics(torch.from_numpy(above + tied + 1))
        for metric, theirs in zip(("hr@10", "ndcg@10", "mrr@10"), recbole[mode], strict=True):
            assert worst[metric] - 5e-5 <= theirs <= best[metric] + 5e-5, (mode, metric)


# ------------------------------------------------------------------------------------------- downstream protocol


def test_one_user_split_for_the_suite_and_the_probes() -> None:
    # The suite: a 60/20/20 permutation. The probes: a stratified 70/30 split by the attribute.
    suite = universal.split_users(10, seed=0)
    assert (len(suite.train), len(suite.valid), len(suite.test), suite.stratified) == (6, 2, 2, False)
    labels = np.array(["a"] * 30 + ["b"] * 10 + ["c"] * 2)
    probe = universal.split_users(len(labels), seed=3, fractions=(0.7, 0.0, 0.3), labels=labels)
    assert probe.stratified and len(probe.valid) == 0
    assert sorted(np.concatenate([probe.train, probe.test]).tolist()) == list(range(len(labels)))
    # Each class keeps its share among the 13 held-out users: 9 a, 3 b, 1 c.
    assert {c: int((labels[probe.test] == c).sum()) for c in "abc"} == {"a": 9, "b": 3, "c": 1}
    lonely = universal.split_users(5, seed=0, fractions=(0.6, 0.0, 0.4), labels=np.array(list("aabbc")))
    assert not lonely.stratified  # class c has one user: a plain seeded split
    with pytest.raises(ValueError, match="no valid users"):
        universal.split_users(10, seed=0, labels=np.zeros(10))


def test_the_chooser_never_receives_test_users() -> None:
    # By construction: choose() takes train and valid arrays only.
    assert list(inspect.signature(universal.choose).parameters) == [
        "family",
        "task_type",
        "x_train",
        "y_train",
        "x_valid",
        "y_valid",
        "seed",
    ]
    rng = np.random.default_rng(0)
    n = 200
    y = rng.integers(0, 2, n)
    x = np.stack([y + rng.normal(scale=1.5, size=n), rng.normal(size=n)], axis=1)
    split = universal.split_users(n, seed=0)
    assert (len(split.train), len(split.valid), len(split.test)) == (120, 40, 40)
    assert sorted(np.concatenate([split.train, split.valid, split.test]).tolist()) == list(range(n))
    # Scrambling the test users' labels changes the test scores but not one chosen setting.
    scrambled = y.copy()
    scrambled[split.test] = 1 - scrambled[split.test]
    scores, settings = universal.evaluate_kind(x, [universal.Task("t", universal.BINARY, y)], split)
    scores2, settings2 = universal.evaluate_kind(x, [universal.Task("t", universal.BINARY, scrambled)], split)
    assert settings == settings2
    assert scores["t"]["linear_auc"] > 0.6 and scores2["t"]["linear_auc"] == pytest.approx(
        1 - scores["t"]["linear_auc"]
    )
    # The chosen setting is the best on the valid users, refitting each by hand.
    valid_auc = {}
    for c in universal.LOGISTIC_CS:
        model = universal._fit("linear", "binary", c, x[split.train], y[split.train], 0)
        valid_auc[c] = universal.score_model(model, "binary", x[split.valid], y[split.valid])["auc"]
    best = max(valid_auc.values())
    _, setting, value = universal.choose(
        "linear", "binary", x[split.train], y[split.train], x[split.valid], y[split.valid]
    )
    assert value == best and setting == next(c for c, v in valid_auc.items() if v == best)
    assert settings["t"]["linear_setting"] == setting


def test_majority_and_task_types() -> None:
    split = universal.UserSplit(np.arange(6), np.arange(6, 8), np.arange(8, 10))
    classes = universal.Task("c", universal.CLASSES, np.array(list("aaaabbabab")))
    regression = universal.Task("r", universal.REGRESSION, np.arange(10, dtype=float))
    got = universal.majority_scores([classes, regression], split)
    assert got["c"]["linear_balanced_accuracy"] == 0.5 and got["c"]["mlp_accuracy"] == 0.5  # predicts "a"
    assert got["r"]["linear_rmse"] == pytest.approx(universal.mean_predictor_rmse(regression, split))
    assert universal.mean_predictor_rmse(regression, split) == pytest.approx(
        math.sqrt(((8 - 2.5) ** 2 + (9 - 2.5) ** 2) / 2)
    )


def test_future_tasks_by_hand(ml100k: MovieLens) -> None:
    genres = [g for g in ML100K_GENRES if g != "unknown"]
    assert len(genres) == 18
    keys = np.array([1, 2, 943])
    tasks = {t.name: t for t in universal.future_tasks(ml100k.ratings, ml100k.items, keys, 0.1, 0.1, genres)}
    genre_of = dict(zip(ml100k.items["item_id"], ml100k.items["genres"], strict=True))
    for u, user in enumerate(keys):
        r = ml100k.ratings[ml100k.ratings["user_id"] == user].sort_values(["timestamp", "item_id"], kind="stable")
        n = len(r)
        held = 2 * max(1, math.ceil(0.1 * n - 1e-9))
        t0 = r["timestamp"].iloc[n - held - 1]
        nxt = r.iloc[n - held :]
        seen = {g for i in nxt["item_id"].iloc[:10] for g in genre_of[i]}
        assert tasks["genres_next10"].y[u].tolist() == [int(g in seen) for g in genres]
        active = int((nxt["timestamp"] <= t0 + 30 * 86400).sum() >= universal.ACTIVE_MIN_ITEMS)
        assert tasks["active_30d"].y[u] == active
        assert tasks["like_rate"].y[u] == pytest.approx((nxt["rating"] >= 4).mean())


# ------------------------------------------------------------------------------------------- aggregate report


def _fake_suite(value: float) -> dict[str, object]:
    return {
        "run": "r",
        "arch": "supermoe",
        "seed": 0,
        "users": {"all": 10, "train": 6, "valid": 2, "test": 2},
        "families": ["linear", "mlp"],
        "tasks": {"gender": {"type": "classes", "primary": "macro_f1", "description": "d"}},
        "kinds": {"user": "u", "tfidf": "t"},
        "embeddings": {
            "user": {"gender": {"linear_macro_f1": value, "mlp_macro_f1": 2 * value}},
            "tfidf": {"gender": {"linear_macro_f1": 0.5, "mlp_macro_f1": 0.5}},
        },
        "retrieval": {"supermoe": {"hr@10": value, "ndcg@10": value / 2, "mrr@10": value / 4}},
        "retrieval_scorers": {"supermoe": "score_items"},
    }


def test_aggregate_three_runs(tmp_path: Path) -> None:
    runs = []
    for i, value in enumerate((0.1, 0.2, 0.3)):
        run = tmp_path / f"seed{i}"
        run.mkdir()
        (run / "universal.json").write_text(json.dumps(_fake_suite(value)))
        runs.append(str(run))
    out = tmp_path / "report"
    peer = tmp_path / "recbole_peer.json"
    sasrec = {"hr@10": 0.12, "ndcg@10": 0.05, "mrr@10": 0.04, "epochs": 3, "stopped_by": "budget"}
    peer.write_text(json.dumps({"models": {"SASRec": sasrec, "Broken": {"hr@10": 0.1}}}))
    assert cli.main(["probe", "--suite-aggregate", *runs, "--out", str(out), "--peer", str(peer)]) == 0
    result = json.loads((out / "universal.json").read_text())
    assert result["embeddings"]["user"]["gender"]["linear_macro_f1"] == pytest.approx(0.2)
    assert result["std"]["embeddings"]["user"]["gender"]["mlp_macro_f1"] == pytest.approx(0.2)  # 0.2, 0.4, 0.6
    assert result["retrieval"]["supermoe"]["ndcg@10"] == pytest.approx(0.1)
    assert result["std"]["retrieval"]["supermoe"]["hr@10"] == pytest.approx(0.1)
    assert result["num_runs"] == 3
    assert result["retrieval"]["recbole_sasrec"] == {"hr@10": 0.12, "ndcg@10": 0.05, "mrr@10": 0.04}
    assert "recbole_broken" not in result["retrieval"]  # a peer row without the three metrics is left out
    md = (out / "universal.md").read_text()
    assert "0.2000 ± 0.1000" in md and "universal.png" in md
    assert "| supermoe | recbole_sasrec | 2.000   |" in md  # NDCG@10 ratio 0.1 / 0.05
    assert (out / "universal.png").read_bytes()[:8] == PNG_SIGNATURE
    with pytest.raises(Exception, match="at least 1 run"):
        aggregate_suites([], out)
    single = aggregate_suites(runs[:1], tmp_path / "one")  # one seed: its figures, std 0, said in the title
    assert single["num_runs"] == 1 and "one run" in single["title"]
    assert single["std"]["retrieval"]["supermoe"]["hr@10"] == 0.0
    # Retrieval from other runs (e.g. the leave-one-out twins): their table replaces the runs' own.
    twins = []
    for i, value in enumerate((0.4, 0.6)):
        twin = tmp_path / f"loo{i}"
        twin.mkdir()
        (twin / "universal.json").write_text(json.dumps(_fake_suite(value)))
        twins.append(str(twin))
    args = ["probe", "--suite-aggregate", *runs, "--out", str(out), "--retrieval-runs", *twins]
    assert cli.main(args) == 0
    result = json.loads((out / "universal.json").read_text())
    assert result["retrieval"]["supermoe"]["hr@10"] == pytest.approx(0.5)
    assert result["embeddings"]["user"]["gender"]["linear_macro_f1"] == pytest.approx(0.2)  # still the runs'
    assert result["retrieval_runs"] == twins and "From the runs" in (out / "universal.md").read_text()


def test_suite_command_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["probe", "--suite-aggregate", str(tmp_path), str(tmp_path)]) == 2
    assert "--out DIR is required" in capsys.readouterr().err
    assert cli.main(["probe", "--suite-aggregate", str(tmp_path), str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "universal.json is missing" in capsys.readouterr().err
    assert cli.main(["probe", "--suite"]) == 2
    assert "--run is required" in capsys.readouterr().err
    assert cli.main(["probe", "--suite", "--run", str(tmp_path), "--compare-run", "no-equals-sign"]) == 2
    assert "is not NAME=RUN" in capsys.readouterr().err


def test_suite_tasks(ml100k: MovieLens) -> None:
    import dataclasses

    from supermoe_rec.config.experiment import DataConfig
    from supermoe_rec.evaluation.suite import suite_tasks

    keys = np.arange(1, 944)
    tasks = suite_tasks(ml100k, DataConfig(), keys)
    assert [(t.name, t.type) for t in tasks] == [
        ("gender", "classes"),
        ("age", "classes"),
        ("occupation", "classes"),
        ("genres_next10", "multilabel"),
        ("active_30d", "binary"),
        ("like_rate", "regression"),
    ]
    active = next(t for t in tasks if t.name == "active_30d").y
    assert 0.4 < active.mean() < 0.6  # ">= 12 items" is near the median: classes are not degenerate
    loo = suite_tasks(ml100k, dataclasses.replace(DataConfig(), leave_one_out=True), keys)
    assert [t.name for t in loo] == ["gender", "age", "occupation"]  # 2 held-out ratings: no future tasks
