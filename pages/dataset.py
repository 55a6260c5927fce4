"""Dataset: choose the images, then look at what is in them before training anything."""
import re
import time
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx

from cxr_core.core.config import SPLIT_LABELS, SPLIT_MODES
from cxr_core.core.errors import CxrError, ServerBusyError
from cxr_core.core.labels import CLASSES
from cxr_core.data import download, practice, shortcut_lab, shortcuts, stats
from cxr_core.hosting import resources
from pages.ui import access, charts, datasets, frame, session

frame.page_header(
    "Dataset",
    "A model can only be as good as the images it learns from. Before training, check how many images "
    "each class has, how many images come from the same child, and how the images are split into "
    "training, validation and test: these decide whether the final accuracy means anything.",
)

W_CHOICE = "dataset_choice"      # the folder selectbox
W_SPLIT = "dataset_split_mode"   # the split-mode control
PENDING = "dataset_pending"      # a folder to select on the next run (after a download, upload or generation)
HELD_ZIP = "dataset_held_zip"    # {"path", "name", "size"}: an uploaded zip waiting on the server's disk
ZIP_ROUND = "dataset_zip_round"  # a new number gives a new, empty zip uploader


def select_next_run(name: str) -> None:
    # The sidebar, drawn before this page, shows the new data set on the rerun; the folder
    # selectbox, already drawn in this run, takes it then (PENDING).
    st.session_state[session.KEY_DATASET] = name
    st.session_state[PENDING] = name
    st.rerun()


def apply_pending() -> None:
    pending = st.session_state.pop(PENDING, None)
    if pending:
        st.session_state[session.KEY_DATASET] = pending
        st.session_state[W_CHOICE] = pending


# --- Choosing -----------------------------------------------------------------------------------
def folder_tab() -> None:
    names = datasets.list_datasets()
    root = datasets.data_root()
    operator = access.is_operator()  # a visitor sees no path of the server
    if not names:
        st.info(f"There are no data sets in the data folder (`{root}`) yet. Download the Kermany release, "
                "upload a zip, or make the synthetic practice set in the other tabs." if operator else
                "There are no data sets here yet; the operator of this app adds them.", icon=":material/info:")
        return
    current = st.session_state.get(session.KEY_DATASET)
    if st.session_state.get(W_CHOICE) not in names:
        st.session_state[W_CHOICE] = current if current in names else None
    choice = st.selectbox("Data set folder", names, key=W_CHOICE, placeholder="Choose a data set",
                          on_change=session.copy_state, args=(W_CHOICE, session.KEY_DATASET),
                          format_func=lambda n: f"{n}  (synthetic)" if datasets.is_synthetic(root / n) else n,
                          help=f"Folders under the data folder `{root}` (set CXR_DATA_ROOT to use another)." if operator
                          else "The data sets on this server.")
    st.session_state[session.KEY_DATASET] = choice
    st.caption("A folder may hold NORMAL/ and PNEUMONIA/ subfolders, or the Kermany layout "
               "(train/, val/, test/, each with NORMAL/ and PNEUMONIA/).")


def download_tab() -> None:
    st.markdown(
        "The **Kermany et al. (2018)** release: 5,856 paediatric chest X-rays from Guangzhou Women and Children's "
        "Medical Center, CC BY 4.0 (doi:10.17632/rscbjbr9sj.2). About 1.2 GB; it is checked against its "
        "SHA-256 and unpacked into the data folder. An interrupted download resumes where it stopped."
    )
    root = datasets.data_root()
    target = root / download.KERMANY_FOLDER
    if target.is_dir() and any(target.iterdir()):
        st.success(f"Already downloaded into `{target.name}`.", icon=":material/check_circle:")
        if st.button("Use it", key="use_kermany"):
            select_next_run(target.name)
        return
    if not access.allowed("download"):
        return
    part = root / f"{download.KERMANY_FILENAME}.part"
    resume = part.is_file()
    label = (f"Resume the download ({part.stat().st_size / 1e6:,.0f} MB already here)" if resume
             else "Download the Kermany release (1.2 GB)")
    if not st.button(label, type="primary", icon=":material/download:", key="download_kermany"):
        return
    bar = st.progress(0.0, text="Connecting...")
    started = time.time()

    def on_progress(done: int, total: int | None) -> None:
        rate = done / max(time.time() - started, 1e-3)
        if total:
            eta = (total - done) / max(rate, 1.0)
            bar.progress(min(1.0, done / total), text=f"Downloaded {done / 1e6:,.0f} of {total / 1e6:,.0f} MB · "
                                                      f"about {charts.fmt_seconds(eta)} left")
        else:
            bar.progress(0.0, text=f"Downloaded {done / 1e6:,.0f} MB")

    def on_extract(done: int, total: int) -> None:
        bar.progress(min(1.0, done / max(total, 1)), text=f"Unpacking: {done:,} of {total:,} files")

    try:
        folder = download.download_kermany(root, on_progress=on_progress, on_extract_progress=on_extract)
    except CxrError as error:
        bar.empty()
        st.error(str(error), icon=":material/error:")
        return
    bar.empty()
    access.record("download", Path(folder).relative_to(root).parts[0])
    select_next_run(Path(folder).relative_to(root).parts[0])


