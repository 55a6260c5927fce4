"""Augmentation: choose realistic random transformations, preview them live, and plan the balance."""
from dataclasses import asdict

import numpy as np
import pandas as pd
import streamlit as st

from cxr_core.core.config import BALANCE_STRATEGIES, AugmentConfig, DataConfig, RunConfig, TrainConfig
from cxr_core.core.errors import CxrError
from cxr_core.core.labels import CLASSES, TASKS
from cxr_core.data import augment
from pages.ui import charts, datasets, frame, session

frame.page_header(
    "Augmentation",
    "Augmentation shows the network slightly different copies of each training image, so it learns "
    "the lungs rather than the exact pixels. It must stay **realistic**: a chest X-ray is never taken "
    "upside down or rotated by 30°, so strong transformations teach the model things it will never see. "
    "The preview below uses the very function that training uses.",
)

DEFAULTS = AugmentConfig()
# widget key -> (AugmentConfig field)
W_ROTATION, W_FLIP, W_BRIGHT = "aug_rotation", "aug_flip", "aug_brightness"
W_WSHIFT, W_HSHIFT, W_ZOOM = "aug_width_shift", "aug_height_shift", "aug_zoom"
W_BALANCE = "aug_balance"
FIELDS = {W_ROTATION: "rotation_range", W_FLIP: "horizontal_flip", W_BRIGHT: "brightness_range",
          W_WSHIFT: "width_shift", W_HSHIFT: "height_shift", W_ZOOM: "zoom"}
# The sliders' ranges: a value from elsewhere (a link, a recipe) is brought inside them.
BOUNDS = {W_ROTATION: (0.0, 45.0), W_BRIGHT: (0.5, 1.5), W_WSHIFT: (0.0, 0.3), W_HSHIFT: (0.0, 0.3),
          W_ZOOM: (0.0, 0.3)}
N_VARIANTS = 7


def _inside(key: str, value):
    if key not in BOUNDS:
        return value
    low, high = BOUNDS[key]
    if isinstance(value, (list, tuple)):
        return tuple(min(max(float(v), low), high) for v in value)
    return min(max(float(value), low), high)


def seed_widgets() -> None:
    """Give the widgets this session's chosen values (they are forgotten when the page is left)."""
    chosen = asdict(session.augment_config())
    for key, name in FIELDS.items():
        if key not in st.session_state:
            st.session_state[key] = _inside(key, chosen[name])
    st.session_state.setdefault(W_BALANCE, st.session_state.get(session.KEY_BALANCE, "augment"))


def reset_to_reference() -> None:
    for key, name in FIELDS.items():
        value = getattr(DEFAULTS, name)
        st.session_state[key] = tuple(value) if isinstance(value, tuple) else value
    st.session_state[session.KEY_AUGMENT] = asdict(DEFAULTS)


def controls() -> AugmentConfig:
    st.slider("Rotation (degrees, either way)", *BOUNDS[W_ROTATION], step=0.1, key=W_ROTATION, format="%.1f°",
              help="Maximum rotation in degrees. The reference uses ±0.3°: patients are positioned "
                   "carefully, so real films are almost never tilted much.")
    st.toggle("Horizontal flip (mirror left-right)", key=W_FLIP,
              help="Half of the images are mirrored. A mirrored chest puts the heart on the right: that is "
                   "dextrocardia, which is rare (about 1 in 10,000). The reference flips anyway; try turning it off.")
    st.slider("Brightness factor range", *BOUNDS[W_BRIGHT], step=0.01, key=W_BRIGHT,
              help="Pixel intensities are multiplied by a factor drawn from this range (1.0 = unchanged). "
                   "The reference uses 0.9–1.1, like exposure differences between machines.")
    st.slider("Horizontal shift (fraction of the width)", *BOUNDS[W_WSHIFT], step=0.01, key=W_WSHIFT,
              help="Maximum sideways shift as a fraction of the image width: 0.05 moves a 224-pixel "
                   "image by up to 11 pixels. Edges are filled by repeating the border pixels.")
    st.slider("Vertical shift (fraction of the height)", *BOUNDS[W_HSHIFT], step=0.01, key=W_HSHIFT,
              help="Maximum up/down shift as a fraction of the image height.")
    st.slider("Zoom (fraction in or out)", *BOUNDS[W_ZOOM], step=0.01, key=W_ZOOM,
              help="Maximum zoom either way as a fraction: 0.1 scales between 90 % and 110 %. "
                   "The reference does not zoom (0).")
    st.button("Reset to the reference settings", on_click=reset_to_reference, icon=":material/restart_alt:")
    # The fields without a control here (robustness augmentation from a recipe or a link) are kept.
    values = {**asdict(session.augment_config()), **{name: st.session_state[key] for key, name in FIELDS.items()}}
    try:
        config = AugmentConfig(**values)
    except ValueError as error:  # e.g. an impossible brightness range
        st.error(f"These settings cannot be used: {error}")
        config = DEFAULTS
    st.session_state[session.KEY_AUGMENT] = asdict(config)
    realism_notes(config)
    return config


