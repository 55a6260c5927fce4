"""The table of training settings (cxr_core.core.settings) is the one place a setting is written: the command
line, the README's usage block, recipe validation and the Training form's rows all come from it."""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest

from cxr_core import cli
from cxr_core.core import recipes, settings
from cxr_core.core.config import AugmentConfig, DataConfig, ModelConfig, RunConfig, TrainConfig
from cxr_core.core.errors import BadSettingError, CxrError
from cxr_core.core.recipes import Recipe, apply_recipe
from cxr_core.core.settings import LEARNING_RATE_RULE, Setting, check_recipe
from cxr_core.io.atomic import json_default

ROOT = Path(__file__).resolve().parents[1]

#: The train flags the README, the tests and people's scripts use: none may change its name.
FLAGS_BEFORE_THE_TABLE = {
    "--data", "--task", "--config", "--recipe", "--out", "--run-dir", "--lock-file", "--backbone", "--alpha",
    "--weights", "--image-size", "--dropout", "--epochs", "--batch-size", "--learning-rate", "--balance", "--split",
    "--val-fraction", "--test-fraction", "--fine-tune-layers", "--fine-tune-epochs", "--fine-tune-learning-rate",
    "--online-augment", "--no-online-augment", "--threshold-rule", "--target-sensitivity", "--label-smoothing",
    "--warmup-epochs", "--schedule", "--fine-tune-batchnorm", "--no-fine-tune-batchnorm", "--weight-decay",
    "--balance-by", "--rotation-range", "--shift", "--zoom", "--blur", "--downscale", "--jpeg-quality", "--contrast",
    "--gamma", "--no-flip", "--limit", "--seed", "--cache-dir", "--export-litert", "--no-export-litert",
    "--distribute", "--precision", "--cpu-replicas", "-v", "--verbose", "-h", "--help",
}


def _train_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    return parser._subparsers._group_actions[0].choices["train"]


def _build(*argv: str) -> RunConfig:
    return cli.build_config(cli._parser().parse_args(["train", *argv]))


# --- the table itself -------------------------------------------------------------------------------------

def test_every_config_field_is_a_setting_or_listed_as_not_one():
    table, excluded = settings.setting_fields(), set(settings.NOT_SETTINGS)
    assert table | excluded == settings.config_fields()
    assert not table & excluded, "a field is both a setting and listed as not one"
    assert all(reason.strip() for reason in settings.NOT_SETTINGS.values())


def test_every_row_names_a_real_field_and_is_well_formed():
    real = settings.config_fields()
    names, flags, keys = set(), set(), set()
    for row in settings.SETTINGS:
        assert set(row.fields) <= real, row.name
        assert not set(row.fields) & names, f"{row.name}: a field set by two rows"
        names.update(row.fields)
        assert row.type in settings.TYPES and row.form in (None, *settings.FORM_LEVELS), row.name
        if row.flag:
            assert row.flag.startswith("--") and row.flag not in flags, row.flag
            flags.add(row.flag)
        if row.type == "choice":
            assert row.default in row.choice_values, f"{row.name}: its default is not one of its choices"
        if row.form:
            key = row.session_key(backbone="mobilenet_v2")
            assert row.label and key not in keys, row.name
            keys.add(key)
            start = row.form_start(backbone="mobilenet_v2")
            if row.range is not None and row.widget_call != "select_slider":
                assert row.range[0] <= start <= row.range[1], f"{row.name}: starts outside its range"
            if row.widget_call in ("select_slider", "selectbox") and row.name != "model.weights":
                assert start in row.form_options(), f"{row.name}: starts outside its options"


