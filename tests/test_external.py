"""External evaluation: stored in the run folder, shown first, and warned about when the images
were in the run's own training part; named recipes and how flags override them."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import TINY_MODEL, make_dataset
from cxr_core.cli import _parser, build_config, main
from cxr_core.core.config import DataConfig, RunConfig
from cxr_core.core.errors import BadSettingError
from cxr_core.core.metrics import binary_metrics, bootstrap_intervals
from cxr_core.core.recipes import RECIPES, apply_recipe
from cxr_core.data.scan import scan_dataset
from cxr_core.evaluation.external import evaluate_folder, overlap_warning
from cxr_core.runs import registry as runs
from cxr_core.runs.run_folder import RunFolder, evaluation_name


@pytest.fixture(scope="module")
def run_with_split(tmp_path_factory) -> tuple[Path, Path]:
    """A run (untrained tiny classifier, threshold 0.4) whose split.csv lists the images of a
    training data set; returns (run folder, that data set)."""
    from cxr_core.engine.model import build_classifier

    base = tmp_path_factory.mktemp("ext")
    train_data = make_dataset(base / "trainset", n_normal=6, n_pneumonia=8, seed=1)
    folder = RunFolder(base / "runs" / "run-a")
    folder.path.mkdir(parents=True)
    classifier = build_classifier(TINY_MODEL, seed=3)
    logit = classifier.get_layer("logit")
    kernel, bias = logit.get_weights()
    logit.set_weights([kernel * 20.0, bias])  # spread the probabilities
    folder.save_model(classifier)
    folder.write_config(RunConfig(data=DataConfig(data_dir=str(train_data)), model=TINY_MODEL))
    folder.write_metrics({"threshold": 0.4, "threshold_rule": "youden"})
    manifest = scan_dataset(train_data).manifest.assign(split="train", augment_seed=-1, is_augmented=False)
    folder.write_split(manifest)
    folder.write_status("done", message="test run")
    return folder.path, train_data


@pytest.mark.slow
def test_external_evaluation_is_stored_and_matches_the_predictions(run_with_split, tmp_path):
    run, _ = run_with_split
    outside = make_dataset(tmp_path / "site-b", n_normal=5, n_pneumonia=7, seed=9)
    result = evaluate_folder(run, outside, engine="keras")
    folder = RunFolder(run)
    stored = folder.read_evaluations()["site-b"]
    assert stored["roc_auc"] == result["roc_auc"] and stored["n"] == 12 and stored["name"] == "site-b"
    predictions = folder.read_evaluation_predictions("site-b")
    assert len(predictions) == 12
    expected = binary_metrics(predictions["y"], predictions["probability"], threshold=0.4)
    assert result["threshold"] == 0.4
    assert result["confusion_matrix"] == expected["confusion_matrix"]
    assert result["at_0.5"]["confusion_matrix"] == binary_metrics(
        predictions["y"], predictions["probability"], 0.5)["confusion_matrix"]
    assert result["overlap"] == {"train": 0, "val": 0, "test": 0} and result["warning"] is None
    # Kermany names with two or three films per child: intervals resample children, and are stored.
    assert result["intervals_by"] == "patient" and stored["intervals"] == result["intervals"]
    assert result["intervals"] == bootstrap_intervals(predictions["y"], predictions["probability"], 0.4,
                                                      groups=predictions["patient_id"])
    assert next(e for e in folder.evaluations() if e.name == "site-b").intervals_by == "patient"
    # The runs table and the pages show this figure first.
    summary = runs.summarize_run(run)
    assert (summary.external_name, summary.external_auc) == ("site-b", result["roc_auc"])
    assert summary.as_row()["external test set"] == "site-b"


@pytest.mark.slow  # builds or loads models: seconds
def test_images_from_the_training_part_are_warned_about_and_not_called_external(run_with_split, tmp_path):
    run, train_data = run_with_split
    mixed = tmp_path / "mixed"
    make_dataset(mixed, n_normal=3, n_pneumonia=3, seed=5)
    # Two NORMAL and one PNEUMONIA image copied from the training data, under new names.
    for i, source in enumerate(sorted((train_data / "NORMAL").glob("*.jpeg"))[:2]):
        (mixed / "NORMAL" / f"IM-{900 + i:04d}-0001.jpeg").write_bytes(source.read_bytes())
    source = sorted((train_data / "PNEUMONIA").glob("*.jpeg"))[0]
    (mixed / "PNEUMONIA" / "person900_bacteria_1.jpeg").write_bytes(source.read_bytes())
    result = evaluate_folder(run, mixed, engine="keras")
    assert result["overlap"]["train"] == 3
    assert result["warning"].startswith("3 of these 9 images were in this run's training part")
    folder = RunFolder(run)
    assert "mixed" in folder.read_evaluations()
    assert "mixed" not in folder.external_evaluations()
    assert runs.summarize_run(run).external_name != "mixed"


@pytest.mark.slow
def test_cli_evaluate_stores_unless_asked_not_to(run_with_split, tmp_path, capsys):
    run, _ = run_with_split
    other = make_dataset(tmp_path / "site-c", n_normal=4, n_pneumonia=4, seed=11)
    assert main(["evaluate", "--run", str(run), "--data", str(other), "--engine", "keras", "--no-store"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["n"] == 8 and "site-c" not in RunFolder(run).read_evaluations()
    assert printed["intervals_by"] == "patient" and set(printed["intervals"]) == {
        "roc_auc", "accuracy", "sensitivity", "specificity"}
    assert main(["evaluate", "--run", str(run), "--data", str(other), "--engine", "keras"]) == 0
    assert RunFolder(run).read_evaluations()["site-c"]["n"] == 8


def test_evaluation_names_are_safe_file_names():
    assert evaluation_name("/data/kermany224-test-dev") == "kermany224-test-dev"
    assert evaluation_name("/data/my set (2)") == "my-set-2"
    assert overlap_warning({"train": 0}, 10) is None


def _args(*argv: str) -> argparse.Namespace:
    return _parser().parse_args(["train", *argv])


def test_recipe_sets_training_choices_and_explicit_flags_override(tmp_path):
    data = str(tmp_path)
    config = build_config(_args("--data", data, "--recipe", "reference", "--backbone", "mobilenet_v2",
                                "--alpha", "0.35"))
    assert config.train.recipe == "reference"
    assert (config.data.split, config.train.epochs, config.train.balance) == ("random", 10, "augment")
    assert config.augment.rotation_range == 0.3 and config.augment.horizontal_flip is True
    # The recipe never changes the data, backbone, alpha or weights.
    assert (config.model.backbone, config.model.alpha) == ("mobilenet_v2", 0.35)
    overridden = build_config(_args("--data", data, "--recipe", "reference", "--epochs", "3", "--split", "patient",
                                    "--no-flip"))
    assert (overridden.train.epochs, overridden.data.split, overridden.augment.horizontal_flip) == (3, "patient", False)
    assert overridden.train.recipe == "reference"
    quick = build_config(_args("--data", data, "--recipe", "quick"))
    assert quick.data.limit is None and quick.model.image_size == 224 and quick.train.threshold_rule == "midpoint"
    assert build_config(_args("--data", data)).train.recipe == ""


def test_every_recipe_makes_a_valid_config_and_unknown_ones_are_refused():
    for name in RECIPES:
        config = apply_recipe(RunConfig(), name)
        assert config.train.recipe == name
        assert config.model.backbone == RunConfig().model.backbone
    with pytest.raises(BadSettingError, match="no recipe 'fastest'"):
        apply_recipe(RunConfig(), "fastest")


def test_bad_settings_exit_2_with_one_sentence(tmp_path, capsys):
    make_dataset(tmp_path / "d", n_normal=4, n_pneumonia=4)
    code = main(["train", "--data", str(tmp_path / "d"), "--backbone", "inception_v3", "--image-size", "64",
                 "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == "error: InceptionV3 (reference) needs images of at least 75 pixels; got 64."
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_stored_evaluation_survives_a_torn_neighbour(run_with_split):
    run, _ = run_with_split
    folder = RunFolder(run)
    (folder.path / "evaluations").mkdir(exist_ok=True)
    (folder.path / "evaluations" / "torn.json").write_text("{not json")
    assert "torn" not in folder.read_evaluations()
    frame = folder.read_evaluation_predictions("does-not-exist")
    assert isinstance(frame, pd.DataFrame) and frame.empty
    assert np.array_equal(frame.columns, ["path", "y", "probability"])


def test_balance_by_weights_make_a_confounded_property_uninformative(tmp_path):
    from cxr_core.data.plan import plan_run
    from cxr_core.engine.context import TrainingContext

    root = make_dataset(tmp_path / "site", n_normal=12, n_pneumonia=24, seed=2)
    scan = scan_dataset(root)
    # A "scanner" column confounded with the label: most pneumonia images from scanner B.
    rng = np.random.default_rng(0)
    scanner = np.where(scan.manifest["y"] == 1, np.where(rng.random(len(scan.manifest)) < 0.8, "B", "A"),
                       np.where(rng.random(len(scan.manifest)) < 0.8, "A", "B"))
    pd.DataFrame({"path": scan.manifest["relpath"], "scanner": scanner}).to_csv(root / "manifest.csv", index=False)
    config = build_config(_args("--data", str(root), "--balance", "class_weight", "--balance-by", "scanner",
                                "--split", "random"))
    plan = plan_run(config, scan_dataset(root).manifest)
    ctx = TrainingContext(config=config, folder=RunFolder(tmp_path / "run"), report=None, plan=plan)
    train = plan.rows[plan.rows["split"] == "train"]
    weights = ctx.sample_weights(train)
    assert weights is not None and weights.mean() == pytest.approx(1.0)
    frame = train.assign(w=weights)
    # Weighted, each scanner has the same share of pneumonia, and the classes weigh the same overall.
    share = frame.groupby("scanner").apply(lambda g: (g["w"] * g["y"]).sum() / g["w"].sum(), include_groups=False)
    assert share["A"] == pytest.approx(share["B"], abs=1e-6)
    assert (frame["w"] * frame["y"]).sum() == pytest.approx((frame["w"] * (1 - frame["y"])).sum())
    # Without balance_by, plain class weights apply.
    plain_config = build_config(_args("--data", str(root), "--split", "random"))
    plain = TrainingContext(config=plain_config, folder=RunFolder(tmp_path / "r2"), report=None,
                            plan=plan_run(plain_config, scan_dataset(root).manifest))
    assert plain.sample_weights(train) is None


def test_balance_by_a_missing_column_is_one_sentence(tmp_path):
    from cxr_core.core.errors import BadDatasetError
    from cxr_core.data.plan import plan_run

    root = make_dataset(tmp_path / "d", n_normal=12, n_pneumonia=12)
    config = build_config(_args("--data", str(root), "--balance-by", "scanner"))
    with pytest.raises(BadDatasetError, match="no column 'scanner' to balance by"):
        plan_run(config, scan_dataset(root).manifest)


def test_fine_tuning_learning_rate_schedules():
    from cxr_core.engine.losses import learning_rate as _learning_rate

    def config(**train):
        return build_config(_args("--data", ".", "--fine-tune-layers", "-1", "--fine-tune-epochs", "5",
                                  "--fine-tune-learning-rate", "0.001", *[x for k, v in train.items()
                                                                          for x in (f"--{k}", str(v))]))

    assert _learning_rate(config(), 10) == 0.001
    cosine = _learning_rate(config(**{"warmup-epochs": 1, "schedule": "cosine"}), 10)
    rates = [float(cosine(step)) for step in (0, 10, 30, 49)]
    assert rates[0] < 1e-4 and rates[1] == pytest.approx(0.001) and rates[1] > rates[2] > rates[3]
    flat = _learning_rate(config(**{"warmup-epochs": 2}), 10)
    assert float(flat(0)) < 1e-4 and float(flat(20)) == pytest.approx(0.001) == pytest.approx(float(flat(45)))
    with pytest.raises(BadSettingError, match="warmup_epochs"):
        config(**{"warmup-epochs": 6})


@pytest.mark.slow
def test_a_run_with_every_robustness_choice_trains_and_records_them(tmp_path):
    from cxr_core.engine.train import train

    root = make_dataset(tmp_path / "site", n_normal=16, n_pneumonia=24, size=40, seed=4)
    scan = scan_dataset(root)
    pd.DataFrame({"path": scan.manifest["relpath"], "copy": np.arange(len(scan.manifest)) % 2}).to_csv(
        root / "manifest.csv", index=False)
    config = build_config(_args(
        "--data", str(root), "--backbone", "mobilenet_v2", "--alpha", "0.35", "--weights", "none",
        "--image-size", "32", "--epochs", "0", "--fine-tune-layers", "-1", "--fine-tune-epochs", "2",
        "--warmup-epochs", "1", "--schedule", "cosine", "--label-smoothing", "0.1", "--balance-by", "copy",
        "--balance", "class_weight", "--online-augment", "--blur", "1.0", "--downscale", "0.3",
        "--jpeg-quality", "40", "--contrast", "0.2", "--gamma", "0.2", "--split", "random",
        "--no-export-litert"))
    run = train(config, run_dir=tmp_path / "run")
    assert runs.read_status(run)["state"] == "done"
    saved = RunFolder(run).read_config()
    assert (saved.train.balance_by, saved.train.schedule, saved.train.label_smoothing) == ("copy", "cosine", 0.1)
    assert saved.augment.jpeg_quality == 40
    history = RunFolder(run).read_history()
    # As the demo recipe trains: no head phase, the whole network from random weights on streamed images.
    assert list(history["phase"]) == ["fine_tune", "fine_tune"]


def test_a_recipe_balances_by_its_column_only_when_the_data_set_has_it(tmp_path):
    from cxr_core.data.plan import plan_run

    root = make_dataset(tmp_path / "plain", n_normal=12, n_pneumonia=12)
    config = build_config(_args("--data", str(root), "--recipe", "best"))
    assert config.train.balance_by == "source_resolution"
    plan = plan_run(config, scan_dataset(root).manifest)
    assert plan.balance_by == ""
    assert plan.notes == ("The data set has no source_resolution column, so the best recipe trains without "
                          "balancing by it.",)
