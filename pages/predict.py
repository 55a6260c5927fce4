"""Predict: classify uploaded chest X-rays with a trained run and show where the model looked."""
import io

import pandas as pd
import streamlit as st

from cxr_core.core.errors import CxrError
from cxr_core.core.labels import TASK_CLASSES, label_for
from cxr_core.inference.predictor import overlay_heatmap
from pages.ui import access, charts, datasets, frame, models, session

frame.page_header(
    "Predict",
    "Upload chest X-rays (JPEG, PNG or DICOM) and a trained model gives each one a probability of "
    "pneumonia; the run's threshold turns it into a label. The **Grad-CAM** overlay colours the evidence "
    "for that label: the regions that raised the pneumonia score for a PNEUMONIA result, those that "
    "lowered it for a NORMAL one. A sanity check that the model looks at the lungs, not at markers, "
    "text or the image border. A three-class run (normal / bacterial / viral) gives three probabilities "
    "instead and calls the most probable class.",
)

UPLOAD_TYPES = ["jpg", "jpeg", "png", "bmp", "tif", "tiff", "dcm", "dicom"]
MAX_DETAILED = 12  # images shown with Grad-CAM; the rest get a row in the table only
#: What happens to an upload (models.explain_bytes keeps it in this session's memory; images.load_gray
#: reads only a DICOM file's image elements).
PRIVACY = ("Uploaded images stay in this server's memory for this session only: they are not saved, and DICOM "
           "patient details are never read out or stored; only the CSV you download holds the results.")
PER_IMAGE_MB = 200  # a full-resolution DICOM is tens of MB; a smaller host lowers it (datasets.upload_limit)


def no_run_message() -> None:
    st.info(
        "There is no trained model yet. Train one on the **Training** page (the synthetic practice set "
        "trains in about a minute; the Kermany data set gives a meaningful model), then come back here.",
        icon=":material/info:",
    )
    st.page_link("pages/training.py", label="Go to Training", icon=":material/model_training:")


def run_card(summary) -> float | None:
    """Show the chosen run; returns its threshold (None when the model cannot be loaded)."""
    try:
        predictor = models.load_predictor(summary.path)
    except CxrError as error:
        st.error(str(error))
        return None
    a, b, c, d = st.columns(4)
    a.metric("Backbone", predictor.config.model.backbone)
    b.metric("Input size", f"{predictor.image_size} px")
    if not models.task_of(summary.path).uses_threshold:
        c.metric("Classes", "3", help="NORMAL, BACTERIA and VIRUS. A three-class run needs no threshold: each "
                                      "image is called the class with the highest probability.")
        honest_auc(d, summary, "macro AUC")
        st.caption("This run tells **normal**, **bacterial** and **viral** pneumonia apart: each image gets three "
                   "probabilities that add up to 100 %, and the map shows the evidence for the class it is called.")
    else:
        c.metric("Threshold", f"{predictor.threshold:.3f}",
                 help="Probabilities at or above this are called PNEUMONIA. It was chosen on the run's "
                      "validation images (see the Evaluation page).")
        honest_auc(d, summary, "ROC AUC")
    engine = ("It runs on **LiteRT**, without TensorFlow, from the run's model.tflite."
              if predictor.engine.name == "LiteRT" else
              "It runs on **Keras/TensorFlow** (this run has no current model.tflite; "
              "`python -m cxr_core export --run RUN` writes one and makes the app lighter).")
    demo = "This is the shipped demo run; its model card in the run folder says what it was trained on. " \
        if summary.is_demo else ""
    views = (" It looks at each image four times (as it is, shifted a little left and right, zoomed in a little) "
             "and averages what it says, because that scored higher on its validation images; the Grad-CAM map "
             "explains that average." if predictor.tta else "")
    st.caption(demo + engine + views)
    return predictor.threshold