def test_form_levels_hold_todays_widgets_and_keys():
    """The basic rows are the Training form's hand-made widgets, under the session keys the page uses today."""
    basic = {row.name: row.session_key(backbone="mobilenet_v2") for row in settings.FORM_BASIC}
    assert basic == {
        "data.task": "train_task", "data.split": "train_split", "data.limit": "train_limit",
        "model.backbone": "train_backbone", "model.weights": "train_weights", "model.alpha": "train_alpha_free",
        "model.image_size": "train_size_mobilenet_v2", "model.dropout": "train_dropout",
        "train.epochs": "train_epochs", "train.batch_size": "train_batch", "train.learning_rate": "train_lr",
        "train.balance": "train_balance", "train.fine_tune_layers": "train_ft_layers",
        "train.fine_tune_epochs": "train_ft_epochs", "train.threshold_rule": "train_rule",
    }
    # The starting values and ranges the page had before it drew its widgets from the table: they must hold.
    rows = {row.session_key(backbone="mobilenet_v2"): row for row in settings.FORM_BASIC}
    starts = {key: rows[key].form_start() for key in ("train_epochs", "train_batch", "train_lr", "train_dropout",
                                                       "train_limit", "train_ft_epochs")}
    assert starts == {"train_epochs": 10, "train_batch": 32, "train_lr": 1e-3, "train_dropout": 0.5,
                      "train_limit": 0, "train_ft_epochs": 3}
    assert {key: rows[key].range for key in ("train_epochs", "train_ft_epochs", "train_dropout", "train_limit")} == {
        "train_epochs": (0, 200), "train_ft_epochs": (0, 100), "train_dropout": (0.0, 0.9),
        "train_limit": (0, 1_000_000)}
    advanced = settings.FORM_ADVANCED
    assert advanced and all(row.session_key() == "train_" + row.name.split(".")[1] for row in advanced)
    # What other pages choose or only a server operator sets stays off the form.
    assert not any(row.form for row in settings.SETTINGS if row.name.startswith("augment."))
    assert {"train.cache_dir", "train.distribute", "train.precision", "train.cpu_replicas"} <= {
        row.name for row in settings.SETTINGS if row.form is None}


# --- the command line --------------------------------------------------------------------------------------

def test_every_flag_keeps_its_name_and_help():
    train = _train_parser(cli._parser())
    options = {option for action in train._actions for option in action.option_strings}
    assert not FLAGS_BEFORE_THE_TABLE - options, "a flag was renamed or removed"
    helps = {action.dest: action.help for action in train._actions}
    assert helps["epochs"] == "epochs of the head phase on cached features (default 10)"
    assert helps["seed"] == "seed of split, augmentation and training (default 123)"
    assert helps["backbone"].endswith("(default inception_v3)")
    assert helps["distribute"].endswith(f"With several replicas, {LEARNING_RATE_RULE}")
    assert helps["batch_size"] is None  # no help today: none made up


def test_a_full_command_line_gives_the_same_config_as_a_hand_made_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _build(
        "--data", "d", "--task", "subtype", "--split", "patient", "--val-fraction", "0.2", "--test-fraction", "0.15",
        "--limit", "60", "--seed", "7", "--backbone", "mobilenet_v2", "--alpha", "0.35", "--weights", "w/tiny.h5",
        "--image-size", "96", "--dropout", "0.3", "--epochs", "3", "--batch-size", "8", "--learning-rate", "0.01",
        "--balance", "none", "--fine-tune-layers", "-1", "--fine-tune-epochs", "4", "--fine-tune-learning-rate",
        "0.002", "--online-augment", "--threshold-rule", "sensitivity", "--target-sensitivity", "0.9",
        "--label-smoothing", "0.1", "--warmup-epochs", "2", "--schedule", "cosine", "--fine-tune-batchnorm",
        "--weight-decay", "0.001", "--balance-by", "scanner", "--rotation-range", "5", "--shift", "0.2", "--zoom",
        "0.1", "--no-flip", "--blur", "1", "--downscale", "0.5", "--jpeg-quality", "40", "--contrast", "0.2",
        "--gamma", "0.3", "--noise", "4", "--brightness-range", "0.8", "1.2", "--cache-dir", "cache",
        "--no-export-litert", "--distribute", "mirrored", "--precision", "float32", "--cpu-replicas", "2")
    expected = RunConfig(
        data=DataConfig(data_dir=str(tmp_path / "d"), split="patient", seed=7, val_fraction=0.2, test_fraction=0.15,
                        limit=60, task="subtype"),
        augment=AugmentConfig(rotation_range=5.0, horizontal_flip=False, brightness_range=(0.8, 1.2),
                              width_shift=0.2, height_shift=0.2, zoom=0.1, blur=1.0, downscale=0.5, jpeg_quality=40,
                              contrast=0.2, gamma=0.3, noise=4.0),
        model=ModelConfig(backbone="mobilenet_v2", weights=str(tmp_path / "w" / "tiny.h5"), image_size=96,
                          alpha=0.35, dropout=0.3),
        train=TrainConfig(epochs=3, batch_size=8, learning_rate=0.01, balance="none", fine_tune_layers=-1,
                          fine_tune_epochs=4, fine_tune_learning_rate=0.002, threshold_rule="sensitivity",
                          target_sensitivity=0.9, seed=7, online_augment=True, cache_dir="cache",
                          export_litert=False, balance_by="scanner", label_smoothing=0.1, warmup_epochs=2,
                          schedule="cosine", fine_tune_batchnorm=True, weight_decay=0.001, distribute="mirrored",
                          precision="float32", cpu_replicas=2),
    )
    assert config == expected