def realism_notes(config: AugmentConfig) -> None:
    notes = []
    if config.rotation_range > 10:
        notes.append(f"±{config.rotation_range:.0f}° rotation is far more tilt than a real chest film shows.")
    if max(config.width_shift, config.height_shift) > 0.15:
        notes.append("Shifts above 0.15 can push the lung apices or the costophrenic angles out of view.")
    if config.zoom > 0.2:
        notes.append("Zoom above 0.2 crops away or shrinks the lungs beyond normal variation.")
    low, high = config.brightness_range
    if low < 0.7 or high > 1.3:
        notes.append("Brightness beyond 0.7–1.3 washes out or darkens the subtle opacities that mark pneumonia.")
    for note in notes:
        st.warning(note, icon=":material/warning:")
    if not notes:
        st.caption(":material/check: These settings stay within what real radiographs look like.")


def synthetic_example() -> np.ndarray:
    """A drawn chest-like image for the preview when no data set is chosen (clearly not a real X-ray)."""
    size = 256
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.full((size, size), 185.0)
    for cx in (0.33, 0.67):
        img[((xx - cx) / 0.15) ** 2 + ((yy - 0.52) / 0.32) ** 2 < 1] = 55
    img[((xx - 0.55) / 0.12) ** 2 + ((yy - 0.62) / 0.14) ** 2 < 1] = 200  # heart, left of the patient
    img[(np.abs(xx - 0.5) < 0.03) & (yy < 0.7)] = 215                      # spine
    rng = np.random.default_rng(0)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def choose_source() -> tuple[np.ndarray, str]:
    """The image to augment: one from the chosen data set, else a drawn example."""
    result = datasets.current_scan()
    if result is None or result.manifest.empty:
        st.info("No data set chosen, so the preview uses a drawn example. Choose a data set on the "
                "Dataset page to preview real X-rays.", icon=":material/info:")
        return synthetic_example(), "drawn example (not an X-ray)"
    manifest = result.manifest
    left, right = st.columns([2, 1], vertical_alignment="bottom")
    label = left.segmented_control("Class", CLASSES, default="NORMAL", key="aug_class") or "NORMAL"
    if right.button("Another image", icon=":material/shuffle:"):
        st.session_state[session.KEY_PREVIEW_SEED] = int(np.random.default_rng().integers(1_000_000))
    rows = manifest[manifest["label"] == label]
    if rows.empty:
        rows = manifest
    index = st.session_state.get(session.KEY_PREVIEW_SEED, 0) % len(rows)
    row = rows.iloc[index]
    try:
        return datasets.thumbnail(row["path"], 512), f"{row['label']}: {row['relpath']}"
    except CxrError as error:
        st.error(str(error))
        return synthetic_example(), "drawn example (not an X-ray)"


def preview(config: AugmentConfig) -> None:
    gray, caption = choose_source()
    draw_seed = st.session_state.get("aug_draw_seed", 0)
    variants = augment.augment_variants(gray, config, seed=draw_seed, n=N_VARIANTS)
    columns = st.columns(4)
    columns[0].image(gray, caption="original", width="stretch")
    for i, image in enumerate(variants, start=1):
        columns[i % 4].image(image, caption=f"variant {i}", width="stretch")
    st.caption(f"Source: {caption}. Each variant is one random draw within the ranges on the left.")
    if st.button("New random draws", icon=":material/casino:"):
        st.session_state["aug_draw_seed"] = draw_seed + N_VARIANTS
        st.rerun()


