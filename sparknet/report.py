"""report.html: one page per run that a browser opens from disk, without a server or
network: every image is a base64 PNG inside the page, the style is inline, and there
is no script.

Sections: test metrics, the comparison table, ROC and PR curves (residuals for
regression), confusion matrix and calibration, training curves, the PCA scree plot,
the data-quality tables, and seconds per stage (timings.json).
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import tempfile
from pathlib import Path

import numpy as np

from sparknet.config import Config
from sparknet.run_dir import RunDir, read_json

STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f0f0f0; text-align: left; }
img { max-width: 100%; border: 1px solid #eee; }
.note { color: #666; font-size: 0.9em; }
"""


def write_report(
    run_dir: RunDir,
    config: Config,
    metrics: dict,
    y: np.ndarray,
    out: np.ndarray,
    evaluate_seconds: float,
) -> Path:
    """y (n,) test labels and out the network's test output (n,) or (n, C), as the
    metrics were computed from them."""
    task = metrics["task"]
    parts = [
        f"<h1>sparknet run: {_e(config.name)}</h1>",
        f"<p class='note'>{_e(str(run_dir.root))} · label <b>{_e(metrics['label'])}</b> "
        f"({_e(task)}) · written {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC</p>",
        "<h2>Test metrics</h2>",
        _metrics_section(metrics),
    ]
    if "comparison" in metrics:
        parts += ["<h2>Comparison on the test split</h2>", _comparison_section(task, metrics)]
    parts.append("<h2>" + ("Residuals" if task == "regression" else "ROC and PR curves") + "</h2>")
    parts.append(_img(_curves_figure(task, metrics, y, out), "test curves"))
    if task != "regression":
        parts += [
            "<h2>Confusion matrix and calibration</h2>",
            _img(_confusion_figure(metrics["model"]), "confusion matrix and reliability"),
        ]
    parts += ["<h2>Training</h2>", _training_section(run_dir)]
    parts += ["<h2>PCA</h2>", _pca_section(run_dir)]
    parts += ["<h2>Data quality</h2>", _quality_section(run_dir)]
    parts += ["<h2>Seconds per stage</h2>", _timings_section(run_dir, evaluate_seconds)]

    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>sparknet · {_e(config.name)}</title><style>{STYLE}</style></head>"
        "<body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )
    tmp = run_dir.report.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(run_dir.report)
    return run_dir.report


def _e(text) -> str:
    return html.escape(str(text))


def _cell(value) -> str:
    if value is None:
        return "<td class='num'>n/a</td>"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        return f"<td>{_e(value)}</td>"
    if isinstance(value, (int, np.integer)):
        return f"<td class='num'>{value:,}</td>"
    return f"<td class='num'>{value:.4g}</td>"


def table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(png: bytes, alt: str) -> str:
    return f"<img alt='{_e(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


def _png_file(path: Path, alt: str) -> str:
    return _img(path.read_bytes(), alt)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _scalars(part: dict) -> dict:
    return {
        k: v for k, v in part.items() if v is None or isinstance(v, (int, float)) and k != "rows"
    }


def _metrics_section(metrics: dict) -> str:
    baseline = "mean_baseline" if metrics["task"] == "regression" else "majority_baseline"
    model, base = _scalars(metrics["model"]), _scalars(metrics[baseline])
    rows = [[k, model[k], base.get(k)] for k in model]
    if "calibration" in metrics["model"]:
        ece = metrics["model"]["calibration"]["expected_calibration_error"]
        rows.append(["expected calibration error", ece, None])
    return f"<p>{metrics['rows']:,} test rows.</p>" + table(
        ["metric", "network", baseline.replace("_", " ")], rows
    )


def _comparison_section(task: str, metrics: dict) -> str:
    from sparknet.compare import comparison_frame

    comparison = metrics["comparison"]
    frame = comparison_frame(task, comparison)
    rows = [
        [name, *(None if v is None or v != v else v for v in values)]
        for name, values in zip(frame.index, frame.itertuples(index=False), strict=True)
    ]
    return (
        f"<p class='note'>Same features ({_e(comparison['features'])}) and the same "
        f"{comparison['test_rows']:,} test rows for every model. scikit-learn and Spark ML "
        f"fit on {_e(comparison['sample'])}; the network's seconds are the whole train "
        "stage.</p>" + table(["model", *frame.columns], rows)
    )


def _curves_figure(task: str, metrics: dict, y: np.ndarray, out: np.ndarray) -> bytes:
    from sklearn.metrics import precision_recall_curve, roc_curve

    if task == "regression":
        fig = _figure(10, 4)
        scatter_ax, hist_ax = fig.subplots(1, 2)
        residual = y - out
        scatter_ax.scatter(out, residual, s=3, alpha=0.3)
        scatter_ax.axhline(0, color="black", lw=1)
        scatter_ax.set_xlabel("predicted")
        scatter_ax.set_ylabel("actual − predicted")
        scatter_ax.set_title("residuals vs prediction")
        hist_ax.hist(residual, bins=60)
        hist_ax.set_xlabel("actual − predicted")
        hist_ax.set_title("residual distribution")
        return _png(fig)

    fig = _figure(10, 4.5)
    roc_ax, pr_ax = fig.subplots(1, 2)
    if task == "binary":
        curves = [("positive class", y.astype(np.int64), out)]
    else:
        classes = metrics["classes"]
        curves = [(c, (y == i).astype(np.int64), out[:, i]) for i, c in enumerate(classes)]
    for label, truth, score in curves:
        if truth.min() == truth.max():
            continue  # a class without rows (or without negatives) has no curve
        fpr, tpr, _ = roc_curve(truth, score)
        precision, recall, _ = precision_recall_curve(truth, score)
        roc_ax.plot(fpr, tpr, label=label)
        pr_ax.plot(recall, precision, label=label)
        pr_ax.axhline(truth.mean(), ls=":", color=pr_ax.lines[-1].get_color(), lw=1)
    roc_ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    pr_ax.set(xlabel="recall", ylabel="precision", title="precision–recall (dotted: chance)")
    roc_ax.set_title(f"ROC (AUC {metrics['model']['roc_auc'] or float('nan'):.3f})")
    for ax in (roc_ax, pr_ax):
        ax.legend(loc="lower right" if ax is roc_ax else "upper right", fontsize=8)
    return _png(fig)