def spool_upload(upload, root: Path) -> None:
    """Move an accepted zip to the server's disk at once and release it from the server's memory:
    Streamlit keeps an upload's bytes until its widget lets go of them."""
    try:
        path = resources.save_upload(upload, root)
    except OSError as error:
        st.error(f"The archive could not be saved on the server ({error.strerror or error}); free some disk "
                 "space and upload it again.", icon=":material/error:")
        return
    finally:
        ctx = get_script_run_ctx()
        if ctx is not None and getattr(upload, "file_id", None):
            ctx.uploaded_file_mgr.remove_file(ctx.session_id, upload.file_id)
        upload.close()
    st.session_state[HELD_ZIP] = {"path": str(path), "name": upload.name, "size": upload.size}
    st.session_state[ZIP_ROUND] = st.session_state.get(ZIP_ROUND, 0) + 1  # a new, empty uploader
    st.rerun()


def discard_held(held: dict | None) -> None:
    if held:
        Path(held["path"]).unlink(missing_ok=True)
    st.session_state.pop(HELD_ZIP, None)


def upload_tab() -> None:
    if not access.allowed("unpack"):  # a visitor is told who can, and nothing about the server's size
        return
    limit_mb, memory_mb = datasets.upload_limit()
    st.markdown("Upload a zip of chest X-rays: NORMAL/ and PNEUMONIA/ folders, or the Kermany layout. "
                f"This server takes archives up to **{limit_mb:,} MB** (it has {memory_mb:,} MB of memory); "
                "for the full Kermany release use the Download tab, which streams to disk. "
                "Archives that would write outside their folder are refused.")
    root = datasets.data_root()
    held = st.session_state.get(HELD_ZIP)
    if held and not Path(held["path"]).is_file():
        discard_held(held)
        held = None
    if held is None:
        rounds = st.session_state.get(ZIP_ROUND, 0)
        upload = st.file_uploader("Zip archive", type=["zip"], key=f"dataset_zip-{rounds}" if rounds else "dataset_zip",
                                  max_upload_size=limit_mb)
        if upload is not None:
            spool_upload(upload, root)
        return
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(held["name"]).stem).strip("-.") or "uploaded"
    candidate, i = name, 1
    while (root / candidate).exists():
        i += 1
        candidate = f"{name}-{i}"
    st.caption(f"`{held['name']}` ({held['size'] / 1e6:,.1f} MB) is on the server's disk, ready to unpack.")
    left, right = st.columns([3, 1])
    if right.button("Remove it", key="discard_zip", icon=":material/delete:"):
        discard_held(held)
        st.rerun()
    if not left.button(f"Unpack into the data folder as `{candidate}`", type="primary", key="unpack_zip"):
        return
    bar = st.progress(0.0, text="Checking the archive...")
    try:
        with resources.unpack_slot(root):
            download.safe_extract_zip(Path(held["path"]), root / candidate,
                                      on_progress=lambda d, t: bar.progress(min(1.0, d / max(t, 1)),
                                                                            text=f"Unpacking: {d:,} of {t:,} files"))
    except ServerBusyError as error:
        bar.empty()
        st.warning(str(error), icon=":material/hourglass_top:")
        return
    except CxrError as error:
        bar.empty()
        discard_held(held)  # a refused archive is of no further use; the message says what to fix
        st.error(str(error), icon=":material/error:")
        return
    bar.empty()
    discard_held(held)
    access.record("unpack", candidate)
    select_next_run(candidate)