def test_flags_not_given_keep_the_config_files_and_the_recipes_values(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = RunConfig(data=DataConfig(data_dir=str(tmp_path / "old"), split="patient", limit=50),
                     augment=AugmentConfig(horizontal_flip=False, noise=3.0),
                     train=TrainConfig(epochs=4, online_augment=True, export_litert=False))
    (tmp_path / "config.json").write_text(json.dumps(base.to_dict()), encoding="utf-8")
    assert _build("--config", "config.json") == base
    # --online-augment / --no-online-augment: given either way it wins; not given, the file's value stays.
    assert _build("--config", "config.json", "--no-online-augment").train.online_augment is False
    changed = _build("--config", "config.json", "--data", "new", "--export-litert", "--limit", "20")
    assert changed == dataclasses.replace(
        base, data=dataclasses.replace(base.data, data_dir=str(tmp_path / "new"), limit=20),
        train=dataclasses.replace(base.train, export_litert=True))
    # The recipe first, the flags over it; --seed sets both seeds; imagenet|none in any case.
    best = apply_recipe(RunConfig(), "best")
    config = _build("--data", "d", "--recipe", "best", "--no-fine-tune-batchnorm", "--epochs", "5", "--seed", "9",
                    "--weights", "ImageNet")
    assert config == RunConfig(
        data=dataclasses.replace(best.data, data_dir=str(tmp_path / "d"), seed=9), augment=best.augment,
        model=best.model, train=dataclasses.replace(best.train, fine_tune_batchnorm=False, epochs=5, seed=9))
    assert _build("--data", "d", "--weights", "NONE").model.weights == "none"


def test_a_refused_combination_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CxrError, match=r"^warmup_epochs must be between 0 and the fine-tuning epochs \(0\); got 3\.$"):
        _build("--data", "d", "--warmup-epochs", "3")
    with pytest.raises(CxrError, match="^No data set given"):
        _build("--epochs", "2")
    with pytest.raises(CxrError, match=r"^limit must be at least 10 images; got 3\.$"):
        _build("--data", "d", "--limit", "3")


def test_printed_json_converts_numbers_paths_and_sets_and_names_anything_else():
    answer = {"auc": np.float32(0.5), "counts": np.array([1, 2]), "file": Path("a.png"), "classes": {"B", "A"},
              "other": object}
    printed = json.loads(json.dumps(answer, default=cli._json_default))
    assert printed["auc"] == 0.5 and printed["counts"] == [1, 2] and printed["file"] == "a.png"
    assert printed["classes"] == ["A", "B"] and printed["other"] == str(object)
    with pytest.raises(TypeError):  # the run files never hold an object written as its text by accident
        json_default(object)


# --- the README and the recipes ---------------------------------------------------------------------------