def three_class_plan(plan, strategy: str) -> None:
    """The balance of a normal / bacterial / viral run (the Training page's task): each smaller class
    is augmented up to the largest, or weighted."""
    st.caption("For the three-class task chosen on the Training page (normal / bacterial / viral).")
    columns = st.columns(len(plan.counts))
    for index, (column, (name, count)) in enumerate(zip(columns, plan.counts.items())):
        if strategy == "augment":
            column.metric(f"{name} in training", f"{count:,}", delta=f"+{plan.extra.get(name, 0):,} augmented",
                          delta_color="off")
        elif strategy == "class_weight" and plan.class_weight:
            column.metric(f"{name} in training", f"{count:,}", delta=f"weight {plan.class_weight[index]:.2f}×",
                          delta_color="off")
        else:
            column.metric(f"{name} in training", f"{count:,}")
    if strategy == "augment":
        st.caption("Augmented copies of each smaller class bring it up to the largest, only inside the training part.")
    elif strategy == "none":
        st.caption("No balancing: the small viral class is easily called bacterial; watch its sensitivity.")


def balance_section() -> None:
    st.subheader("Balancing the classes")
    st.markdown(
        "Pneumonia images outnumber normal ones about three to one. **Augment** adds augmented copies "
        "of NORMAL training images until the classes are equal (the reference); **class weight** "
        "counts each NORMAL image more in the loss instead; **none** leaves the imbalance, which "
        "biases the model toward saying *pneumonia*."
    )
    labels = {"augment": "Augment NORMAL images", "class_weight": "Class weights", "none": "None"}
    strategy = st.radio("Balance strategy (carried to Training)", BALANCE_STRATEGIES, key=W_BALANCE,
                        format_func=labels.get, horizontal=True)
    st.session_state[session.KEY_BALANCE] = strategy
    mode = st.session_state.get(session.KEY_SPLIT, "random")
    limit = int(st.session_state.get(session.KEY_LIMIT) or 0) or None
    task = st.session_state.get("train_task") or "pneumonia"  # the Training page's task choice
    settings = RunConfig(data=DataConfig(data_dir=str(datasets.dataset_path() or ""), split=mode, limit=limit,
                                         task=task if task in TASKS else "pneumonia"),
                         train=TrainConfig(balance=strategy))
    try:
        planned = datasets.run_plan(settings)
    except CxrError as error:
        st.error(str(error))
        return
    if planned is None:
        st.info("Choose a data set on the Dataset page to see the plan for its training part. On the full "
                "Kermany release with the reference split, *augment* adds 2,152 augmented NORMAL images.",
                icon=":material/info:")
        return
    plan = planned.balance
    if limit:
        st.caption(f"As the Training page will use it: a stratified subset of {planned.n_images:,} images.")
    if len(plan.counts) > 2:
        three_class_plan(plan, strategy)
        return
    a, b, c = st.columns(3)
    a.metric("NORMAL in training", f"{plan.n_normal:,}")
    b.metric("PNEUMONIA in training", f"{plan.n_pneumonia:,}")
    if strategy == "augment":
        c.metric("Augmented NORMAL added", f"{plan.n_extra:,}")
        st.caption(f"With the {mode} split of **{st.session_state.get(session.KEY_DATASET)}**, training sees "
                   f"{plan.n_normal + plan.n_extra:,} NORMAL and {plan.n_pneumonia:,} PNEUMONIA images. "
                   "Augmented copies are made only inside the training part, never in validation or test.")
    elif strategy == "class_weight" and plan.class_weight:
        c.metric("Weight of a NORMAL image", f"{plan.class_weight[0]:.2f}×")
        st.caption(f"Each NORMAL image counts {plan.class_weight[0]:.2f}× and each PNEUMONIA image "
                   f"{plan.class_weight[1]:.2f}× in the loss, so both classes weigh the same in total.")
    else:
        share = plan.n_normal / max(1, plan.n_normal + plan.n_pneumonia)
        c.metric("NORMAL share", f"{share:.0%}")
        st.caption("No balancing: watch the specificity on the Evaluation page.")


seed_widgets()
left, right = st.columns([1, 2], gap="large")
with left:
    st.subheader("Parameters")
    config = controls()
with right:
    st.subheader("Live preview")
    preview(config)
st.divider()
balance_section()
with st.expander("The chosen settings, as saved in the run's config.json"):
    settings = pd.DataFrame([asdict(config)]).map(lambda v: None if v is None else str(v))
    charts.table(settings, hide_index=True)
