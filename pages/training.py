"""Training: configure a run, launch it in the background, watch it live, manage past runs."""
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from cxr_core.core import metrics as evaluate, settings
from cxr_core.core.backbones import BACKBONES
from cxr_core.core.config import RunConfig
from cxr_core.core.errors import CxrError
from cxr_core.core.recipes import RECIPES, apply_recipe
from cxr_core.core.settings import Setting
from cxr_core.core.tasks import TASKS, Task, get_task
from cxr_core.data import plan, scan as data
from cxr_core.hosting import job_queue, jobs, resources, workspaces
from cxr_core.io import weights
from cxr_core.runs import registry as runs
from cxr_core.runs.run_folder import RunFolder
from pages.ui import access, charts, datasets, frame, models, session

log = logging.getLogger(__name__)

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
KEY_WATCHED = "training_watched_run"    # the run whose panel this session shows (kept after it ends)
# A setting keeps its value across page switches and goes into this page's URL (a reload or a link keeps it).
# Its label, help, range or options, starting value and session key are its row's in cxr_core.core.settings.
PERSIST = session.KEEP

KEY_TASK = settings.find("data.task").session_key()
KEY_BACKBONE = settings.find("model.backbone").session_key()
KEY_WEIGHTS = settings.find("model.weights").session_key()  # "imagenet", "none", a file path or UPLOAD
KEY_WEIGHTS_UPLOAD = "train_weights_upload"  # the uploader's key (+ a counter: a new key drops the held bytes)
KEY_WEIGHTS_NOTE = "train_weights_note"      # what happened to the last upload, shown once
KEY_WEIGHTS_CHOSEN = "train_weights_chosen"  # True once the person picked starting weights themselves
UPLOAD = "upload"


@st.cache_data(ttl=300, show_spinner="Checking whether the ImageNet weights can be downloaded...")
def _imagenet_reachable() -> bool:
    """The network probe, at most once every five minutes (a page rerun must stay fast)."""
    return weights.reachable()


def _save_uploaded_weights(key: str) -> None:
    """Uploader callback: keep the file in the weights folder and choose it."""
    upload = st.session_state.get(key)
    if upload is None:
        return
    try:
        path = weights.save_upload(upload.name, upload)
    except CxrError as error:
        st.session_state[KEY_WEIGHTS_NOTE] = ("error", str(error))
    except OSError as error:
        st.session_state[KEY_WEIGHTS_NOTE] = ("error", f"{upload.name} could not be saved in "
                                                       f"{weights.upload_dir()} ({error.strerror}).")
    else:
        st.session_state[KEY_WEIGHTS] = str(path)
        st.session_state[KEY_WEIGHTS_CHOSEN] = True
        access.record("weights", path.name)
        st.session_state[KEY_WEIGHTS_NOTE] = ("success", f"Saved {path.name} in {path.parent}; it is now chosen.")
    # A new uploader key releases the uploaded bytes from the server's memory.
    st.session_state[KEY_WEIGHTS_UPLOAD + "_n"] = st.session_state.get(KEY_WEIGHTS_UPLOAD + "_n", 0) + 1


ALPHAS = list(settings.find("model.alpha").options)  # MobileNetV2's widths that Keras has ImageNet weights for
KEY_ALPHA_FREE = settings.find("model.alpha").session_key()  # the width while no weights file fixes it


def _imagenet_alpha() -> float:
    """The width the ImageNet file is for: the free width slider's value (drawn after the weights, so read from
    the session, else from the URL that seeds it), else 1.0."""
    value = st.session_state.get(KEY_ALPHA_FREE, st.query_params.get(KEY_ALPHA_FREE))
    try:
        return float(value) if float(value) in ALPHAS else 1.0
    except (TypeError, ValueError):
        return 1.0


def weights_help(spec, alpha: float, size: int | None, operator: bool) -> str:
    """The starting weights' help: the server's folders for the operator only (a visitor sees no path)."""
    imagenet_file = spec.imagenet_filename(alpha, size)
    if operator:
        return (f"Pretrained weights make a few epochs enough. Files are looked for in {weights.upload_dir()} "
                f"and Keras' cache ({weights.keras_cache_dir()}); without internet, place a weights file there or "
                f"upload one. {spec.label}'s ImageNet file is {imagenet_file}.")
    return ("Pretrained weights make a few epochs enough. ImageNet weights are downloaded once, or used from "
            f"the server when its operator has added them ({spec.label}'s file is {imagenet_file}); files the "
            "operator added to the server are listed here too.")