def test_readme_usage_block_is_the_generated_one():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"^    python -m cxr_core train .*?(?=^    python -m cxr_core evaluate)", readme, re.S | re.M)
    assert block, "README.md has no `python -m cxr_core train` usage block"
    assert block.group(0) == settings.readme_usage(), (
        "README's train usage is out of date: replace it with `python -m cxr_core.core.settings --readme`")
    for row in settings.cli_rows():
        changes_default = row.type == "bool" and row.flag_sets is None and row.default
        assert (f"--no-{row.flag[2:]}" if changes_default else row.flag) in block.group(0)


def test_recipes_set_only_settings_and_each_applies():
    for name, recipe in recipes.RECIPES.items():
        check_recipe(recipe)
        assert apply_recipe(RunConfig(), name).train.recipe == name
    typo = Recipe("typo", "A typo", "", {"train": {"epochs": 3, "fine_tune_epoch": 2}})
    with pytest.raises(BadSettingError, match=r"^The recipe 'typo' sets train\.fine_tune_epoch, which is not a "):
        check_recipe(typo)
    with pytest.raises(BadSettingError, match=r"sets data\.data_dir"):  # a field, but not a choice of training
        check_recipe(Recipe("data", "Data", "", {"data": {"data_dir": "/x"}}))


# --- the Training form ------------------------------------------------------------------------------------

def test_form_values_turn_into_the_config_the_form_made_by_hand():
    """What pages/training.settings_form builds today from its widgets, from the same widget values."""
    base = apply_recipe(RunConfig(), "best")
    widgets = {"data.split": "patient", "data.task": "pneumonia", "data.limit": 0, "model.backbone": "mobilenet_v2",
               "model.weights": "none", "model.image_size": 128, "model.alpha": 0.35, "model.dropout": 0.25,
               "train.epochs": 2, "train.batch_size": 16, "train.learning_rate": 3e-3, "train.balance": "none",
               "train.fine_tune_layers": 0, "train.fine_tune_epochs": 5, "train.threshold_rule": "midpoint"}
    by_hand = RunConfig(
        data=dataclasses.replace(base.data, split="patient", task="pneumonia", limit=None),
        augment=base.augment,
        model=dataclasses.replace(base.model, backbone="mobilenet_v2", weights="none", image_size=128, alpha=0.35,
                                  dropout=0.25),
        train=dataclasses.replace(base.train, epochs=2, batch_size=16, learning_rate=3e-3, balance="none",
                                  fine_tune_layers=0, fine_tune_epochs=0, threshold_rule="midpoint", warmup_epochs=0),
    )
    # Fine-tune epochs count only with fine-tuned layers; so does the warm-up (best's 1 would be refused).
    assert settings.apply_form_values(base, {**widgets, "train.warmup_epochs": 1}) == by_hand
    tuned = settings.apply_form_values(base, {**widgets, "train.fine_tune_layers": 20, "data.limit": 300})
    assert (tuned.train.fine_tune_epochs, tuned.data.limit) == (5, 300)
    # Filling the form from a config and reading it back gives that config's settings.
    filled = settings.form_values(tuned, "basic", backbone="mobilenet_v2")
    assert filled["train_limit"] == 300 and filled["train_size_mobilenet_v2"] == 128
    read_back = settings.values_from_state(filled, "basic", backbone="mobilenet_v2")
    assert settings.apply_form_values(base, read_back) == tuned
    with pytest.raises(BadSettingError, match="dropout must be in"):
        settings.apply_form_values(base, {"model.dropout": 1.5})


def test_widget_kwargs_follow_the_session():
    rows = {row.name: row for row in settings.SETTINGS}
    limit = rows["data.limit"].widget_kwargs({})
    assert limit == {"label": "Quick demo: use only this many images (0 = all)", "key": "train_limit",
                     "help": limit["help"], "min_value": 0, "max_value": 1_000_000, "step": 50, "value": 0}
    assert "value" not in rows["data.limit"].widget_kwargs({"train_limit": 600})  # the session's value wins
    learning_rate = rows["train.learning_rate"].widget_kwargs({"train_lr": 5e-4})  # a recipe's value
    assert learning_rate["options"] == [1e-4, 3e-4, 5e-4, 1e-3, 3e-3, 1e-2]
    layers = rows["train.fine_tune_layers"].widget_kwargs({"train_ft_layers": 100})
    assert layers["options"] == [0, 10, 20, 40, 80, 100, -1]
    assert [layers["format_func"](n) for n in (0, 100, -1)] == ["none (frozen backbone)", "top 100", "all layers"]
    epochs = rows["train.fine_tune_epochs"]
    assert epochs.widget_kwargs({})["disabled"] and not epochs.widget_kwargs({"train_ft_layers": 10})["disabled"]
    assert rows["model.image_size"].widget_kwargs({}, backbone="inception_v3")["value"] == 299