def _confusion_figure(model: dict) -> bytes:
    cm = model["confusion_matrix"]
    counts = np.array(cm["counts"])
    classes = cm["classes"]
    fig = _figure(10, 4.5)
    cm_ax, cal_ax = fig.subplots(1, 2)
    cm_ax.imshow(counts, cmap="Blues")
    for (i, j), n in np.ndenumerate(counts):
        dark = n > counts.max() / 2
        cm_ax.text(j, i, f"{n:,}", ha="center", va="center", color="white" if dark else "black")
    cm_ax.set_xticks(range(len(classes)), classes)
    cm_ax.set_yticks(range(len(classes)), classes)
    cm_ax.set(xlabel="predicted class", ylabel="true class", title="confusion matrix")

    bins = model["calibration"]["bins"]
    cal_ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    cal_ax.plot(
        [b["mean_predicted"] for b in bins], [b["observed"] for b in bins], marker="o", label="bins"
    )
    cal_ax.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="mean predicted probability",
        ylabel="observed share",
        title=f"reliability (ECE {model['calibration']['expected_calibration_error']:.3f})",
    )
    return _png(fig)


def _training_section(run_dir: RunDir) -> str:
    from sparknet.train.progress import CURVES_FILE, write_curves

    curves = run_dir.train_dir / CURVES_FILE
    report = read_json(run_dir.train_report)
    summary = (
        f"<p>{len(report['epochs'])} epochs on {report['world_size']} ranks, "
        f"{report['train_rows']:,} train rows, {report['seconds']:.1f} s.</p>"
    )
    if curves.exists():
        return summary + _png_file(curves, "training curves")
    if not report.get("epochs"):
        return summary
    # Trained before curves.png existed: drawn from train.json's history, outside
    # train/, which belongs to the train stage.
    with tempfile.TemporaryDirectory() as tmp:
        drawn = Path(tmp) / CURVES_FILE
        write_curves(drawn, report["task"], report["epochs"])
        return summary + _png_file(drawn, "training curves")


def _pca_section(run_dir: RunDir) -> str:
    if not run_dir.pca.exists():
        return "<p class='note'>pca.json is missing.</p>"
    pca = read_json(run_dir.pca)
    text = (
        f"<p>{pca['k']} components of {pca['n_features_in']} standardised columns keep "
        f"{pca['variance_kept']:.1%} of the train split's variance.</p>"
    )
    if run_dir.pca_scree.exists():
        text += _png_file(run_dir.pca_scree, "PCA scree plot")
    return text


def _quality_section(run_dir: RunDir) -> str:
    if not run_dir.quality.exists():
        return "<p class='note'>quality.json is missing.</p>"
    q = read_json(run_dir.quality)
    parts = [
        table(
            ["rows in", "clean", "rejected", "reconciled"],
            [[q.get("rows_in"), q.get("clean"), q.get("rejected"), str(q.get("reconciled"))]],
        )
    ]
    if q.get("rejected_by_reason"):
        parts.append(table(["reject reason", "rows"], list(q["rejected_by_reason"].items())))
    columns = q.get("columns", {})
    if columns:
        stats = ["type", "nulls", "distinct", "min", "max", "mean", "stddev"]
        parts.append(
            table(["column", *stats], [[c, *(p.get(s) for s in stats)] for c, p in columns.items()])
        )
    feature_quality = read_json(run_dir.feature_quality) if run_dir.feature_quality.exists() else {}
    features = feature_quality.get("columns", {})
    if features:
        keys = ["kind", "impute", "fill", "filled", "clipped"]
        parts.append(
            table(
                ["feature", *keys],
                [[f, *(_short(p.get(k)) for k in keys)] for f, p in features.items()],
            )
        )
    return "\n".join(parts)


def _short(value):
    return value if value is None or isinstance(value, (int, float, str)) else str(value)


def _timings_section(run_dir: RunDir, evaluate_seconds: float) -> str:
    timings = read_json(run_dir.timings) if run_dir.timings.exists() else {}
    rows = [[stage, seconds] for stage, seconds in timings.items() if stage != "evaluate"]
    rows.append(["evaluate (until this report)", round(evaluate_seconds, 2)])
    return table(["stage", "seconds"], rows) + (
        "<p class='note'>From timings.json, which the command line writes after each stage; "
        "a stage run outside it (a test calling the function) is not listed.</p>"
    )
