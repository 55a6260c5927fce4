"""Training: configure a run, launch it in the background, watch it live, manage past runs."""
import dataclasses
import os
import re
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from cxr_core import jobs, plan, runs
from cxr_core.backbones import BACKBONES
from cxr_core.config import (
    BALANCE_STRATEGIES,
    SPLIT_LABELS,
    SPLIT_MODES,
    RunConfig,
)
from cxr_core.errors import CxrError, TrainingBusyError
from cxr_core.labels import THRESHOLD_RULES
from cxr_core.recipes import RECIPES, apply_recipe
from cxr_core.run_folder import RunFolder
from pages.ui import PROJECT_ROOT, charts, datasets, frame, models, session

frame.page_header(
    "Training",
    "Training reuses a network pretrained on everyday photos (**transfer learning**): the frozen backbone "
    "turns each X-ray into features once, then a small head learns to separate normal from pneumonia. "
    "Optionally the top layers are then **fine-tuned** at a low learning rate. Runs go on in the "
    "background, so you can leave this page and come back.",
)

STAGES = {"scan": "Reading the data set", "split": "Splitting", "extract": "Extracting features",
          "train": "Training the head", "fine_tune": "Fine-tuning", "evaluate": "Testing",
          "save": "Saving the model", "export": "Exporting for light prediction", "done": "Done", "failed": "Failed",
          "cancelled": "Cancelled"}
KEY_LIVE_STATE = "training_live_state"  # {run_dir: last state seen} so a finish refreshes the page once
SIZES = [32, 64, 96, 128, 160, 192, 224, 256, 299, 320, 384]
PERSIST = {"persist_state": "session"}
# Widget defaults, given through Session State (a recipe fills the same keys).
FORM_DEFAULTS = {"train_epochs": 10, "train_batch": 32, "train_lr": 1e-3, "train_dropout": 0.5, session.KEY_LIMIT: 0}


def weight_files() -> list[Path]:
    """Weights files (*.h5) in ./weights or $CXR_WEIGHTS_DIR, for machines without internet."""
    folders = [PROJECT_ROOT / "weights"]
    if os.environ.get("CXR_WEIGHTS_DIR"):
        folders.insert(0, Path(os.environ["CXR_WEIGHTS_DIR"]).expanduser())
    found = []
    for folder in folders:
        if folder.is_dir():
            found += sorted(p for p in folder.rglob("*.h5") if p.is_file())
    return found


def _fill_from_recipe() -> None:
    """Widget callback: put the chosen recipe's settings into the form (the person may then change any)."""
    name = st.session_state.get(session.KEY_RECIPE) or ""
    if not name:
        return
    config = apply_recipe(RunConfig(), name)
    backbone = st.session_state.get("train_backbone", "inception_v3")
    values = {
        "train_epochs": config.train.epochs, "train_batch": config.train.batch_size,
        "train_lr": config.train.learning_rate, "train_ft_layers": config.train.fine_tune_layers,
        "train_ft_epochs": config.train.fine_tune_epochs, "train_rule": config.train.threshold_rule,
        "train_split": config.data.split, "train_balance": config.train.balance,
        session.KEY_LIMIT: config.data.limit or 0, "train_dropout": config.model.dropout,
        f"train_size_{backbone}": config.model.image_size or BACKBONES[backbone].default_size,
    }
    for key, value in values.items():
        st.session_state[key] = value
    st.session_state[session.KEY_SPLIT] = config.data.split
    st.session_state[session.KEY_BALANCE] = config.train.balance
    st.session_state[session.KEY_AUGMENT] = asdict(config.augment)
    for key in [k for k in st.session_state if str(k).startswith("aug_")]:
        del st.session_state[key]  # the Augmentation page's widgets take the recipe's values anew


def recipe_choice() -> str:
    """The recipe the settings start from, with what it is for and what it measured."""
    names = ["", *RECIPES]
    if st.session_state.get(session.KEY_RECIPE) not in names:
        st.session_state[session.KEY_RECIPE] = ""
    left, right = st.columns([1, 2])
    name = left.selectbox("Recipe", names, key=session.KEY_RECIPE, on_change=_fill_from_recipe,
                          format_func=lambda n: RECIPES[n].label if n else "None: my own settings",
                          help="A named set of training choices, measured in benchmarks/ACCURACY.md. It fills "
                               "in the settings below; change any of them and the change wins.")
    if name:
        recipe = RECIPES[name]
        right.markdown(recipe.purpose)
        if recipe.expected:
            right.caption(f"Measured: {recipe.expected}")
    else:
        right.caption("Choose a recipe to start from measured settings, or set everything yourself.")
    return name