@pytest.mark.slow
def test_advanced_rows_draw_as_streamlit_widgets_and_read_back():
    """Every advanced row through Streamlit itself: its kwargs are valid, its values make the config."""
    from streamlit.testing.v1 import AppTest

    def form():
        import streamlit as st

        from cxr_core.core import settings
        from cxr_core.core.config import RunConfig

        for row in settings.form_rows("advanced"):
            getattr(st, row.widget_call)(**row.widget_kwargs(st.session_state))
        values = settings.values_from_state(st.session_state, "advanced")
        st.session_state["made"] = settings.apply_form_values(RunConfig(), values).to_dict()

    at = AppTest.from_function(form).run(timeout=30)
    assert not at.exception
    assert at.session_state["made"] == RunConfig().to_dict()  # the widgets start at the config's defaults
    at.toggle(key="train_online_augment").set_value(True)
    at.selectbox(key="train_schedule").set_value("cosine")
    at.text_input(key="train_balance_by").set_value("scanner")
    at.run(timeout=30)
    made = RunConfig.from_dict(at.session_state["made"]).train
    assert (made.online_augment, made.schedule, made.balance_by) == (True, "cosine", "scanner")
    assert at.number_input(key="train_warmup_epochs").disabled  # no fine-tuned layers chosen: no warm-up


# --- a new setting is one row ------------------------------------------------------------------------------

def test_a_setting_added_to_the_table_reaches_the_cli_readme_form_and_recipes(monkeypatch, tmp_path):
    """``train.restore_best`` has no row (it is listed as not a setting): adding one row makes it a flag, a
    README entry, an advanced widget and a field recipes may set, with nothing else edited."""
    keeps_best = Recipe("keeps", "Keeps the last epoch", "", {"train": {"restore_best": False}})
    with pytest.raises(BadSettingError, match="restore_best"):
        check_recipe(keeps_best)
    row = Setting("train.restore_best", "--restore-best", "bool", "keep the weights of the best validation epoch",
                  form="advanced", label="Keep the best epoch")
    monkeypatch.setattr(settings, "SETTINGS", (*settings.SETTINGS, row))
    monkeypatch.setattr(settings, "NOT_SETTINGS",
                        {k: v for k, v in settings.NOT_SETTINGS.items() if k != "train.restore_best"})
    monkeypatch.chdir(tmp_path)

    train_help = _train_parser(cli._parser()).format_help()
    assert "--restore-best, --no-restore-best" in train_help and "keep the weights of the best" in train_help
    assert _build("--data", "d", "--no-restore-best").train.restore_best is False
    assert _build("--data", "d").train.restore_best is True
    assert "[--no-restore-best]" in settings.readme_usage()
    (added,) = [r for r in settings.form_rows("advanced") if r.name == "train.restore_best"]
    assert added.widget_call == "toggle" and added.widget_kwargs({})["key"] == "train_restore_best"
    assert settings.apply_form_values(RunConfig(), {"train.restore_best": False}).train.restore_best is False
    check_recipe(keeps_best)
    assert settings.setting_fields() | set(settings.NOT_SETTINGS) == settings.config_fields()


def test_limit_zero_on_the_command_line_means_every_image():
    from cxr_core import cli

    parser = cli._parser()
    given = cli.build_config(parser.parse_args(["train", "--data", "x", "--limit", "50"]))
    every = cli.build_config(parser.parse_args(["train", "--data", "x", "--limit", "50", "--limit", "0"]))
    assert given.data.limit == 50 and every.data.limit is None
