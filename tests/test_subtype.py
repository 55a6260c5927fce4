"""The subtype task (NORMAL / BACTERIA / VIRUS): labels, splits, balance, metrics, a tiny run and its JSON."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxr_core.core.config import DataConfig, RunConfig, TrainConfig
from cxr_core.core.errors import BadDatasetError, CxrError
from cxr_core.core.labels import TASK_CLASSES
from cxr_core.core.metrics import binary_metrics, calibration_bins, multiclass_metrics
from cxr_core.data import augment, plan, scan as data

SUBTYPES = TASK_CLASSES["subtype"]


def synthetic_manifest(n_normal: int = 60, n_bacteria: int = 120, n_virus: int = 60) -> pd.DataFrame:
    """A scanned-looking manifest with Kermany names: two images per patient, an official test part."""
    rows = []
    for kind, n in (("normal", n_normal), ("bacteria", n_bacteria), ("virus", n_virus)):
        for i in range(n):
            label = "NORMAL" if kind == "normal" else "PNEUMONIA"
            patient = f"{kind}{i // 2}"
            name = f"IM-{i // 2:04d}-{i % 2}.jpeg" if kind == "normal" else f"person{i // 2}_{kind}_{i}.jpeg"
            rows.append({"path": f"/d/{label}/{kind}-{name}", "label": label, "y": int(label == "PNEUMONIA"),
                         "patient_id": patient, "subtype": kind,
                         "official_split": "test" if (i // 2) % 6 == 0 else "train"})
    return pd.DataFrame(rows)


def subtype_config(split: str = "random", balance: str = "augment", **data_fields) -> RunConfig:
    return RunConfig(data=DataConfig(data_dir="/d", split=split, task="subtype", **data_fields),
                     train=TrainConfig(balance=balance))


# -- labels and splits ----------------------------------------------------------------------------

def test_task_labels_map_names_to_the_three_classes():
    manifest = synthetic_manifest(4, 4, 4)
    labelled = data.task_labels(manifest, "subtype")
    assert list(labelled["label"].unique()) == list(SUBTYPES)
    assert labelled.groupby("label")["y"].first().to_dict() == {"NORMAL": 0, "BACTERIA": 1, "VIRUS": 2}
    # The binary task is the manifest as scanned; the call is idempotent for subtype.
    assert data.task_labels(manifest, "pneumonia") is manifest
    assert data.task_labels(labelled, "subtype")["y"].tolist() == labelled["y"].tolist()


@pytest.mark.parametrize("mode", ["random", "patient", "official"])
def test_splits_are_stratified_on_the_three_classes(mode):
    manifest = synthetic_manifest()
    result = plan.plan_run(subtype_config(mode, balance="none"), manifest)
    rows = result.rows
    assert set(rows["y"]) == {0, 1, 2}
    assert (rows["label"] == np.asarray(SUBTYPES, dtype=object)[rows["y"]]).all()
    assert set(result.counts) == {"train", "val", "test"}
    totals = {"NORMAL": 60, "BACTERIA": 120, "VIRUS": 60}
    for part, counts in result.counts.items():
        assert set(counts) == set(SUBTYPES)
        assert all(counts[name] > 0 for name in SUBTYPES), (part, counts)
        n_part = sum(counts.values())
        for name, total in totals.items():
            # Each part holds each class in about its share of the whole (2 images per patient).
            assert abs(counts[name] - total * n_part / 240) <= 4, (part, counts)
    if mode != "random":
        assert (rows.groupby("patient_id")["split"].nunique() == 1).all()
    if mode == "official":
        assert (rows.loc[rows["official_split"] == "test", "split"] == "test").all()


def test_limit_keeps_every_class():
    subset = data.stratified_subset(data.task_labels(synthetic_manifest(), "subtype"), 24, seed=1, task="subtype")
    assert len(subset) == 24
    assert subset["label"].value_counts().to_dict() == {"BACTERIA": 12, "NORMAL": 6, "VIRUS": 6}


def test_images_without_a_subtype_are_refused_in_one_sentence():
    manifest = synthetic_manifest(10, 10, 10)
    blind = manifest["subtype"] != "normal"
    blind.iloc[np.flatnonzero(blind)[3:]] = False  # three PNEUMONIA images lose their subtype
    manifest.loc[blind, "subtype"] = "unknown"
    with pytest.raises(BadDatasetError) as error:
        plan.plan_run(subtype_config(), manifest)
    assert str(error.value) == (
        "3 of the 20 PNEUMONIA images have no subtype (bacteria or virus) in their file name, so this data set "
        "cannot train the subtype task; choose the pneumonia task or use a data set whose files are named like "
        "person1_bacteria_1.jpeg.")
    # The binary task is not concerned.
    assert plan.plan_run(dataclasses.replace(subtype_config(), data=DataConfig(data_dir="/d")), manifest).n_images == 30


def test_a_split_part_without_a_class_is_one_sentence():
    manifest = synthetic_manifest(60, 120, 2)  # one VIRUS patient cannot be in three parts
    with pytest.raises(BadDatasetError, match=r"^Only 1 VIRUS patient\(s\) were found"):
        plan.plan_run(subtype_config("patient"), manifest)


# -- balance --------------------------------------------------------------------------------------

def test_augment_adds_each_smaller_class_up_to_the_largest():
    result = plan.plan_run(subtype_config("random", "augment"), synthetic_manifest())
    train = result.counts["train"]
    largest = max(train.values())
    assert result.balance.extra == {name: largest - n for name, n in train.items() if n < largest}
    augmented = result.rows[result.rows["is_augmented"]]
    assert len(augmented) == result.balance.n_extra == sum(result.balance.extra.values())
    assert augmented["label"].value_counts().to_dict() == result.balance.extra
    assert set(augmented["split"]) == {"train"}
    assert augmented["augment_seed"].is_unique
    # Every augmented row copies a training image of its own class.
    originals = result.rows[~result.rows["is_augmented"]].set_index("path")
    assert (originals.loc[augmented["path"], "split"] == "train").all()
    assert (originals.loc[augmented["path"], "label"].to_numpy() == augmented["label"].to_numpy()).all()
    after = result.rows[result.rows["split"] == "train"]["label"].value_counts()
    assert set(after) == {largest}


def test_class_weights_of_three_classes():
    labels = ["NORMAL"] * 10 + ["BACTERIA"] * 20 + ["VIRUS"] * 10
    balance = augment.balance_plan(labels, "class_weight", SUBTYPES)
    # sklearn's "balanced": n / (classes * n_class) = 40 / (3 * n).
    assert balance.class_weight == pytest.approx({0: 4 / 3, 1: 2 / 3, 2: 4 / 3})
    assert balance.n_extra == 0 and balance.counts == {"NORMAL": 10, "BACTERIA": 20, "VIRUS": 10}
    with pytest.raises(BadDatasetError, match="no VIRUS images"):
        augment.balance_plan(["NORMAL", "BACTERIA"], "augment", SUBTYPES)


def test_binary_balance_is_unchanged():
    labels = ["NORMAL"] * 3 + ["PNEUMONIA"] * 7
    balance = augment.balance_plan(labels, "augment")
    assert (balance.n_normal, balance.n_pneumonia, balance.n_extra) == (3, 7, 4)
    assert balance.extra == {"NORMAL": 4}
    split = pd.DataFrame({"path": [f"p{i}" for i in range(10)], "label": labels, "split": "train"})
    assert augment.with_augmented_rows(split, 4, seed=5).equals(
        augment.with_augmented_rows(split, 4, seed=5, per_class=balance.extra))


# -- metrics --------------------------------------------------------------------------------------

# Seven images worked through by hand (columns NORMAL, BACTERIA, VIRUS).
Y = np.array([0, 0, 1, 1, 1, 2, 2])
P = np.array([
    [0.7, 0.2, 0.1],   # NORMAL called NORMAL
    [0.4, 0.5, 0.1],   # NORMAL called BACTERIA
    [0.1, 0.8, 0.1],   # BACTERIA called BACTERIA
    [0.2, 0.3, 0.5],   # BACTERIA called VIRUS
    [0.1, 0.6, 0.3],   # BACTERIA called BACTERIA
    [0.1, 0.3, 0.6],   # VIRUS called VIRUS
    [0.5, 0.2, 0.3],   # VIRUS called NORMAL (but VIRUS rather than BACTERIA)
])


def test_multiclass_metrics_on_a_worked_example():
    m = multiclass_metrics(Y, P)
    assert m["task"] == "subtype" and m["classes"] == list(SUBTYPES) and m["n"] == 7
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 1], [1, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 7)
    expected = {
        "NORMAL": {"sensitivity": 1 / 2, "specificity": 4 / 5, "precision": 1 / 2, "roc_auc": 9 / 10, "n": 2},
        "BACTERIA": {"sensitivity": 2 / 3, "specificity": 3 / 4, "precision": 2 / 3, "roc_auc": 10.5 / 12, "n": 3},
        "VIRUS": {"sensitivity": 1 / 2, "specificity": 4 / 5, "precision": 1 / 2, "roc_auc": 8.5 / 10, "n": 2},
    }
    assert m["per_class"] == {name: pytest.approx(values) for name, values in expected.items()}
    assert m["roc_auc"] == pytest.approx((0.9 + 0.875 + 0.85) / 3)
    # Among the five pneumonias: the larger of p_BACTERIA and p_VIRUS is right four times; both VIRUS
    # images are called VIRUS, two of the three BACTERIA images BACTERIA.
    assert m["bacterial_vs_viral"] == pytest.approx({"n": 5, "accuracy": 4 / 5, "sensitivity": 1.0,
                                                     "specificity": 2 / 3})
    binary = binary_metrics((Y != 0).astype(int), 1 - P[:, 0], 0.5)
    assert m["pneumonia_vs_normal"] == binary
    # P(pneumonia) = 1 - P(NORMAL) >= 0.5: the second NORMAL (0.6) and every pneumonia (the last at 0.5).
    assert m["pneumonia_vs_normal"]["confusion_matrix"] == [[1, 1], [0, 5]]
    assert (m["pneumonia_vs_normal"]["sensitivity"], m["pneumonia_vs_normal"]["specificity"]) == (1.0, 0.5)
    assert set(m["calibration"]) == set(SUBTYPES)
    assert m["calibration"]["VIRUS"] == calibration_bins(Y == 2, P[:, 2])
    json.dumps(m)  # plain numbers only


def test_multiclass_metrics_refuse_bad_input():
    with pytest.raises(CxrError, match="one row of 3 probabilities per label"):
        multiclass_metrics(Y, P[:, :2])
    with pytest.raises(CxrError, match="class numbers 0 to 2"):
        multiclass_metrics(Y + 1, P)
    # One class absent: the macro AUC is undefined, not an error.
    assert multiclass_metrics(Y[Y > 0], P[Y > 0])["roc_auc"] is None


# -- a tiny run, end to end (about 20 s of training: the slow lane) -------------------------------

@pytest.fixture(scope="module")
def subtype_run(tmp_path_factory) -> tuple[Path, Path]:
    from conftest import TINY_PRETRAINED, make_dataset
    from cxr_core.engine.train import train

    base = tmp_path_factory.mktemp("subtype")
    folder = make_dataset(base / "data", n_normal=18, n_pneumonia=36, size=32)
    config = RunConfig(data=DataConfig(data_dir=str(folder), split="random", task="subtype"), model=TINY_PRETRAINED,
                       train=TrainConfig(epochs=2, batch_size=8, cache_dir=str(base / "cache"), export_litert=False))
    return train(config, run_dir=base / "run"), folder


@pytest.mark.slow
def test_subtype_run_files_follow_the_contract(subtype_run):
    from cxr_core.runs.run_folder import RunFolder

    run, _ = subtype_run
    folder = RunFolder(run)
    assert folder.read_config().data.task == "subtype"
    metrics = folder.read_metrics()
    assert metrics["task"] == "subtype" and metrics["classes"] == list(SUBTYPES)
    assert metrics["threshold"] is None and metrics["threshold_rule"] == "argmax"
    assert set(metrics["test"]) == {"at_threshold"}
    for part in (metrics["val"], metrics["test"]["at_threshold"]):
        assert {"accuracy", "roc_auc", "per_class", "confusion_matrix", "pneumonia_vs_normal", "bacterial_vs_viral",
                "calibration"} <= set(part)
        assert np.asarray(part["confusion_matrix"]).shape == (3, 3)
    assert set(metrics["split_counts"]["train"]) == set(SUBTYPES)
    predictions = pd.read_csv(run / "predictions.csv")
    assert list(predictions.columns) == ["path", "y", "probability", "p_NORMAL", "p_BACTERIA", "p_VIRUS", "split",
                                         "label", "patient_id"]
    probs = predictions[["p_NORMAL", "p_BACTERIA", "p_VIRUS"]].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1.0)
    assert np.allclose(predictions["probability"], 1 - predictions["p_NORMAL"])
    assert (predictions["label"] == np.asarray(SUBTYPES, dtype=object)[probs.argmax(axis=1)]).all()
    assert set(predictions["y"]) == {0, 1, 2} and set(predictions["split"]) == {"val", "test"}
    test = predictions[predictions["split"] == "test"]
    again = multiclass_metrics(test["y"], test[["p_NORMAL", "p_BACTERIA", "p_VIRUS"]].to_numpy())
    stored = metrics["test"]["at_threshold"]
    assert stored["confusion_matrix"] == again["confusion_matrix"]
    assert stored["bacterial_vs_viral"] == pytest.approx(again["bacterial_vs_viral"])
    assert (stored["accuracy"], stored["roc_auc"]) == pytest.approx((again["accuracy"], again["roc_auc"]))
    history = folder.read_history()
    assert history[["loss", "accuracy", "auc", "val_loss", "val_accuracy", "val_auc"]].notna().all().all()
    split = pd.read_csv(run / "split.csv")
    train_part = split[split["split"] == "train"]
    assert train_part["label"].value_counts().nunique() == 1  # balanced by augmentation


@pytest.mark.slow
def test_cli_evaluate_json_for_a_subtype_run(subtype_run, capsys):
    from cxr_core.cli import main

    run, folder = subtype_run
    assert main(["evaluate", "--run", str(run), "--data", str(folder), "--engine", "keras", "--no-store"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "subtype" and result["classes"] == list(SUBTYPES) and result["n"] == 54
    assert {"accuracy", "roc_auc", "per_class", "confusion_matrix", "pneumonia_vs_normal", "bacterial_vs_viral",
            "calibration", "skipped", "overlap", "run", "data", "name", "engine"} <= set(result)
    assert "prevalence" not in result and "at_0.5" not in result
    assert set(result["per_class"]["VIRUS"]) == {"roc_auc", "sensitivity", "specificity", "precision", "n"}
    assert sum(map(sum, result["confusion_matrix"])) == 54
    assert result["overlap"]["train"] > 0  # the run's own images: not an external test
    # A threshold means nothing to a subtype run: exit 2 with one sentence.
    assert main(["evaluate", "--run", str(run), "--data", str(folder), "--threshold", "0.3", "--no-store"]) == 2
    assert "labels each image with its most probable class" in capsys.readouterr().err


def test_macro_auc_metric_matches_sklearn():
    import keras
    from sklearn.metrics import roc_auc_score

    from cxr_core.engine.losses import SparseMacroAUC

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    logits = rng.normal(size=(200, 3)) + 1.5 * np.eye(3)[y]
    metric = SparseMacroAUC(3)
    metric.update_state(y.astype(np.float32), logits.astype(np.float32))
    probs = np.asarray(keras.ops.softmax(logits, axis=-1))
    assert float(metric.result()) == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"), abs=0.01)