def weights_choice(column, backbone: str, size: int | None) -> str:
    """The starting weights: the files found on this machine for ``backbone`` first (they work
    offline), ImageNet (said to be cached when Keras has its file), random, or (the operator only)
    an upload. The choice survives a change of backbone whenever it still fits."""
    spec = BACKBONES[backbone]
    operator = access.is_operator()
    found = [f for f in weights.find_weight_files() if f.source == "weights folder"]
    matching = [str(f.path) for f in found if f.backbone == backbone]
    unknown = [str(f.path) for f in found if f.backbone is None]
    # Only the operator may add a file to the server: a visitor is not offered an upload they would be refused.
    options = [*matching, "imagenet", "none", *unknown, *([UPLOAD] if operator else [])]
    current = st.session_state.get(KEY_WEIGHTS)
    # A person's choice (made here or carried by a link) stays while it fits the backbone; otherwise
    # the first option is the default: a file made for this backbone (works offline), else ImageNet.
    chosen = st.session_state.get(KEY_WEIGHTS_CHOSEN) or KEY_WEIGHTS in st.query_params
    if current not in options or not chosen:
        st.session_state[KEY_WEIGHTS] = options[0]
    alpha = _imagenet_alpha() if spec.supports_alpha else 1.0
    cached = weights.cached_imagenet(backbone, alpha, size)
    by_path = {str(f.path): f for f in found}
    names = {"imagenet": (f"ImageNet (on this machine: {cached.name})" if cached
                          else "ImageNet (downloads once; needs internet)"),
             "none": "None (random: the whole network must learn)", UPLOAD: "Upload a weights file..."}
    choice = column.selectbox(
        settings.find("model.weights").label, options, key=KEY_WEIGHTS, **PERSIST,
        on_change=lambda: st.session_state.__setitem__(KEY_WEIGHTS_CHOSEN, True),
        format_func=lambda w: names.get(w) or f"File: {Path(w).name} ({by_path[w].source if w in by_path else 'file'})",
        help=weights_help(spec, alpha, size, operator))
    if not operator:
        others = "a file listed here, " if matching or unknown else ""
        column.caption(f"Only the operator of this app can add weights files; you can start from ImageNet, {others}"
                       "or random weights (None).")
    note = st.session_state.pop(KEY_WEIGHTS_NOTE, None)
    if note:
        (st.error if note[0] == "error" else st.success)(note[1])
    if choice == UPLOAD and access.allowed("weights"):
        key = f"{KEY_WEIGHTS_UPLOAD}_{st.session_state.get(KEY_WEIGHTS_UPLOAD + '_n', 0)}"
        st.file_uploader(f"A Keras weights file for {spec.label} (*.h5, without the classification top)",
                         type=["h5"], key=key, on_change=_save_uploaded_weights, args=(key,),
                         help=f"It is kept in {weights.upload_dir()} and offered here from then on.")
    return choice


def _fill_from_recipe() -> None:
    """Widget callback: put the chosen recipe's settings into the form (the person may then change any)."""
    name = st.session_state.get(session.KEY_RECIPE) or ""
    if not name:
        return
    task = (RECIPES[name].settings.get("data") or {}).get("task")
    if task in TASKS:  # a recipe made for one task chooses it; the others leave the choice alone
        st.session_state[KEY_TASK] = task
    _fill_form(apply_recipe(RunConfig(), name))


#: Choices that stay the person's: a recipe never sets them (``apply_recipe`` keeps them), so filling the form
#: from one leaves their widgets alone.
PERSONS_CHOICES = ("data.task", "model.backbone", "model.weights", "model.alpha")


def form_state(config: RunConfig) -> dict:
    """Session key -> widget value of every basic and advanced setting of ``config``, the image size for every
    backbone (a backbone chosen afterwards keeps the config's size, not its own default)."""
    values = settings.form_values(config, "advanced")
    size = settings.find("model.image_size")
    for name, spec in BACKBONES.items():
        values.update(settings.form_values(config, "basic", backbone=name))
        key = size.session_key(backbone=name)
        values[key] = max(values[key], spec.min_size)  # a size this backbone cannot take becomes its smallest
    return values


def _fill_form(config: RunConfig) -> None:
    """Put ``config``'s settings into the form's widgets (not the person's own choices) and the shared choices."""
    kept = {settings.find(name).session_key() for name in PERSONS_CHOICES}
    st.session_state.update({key: value for key, value in form_state(config).items() if key not in kept})
    st.session_state[session.KEY_SPLIT] = config.data.split
    st.session_state[session.KEY_BALANCE] = config.train.balance
    st.session_state[session.KEY_AUGMENT] = asdict(config.augment)
    for key in [k for k in st.session_state if str(k).startswith("aug_")]:
        del st.session_state[key]  # the Augmentation page's widgets take the recipe's values anew


def show_running_settings() -> None:
    """After a reload while a run trains, the form starts from that run's own settings (config.json)
    rather than the defaults; settings this session already has, or a link names, win."""
    active = jobs.active_run()
    if active is None or KEY_BACKBONE in st.session_state or any(k.startswith("train_") for k in st.query_params):
        return
    try:
        config = RunFolder(active).read_config()
    except CxrError:
        return
    backbone = config.model.backbone
    if backbone not in BACKBONES:
        return
    _fill_form(config)
    values = settings.form_values(config, "basic", backbone=backbone)
    for name in ("data.task", "model.backbone", "model.weights"):
        key = settings.find(name).session_key()
        st.session_state[key] = values[key]
    st.session_state[session.KEY_RECIPE] = config.train.recipe if config.train.recipe in RECIPES else ""
    st.session_state[KEY_WEIGHTS_CHOSEN] = True  # the running job's weights, not the default
    if config.model.alpha in ALPHAS:
        st.session_state[KEY_ALPHA_FREE] = config.model.alpha
    name = Path(config.data.data_dir).name
    if "dataset" not in st.query_params and name in datasets.list_datasets():
        st.session_state[session.KEY_DATASET] = name
    st.rerun()  # the sidebar, drawn before this page, shows the run's data set and split too