def practice_tab() -> None:
    st.warning("**Synthetic images, not X-rays.** The practice set is drawn by a program (lungs, ribs, bright "
               "blobs for pneumonia). It lets you try every step offline in a minute, but a model trained on it "
               "knows nothing about real chest X-rays. Use the Kermany release for anything meaningful.",
               icon=":material/science:")
    if not access.allowed("practice"):
        return
    if st.button("Make the synthetic practice set (220 images, a few seconds)", key="make_practice",
                 icon=":material/draw:"):
        try:
            with st.spinner("Drawing synthetic images..."):
                folder = practice.make_practice_dataset(datasets.data_root())
        except (CxrError, OSError) as error:
            st.error(f"The practice set could not be made: {error}")
            return
        access.record("practice", Path(folder).relative_to(datasets.data_root()).parts[0])
        select_next_run(Path(folder).relative_to(datasets.data_root()).parts[0])


# --- Looking ----------------------------------------------------------------------------------
def overview(result, summary: dict) -> None:
    name = st.session_state.get(session.KEY_DATASET)
    if datasets.is_synthetic(datasets.data_root() / name):
        st.warning("This is the **synthetic** practice set: drawn images, not X-rays.", icon=":material/science:")
    cols = st.columns(5)
    cols[0].metric("Images", f"{summary['images']:,}")
    cols[1].metric("Normal", f"{summary['NORMAL']:,}")
    cols[2].metric("Pneumonia", f"{summary['PNEUMONIA']:,}")
    cols[3].metric("Patients", f"{summary['patients']:,}")
    cols[4].metric("Unreadable / duplicates", f"{summary['skipped']} / {summary['duplicates']}")
    st.caption(f"Layout: {'Kermany (train/val/test folders)' if result.layout == 'kermany' else 'class folders'} "
               f"· found in `{Path(result.root).name}`")


def imbalance(summary: dict, data: dict) -> None:
    st.subheader("Class balance")
    counts = data["class_counts"]
    left, right = st.columns([1, 1])
    fig = go.Figure(go.Bar(x=list(counts.index), y=counts["count"],
                           marker_color=[charts.CLASS_COLORS[c] for c in counts.index],
                           text=[f"{c:,} ({s:.0%})" for c, s in zip(counts["count"], counts["share"])],
                           textposition="auto"))
    left.plotly_chart(charts.style(fig, 280, title="Images per class", yaxis_title="images"), key="class_counts")
    majority = counts["share"].max()
    right.markdown(
        f"There are **{summary['imbalance']}**.\n\n"
        "Imbalance biases a model toward the majority class: a model that answered *pneumonia* for every "
        f"image would already be right {majority:.0%} of the time. That is why accuracy is not enough and why "
        "the Augmentation page balances the training part."
    )


def splits(data: dict) -> None:
    st.subheader("How the images are split")
    modes = [m for m in SPLIT_MODES if m != "official" or data["summary"]["has_official_split"]]
    current = st.session_state.get(session.KEY_SPLIT, "random")
    if st.session_state.get(W_SPLIT) not in modes:
        st.session_state[W_SPLIT] = current if current in modes else "random"
    mode = st.segmented_control("Split mode (carried to Training)", modes, key=W_SPLIT, required=True,
                                on_change=session.copy_state, args=(W_SPLIT, session.KEY_SPLIT),
                                format_func=SPLIT_LABELS.get)
    st.session_state[session.KEY_SPLIT] = mode
    try:
        split = datasets.current_split(mode)
    except CxrError as error:
        st.error(str(error), icon=":material/error:")
        return
    table = stats.split_proportions(split)
    leaked = int((split.groupby("patient_id")["split"].nunique() > 1).sum())
    spread = float(table["share_NORMAL"].max() - table["share_NORMAL"].min())
    left, right = st.columns([1, 1])
    fig = go.Figure()
    for label in CLASSES:
        fig.add_bar(x=list(table.index), y=table[f"share_{label}"], name=label, marker_color=charts.CLASS_COLORS[label],
                    text=[f"{v:.0%}" for v in table[f"share_{label}"]], textposition="inside")
    fig.update_layout(barmode="stack", yaxis_tickformat=".0%")
    left.plotly_chart(charts.style(fig, 280, title="Class shares in each part"), key="split_shares")
    shown = table[["n", "NORMAL", "PNEUMONIA", "share_NORMAL"]].rename(
        columns={"n": "images", "share_NORMAL": "healthy share"})
    charts.table(shown.style.format({"healthy share": "{:.2f}"}, na_rep=charts.MISSING), where=right, width="stretch")
    texts = {
        "random": "The random split (seed 123, 8:1:1 as the reference) is stratified by class, "
                  + ("so every part has about the same healthy share. " if spread < 0.03 else
                     "although with this few images the healthy shares still differ between the parts. ")
                  + f"But it splits **images**, not children: **{leaked:,} patients** have "
                  "images in more than one part, so the model is tested partly on children it has already seen. "
                  "That leaks information and overstates accuracy.",
        "patient": f"Every child's images stay in one part ({leaked} patients in two parts), so the test measures "
                   "how the model does on new children. Expect lower, more honest numbers than the random split.",
        "official": "The release's own test folder: images collected separately, with a different class balance. "
                    "It is harder than any random split of the training images, so scores are lower and closer to "
                    "what a new hospital would see.",
    }
    right.markdown(texts[mode])