def _options(values: list, current) -> list:
    """Slider options that include a value a recipe put into the form."""
    return sorted(set(values) | ({current} if current is not None else set()))


def settings_form(has_official: bool) -> RunConfig | None:
    """The run settings; returns a RunConfig (None when the choices are invalid)."""
    recipe = recipe_choice()
    for key, value in FORM_DEFAULTS.items():
        st.session_state.setdefault(key, value)
    with st.container(border=True):
        st.markdown("**Model**")
        c1, c2, c3 = st.columns(3)
        names = list(BACKBONES)
        backbone = c1.selectbox("Backbone", names, index=names.index("inception_v3") if "inception_v3" in names else 0,
                                format_func=lambda n: BACKBONES[n].label, key="train_backbone", **PERSIST,
                                help="InceptionV3 at 299 px is the reference (about 8 images/s on a 2-core laptop: "
                                     "the estimate below says how long); MobileNetV2 is several times faster.")
        spec = BACKBONES[backbone]
        matching = [p for p in weight_files() if backbone.split("_")[0] in p.name.lower()]
        others = [p for p in weight_files() if p not in matching]
        # A local weights file made for this backbone first (works offline), then ImageNet (downloads).
        weight_options = [str(p) for p in matching] + ["imagenet", "none"] + [str(p) for p in others]
        weight_names = {"imagenet": "ImageNet (downloads once; needs internet)",
                        "none": "None (random: learn from scratch)"}
        weights = c2.selectbox("Starting weights", weight_options, key=f"train_weights_{backbone}",
                               format_func=lambda w: weight_names.get(w, f"File: {Path(w).name}"),
                               help="Pretrained weights make a few epochs enough. Without internet, put a "
                                    "*.weights.h5 file in ./weights (or $CXR_WEIGHTS_DIR).")
        sizes = sorted({s for s in SIZES if s >= spec.min_size} | {spec.default_size}
                       | {st.session_state.get(f"train_size_{backbone}") or spec.default_size})
        st.session_state.setdefault(f"train_size_{backbone}", spec.default_size)
        size = c3.select_slider("Image size (pixels)", sizes, key=f"train_size_{backbone}",
                                help="Images are resized to a square of this side. Smaller is much faster "
                                     "and loses fine detail.")
        alpha = 1.0
        if spec.supports_alpha:
            # A weights file fits one width only; Keras names them ..._<alpha>_<size>_no_top...
            match = (re.search(r"_(0\.35|0\.5|0\.75|1\.0)_", Path(weights).name)
                     if weights not in ("imagenet", "none") else None)
            alpha = c1.select_slider("Width (alpha)", [0.35, 0.5, 0.75, 1.0],
                                     value=float(match.group(1)) if match else 1.0,
                                     key=f"train_alpha_{match.group(1) if match else 'free'}",
                                     disabled=match is not None,
                                     help="MobileNetV2's width multiplier: 0.35 is about 8× smaller and faster. "
                                          "A weights file fixes it.")
        dropout = c2.slider("Dropout before the last layer", 0.0, 0.9, step=0.05, key="train_dropout", **PERSIST,
                            help="Randomly silences this share of features while training (0.5 in the reference), "
                                 "which fights overfitting.")

        st.markdown("**Training**")
        c1, c2, c3 = st.columns(3)
        epochs = c1.number_input("Epochs", 0, 200, key="train_epochs", **PERSIST,
                                 help="Passes over the training images for the head (fast: on cached features).")
        batches = _options([8, 16, 32, 64, 128], st.session_state.get("train_batch"))
        batch = c2.select_slider("Batch size", batches, key="train_batch", **PERSIST)
        rates = _options([1e-4, 3e-4, 1e-3, 3e-3, 1e-2], st.session_state.get("train_lr"))
        lr = c3.select_slider("Learning rate", rates, key="train_lr", format_func=lambda v: f"{v:g}",
                              **PERSIST)
        c1, c2, c3 = st.columns(3)
        layer_choices = [0, 10, 20, 40, 80, -1]
        if st.session_state.get("train_ft_layers") not in (None, *layer_choices):
            layer_choices.insert(-1, st.session_state["train_ft_layers"])
        ft_layers = c1.selectbox("Fine-tune top layers", layer_choices, key="train_ft_layers", **PERSIST,
                                 format_func=lambda n: {0: "none (frozen backbone)",
                                                        -1: "all layers"}.get(n, f"top {n}"),
                                 help="After the head, unfreeze this many top backbone layers and train on at a low "
                                      "learning rate (1e-5). Slower: the images go through the backbone every epoch.")
        st.session_state.setdefault("train_ft_epochs", 3)
        ft_epochs = c2.number_input("Fine-tune epochs", 0, 100, key="train_ft_epochs",
                                    disabled=ft_layers == 0)
        threshold_rule = c3.selectbox("Threshold rule", THRESHOLD_RULES, key="train_rule", **PERSIST,
                                      format_func={"youden": "Youden (balance both)",
                                                   "sensitivity": "95 % sensitivity (screening)",
                                                   "midpoint": "Midpoint (robust to a new site)"}.get,
                                      help="How the decision threshold is chosen on the validation images: "
                                           "Youden maximises sensitivity + specificity; the screening rule "
                                           "takes the highest threshold that still finds 95 % of pneumonias; "
                                           "the midpoint lies halfway between the two classes' typical scores, "
                                           "so it moves less when images from elsewhere score differently.")

        st.markdown("**Data**")
        c1, c2, c3 = st.columns(3)
        current_split = st.session_state.get(session.KEY_SPLIT, "random")
        st.session_state.setdefault("train_split", current_split)
        split = c1.selectbox("Split", SPLIT_MODES, key="train_split",
                             format_func=SPLIT_LABELS.get,
                             help="Chosen on the Dataset page by default. A random split by image lets one "
                                  "patient's images land in training and test, which flatters the model.")
        current_balance = st.session_state.get(session.KEY_BALANCE, "augment")
        st.session_state.setdefault("train_balance", current_balance)
        balance = c2.selectbox("Balance strategy", BALANCE_STRATEGIES,
                               key="train_balance", format_func={"augment": "Augment NORMAL (reference)",
                                                                 "class_weight": "Class weights", "none": "None"}.get)
        limit = c3.number_input("Quick demo: use only this many images (0 = all)", 0, 1_000_000, step=50,
                                key=session.KEY_LIMIT, **PERSIST,
                                help="A stratified subset (same class shares) for a fast first run; at least 10.")
        aug = session.augment_config()
        st.caption(
            f"Augmentation from the Augmentation page: rotation ±{aug.rotation_range:g}°, "
            f"flip {'on' if aug.horizontal_flip else 'off'}, "
            f"brightness {aug.brightness_range[0]:g}–{aug.brightness_range[1]:g}, "
            f"shifts {aug.width_shift:g}/{aug.height_shift:g}, zoom {aug.zoom:g}"
            + (" (the reference)." if session.augment_is_default() else ".")
        )
    if split == "official" and not has_official:
        st.error("The official split needs the Kermany layout (train/val/test folders); this data set has none. "
                 "Choose the random or patient split.")
        return None
    path = datasets.dataset_path()
    # The recipe gives every choice the form does not show (e.g. the fine-tuning learning rate);
    # the form's values win for the rest.
    base = apply_recipe(RunConfig(), recipe) if recipe else RunConfig()
    try:
        return RunConfig(
            data=dataclasses.replace(base.data, data_dir=str(path) if path else "", split=split,
                                     limit=int(limit) or None),
            augment=aug,
            model=dataclasses.replace(base.model, backbone=backbone, weights=weights, image_size=int(size),
                                      alpha=float(alpha), dropout=float(dropout)),
            train=dataclasses.replace(base.train, epochs=int(epochs), batch_size=int(batch), learning_rate=float(lr),
                                      balance=balance, fine_tune_layers=int(ft_layers),
                                      fine_tune_epochs=int(ft_epochs) if ft_layers else 0,
                                      threshold_rule=threshold_rule),
        )
    except ValueError as error:
        st.error(f"These settings cannot be used: {error}")
        return None