def recipe_choice() -> str:
    """The recipe the settings start from, with what it is for and what it measured."""
    names = ["", *RECIPES]
    if st.session_state.get(session.KEY_RECIPE) not in names:
        st.session_state[session.KEY_RECIPE] = ""
    left, right = st.columns([1, 2])
    name = left.selectbox("Recipe", names, key=session.KEY_RECIPE, on_change=_fill_from_recipe, **PERSIST,
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


def table_widget(column, row: Setting, context: Mapping[str, Any] | None = None, persist: bool = True,
                 **overrides: Any) -> Any:
    """Draw ``row``'s widget in ``column``: label, help, range or options, starting value and session key from
    the table of settings (``context`` fills a per-backbone key); ``overrides`` replace what the page decides
    itself. ``persist``: the value is kept across pages and in the URL (a shared choice has its own place)."""
    kwargs = {**row.widget_kwargs(st.session_state, **(context or {})), **overrides}
    return getattr(column, row.widget_call)(**kwargs, **(PERSIST if persist else {}))


WHY_SUBTYPE_IS_HARDER = (
    "Telling **bacterial from viral** pneumonia is harder than finding pneumonia: their patterns on a film "
    "overlap (dense lobar consolidation is typical of bacteria, diffuse patchy opacities on both sides of "
    "viruses, but many films show a mix or neither clearly), and the viral class is small, so the model sees "
    "few examples of it and is tempted to call every pneumonia bacterial. It is the question that decides "
    "antibiotics; Kermany et al. (2018) reached 90.7 % accuracy on it, against 92.8 % for pneumonia against normal.")
#: Beside the task choice, per task (a task without a note shows its own help).
TASK_NOTES = {
    "pneumonia": "The reference task: NORMAL against PNEUMONIA, with a threshold chosen on validation. Choose three "
                 "classes to tell bacterial from viral pneumonia too.",
    "subtype": WHY_SUBTYPE_IS_HARDER,
}


def task_section(manifest) -> tuple[Task, bool]:
    """What the run learns to tell apart, with what that means; and whether the data set can teach it."""
    st.markdown("**Task**")
    left, right = st.columns([1, 2])
    task = get_task(table_widget(left, settings.find("data.task")))
    right.markdown(TASK_NOTES.get(task.name, task.help))
    return task, not task.needs or manifest is None or task_check(manifest, task)


def task_check(manifest, task: Task) -> bool:
    """For a task that needs more than the label (the subtype, read from the file names): the class counts, or
    the one sentence that refuses a data set without it. Returns True when the data set can be used."""
    try:
        labelled = data.task_labels(manifest, task.name)
    except CxrError as error:
        st.error(str(error), icon=":material/block:")
        return False
    counts = labelled["label"].value_counts()
    st.caption("Classes of this data set: " + ", ".join(f"{int(counts.get(c, 0)):,} {c}" for c in task.classes) + ".")
    return True


def model_section() -> dict[str, Any]:
    """The network: backbone, starting weights, image size, width and dropout (setting name -> value)."""
    st.markdown("**Model**")
    c1, c2, c3 = st.columns(3)
    backbone = table_widget(c1, settings.find("model.backbone"))
    spec = BACKBONES[backbone]
    size_row = settings.find("model.image_size")
    size_key = size_row.session_key(backbone=backbone)
    weights_value = weights_choice(c2, backbone, st.session_state.get(size_key))
    # The sizes this backbone takes, its own, and one a recipe or a run put into the form.
    sizes = sorted({s for s in size_row.options if s >= spec.min_size} | {spec.default_size}
                   | {st.session_state.get(size_key) or spec.default_size})
    size = table_widget(c3, size_row, {"backbone": backbone}, options=sizes)
    alpha = alpha_choice(c1, weights_value) if spec.supports_alpha else 1.0
    dropout = table_widget(c2, settings.find("model.dropout"))
    return {"model.backbone": backbone, "model.weights": weights_value, "model.image_size": size,
            "model.alpha": alpha, "model.dropout": dropout}


def alpha_choice(column, weights_value: str) -> float:
    """MobileNetV2's width: free with ImageNet or random weights, fixed by a weights file (Keras names them
    ..._<alpha>_<size>_no_top...), which then has a slider of its own."""
    row = settings.find("model.alpha")
    fixed = weights.alpha_of(Path(weights_value).name) if weights_value not in ("imagenet", "none", UPLOAD) else None
    key = f"train_alpha_{fixed}" if fixed else KEY_ALPHA_FREE
    # A value the session holds wins; a default beside it would be a conflict Streamlit warns about.
    start = {} if fixed is None and key in st.session_state else {"value": fixed or row.form_start()}
    return column.select_slider(row.label, ALPHAS, key=key, **start, disabled=fixed is not None, help=row.form_help,
                                **PERSIST)


#: The Training section's widgets, a line of columns each.
TRAINING_LINES = (("train.epochs", "train.batch_size", "train.learning_rate"),
                  ("train.fine_tune_layers", "train.fine_tune_epochs", "train.threshold_rule"))


def training_section(task: Task) -> dict[str, Any]:
    """Epochs, batch, learning rate, fine-tuning and the threshold rule (setting name -> value)."""
    st.markdown("**Training**")
    values = {}
    for line in TRAINING_LINES:
        for column, name in zip(st.columns(len(line)), line):
            # A task whose label is its most probable class has no threshold to choose.
            off = {"disabled": True} if name == "train.threshold_rule" and not task.uses_threshold else {}
            values[name] = table_widget(column, settings.find(name), **off)
    return values


def balance_labels(task: Task) -> dict[str, str]:
    """How the balance choice names its options for ``task``: augmentation adds images of the smaller classes."""
    augment = (f"Augment {task.classes[0]} (reference)" if task.is_binary
               else "Augment the smaller classes (reference)")
    return {**settings.BALANCE_LABELS, "augment": augment}


def shared_choice(column, name: str, shared_key: str, **overrides: Any) -> Any:
    """A choice the sidebar and the other pages share (split, balance): it shows the shared value on every run
    and writes back to it; the shared value, not this widget, goes into the URL. Set anew on every run, not
    only when missing: a widget value left from an earlier run (a run cut short under load keeps it) would
    otherwise show one split while the sidebar, a lesson and the run's settings say another."""
    row = settings.find(name)
    key = row.session_key()
    shared = st.session_state.get(shared_key, row.form_start())
    if st.session_state.get(key) != shared:
        st.session_state[key] = shared
    return table_widget(column, row, persist=False, on_change=session.copy_state, args=(key, shared_key),
                        **overrides)


def data_section(task: Task) -> dict[str, Any]:
    """The split, the balance, the quick-demo limit, and the augmentation chosen on its page."""
    st.markdown("**Data**")
    c1, c2, c3 = st.columns(3)
    values = {"data.split": shared_choice(c1, "data.split", session.KEY_SPLIT),
              "train.balance": shared_choice(c2, "train.balance", session.KEY_BALANCE,
                                             format_func=balance_labels(task).get),
              "data.limit": table_widget(c3, settings.find("data.limit"))}
    aug = session.augment_config()
    st.caption(
        f"Augmentation from the Augmentation page: rotation ±{aug.rotation_range:g}°, "
        f"flip {'on' if aug.horizontal_flip else 'off'}, "
        f"brightness {aug.brightness_range[0]:g}–{aug.brightness_range[1]:g}, "
        f"shifts {aug.width_shift:g}/{aug.height_shift:g}, zoom {aug.zoom:g}"
        + (" (the reference)." if session.augment_is_default() else ".")
    )
    return values


ADVANCED_COLUMNS = 3


def advanced_section() -> dict[str, Any]:
    """Every setting the table marks advanced, drawn from its row (a new row appears here by itself)."""
    rows = settings.form_rows("advanced")
    values = {}
    with st.expander("Advanced settings", icon=":material/tune:"):
        st.caption("Settings most runs leave as they are; a recipe fills them in. The ? beside each says what it "
                   "does.")
        for start in range(0, len(rows), ADVANCED_COLUMNS):
            line = rows[start:start + ADVANCED_COLUMNS]
            for column, row in zip(st.columns(ADVANCED_COLUMNS), line):
                values[row.name] = table_widget(column, row)
    return values


def settings_form(has_official: bool, manifest=None) -> RunConfig | None:
    """The run settings; returns a RunConfig (None when the choices are invalid)."""
    recipe = recipe_choice()
    with st.container(border=True):
        task, usable = task_section(manifest)
        model = model_section()
        training = training_section(task)
        data_values = data_section(task)
        advanced = advanced_section()
    if data_values["data.split"] == "official" and not has_official:
        st.error("The official split needs the Kermany layout (train/val/test folders); this data set has none. "
                 "Choose the random or patient split.")
        return None
    if model["model.weights"] == UPLOAD:
        st.info("Upload a weights file above, or choose other starting weights.")
        return None
    if not usable:
        return None
    return build_config(recipe, {"data.task": task.name, **model, **training, **data_values, **advanced})


def build_config(recipe: str, values: Mapping[str, Any]) -> RunConfig | None:
    """The run the form describes: the recipe's settings (it gives what the form does not show), the data set
    and the Augmentation page's choices, then the form's values (setting name -> widget value) over them."""
    path = datasets.dataset_path()
    base = apply_recipe(RunConfig(), recipe) if recipe else RunConfig()
    base = dataclasses.replace(base, data=dataclasses.replace(base.data, data_dir=str(path) if path else ""),
                               augment=session.augment_config())
    try:
        return settings.apply_form_values(base, values)
    except CxrError as error:
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
    problem = None
    try:
        # A visitor's advice names no folder of the server (they could not place a file there anyway).
        source = plan.preflight(config, probe=_imagenet_reachable,
                                audience="app" if access.is_operator() else "visitor")
    except CxrError as error:
        problem = str(error)
        st.error(problem, icon=":material/block:")
    else:
        if source == "download":
            left.caption("The ImageNet weights are downloaded once when the run starts (they are not on this "
                         "machine yet).")
    ws = access.workspace()
    if ws and problem is None:
        try:
            workspaces.check_room(ws)
        except CxrError as error:
            problem = str(error)
            st.error(problem, icon=":material/block:")
    queued = not queue_has_room()
    label = "Add to the queue" if queued else "Start training"
    # A fixed key: the label and help change when another job takes the last place, and a button without a key
    # would then be a new button, so the click of someone who saw the old one would be lost.
    if right.button(label, type="primary", icon=":material/play_arrow:", disabled=problem is not None,
                    key=KEY_START, width="stretch", help=("Fix the settings above first." if problem else
                                           "The server's training places are taken: your run waits in the queue "
                                           "and starts by itself." if queued else None)):
        start_or_queue(config, ws)


KEY_START = "train_start"  # the Start training / Add to the queue button


def queue_has_room() -> bool:
    """Whether a new job would start now (a free place and nobody waiting before it)."""
    return not job_queue.waiting() and jobs.running_count() < job_queue.max_concurrent()


#: How long pressing Start waits for the job to start before the page shows it starting (or waiting).
DISPATCH_WAIT_S = 1.0


def _dispatch() -> None:
    try:
        job_queue.dispatch()
    except CxrError:  # the job is marked failed with this sentence; its panel says it
        log.info("a job could not start", exc_info=True)


def start_or_queue(config: RunConfig, ws: str | None) -> None:
    """Put the run in the queue (a visitor's into their workspace, one waiting job each) and start
    whatever can start now; the run's panel then shows it running or its place in the queue."""
    try:
        job = job_queue.submit(config, owner=ws or access.who(), parent=workspaces.folder(ws) if ws else None,
                               per_owner_limit=1 if ws else None)
    except CxrError as error:
        st.warning(str(error), icon=":material/hourglass_top:")
        return
    access.record("start", job.run_dir.name)
    # Start what can start now, but give the page back within a moment: handing a job to a resident worker takes
    # an instant, starting a new training process some seconds (a class of thirty must not wait on it). A job
    # that cannot start is marked failed with its sentence, which the run's panel shows.
    starter = threading.Thread(target=_dispatch, daemon=True, name="dispatch-on-start")
    starter.start()
    starter.join(DISPATCH_WAIT_S)
    job_queue.start_dispatcher()  # the next ones start when a place frees, with or without this page open
    st.session_state[session.KEY_LAUNCHED] = st.session_state[KEY_WATCHED] = str(job.run_dir)
    st.session_state.setdefault(KEY_LIVE_STATE, {})[str(job.run_dir)] = runs.read_status(job.run_dir)["state"]
    st.rerun()


def watched_run() -> Path | None:
    """The run this session launched while it trains or waits, else a running job this session may see
    (from any session), else the run this session watched last: a run's panel stays, with its final
    state, after the run ends or is cancelled."""
    launched = st.session_state.get(session.KEY_LAUNCHED)
    if launched and Path(launched).is_dir() and runs.read_status(launched)["state"] in ("running", "queued"):
        return Path(launched)
    summaries = models.all_runs()
    ws = access.workspace()
    if ws:  # a visitor back after a reload: their own run that trains or waits comes first
        mine = [s for s in summaries if s.owner == ws and s.state in ("running", "queued")]
        if mine:  # remembered, so that its panel stays with its finish once it ends
            st.session_state[KEY_WATCHED] = str(mine[0].path)
            return Path(mine[0].path)
    visible = {str(s.path) for s in summaries}
    for active in jobs.active_runs():
        if str(active) in visible:
            st.session_state[KEY_WATCHED] = str(active)
            return Path(active)
    for key in (KEY_WATCHED, session.KEY_LAUNCHED):
        path = st.session_state.get(key)
        if path and Path(path).is_dir():
            return Path(path)
    ended = recently_ended(summaries, owner=ws or "")
    if ended is not None:  # a session opened just as its run ended (a reload) still sees the finish
        st.session_state[KEY_WATCHED] = str(ended)
    return ended


RECENT_S = 10 * 60  # a run of this workspace that ended this recently is still its current run


def recently_ended(summaries: list, owner: str, now: float | None = None) -> Path | None:
    """The run of ``owner``'s workspace ("" for the shared runs) that ended last, if it ended within
    ``RECENT_S``: a new session (a reload) knows nothing else of the run it followed."""
    now = time.time() if now is None else now
    ended = []
    for summary in summaries:
        if summary.owner != owner or summary.is_demo or summary.state in ("running", "queued"):
            continue
        finished = (RunFolder(summary.path).read_status_file() or {}).get("finished")
        if isinstance(finished, (int, float)) and now - finished <= RECENT_S:
            ended.append((finished, Path(summary.path)))
    return max(ended)[1] if ended else None


QUIET_S = 5  # a run that has written nothing for this long says since when (it may be building the network)


def progress_text(progress: dict) -> str:
    """'Training the head: epoch 2 of 5 · about 3 min left' (the epoch under way, never a fraction),
    or '... · last update 12 s ago' when the job has been quiet for a while and its estimate is spent."""
    stage = progress.get("stage") or ""
    text = STAGES.get(stage, stage or "Starting")
    done, total = float(progress.get("done") or 0), int(progress.get("total") or 0)
    if total:
        if stage in ("train", "fine_tune"):
            # done counts finished epochs plus the share of the current one (batch by batch).
            text += f": epoch {min(total, int(done) + 1)} of {total}"
        else:
            text += f": {int(done):,} of {total:,} images"
    if progress.get("eta_s") is not None:
        text += f" · about {charts.fmt_seconds(progress['eta_s'])} left"
    elif (progress.get("quiet_s") or 0) >= QUIET_S:
        text += f" · last update {charts.fmt_seconds(progress['quiet_s'])} ago"
    return text


def _failure(status: dict) -> str:
    """'This run failed: <why>.' from the status (the error, else the message)."""
    reason = str(status.get("error") or status.get("message") or "").strip()
    if not reason or reason == "failed":
        return "This run failed without saying why; the training log below may tell."
    if reason[1:2].islower():  # "The data..." -> "the data...", but "ImageNet..." stays
        reason = reason[:1].lower() + reason[1:]
    return f"This run failed: {reason.rstrip('.')}."


def render_run(run_dir: Path) -> str:
    """Progress, curves and status of one run; returns its state."""
    status = runs.read_status(run_dir)
    state = status["state"]
    with st.container(border=True):
        head, button = st.columns([4, 1], vertical_alignment="center")
        head.markdown(f"#### Run `{run_dir.name}`")
        where = models.where_trained(run_dir, running=state == "running")
        if where:  # a run from before these fields says nothing
            st.caption(where)
        elsewhere = models.elsewhere_note(run_dir) if state == "running" else ""
        if elsewhere:
            st.caption(elsewhere, help="The runs folder is shared storage that both machines see. The training "
                                       "process there rewrites its heartbeat file regularly; a run not heard "
                                       "from for a few minutes reads as failed.")
        if state == "running":
            running_panel(run_dir, button)
        elif state == "queued":
            queued_panel(run_dir, button)
        elif state == "done":
            st.success(f"Finished: {status.get('message', 'done')}.", icon=":material/check_circle:")
            st.session_state[session.KEY_RUN] = str(run_dir)
            st.page_link("pages/evaluation.py", label="See its evaluation", icon=":material/analytics:")
        elif state == "cancelled":
            st.info("This run was cancelled.", icon=":material/cancel:")
        else:
            st.error(_failure(status), icon=":material/error:")
            log = RunFolder(run_dir).log_path
            if log.is_file():
                with st.expander("Last lines of the training log (for bug reports)"):
                    st.code("\n".join(log.read_text(errors="replace").splitlines()[-25:]) or "(empty)")
        curves(RunFolder(run_dir).read_history(), key=run_dir.name, state=state, task=models.run_task(run_dir))
    return state


def running_panel(run_dir: Path, button) -> None:
    """A running run's progress, and its Cancel confirmation (in ``button``'s column) for who may cancel it."""
    progress = runs.read_progress(run_dir)
    st.progress(float(progress.get("fraction") or 0.0), text=progress_text(progress))
    if progress.get("message"):
        st.caption(progress["message"])
    note = st.empty()
    # The cancel request is a file in the run folder, so every session sees it.
    cancelling = RunFolder(run_dir).cancel_requested()
    if not cancelling and access.can_change_run(run_dir):  # a visitor cancels only their own runs
        with button.popover("Cancel", icon=":material/stop:"):
            st.markdown("Stop this run? It ends as cancelled, without a model.")
            if st.button("Yes, stop it", type="primary", key=f"cancel_confirm_{run_dir.name}"):
                jobs.request_cancel(run_dir)
                access.record("cancel", run_dir.name)
                cancelling = True
    if cancelling:
        note.info("Cancelling: the job stops after the current batch.", icon=":material/hourglass_top:")


def queued_panel(run_dir: Path, button) -> None:
    """A waiting run's place in the queue, and its Withdraw confirmation for who may withdraw it."""
    place, waiting = job_queue.place(run_dir), len(job_queue.waiting())
    st.info(f"Waiting in the queue: place {place or '?'} of {waiting}. It starts by itself when a place "
            "frees; you can leave this page meanwhile.", icon=":material/hourglass_top:")
    if access.can_change_run(run_dir):
        with button.popover("Withdraw", icon=":material/remove_circle:"):
            st.markdown("Take this run out of the queue? It is removed without training.")
            if st.button("Yes, withdraw it", type="primary", key=f"withdraw_confirm_{run_dir.name}"):
                if job_queue.withdraw(run_dir):
                    access.record("withdraw", run_dir.name)
                    for key in (KEY_WATCHED, session.KEY_LAUNCHED):
                        if st.session_state.get(key) == str(run_dir):
                            st.session_state.pop(key, None)
                st.rerun(scope="app")


def class_count(task_name: str) -> int:
    """How many classes a run's task tells apart (two for a task this version does not know)."""
    task = TASKS.get(task_name)
    return len(task.classes) if task is not None else 2


NO_CURVES = {"running": "Curves appear after the first epoch.",
             "queued": "Curves appear once it has started and finished its first epoch.",
             "failed": "No curves: the run failed before its first epoch ended.",
             "cancelled": "No curves: the run was cancelled before its first epoch ended."}


def curves(history: pd.DataFrame, key: str, state: str = "running", task: str = "pneumonia") -> None:
    if history is None or history.empty:
        st.caption(NO_CURVES.get(state, "This run has no training curves."))
        return
    history = history.reset_index(drop=True)
    x = list(range(1, len(history) + 1))
    columns = st.columns(3)
    classes = class_count(task)
    auc_title = "ROC AUC" if classes == 2 else f"Macro ROC AUC ({classes} classes)"
    for column, (metric, title) in zip(columns, [("loss", "Loss"), ("accuracy", "Accuracy"), ("auc", auc_title)]):
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
        if metric == "loss":
            fig.update_yaxes(rangemode="tozero")
        else:
            charts.unit_axes(fig)  # a flat AUC of 0.5 must not zoom to -0.5..1.5
        column.plotly_chart(charts.style(fig, 260, title=title), key=f"curve_{key}_{metric}")
    found = evaluate.fit_diagnosis(history)
    if found.is_warning:
        st.warning(found.message, icon=":material/warning:")
    else:
        st.caption(found.message)


def live_view(run_dir: Path) -> None:
    """A running run's panel, polled every 2 s; a waiting one's every 5 s (a class of thirty waiting in the queue
    would otherwise keep the server redrawing places that change once a minute)."""
    if runs.read_status(run_dir)["state"] == "queued":
        _waiting_view(run_dir)
    else:
        _running_view(run_dir)


def _follow(run_dir: Path, *, until_not: tuple[str, ...]) -> None:
    """Draw the run and refresh the whole page once its state leaves ``until_not`` (or its folder is gone)."""
    if not run_dir.is_dir():
        st.rerun(scope="app")
    state = render_run(run_dir)
    seen = st.session_state.setdefault(KEY_LIVE_STATE, {})
    previous = seen.get(str(run_dir))
    seen[str(run_dir)] = state
    if previous in until_not and state not in until_not:
        st.rerun(scope="app")


@st.fragment(run_every=2)
def _running_view(run_dir: Path) -> None:
    _follow(run_dir, until_not=("running", "queued"))


@st.fragment(run_every=5)
def _waiting_view(run_dir: Path) -> None:
    _follow(run_dir, until_not=("queued",))  # started: the page draws it again with the running view


KEY_REMOTE = "training_remote_runs"  # runs this session saw training on other machines (kept once they end)


def remote_runs_section(current: Path | None) -> None:
    """Runs that train on other machines into this runs folder (shared storage, started there from the
    command line), live like the current run; each stays here with its final state once it ends."""
    seen = st.session_state.setdefault(KEY_REMOTE, [])
    root = models.runs_root_info()
    for path in runs.running_elsewhere(root.path) if root is not None else []:
        if str(path) not in seen:
            seen.append(str(path))
    shown = [Path(p) for p in seen if Path(p).is_dir() and Path(p) != current]
    if not shown:
        return
    st.subheader("Training on other machines")
    st.caption("These runs write into this app's runs folder from another machine that shares it. The app follows "
               "their files as they are written; it never starts a run on another machine.")
    for path in shown:
        if runs.read_status(path)["state"] == "running":
            live_view(path)
        else:
            render_run(path)


def queue_section() -> None:
    """The jobs waiting for a place, and, for the operator, how many train at once."""
    waiting, running = job_queue.waiting(), jobs.active_runs()
    limit = job_queue.max_concurrent()
    if access.is_operator():
        most = resources.max_training_jobs()
        chosen = st.columns([1, 3])[0].number_input(
            "Training jobs at once", 1, max(most, limit), limit, key="queue_max_jobs",
            help=f"This server has room for {most} at once ({os.cpu_count()} CPU cores; each job takes about "
                 f"{resources.TRAINING_JOB_MB / 1024:.1f} GB of memory). Further jobs wait in the queue.")
        if int(chosen) != limit:
            job_queue.set_max_concurrent(int(chosen))
            access.record("jobs at once", str(int(chosen)))
            job_queue.dispatch()
    if not waiting:
        if running:
            st.caption(f"{len(running)} of {limit} training place(s) in use; nobody is waiting.")
        return
    st.markdown(f"**Queue:** {len(running)} of {limit} training place(s) in use, {len(waiting)} run(s) waiting.")
    rows = [{"place": job.place, "run": job.run_dir.name, "owner": access.runs_owner_label(job_owner(job)),
             "waiting since": pd.Timestamp(job.submitted, unit="s").strftime("%H:%M:%S")} for job in waiting]
    charts.table(pd.DataFrame(rows), hide_index=True, width="stretch")
    if not access.is_operator():
        return  # a visitor withdraws their own run from its panel above
    by_path = {str(job.run_dir): job for job in waiting}
    left, right = st.columns([3, 1], vertical_alignment="bottom")
    choice = left.selectbox("Withdraw a waiting run", list(by_path), key="queue_withdraw_choice",
                            format_func=lambda p: f"{by_path[p].place}. {Path(p).name}")
    if right.button("Withdraw", icon=":material/remove_circle:", key="queue_withdraw"):
        if job_queue.withdraw(choice):
            access.record("withdraw", Path(choice).name)
        st.rerun()


def job_owner(job) -> str:
    """The workspace a queued job's run folder is in ("" for the shared runs)."""
    return workspaces.owner_of(job.run_dir) or ""


KEY_DELETE_POPOVER = "train_delete_popover"  # the delete confirmation (+ "_<deletes so far>")
KEY_DELETES = "train_deletes"                # confirmations answered in this session
KEY_DELETE_NOTE = "train_delete_note"        # what the last delete did, shown once
KEY_DELETED = "train_deleted_run"            # the run this session deleted last


def past_runs() -> None:
    st.subheader("Past runs")
    summaries = models.all_runs()
    note = st.session_state.pop(KEY_DELETE_NOTE, None)
    if not summaries:
        st.caption("No runs yet. They are kept in the runs folder and listed here.")
        if note:
            show_note(note)
        return
    table = pd.DataFrame([{**s.as_row(), "demo": s.is_demo} for s in summaries])
    if access.hosted():  # whose run it is: shared (the operator's), yours, or another visitor's workspace
        table.insert(1, "owner", [access.runs_owner_label(s.owner) for s in summaries])
    classes = [class_count(models.run_task(s.path)) for s in summaries]
    if any(n != 2 for n in classes):  # such a run's AUCs are macro AUCs over its classes: say which runs those are
        table.insert(1, "task", [f"{n} classes" for n in classes])
    # The figures that tell runs apart first; the table scrolls sideways to the rest, the run pinned.
    first = ["run", "owner", "status", "task", "test AUC", "external AUC", "external AUC 95 % CI", "best val AUC",
             "backbone", "data", "split", "images"]
    order = [c for c in first if c in table.columns] + [c for c in table.columns if c not in first]
    charts.table(table, hide_index=True, width="stretch", column_config=RUNS_COLUMNS, column_order=order)
    if access.hosted() and not access.is_operator():
        st.info(access.SHARED_RUN_SENTENCE, icon=":material/lock:")
    deletable = [s for s in summaries
                 if not s.is_demo and s.state not in ("running", "queued") and access.can_delete(s)]
    if deletable:
        by_path = {str(s.path): s for s in deletable}
        left, right = st.columns([3, 1], vertical_alignment="bottom")
        choice = left.selectbox("Delete a run", list(by_path), key="train_delete_choice",
                                format_func=lambda p: f"{by_path[p].run_id} ({by_path[p].state})")
        # A new confirmation, drawn closed, after each answer: an open one the browser still shows then (a double
        # click) is not reopened by its second click.
        popover_key = f"{KEY_DELETE_POPOVER}_{st.session_state.get(KEY_DELETES, 0)}"
        with right.popover("Delete...", icon=":material/delete:", key=popover_key, on_change="rerun"):
            run_id = by_path[choice].run_id
            st.markdown(f"Delete `{run_id}` and its model for good?")
            # Bound to the run it names: a second click on this confirmation never reaches another run.
            st.button("Yes, delete it", type="primary", key=f"train_delete_confirm_{run_id}",
                      on_click=delete_confirmed, args=(choice, run_id))
    if note:
        show_note(note)


def show_note(note: tuple[str, str]) -> None:
    """What the last delete did: ("success" | "info" | "error", sentence)."""
    kind, text = note
    {"success": st.success, "info": st.info}.get(kind, st.error)(text)


def delete_confirmed(path: str, run_id: str) -> None:
    """The confirm button's callback: delete the run the confirmation named, if it still exists and may
    be deleted, then close the confirmation and say what happened."""
    st.session_state[KEY_DELETES] = st.session_state.get(KEY_DELETES, 0) + 1
    target = next((s for s in models.all_runs() if str(s.path) == path), None)
    if target is None or not Path(path).is_dir():  # gone: a double click's second click, or another session
        st.session_state[KEY_DELETE_NOTE] = (
            ("success", f"Deleted run {run_id} and its model.") if st.session_state.get(KEY_DELETED) == path
            else ("info", f"Run {run_id} is deleted already; nothing else was deleted."))
        return
    if target.is_demo or target.state in ("running", "queued") or not access.can_delete(target):
        st.session_state[KEY_DELETE_NOTE] = ("error", f"Run {run_id} cannot be deleted now; nothing was deleted.")
        return
    try:
        runs.delete_run(path)
    except CxrError as error:
        st.session_state[KEY_DELETE_NOTE] = ("error", str(error))
        return
    access.record("delete", run_id)
    st.session_state[KEY_DELETED] = path
    for key in (session.KEY_RUN, session.KEY_LAUNCHED, KEY_WATCHED):
        if st.session_state.get(key) == path:
            st.session_state.pop(key, None)
    st.session_state[KEY_DELETE_NOTE] = ("success", f"Deleted run {run_id} and its model.")


_number = st.column_config.NumberColumn
# Short headers with the full meaning in the tooltip, so no header is cut.
RUNS_COLUMNS = {
    "run": st.column_config.TextColumn("run", width="large", pinned=True),
    "status": st.column_config.TextColumn("status", width="medium"),
    "owner": st.column_config.TextColumn("owner", width="medium",
                                         help="shared: the operator's runs, which everyone can use; yours: the runs "
                                              "in your own workspace."),
    "task": st.column_config.TextColumn("task", width="small",
                                        help="2 classes: normal / pneumonia; 3 classes: normal / bacterial / viral "
                                             "(its AUCs are macro AUCs over the three)."),
    "images": _number("images", format="%d", width="small"),
    "external test set": st.column_config.TextColumn(
        "ext. set", width="small", help="The newest external test set: a data set none of whose images the run "
                                        "trained on."),
    "external AUC": _number("ext. AUC", format="%.3f", width="small", help="ROC AUC on that external test set."),
    "external AUC 95 % CI": st.column_config.TextColumn(
        "ext. AUC 95 % CI", width="small", help="Where the external AUC could lie by chance alone on another test "
        "set of this size (bootstrap by child): runs whose intervals overlap cannot be told apart there."),
    "external accuracy": _number("ext. acc.", format="%.3f", width="small",
                                 help="Accuracy on that external test set, at the run's threshold."),
    "best val AUC": _number("val AUC", format="%.3f", width="small", help="The best validation AUC over the epochs."),
    "test AUC": _number("test AUC", format="%.3f", width="small",
                        help="ROC AUC on the run's own test part (internal: it flatters the run)."),
    "duration (s)": _number("time (s)", format="%.0f", width="small", help="Training time in seconds."),
    "started": st.column_config.TextColumn("started", width="medium"),
    "demo": st.column_config.CheckboxColumn("demo", width="small",
                                            help="The shipped demo run (cannot be deleted)."),
}


# --- The page ---------------------------------------------------------------------------------
show_running_settings()
run_dir = watched_run()
if run_dir is not None:
    st.subheader("Current run")
    if runs.read_status(run_dir)["state"] in ("running", "queued"):
        live_view(run_dir)
    else:
        render_run(run_dir)
remote_runs_section(run_dir)

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
    config = settings_form(has_official, None if result is None else result.manifest)
except CxrError as error:
    st.error(str(error))
    config = None
launch_section(config, n_images)
queue_section()
past_runs()
access.audit_table()