def honest_auc(column, summary, what: str) -> None:
    """The run's AUC on an external test set when it has one (the honest figure), else on its own
    split's test part, said to be internal."""
    if summary.external_auc is not None:
        column.metric(f"{what} on {summary.external_name}", charts.fmt_num(summary.external_auc),
                      help="On a test set from outside the run's training data: the figure to believe.")
    else:
        column.metric(f"Internal test {what}", charts.fmt_num(summary.test_auc),
                      help="On the test part of the run's own split, which flatters a model; evaluate it on "
                           "another data set on the Evaluation page for its honest score.")


def explained_uploads(summary, files, rows: list[dict], blank: dict):
    """Yield (index, name, gray, Explanation) for every upload the run can read; an unreadable one adds
    ``{"file", **blank, "error"}`` to ``rows`` and gets its own one-line error, and the rest go on."""
    stamp = models.model_stamp(summary.path)
    progress = st.progress(0.0, text="Classifying...") if len(files) > 3 else None
    for i, upload in enumerate(files):
        name = upload.name
        try:
            gray, found = models.explain_bytes(str(summary.path), stamp, upload.getvalue(), name)
        except CxrError as error:
            rows.append({"file": name, **blank, "error": str(error)})
            st.error(str(error) if name in str(error) else f"{name}: {error}", icon=":material/broken_image:")
        else:
            yield i, name, gray, found
        if progress is not None:
            progress.progress((i + 1) / len(files), text=f"Classified {i + 1} of {len(files)}")
    if progress is not None:
        progress.empty()
    if len(files) > MAX_DETAILED:
        st.caption(f"Grad-CAM is shown for the first {MAX_DETAILED} images; every image is in the table below.")


def result_rows(summary, files, opacity: float, threshold: float) -> list[dict]:
    """Classify every upload; each bad file gets its own one-line error and the rest go on."""
    if not models.task_of(summary.path).uses_threshold:
        return subtype_rows(summary, files, opacity)
    rows: list[dict] = []
    for i, name, gray, found in explained_uploads(summary, files, rows, {"probability": None, "label": None}):
        probability = found.probability
        label = label_for(probability, threshold)
        rows.append({"file": name, "probability": round(probability, 4), "label": label, "error": ""})
        if i < MAX_DETAILED:
            show_one(name, gray, probability, label, found, opacity, threshold)
    return rows


def show_one(name, gray, probability, label, found, opacity, threshold) -> None:
    """One result: the X-ray, the map of the evidence for its label (``found``, an Explanation), the numbers."""
    with st.container(border=True):
        left, middle, right = st.columns([2, 2, 1.4])
        left.image(gray, caption=f"{name}", width="stretch")
        if found.empty:  # an all-zero map would be a blank square: say why instead
            middle.info(found.caption, icon=":material/info:")
        else:
            middle.image(overlay_heatmap(gray, found.heatmap, opacity), caption="Grad-CAM overlay", width="stretch")
            middle.caption(found.caption)
        colour = "red" if label == "PNEUMONIA" else "green"
        right.markdown(f"#### :{colour}[{label}]")
        right.metric("Probability of pneumonia", f"{probability:.1%}")
        right.progress(min(1.0, max(0.0, probability)))
        margin = abs(probability - threshold)
        right.caption(
            f"Threshold {threshold:.2f}. "
            + ("Close to the threshold: an uncertain case." if margin < 0.1 else
               "Far from the threshold." if margin > 0.3 else "")
        )


SUBTYPE_CLASSES = TASK_CLASSES["subtype"]
SUBTYPE_COLUMNS = [f"p_{c}" for c in SUBTYPE_CLASSES]  # the table's and the CSV's probability columns
SUBTYPE_COLOURS = {"NORMAL": "green", "BACTERIA": "red", "VIRUS": "orange"}