def launch_section(config: RunConfig | None, n_images: int | None) -> None:
    if config is None or n_images is None:
        return
    n = min(n_images, config.data.limit or n_images)
    seconds = plan.estimate_seconds(config, n)
    left, right = st.columns([3, 1], vertical_alignment="center")
    left.markdown(f"**Estimated time: about {charts.fmt_seconds(seconds)}** for {n:,} images on this machine "
                  f"({os.cpu_count()} CPU cores). Features already extracted by an earlier run with the same "
                  "backbone, size and images are reused, so a second run is much faster.")
    if config.model.weights == "imagenet":
        left.caption("ImageNet weights are downloaded on first use; without internet choose *None* or a weights file.")
    busy = jobs.active_run() is not None
    if right.button("Start training", type="primary", icon=":material/play_arrow:", disabled=busy,
                    width="stretch", help="Busy: a run is already training." if busy else None):
        try:
            run_dir = jobs.start_training(config)
        except TrainingBusyError as error:
            st.warning(str(error))
        except CxrError as error:
            st.error(str(error))
        else:
            st.session_state[session.KEY_LAUNCHED] = str(run_dir)
            st.session_state.setdefault(KEY_LIVE_STATE, {})[str(run_dir)] = "running"
            st.rerun()


def watched_run() -> Path | None:
    """The running job (from any session), else the run this session launched last."""
    active = jobs.active_run()
    if active is not None:
        return Path(active)
    launched = st.session_state.get(session.KEY_LAUNCHED)
    if launched and Path(launched).is_dir():
        return Path(launched)
    return None