def composition(data: dict) -> None:
    st.subheader("Subtypes and patients")
    left, right = st.columns(2)
    sub = data["subtypes"]
    fig = go.Figure(go.Bar(x=sub["label"] + " · " + sub["subtype"], y=sub["count"], text=sub["count"],
                           marker_color=[charts.CLASS_COLORS.get(c, "#888") for c in sub["label"]]))
    left.plotly_chart(charts.style(fig, 280, title="Images by subtype (from the file names)"), key="subtypes")
    left.caption("Bacterial and viral pneumonia look different (a dense lobe versus patchy haze); the model is "
                 "only asked normal versus pneumonia.")
    per = data["per_patient"]
    fig = go.Figure()
    for label in CLASSES:
        part = per[per["label"] == label]
        fig.add_bar(x=part["images"], y=part["patients"], name=label, marker_color=charts.CLASS_COLORS[label])
    fig.update_layout(barmode="group", xaxis_title="images per patient", yaxis_title="patients")
    right.plotly_chart(charts.style(fig, 280, title="Images per patient"), key="per_patient")
    p = data["patients"]
    right.caption(f"{p['patients']:,} patients, {p['patients_with_several_images']:,} with several images "
                  f"(up to {p['max_images_per_patient']}). Images of one child look alike, which is why splits "
                  "should keep a child in one part.")


def sizes_and_intensity(path: Path, data: dict) -> None:
    st.subheader("Image sizes and intensities")
    left, right = st.columns(2)
    sizes = data["sizes"]
    if sizes["width"].nunique() == 1 and sizes["height"].nunique() == 1:
        left.metric("Every image is", f"{int(sizes['width'].iloc[0])} × {int(sizes['height'].iloc[0])} px")
        left.caption("All images have one size: this copy was already resized (the originals range from about "
                     "400 to 2,900 pixels). The model resizes every image to a square anyway.")
    else:
        size_scatter(left, sizes)
    hist_panel(right, path)


def size_scatter(left, sizes: pd.DataFrame) -> None:
    if len(sizes) > 3000:
        sizes = sizes.sample(3000, random_state=0)
    fig = go.Figure()
    for label in CLASSES:
        part = sizes[sizes["label"] == label]
        fig.add_scatter(x=part["width"], y=part["height"], mode="markers", name=label, opacity=0.5,
                        marker=dict(color=charts.CLASS_COLORS[label], size=5))
    fig.update_layout(xaxis_title="width (px)", yaxis_title="height (px)")
    left.plotly_chart(charts.style(fig, 300, title="Width and height of each image"), key="sizes")
    left.caption("Every image is resized to a square for the model; very different shapes are stretched differently. "
                 "If the classes differ in size, a model can learn the size instead of the disease.")


def hist_panel(right, path: Path) -> None:
    try:
        hist = datasets.intensity_histograms(str(path), datasets.fingerprint(path))
    except CxrError as error:
        right.error(str(error))
        return
    fig = go.Figure()
    for label in CLASSES:
        fig.add_scatter(x=(hist["bin_start"] + hist["bin_end"]) / 2, y=hist[label], mode="lines", name=label,
                        line=dict(color=charts.CLASS_COLORS[label]), fill="tozeroy", opacity=0.4)
    fig.update_layout(xaxis_title="pixel intensity (0 black – 255 white)", yaxis_title="share of pixels",
                      yaxis_tickformat=".1%")
    right.plotly_chart(charts.style(fig, 300, title="Intensity histograms per class"), key="intensity")
    n = hist.attrs.get("n_images", {})
    right.caption(f"Averaged over {n.get('NORMAL', 0)} normal and {n.get('PNEUMONIA', 0)} pneumonia images. "
                  "Pneumonia adds bright opacities in the lungs; a large shift between the classes can also come "
                  "from different machines, which a model would happily learn.")


