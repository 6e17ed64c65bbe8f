"""The report's gallery section and its data-use warning (HTML only; the data is gallery.py's)."""

from __future__ import annotations

import base64
import html

import pandas as pd

from cxr_fast.analyze.gallery import PER_ERROR, ROLES, Gallery
from cxr_fast.explain.pointing import beats_chance

GALLERY_CSS = """
.gallery{display:flex;flex-wrap:wrap;gap:.5em;margin:.4em 0 1em}
figure.thumb{margin:0;border:1px solid #ddd;padding:.25em;width:min-content;font-size:.72em;line-height:1.25}
figure.thumb .row{display:flex;gap:2px}figure.thumb img{width:112px;height:auto;display:block}
figure.thumb figcaption{width:max-content;max-width:100%}.thumb.control{background:#f3f9f3}
.dua{background:#fdecea;border:2px solid #c0392b;padding:.6em 1em;font-weight:600}
"""

DUA_WARNING = ('<p class="dua">This report embeds radiographs. MIMIC-CXR\'s data use agreement forbids sharing its '
               "images: do not share this report outside the credentialed team. "
               "(<code>--no-images</code> writes a report without them.)</p>")


def _uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def _caption(row) -> str:
    age = "?" if pd.isna(row.age) else f"{float(row.age):.0f}"
    wrong = f"{row.share_wrong:.0%} of {row.n_models} models wrong"
    spread = f"p {row.prob_min:.2f}&ndash;{row.prob_max:.2f} (median {row.prob_median:.2f})"
    return (f"<b>{html.escape(str(row.dicom_id))}</b><br>{html.escape(str(row.sex))}, {age} y "
            f"({html.escape(str(row.age_group))}), {html.escape(str(row.race))}<br>view {html.escape(str(row.view))}; "
            f"{wrong}<br>{spread}")


def _figure(row, gallery: Gallery) -> str:
    jpeg = gallery.thumbnails.get(row.key)
    images = [f'<img alt="radiograph {html.escape(str(row.dicom_id))}" src="{_uri(jpeg)}">'] if jpeg else []
    for arch, overlay in gallery.overlays.get((row.task, row.key), []) if jpeg else []:
        images.append(f'<img alt="heatmap of {html.escape(arch)}" title="{html.escape(arch)}" src="{_uri(overlay)}">')
    archs = [arch for arch, _ in gallery.overlays.get((row.task, row.key), [])] if jpeg else []
    looked = f"<br>heatmaps: {html.escape(', '.join(archs))}" if archs else ""
    kind = "control" if row.role.startswith("control") else "miss"
    return (f'<figure class="thumb {kind}" data-key="{html.escape(str(row.key))}" data-task="{html.escape(row.task)}" '
            f'data-role="{row.role}"><div class="row">{"".join(images)}</div>'
            f"<figcaption>{_caption(row)}{looked}</figcaption></figure>")


def _pointing_lines(pointing: pd.DataFrame | None) -> str:
    if pointing is None or pointing.empty:
        return ""
    items = "".join(
        f"<li>{html.escape(str(r.recipe))}: maximum inside the drawn finding in {r.hit_rate:.0%} of {int(r.n_images)} "
        f"positives (chance {r.chance:.0%}); {r.mass_inside:.0%} of the heatmap inside it (its share of the image "
        f"{r.chance:.0%}): {'beats chance clearly' if beats_chance(r._asdict()) else 'not clearly better than chance'}"
        "</li>" for r in pointing.itertuples())
    return ("<h3>Do the heatmaps point at the finding? (phantom data)</h3><p class=note>The phantom records where it "
            "drew each finding; a model that learnt the finding puts its heatmap's maximum, and more of its mass, "
            f"inside that region than chance (the region's share of the image).</p><ul>{items}</ul>")


def gallery_section(gallery: Gallery | None) -> str:
    """The systematic misses of each task beside matched correct images, with heatmaps."""
    if gallery is None:
        return ""
    parts = ["<h3>The images: systematic misses beside correctly classified images of the same label and view</h3>",
             f"<p class=note>Per task and error kind the first {PER_ERROR} images of systematic_images.csv (most "
             "models wrong first), then correctly classified images of the same label, matched on view (green). "
             "Each caption: demographics, view, the share of models wrong and the spread of their probabilities. "
             "Heatmaps (Grad-CAM, where <code>python -m cxr_fast.explain</code> has run) show where a few of the "
             "models looked; the shown images are listed in gallery.csv.</p>"]
    if gallery.note:
        parts.append(f'<p class="note gallery-note">{html.escape(gallery.note)}</p>')
    counts = gallery.counts.set_index(["task", "error"])
    for task, rows in gallery.shown.groupby("task", sort=True):
        parts.append(f"<h4>{html.escape(task)}</h4>")
        for error in ("false_negative", "false_positive"):
            total, shown = (int(v) for v in counts.loc[(task, error), ["systematic", "shown"]])
            control = "control_positive" if error == "false_negative" else "control_negative"
            left = (f"; {total - shown} more left out (all in systematic_images.csv)" if total > shown else "")
            parts.append(f"<p><b>{ROLES[error]}s</b>: {shown} of {total} shown{left}.</p>")
            chosen = rows[rows["role"].isin([error, control])]
            if len(chosen):
                parts.append('<div class="gallery">' + "".join(_figure(r, gallery) for r in chosen.itertuples()) + "</div>")
    parts.append(_pointing_lines(gallery.pointing))
    return "".join(parts)