def render_run(run_dir: Path) -> str:
    """Progress, curves and status of one run; returns its state."""
    status = runs.read_status(run_dir)
    state = status["state"]
    progress = runs.read_progress(run_dir)
    with st.container(border=True):
        head, button = st.columns([4, 1], vertical_alignment="center")
        head.markdown(f"#### Run `{run_dir.name}`")
        if state == "running":
            stage = STAGES.get(progress.get("stage") or "", progress.get("stage") or "Starting")
            done, total = progress.get("done", 0), progress.get("total", 0)
            text = f"{stage}"
            if total:
                unit = "epoch" if progress.get("stage") in ("train", "fine_tune") else "images"
                text += f": {done:,} of {total:,} {unit if unit == 'images' else 'epochs'}"
            if progress.get("eta_s") is not None:
                text += f" · about {charts.fmt_seconds(progress['eta_s'])} left"
            st.progress(float(progress.get("fraction") or 0.0), text=text)
            if progress.get("message"):
                st.caption(progress["message"])
            if button.button("Cancel", icon=":material/stop:", key=f"cancel_{run_dir.name}"):
                jobs.request_cancel(run_dir)
                st.toast("Cancelling: the run stops after the current batch.")
        elif state == "done":
            st.success(f"Finished: {status.get('message', 'done')}.", icon=":material/check_circle:")
            st.session_state[session.KEY_RUN] = str(run_dir)
            st.page_link("pages/evaluation.py", label="See its evaluation", icon=":material/analytics:")
        elif state == "cancelled":
            st.info("This run was cancelled.", icon=":material/cancel:")
        else:
            st.error(str(status.get("error") or status.get("message") or "The run failed."), icon=":material/error:")
            log = RunFolder(run_dir).log_path
            if log.is_file():
                with st.expander("Last lines of the training log (for bug reports)"):
                    st.code("\n".join(log.read_text(errors="replace").splitlines()[-25:]) or "(empty)")
        curves(RunFolder(run_dir).read_history(), key=run_dir.name)
    return state