def subtype_rows(summary, files, opacity: float) -> list[dict]:
    """Like ``result_rows`` for a three-class run: one probability column per class, the most probable the label."""
    rows: list[dict] = []
    blank = {**dict.fromkeys(SUBTYPE_COLUMNS), "label": None}
    for i, name, gray, found in explained_uploads(summary, files, rows, blank):
        probabilities = {c: float(found.probabilities[c]) for c in SUBTYPE_CLASSES}
        rows.append({"file": name, **{f"p_{c}": round(p, 4) for c, p in probabilities.items()},
                     "label": found.label, "error": ""})
        if i < MAX_DETAILED:
            show_subtype(name, gray, probabilities, found, opacity)
    return rows


def show_subtype(name, gray, probabilities: dict[str, float], found, opacity) -> None:
    """One result of a three-class run: the X-ray, the map of its predicted class, the three probabilities."""
    with st.container(border=True):
        left, middle, right = st.columns([2, 2, 1.4])
        left.image(gray, caption=f"{name}", width="stretch")
        if found.empty:
            middle.info(found.caption, icon=":material/info:")
        else:
            middle.image(overlay_heatmap(gray, found.heatmap, opacity), caption=f"Grad-CAM overlay: {found.target}",
                         width="stretch")
            middle.caption(found.caption)
        right.markdown(f"#### :{SUBTYPE_COLOURS.get(found.label, 'gray')}[{found.label}]")
        for cls, p in probabilities.items():
            right.progress(min(1.0, max(0.0, p)), text=f"{cls}: {p:.1%}")
        first, second = sorted(probabilities.values(), reverse=True)[:2]
        right.caption("The two most probable classes are close: an uncertain case." if first - second < 0.1 else
                      "The most probable class is the label; there is no threshold.")


summary = models.run_picker("Model (a finished run)", key="predict_run",
                        help="The shipped demo run is chosen by default; your own finished runs are listed too.")
models.warn_if_useless(summary)
if summary is None:
    no_run_message()
else:
    threshold = run_card(summary)
    if threshold is not None:
        files = st.file_uploader("Chest X-ray images", type=UPLOAD_TYPES, accept_multiple_files=True,
                                 key="predict_upload", max_upload_size=min(PER_IMAGE_MB, datasets.upload_limit()[0]),
                                 help="One or many files. DICOM files are windowed as their header says." +
                                      (f" At most {access.uploads_per_minute()} images a minute per visitor."
                                       if access.hosted() else ""))
        st.caption(PRIVACY)
        files = access.admitted_uploads(files)  # the per-minute limit of uploads, per visitor
        opacity = st.slider("Heatmap opacity", 0.0, 1.0, 0.4, 0.05, key="predict_opacity", **session.KEEP,
                            help="0 shows only the X-ray, 1 only the heatmap.")
        if not files:
            st.caption("Upload one or more images to see their predictions.")
        else:
            rows = result_rows(summary, files, opacity, threshold)
            table = pd.DataFrame(rows)
            st.subheader("All results")
            subtype = not models.task_of(summary.path).uses_threshold
            columns = ({c: st.column_config.ProgressColumn(f"P({c[2:]})", min_value=0.0, max_value=1.0, format="%.3f")
                        for c in SUBTYPE_COLUMNS} if subtype else
                       {"probability": st.column_config.ProgressColumn(
                           "probability of pneumonia", min_value=0.0, max_value=1.0, format="%.3f")})
            charts.table(table, hide_index=True, column_config=columns)
            buffer = io.StringIO()
            # A three-class run has no threshold: one probability column per class and the most probable label.
            (table.assign(run=summary.run_id) if subtype
             else table.assign(run=summary.run_id, threshold=threshold)).to_csv(buffer, index=False)
            st.download_button("Download the results as CSV", buffer.getvalue(), file_name="predictions.csv",
                               mime="text/csv", icon=":material/download:")

st.warning(frame.DISCLAIMER + " A probability from this model is not a diagnosis; a clinician reads the film.",
           icon=":material/medical_information:")