SHORTCUT_SAMPLE = 300  # images measured for the pixel properties (sharpness, file size, ...)


@st.cache_data(show_spinner="Looking for shortcuts on a sample of images...", max_entries=8)
def shortcut_report(path: str, fingerprint: str, _result,  # noqa: ARG001 (path, fingerprint: the cache key)
                    max_images: int = SHORTCUT_SAMPLE) -> list[dict]:
    """``shortcuts.shortcut_check`` of the chosen data set, once per folder contents."""
    return shortcuts.shortcut_check(_result, max_images=max_images)


def shortcuts_section(path: Path, result) -> None:
    st.subheader("Shortcuts: what else predicts the label?")
    st.markdown(
        "A model learns whatever separates the classes, not only the disease. If a property that is not the "
        "disease (the scanner, the hospital, which copy of the data an image came from) also goes with the "
        "label, a model can score well on its own data by learning that property, and then fail on images "
        "from elsewhere. Each row says how well one property **alone** predicts pneumonia: an AUC of 0.5 is "
        "chance, 1.0 is perfect."
    )
    try:
        report = shortcut_report(str(path), datasets.fingerprint(path), result)
    except (CxrError, ValueError) as error:
        st.error(str(error), icon=":material/error:")
        return
    if not report:
        st.info("No property besides the images could be compared with the label here.", icon=":material/info:")
        return
    table = shortcuts.report_table(report)
    shown = table[["property", "auc", "direction", "warning", "measured_on"]].rename(
        columns={"auc": "AUC", "measured_on": "measured on"})
    charts.table(shown.style.format({"AUC": "{:.2f}"}, na_rep=charts.MISSING), hide_index=True, width="stretch",
                 key="shortcut_table")
    warned = [entry for entry in report if entry.get("warning")]
    for entry in warned:
        st.warning(f"{entry['warning']} In this data set, {entry['direction']}.", icon=":material/warning:")
    if not warned:
        st.success("No property predicts the label well on its own.", icon=":material/check_circle:")
    st.caption(
        "Columns of the data set's own manifest.csv (such as a scanner or a source) are measured on every image; "
        f"sharpness, file size per pixel, JPEG quality, brightness and contrast on up to {SHORTCUT_SAMPLE} images. "
        "Pixel properties can also change with the disease itself (opacities blur the lung detail), so a warning "
        "there is a lead to check, not proof; a recorded source or scanner is never the disease."
    )


def shortcut_lab_section(path: Path, result) -> None:

    st.subheader("Shortcut lab: plant a shortcut and watch a model take it")
    st.markdown(
        "Published models have learned things that are not the disease: a hospital's identity alone predicted "
        "the label with AUC 0.86 (Zech et al. 2018), and COVID-19 detectors read the text and markers on the "
        "films instead of the lungs (DeGrave et al. 2021). The lab makes a copy of this data set with a small "
        "lead marker (a white L or R in a small frame in a corner, as radiographers put on films) burnt into "
        "most pneumonia images and a few normal ones. The marker says nothing about the lungs, yet it predicts "
        "the label. Train on the copy, then evaluate the run on a clean data set: the Evaluation page shows how "
        "often the model's Grad-CAM map peaks on the marker, and a score that drops on clean images is the "
        "shortcut's cost. A model takes a shortcut when it is easier than the disease: on the synthetic practice "
        "set the drawn opacities are easier, so models there mostly ignore the marker."
    )
    if (path / shortcut_lab.SETTINGS_FILE).is_file():
        st.info("This data set is a shortcut-lab copy: its manifest.csv records which images carry the marker "
                "(the shortcut check above lists it). Train on it, then evaluate the run on a clean data set.",
                icon=":material/science:")
        return
    if not access.allowed("shortcut lab"):
        return
    left, right = st.columns(2)
    positive = left.slider("Share of pneumonia images marked", 0.0, 1.0, shortcut_lab.DEFAULT_POSITIVE_RATE, 0.05,
                           key="lab_positive_rate")
    negative = right.slider("Share of normal images marked", 0.0, 1.0, shortcut_lab.DEFAULT_NEGATIVE_RATE, 0.05,
                            key="lab_negative_rate")
    target = shortcut_lab.free_folder(datasets.data_root(), path.name)
    if not st.button(f"Make the lab copy as `{target.name}` ({len(result.manifest):,} images)", key="make_lab",
                     icon=":material/science:"):
        return
    bar = st.progress(0.0, text="Copying...")
    try:
        lab = shortcut_lab.make_shortcut_lab(
            path, target, positive_rate=positive, negative_rate=negative,
            on_progress=lambda d, t: bar.progress(min(1.0, d / max(t, 1)), text=f"Copied {d:,} of {t:,} images"))
    except (CxrError, OSError) as error:
        bar.empty()
        st.error(f"The lab copy could not be made: {error}", icon=":material/error:")
        return
    bar.empty()
    access.record("shortcut lab", target.name)
    if len(lab.skipped):  # say so before moving on: choose the copy above when ready
        st.warning(f"`{target.name}` is made, but {len(lab.skipped)} file(s) could not be read and were left out: "
                   + "; ".join(lab.skipped["reason"].astype(str).head(3)), icon=":material/warning:")
        return
    select_next_run(target.name)