def curves(history: pd.DataFrame, key: str) -> None:
    if history is None or history.empty:
        st.caption("Curves appear after the first epoch.")
        return
    history = history.reset_index(drop=True)
    x = list(range(1, len(history) + 1))
    columns = st.columns(3)
    for column, (metric, title) in zip(columns, [("loss", "Loss"), ("accuracy", "Accuracy"), ("auc", "ROC AUC")]):
        fig = go.Figure()
        if metric in history:
            fig.add_scatter(x=x, y=history[metric], mode="lines+markers", name="train", line=dict(color="#1f6feb"))
        if f"val_{metric}" in history:
            fig.add_scatter(x=x, y=history[f"val_{metric}"], mode="lines+markers", name="validation",
                            line=dict(color="#d1495b"))
        if "phase" in history and (history["phase"] == "fine_tune").any():
            start = x[int((history["phase"] == "fine_tune").to_numpy().argmax())]
            fig.add_vrect(x0=start - 0.5, x1=x[-1] + 0.5, fillcolor="#f3c969", opacity=0.15, line_width=0,
                          annotation_text="fine-tune", annotation_position="top left")
        fig.update_xaxes(title="epoch", dtick=1 if len(x) <= 20 else None)
        column.plotly_chart(charts.style(fig, 260, title=title), key=f"curve_{key}_{metric}")
    st.caption("Validation worse than training and getting worse: overfitting. Both flat and poor: underfitting "
               "or too low a learning rate.")


@st.fragment(run_every=2)
def live_view(run_dir: Path) -> None:
    """Polls the run folder every 2 s; refreshes the whole page once when the run ends."""
    state = render_run(run_dir)
    seen = st.session_state.setdefault(KEY_LIVE_STATE, {})
    previous = seen.get(str(run_dir))
    seen[str(run_dir)] = state
    if previous == "running" and state != "running":
        st.rerun(scope="app")


def past_runs() -> None:
    st.subheader("Past runs")
    summaries = models.all_runs()
    if not summaries:
        st.caption("No runs yet. They are kept in the runs folder and listed here.")
        return
    table = pd.DataFrame([{**s.as_row(), "demo": s.is_demo} for s in summaries])
    st.dataframe(table, hide_index=True, column_config={
        "best val AUC": st.column_config.NumberColumn(format="%.3f"),
        "test AUC": st.column_config.NumberColumn(format="%.3f"),
        "external AUC": st.column_config.NumberColumn(format="%.3f"),
        "external accuracy": st.column_config.NumberColumn(format="%.3f"),
        "demo": st.column_config.CheckboxColumn("demo", help="The shipped demo run (cannot be deleted)."),
    })
    deletable = [s for s in summaries if not s.is_demo and s.state != "running"]
    if not deletable:
        return
    by_path = {str(s.path): s for s in deletable}
    left, right = st.columns([3, 1], vertical_alignment="bottom")
    choice = left.selectbox("Delete a run", list(by_path), key="train_delete_choice",
                            format_func=lambda p: f"{by_path[p].run_id} ({by_path[p].state})")
    with right.popover("Delete...", icon=":material/delete:"):
        st.markdown(f"Delete `{by_path[choice].run_id}` and its model for good?")
        if st.button("Yes, delete it", type="primary", key="train_delete_confirm"):
            try:
                runs.delete_run(by_path[choice].path)
            except CxrError as error:
                st.error(str(error))
            else:
                if st.session_state.get(session.KEY_RUN) == choice:
                    st.session_state.pop(session.KEY_RUN, None)
                if st.session_state.get(session.KEY_LAUNCHED) == choice:
                    st.session_state.pop(session.KEY_LAUNCHED, None)
                st.rerun()


# --- The page ---------------------------------------------------------------------------------
run_dir = watched_run()
if run_dir is not None:
    st.subheader("Current run")
    if runs.read_status(run_dir)["state"] == "running":
        live_view(run_dir)
    else:
        render_run(run_dir)

st.subheader("New run")
result = datasets.current_scan()
if result is None:
    st.info("Choose a data set on the **Dataset** page first (the synthetic practice set is enough for a first "
            "try). The settings below show what you will be able to choose.", icon=":material/info:")
    st.page_link("pages/dataset.py", label="Go to Dataset", icon=":material/folder_open:")
    n_images, has_official = None, False
else:
    n_images = len(result.manifest)
    has_official = bool((result.manifest["official_split"] == "test").any())
    st.markdown(f"Data set **{st.session_state.get(session.KEY_DATASET)}**: {n_images:,} images.")
try:
    config = settings_form(has_official)
except CxrError as error:
    st.error(str(error))
    config = None
launch_section(config, n_images)
past_runs()