def sample_grid(result) -> None:
    st.subheader("Sample images")
    c1, c2, c3 = st.columns([1, 1, 1], vertical_alignment="bottom")
    label = c1.selectbox("Class", ["both", *CLASSES], key="grid_class")
    subtypes = sorted(result.manifest["subtype"].dropna().astype(str).unique())
    subtype = c2.selectbox("Subtype", ["any", *subtypes], key="grid_subtype")
    if c3.button("Show others", icon=":material/shuffle:", key="grid_shuffle"):
        st.session_state[session.KEY_GRID_SEED] = st.session_state.get(session.KEY_GRID_SEED, 0) + 1
    rows = stats.sample_images(result, n=12, label=None if label == "both" else label,
                               subtype=None if subtype == "any" else subtype,
                               seed=st.session_state.get(session.KEY_GRID_SEED, 0))
    if rows.empty:
        st.caption("No image matches these filters.")
        return
    columns = st.columns(6)
    for i, row in rows.iterrows():
        with columns[i % 6]:
            try:
                st.image(datasets.thumbnail(str(row["path"]), 256), width="stretch",
                         caption=f"{row['label']} · {Path(str(row['path'])).name}")
            except CxrError as error:
                st.caption(f"{Path(str(row['path'])).name}: {error}")


def problems(result) -> None:
    st.subheader("Unreadable files and duplicates")
    skipped, dups = result.skipped, result.duplicates
    if skipped.empty and dups.empty:
        st.success("Every file could be read and no image appears twice.", icon=":material/check_circle:")
        return
    left, right = st.columns(2)
    with left:
        st.markdown(f"**{len(skipped)} file(s) left out**")
        if len(skipped):
            charts.table(skipped.assign(path=skipped["path"].map(lambda p: Path(str(p)).name)), hide_index=True)
    with right:
        st.markdown(f"**{len(dups)} duplicate(s)** (same bytes; only the first copy is used)")
        if len(dups):
            shown = dups.copy()
            for col in ("path", "duplicate_of"):
                if col in shown:
                    shown[col] = shown[col].map(lambda p: Path(str(p)).name)
            charts.table(shown, hide_index=True)
            st.caption("A duplicate across training and test would let the model be tested on an image it learned.")


# --- The page ---------------------------------------------------------------------------------
apply_pending()
st.subheader("Choose a data set")
tabs = st.tabs([":material/folder: Folder on this server", ":material/download: Download Kermany",
                ":material/upload: Upload a zip", ":material/science: Synthetic practice set"])
with tabs[0]:
    folder_tab()
with tabs[1]:
    download_tab()
with tabs[2]:
    upload_tab()
with tabs[3]:
    practice_tab()

path = datasets.dataset_path()
if path is None:
    st.info("**Next step:** download the Kermany release (the real data) or choose a folder above. Offline, the "
            "synthetic practice set lets you try every step.", icon=":material/arrow_forward:")
else:
    st.divider()
    try:
        result = datasets.scan(path)
        data = datasets.dataset_stats(str(path), datasets.fingerprint(path))
    except CxrError as error:
        st.error(str(error), icon=":material/error:")
    else:
        overview(result, data["summary"])
        imbalance(data["summary"], data)
        splits(data)
        composition(data)
        sizes_and_intensity(path, data)
        shortcuts_section(path, result)
        shortcut_lab_section(path, result)
        sample_grid(result)
        problems(result)
        st.page_link("pages/augmentation.py", label="Next: choose the augmentation", icon=":material/arrow_forward:")
