"""The study report: ``report/index.html`` (self-contained, images inlined) plus its PNGs.

It reads only the run folder: protocol, environment, ingest summary, training log, pool
manifest, evaluation results. No DICOM attribute of a source file is read or shown.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from medsynth import __version__  # noqa: E402
from medsynth.data.leakage import leak_line  # noqa: E402
from medsynth.evaluation.memorization import audit_line  # noqa: E402
from medsynth.evaluation.per_class import COLUMNS, cell, flag_text  # noqa: E402
from medsynth.protocol import format_scale  # noqa: E402
from medsynth.utils.csvsafe import read_rows  # noqa: E402

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#1d2330;line-height:1.45}
h1{font-size:1.7em;margin-bottom:.2em}h2{border-bottom:2px solid #e4e7ee;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}th,td{border:1px solid #d8dce6;padding:.3em .6em;
text-align:right}th{background:#f3f5f9}td:first-child,th:first-child{text-align:left}
.pos{color:#0a7a32;font-weight:600}.neg{color:#b3261e;font-weight:600}.muted{color:#667}
img{max-width:100%;border:1px solid #e4e7ee}.card{background:#f7f8fb;border-left:4px solid #4a6fd1;
padding:.6em 1em;margin:1em 0}.warn{border-left-color:#d17a4a}pre{background:#f3f5f9;padding:.8em;overflow-x:auto;
font-size:.85em}
"""


def _png(fig, path: Path) -> str:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}" alt="{path.stem}">'


def _table(rows: list[list], head: list[str]) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def _fmt(v, digits=3) -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return "—"
    return "—" if not np.isfinite(v) else f"{v:.{digits}f}"


def _ci(r: dict, key: str) -> str:
    if not r.get(key):
        return "—"
    d, lo, hi = float(r[key]), float(r[key + "_ci_low"]), float(r[key + "_ci_high"])
    cls = "pos" if lo > 0 else "neg" if hi < 0 else ""
    return f'<span class="{cls}">{d:+.3f}</span> <span class="muted">[{lo:+.3f}, {hi:+.3f}]</span>'


def _displayable(unit: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` in [0, 1] -> what ``imshow`` shows: ``(H, W)`` grey or ``(H, W, 3)`` RGB."""
    return unit[0] if unit.shape[0] == 1 else np.ascontiguousarray(unit.transpose(1, 2, 0))


def _strip(images: np.ndarray, per: int) -> np.ndarray:
    """``(N, C, H, W)`` in [-1, 1], N <= ``per`` -> one row ``(C, H, per*W)`` in [0, 1];
    empty places stay black."""
    n, c, h, w = images.shape
    strip = np.zeros((c, h, per * w), np.float32)
    strip[:, :, : n * w] = ((images.transpose(1, 2, 0, 3).reshape(c, h, n * w) + 1) / 2).clip(0, 1)
    return strip


def _small_class_card(run: Path, protocol, classes: list[str]) -> str:
    """A warning card naming classes with fewer than a handful of training images, or ''."""
    from medsynth.data.datasets import small_class_warnings, split_rows

    ds = protocol.dataset
    rows = split_rows(run / "ingest", "train", ds.train_fraction, ds.fraction_seed)
    lines = small_class_warnings(rows, classes)
    if not lines:
        return ""
    items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    return f"<div class='card warn'><b>Small classes.</b><ul>{items}</ul></div>"


def write_report(run: Path, protocol) -> Path:
    """Render the report of a run folder; returns the path of ``index.html``."""
    from medsynth.generation.dataset import load_pool, read_manifest

    out = run / "report"
    out.mkdir(parents=True, exist_ok=True)
    env = json.loads((run / "environment.json").read_text())
    ingest = json.loads((run / "ingest" / "summary.json").read_text())
    classes = ingest["classes"]
    parts = [
        f"<h1>medsynth study: {html.escape(protocol.name)}</h1>",
        f"<p class=muted>{html.escape(protocol.description)}</p>",
    ]

    # What was run.
    skipped = list(csv.DictReader((run / "ingest" / "skipped.csv").open()))
    reasons: dict[str, int] = {}
    for s in skipped:
        reasons[s["reason"].split(":")[0]] = reasons.get(s["reason"].split(":")[0], 0) + 1
    counts = [[s] + [ingest["counts"][s][c] for c in classes] for s in ("train", "val", "test")]
    parts += [
        "<h2>What was run</h2>",
        f"<p>{ingest['images']} images from {ingest['files_scanned']} files at {ingest['spatial_size']} px; "
        f"{ingest['skipped']} files skipped"
        + (
            " (" + ", ".join(f"{n}× {html.escape(r)}" for r, n in reasons.items()) + ")"
            if reasons
            else ""
        )
        + f"; training fraction {protocol.dataset.train_fraction:g} of the train split.</p>",
        _leak_box(ingest),
        _table(counts, ["split"] + classes),
        _small_class_card(run, protocol, classes),
        "<p class=muted>" + ", ".join(f"{k} {v}" for k, v in env.items() if v) + "</p>",
    ]

    # Training curve.
    log = run / "train" / "log.jsonl"
    if log.exists():
        recs = [json.loads(line) for line in log.read_text().splitlines()]
        fig, ax = plt.subplots(figsize=(6.5, 2.6))
        ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], lw=1.2)
        ax.set(
            xlabel="optimizer step",
            ylabel="diffusion loss (MSE)",
            yscale="log",
            title="Training curve",
        )
        ax.grid(alpha=0.3)
        parts += ["<h2>Generator training</h2>", _png(fig, out / "training_curve.png")]
    # Samples beside real images.
    pool_name = protocol.generation.pool
    pool_dir = run / "generate" / pool_name
    if (pool_dir / "manifest.csv").exists():
        manifest = read_manifest(pool_dir)
        per = 8
        real = _real_examples(run, protocol, classes, per)
        rows_syn = [r for c in classes for r in [m for m in manifest if m["class_name"] == c][:per]]
        pool = load_pool(
            pool_dir, classes, real.images.shape[-1], rows=rows_syn, channels=real.images.shape[1]
        )
        rows_img = []
        for ci in range(len(classes)):
            strips = [
                _strip(imgs.numpy(), per)
                for imgs in (
                    real.images[real.labels == ci][:per],
                    pool.images[pool.labels == ci][:per],
                )
            ]
            c, h, _ = strips[0].shape
            gap = np.ones((c, h, h // 2), np.float32)
            rows_img.append(_displayable(np.concatenate([strips[0], gap, strips[1]], 2)))
        fig, axes = plt.subplots(
            len(classes), 1, figsize=(11, 1.05 * len(classes) + 0.3), squeeze=False
        )
        verdict = _pool_verdicts(run, pool_name, classes)
        for ci, c in enumerate(classes):
            axes[ci, 0].imshow(rows_img[ci], cmap="gray", vmin=0, vmax=1)
            bad = verdict.get(c, "").startswith("COLLAPSED")
            axes[ci, 0].set_title(
                f"{c}: real (left) | synthetic (right)"
                + (f"  [{verdict[c]}]" if c in verdict else ""),
                fontsize=9,
                loc="left",
                color="#b3261e" if bad else "black",
            )
            axes[ci, 0].axis("off")
        fig.tight_layout()
        parts += [
            f"<h2>Samples (pool <code>{html.escape(pool_name)}</code>)</h2>",
            f"<p>{len(manifest)} synthetic images, sampler {_sampler(protocol.generation)}, "
            f"{_guidance(protocol.generation)}. Left: real training images; right: synthetic.</p>",
            _png(fig, out / "samples.png"),
        ]
    parts += _latent_sections(run)
    parts += _evaluation_sections(run, out, classes)
    parts += _cards(run, protocol, ingest)
    parts += [
        "<h2>Protocol</h2>",
        "<details><summary>resolved protocol (YAML)</summary>"
        f"<pre>{html.escape((run / 'protocol.yaml').read_text())}</pre></details>",
        f"<p class=muted>medsynth {__version__}</p>",
    ]
    page = (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>medsynth report: "
        f"{html.escape(protocol.name)}</title><style>{CSS}</style></head><body>{''.join(parts)}</body></html>"
    )
    (out / "index.html").write_text(page)
    return out / "index.html"


def _evaluation_sections(run: Path, out: Path, classes: list[str]) -> list[str]:
    ev = run / "evaluate"
    if not (ev / "uplift.csv").exists():
        return ["<h2>Uplift</h2><p>Not evaluated yet.</p>"]
    summary = json.loads((ev / "summary.json").read_text())
    uplift = read_rows(ev / "uplift.csv")
    parts = [
        "<h2>Does it help the diagnosis?</h2>",
        f"<p>Classifier: {summary['classifier']['kind']}, {summary['seeds']} seeds per arm, best epoch on the real "
        f"validation split, tested on {summary['n_test']} real test images. Differences are paired (same seeds, "
        "same test cases) with bootstrap 95 % CIs; green/red = CI excludes zero. Synthetic arms must beat the "
        "duplicate-real control holding as many extra images per class.</p>",
        *_warning_cards(summary.get("warnings", [])),
        _table(
            [
                [
                    html.escape(r["arm"]),
                    _fmt(r["auc_mean"]),
                    _fmt(r["balanced_accuracy_mean"]),
                    _ci(r, "auc_vs_real"),
                    _ci(r, "auc_vs_dup"),
                    _ci(r, "balanced_accuracy_vs_real"),
                ]
                for r in uplift
            ],
            [
                "arm",
                "AUC",
                "bal. acc.",
                "ΔAUC vs real-only",
                "ΔAUC vs duplicate control",
                "Δbal. acc. vs real-only",
            ],
        ),
    ]
    parts += _views_section(ev)
    arms = [r for r in uplift if r.get("auc_vs_real")]
    if arms:
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(arms) + 1))
        y = np.arange(len(arms))
        d = np.array([float(r["auc_vs_real"]) for r in arms])
        lo = d - np.array([float(r["auc_vs_real_ci_low"]) for r in arms])
        hi = np.array([float(r["auc_vs_real_ci_high"]) for r in arms]) - d
        ax.barh(
            y,
            d,
            xerr=[lo, hi],
            color=["#4a6fd1" if a["arm"].startswith("synthetic") else "#9aa4b8" for a in arms],
            capsize=3,
        )
        ax.set_yticks(y, [a["arm"] for a in arms], fontsize=8)
        ax.axvline(0, color="k", lw=0.8)
        ax.set(xlabel="test AUC difference to real-only (95 % CI)", title="Uplift")
        parts.append(_png(fig, out / "uplift.png"))
    fid = json.loads((ev / "fidelity.json").read_text())
    keys = [
        "FD_clf",
        "KID_clf",
        "precision_clf",
        "recall_clf",
        "density_clf",
        "coverage_clf",
        "msssim_ratio",
        "vendi_clf",
        "vendi_clf_real",
    ]
    rows = [
        [html.escape(f"{arm} / {c}")] + [_fmt(m.get(k)) for k in keys]
        for arm, per in fid.items()
        for c, m in per.items()
    ]
    parts += [
        "<h2>Fidelity and diversity</h2>",
        "<p>In the features of the real-only classifier (seed 0), hence the <code>_clf</code> names — not FID. "
        "MS-SSIM ratio: mean pairwise MS-SSIM among synthetic images over the same among real ones (1 = as "
        "diverse as real, higher = less diverse).</p>",
        _table(rows, ["set / class"] + keys),
    ]
    parts += _per_class_section(fid, classes)
    div = json.loads((ev / "diversity_uplift.json").read_text())
    if div:
        fig, axes = plt.subplots(1, 3, figsize=(11, 3))
        for ax, key in zip(axes, ("vendi_clf", "coverage_clf", "msssim_ratio"), strict=False):
            ax.scatter(div[key]["x"], div[key]["uplift_auc"])
            ax.set(xlabel=key, ylabel="ΔAUC vs real-only", title=f"ρ = {_fmt(div[key]['rho'], 2)}")
        parts += [
            "<h2>Diversity ↔ uplift</h2>",
            _table(
                [
                    [
                        k,
                        _fmt(v["rho"], 2),
                        f"[{_fmt(v['ci_low'], 2)}, {_fmt(v['ci_high'], 2)}]",
                        v["n"],
                    ]
                    for k, v in div.items()
                ],
                ["metric", "Spearman ρ", "95 % CI", "sets"],
            ),
            _png(fig, out / "diversity_uplift.png"),
        ]
    memo = json.loads((ev / "memorization.json").read_text())
    parts.append("<h2>Memorization audit</h2>")
    for name, m in memo.items():
        cls = "" if m.get("informative", True) else " class='card warn'"
        parts.append(
            f"<p{cls}>Pool <code>{html.escape(name)}</code>: {html.escape(audit_line(m))}. A sample is "
            f"flagged when it is closer to a training image (pixels or features) than "
            f"{100 * (1 - m.get('holdout_flag_rate_nominal', 0.01)):.0f} % of calibration held-out real images "
            f"are.</p>"
        )
        parts.append(_pairs_png(run, out, name, m))
    return parts


def _warning_cards(warnings: list[str], title: str = "Check the classifier.") -> list[str]:
    """The classifier-health warnings of a study (evaluation.health), one card each."""
    return [
        f"<div class='card warn'><b>{html.escape(title)}</b> {html.escape(w)}</div>"
        for w in warnings
    ]


def _sampler(g) -> str:
    """``dpmpp-50``, plus the timestep grid when it is not the default trailing one."""
    grid = " on the Karras timestep grid" if g.timestep_spacing == "karras" else ""
    return f"{g.sampler}-{g.steps}{grid}"


def _guidance(g) -> str:
    """``guidance 2`` plus rescale / interval / per-class scales when set; ``autoguidance 1.5``
    when the guided rows extrapolate from the guide rather than the null class (``…; the null
    class for the other classes, autoguidance for pneumonia`` when only some classes do)."""
    some = g.autoguided_classes
    auto = g.uses_guide and some is None
    text = f"{'autoguidance' if auto else 'guidance'} {g.guidance_scale:g}"
    if g.guidance_rescale:
        text += f" (rescaled, φ {g.guidance_rescale:g})"
    if list(g.guidance_interval) != [0.0, 1.0]:
        lo, hi = g.guidance_interval
        text += f" within t/T ∈ [{lo:g}, {hi:g}]"
    if g.class_guidance:
        # A set of scales reads "1.5 or 2.5 by seed": each image took one of them.
        scales = (
            f"{c}: {format_scale(v, ' or ')}{' by seed' if isinstance(v, list) else ''}"
            for c, v in sorted(g.class_guidance.items())
        )
        text += " (" + ", ".join(scales) + ")"
    if g.uses_guide and some:
        # Last, so the pool card's "away from guide sha256:…" follows the autoguided classes.
        text += f"; the null class for the other classes, autoguidance for {', '.join(some)}"
    return text


def _pool_verdicts(run: Path, pool: str, classes: list[str]) -> dict[str, str]:
    """Class -> its per-class flag in the first evaluated set drawn from ``pool`` (or {})."""
    path = run / "evaluate" / "fidelity.json"
    if not path.exists():
        return {}
    for key, per in json.loads(path.read_text()).items():
        if f":{pool}:" in f"{key}:":
            return {c: flag_text(per[c]) for c in classes if c in per}
    return {}


def _per_class_section(fid: dict, classes: list[str]) -> list[str]:
    """Per-class quality table of every synthetic set, collapsed classes in red."""
    rows = []
    for key, per in fid.items():
        for c in classes:
            if c not in per:
                continue
            m = per[c]
            flag = html.escape(flag_text(m))
            rows.append(
                [html.escape(f"{key} / {c}"), f"{m['n_synthetic']} / {m['n_real']}"]
                + [cell(m, k) for k, _ in COLUMNS]
                + [f'<span class="neg">{flag}</span>' if m.get("collapsed") else flag]
            )
    if not rows:
        return []
    return [
        "<h3>Per class</h3>",
        "<p>Synthetic images of each class against the real training images of that class; an "
        "average over classes hides a collapsed class. Raw FD_clf differs between classes even for "
        "real images (n and spread), so each class's FD_clf is divided by its real floor (two "
        "halves of its real images, same n). A class is flagged <b>collapsed</b> when that ratio is "
        "above 1.5× the best class's (taken as no lower than 1, what real images score) or its "
        "MS-SSIM ratio is above 1.1 (its samples are more alike than real ones). Below 10 "
        "synthetic or real images: <i>n too small</i>. "
        "Mean intensity in [0, 1].</p>",
        _table(rows, ["set / class", "n syn / real"] + [t for _, t in COLUMNS] + ["flag"]),
    ]


def _views_section(ev: Path) -> list[str]:
    """Within-view AUC and the view gap per arm (``evaluate/views.json``), if views were found."""
    path = ev / "views.json"
    rep = json.loads(path.read_text()) if path.exists() else {}
    if not rep:
        return []
    vl = rep["views"]

    def up(d: dict | None) -> str:
        if not d:
            return "—"
        r = {"x": d["diff"], "x_ci_low": d["ci_low"], "x_ci_high": d["ci_high"]}
        return _ci(r, "x")

    rows = []
    for arm, rec in rep["arms"].items():
        per = rec["views"]
        rows.append(
            [html.escape(arm)]
            + [_fmt(per[v]["auc_mean"]) for v in vl]
            + [_fmt(rec.get("gap", {}).get("mean"))]
            + [up(rec.get("gap", {}).get("vs_dup"))]
            + [up(per[v].get("auc_vs_dup")) for v in vl]
        )
    counts = ", ".join(
        f"{v}: {c['n']} cases, {c['positives']} positive"
        for v, c in next(iter(rep["arms"].values()))["views"].items()
    )
    return [
        f"<h3>Within {html.escape(rep['attribute'])} (shortcut control)</h3>",
        f"<p>AUC among the test cases of one view only ({html.escape(counts)}): a classifier "
        "that recognises the view instead of the disease scores 0.5 here. Gap = "
        f"{html.escape(vl[0])} − {html.escape(vl[1])} AUC (mean over seeds); uplift within a "
        "view is paired-bootstrapped over seeds and that view's cases; the gap's change vs the "
        "control resamples each view's cases separately (negative = the arm narrows a positive "
        "gap).</p>",
        _table(
            rows,
            ["arm"]
            + [f"AUC {v}" for v in vl]
            + [f"gap {vl[0]} − {vl[1]}", "gap change vs control"]
            + [f"ΔAUC vs control in {v}" for v in vl],
        ),
    ]


def _leak_box(ingest: dict) -> str:
    """Held-out images with a near-duplicate in train, prominently (a warning box if any)."""
    d = ingest.get("duplicates")
    if not d:
        return ""
    leaks = sum(d["heldout_with_train_duplicate"].values())
    cls = "card warn" if leaks else "muted"
    return f"<div class='{cls}'>{'<b>Split leak.</b> ' if leaks else ''}{html.escape(leak_line(d))}.</div>"


def _real_examples(run: Path, protocol, classes: list[str], per: int):
    """``per`` training images of each class, read alone from the memory-mapped cache.

    At 1024 px a whole split is gigabytes: only the rows shown are decoded.
    """
    from types import SimpleNamespace

    import torch

    from medsynth.data.datasets import split_rows

    rows = split_rows(
        run / "ingest", "train", protocol.dataset.train_fraction, protocol.dataset.fraction_seed
    )
    picked = [r for c in classes for r in [r for r in rows if r["label"] == c][:per]]
    cache = np.load(run / "ingest" / "images.npy", mmap_mode="r")
    idx = np.array([int(r["row"]) for r in picked], dtype=np.int64)
    images = torch.from_numpy(np.asarray(cache[idx], dtype=np.float32))
    labels = torch.tensor([classes.index(r["label"]) for r in picked], dtype=torch.long)
    return SimpleNamespace(images=images, labels=labels)


def _latent_sections(run: Path) -> list[str]:
    """Autoencoder reconstruction and upsampler-vs-bicubic figures, when the run has them."""
    parts = []
    recon = run / "autoencoder" / "recon.json"
    if recon.exists():
        r = json.loads(recon.read_text())
        line = (
            f"Reconstruction (encode -> decode) on {r['images']} validation images: PSNR "
            f"{r['psnr_db_mean']:.2f} dB (worst {r['psnr_db_min']:.2f}), SSIM "
            f"{r['ssim_mean']:.3f} (worst {r['ssim_min']:.3f}); snapshot {r['snapshot']}."
            if r.get("images")
            else "Reconstruction: no validation images to measure on."
        )
        parts += ["<h2>Latent autoencoder</h2>", f"<p>{html.escape(line)}</p>"]
    compare = run / "upscaler" / "compare.json"
    if compare.exists():
        from medsynth.experiment.upscale_eval import compare_line

        line = compare_line(json.loads(compare.read_text()))
        parts += ["<h2>Diffusion upsampler</h2>", f"<p>{html.escape(line)}</p>"]
    return parts


def _pairs_png(run: Path, out: Path, name: str, m: dict) -> str:
    from medsynth.dicom.read import load_unit_image
    from medsynth.dicom.write import synthetic_decode_options

    top = m["top_pairs"][:8]
    if not top:
        return ""
    cache = np.load(run / "ingest" / "images.npy", mmap_mode="r")
    opts = synthetic_decode_options(cache.shape[1])
    fig, axes = plt.subplots(2, len(top), figsize=(1.4 * len(top), 3.2), squeeze=False)
    for j, p in enumerate(top):
        path = run / "generate" / name / m["synthetic_paths"][p["synthetic"]]
        syn = _displayable(load_unit_image(path, opts))
        real = _displayable((cache[m["train_cache_rows"][p["train"]]].astype(np.float32) + 1) / 2)
        for i, (img, t) in enumerate(
            ((syn, f"r={p['pixel_similarity']:.3f}"), (real, "nearest train"))
        ):
            axes[i, j].imshow(img, cmap="gray", vmin=0, vmax=1)
            axes[i, j].set_title(t + (" ⚑" if i == 0 and p["flagged"] else ""), fontsize=7)
            axes[i, j].axis("off")
    return _png(fig, out / f"memorization_{name}.png")


def _cards(run: Path, protocol, ingest: dict) -> list[str]:
    g, t = protocol.generation, protocol.training
    # Published snapshots only (an unpublished snapshot-XXXXXXX.tmp is not the model).
    snaps = sorted(
        p for p in (run / "train").glob("snapshot-*") if re.fullmatch(r"snapshot-\d{7}", p.name)
    )
    snap = snaps[-1].name if snaps else "—"
    memo_path = run / "evaluate" / "memorization.json"
    memo = json.loads(memo_path.read_text()).get(g.pool) if memo_path.exists() else None
    audit = audit_line(memo) if memo else "not run"
    return [
        "<h2>Dataset card: synthetic pool</h2>",
        f"<div class='card warn'><b>Not for clinical use.</b> Synthetic images generated by a diffusion model; they "
        f"depict no patient. Intended use: research on data augmentation for the classes {', '.join(ingest['classes'])}, "
        f"after human review (medsynth dashboard). Made from snapshot <code>{snap}</code> with {_sampler(g)}, "
        f"{_guidance(g)}{_guide_of_pool(run, g.pool)}; labels are the conditioning class (manifest.csv is the source of truth). "
        f"Written as DICOM Secondary Capture with ConversionType SYN and ImageType DERIVED\\SECONDARY\\SYNTHETIC; no "
        f"attribute of any source file is copied. Memorization audit: {audit}.</div>",
        *_edited_cards(run, json.loads(memo_path.read_text()) if memo_path.exists() else {}),
        "<h2>Model card: generator snapshot</h2>",
        f"<div class=card>Class-conditional MONAI DiffusionModelUNet, channels {protocol.model.channels}, "
        f"{protocol.schedule.kind} schedule ({protocol.schedule.beta_schedule}, {protocol.schedule.prediction_type}), "
        f"trained {t.max_steps} steps, batch {t.batch_size}, lr {t.lr:g}, EMA half-life {t.ema_halflife_steps:g} steps, "
        f"label dropout {t.label_dropout:g} for classifier-free guidance, {_precision_text(run, t.precision)}.{_guide_text(t)} Trained only on the "
        f"train split{'' if protocol.dataset.train_fraction >= 1 else f' ({protocol.dataset.train_fraction:g} of it)'}; "
        f"validation and test patients never reached it. Limitations: resolution {ingest['spatial_size']} px; "
        f"quality and diversity as measured above, on this dataset only.{_adaptation(snaps)}</div>",
    ]


def _guide_of_pool(run: Path, pool: str) -> str:
    """`` away from guide sha256:…`` when the pool's request records an autoguidance guide."""
    path = run / "generate" / pool / "request.json"
    sha = json.loads(path.read_text()).get("guide_snapshot_sha256") if path.exists() else None
    return f" away from guide <code>sha256:{sha[:16]}</code> (RUN/train/guide)" if sha else ""


def _guide_text(t) -> str:
    """A sentence on the autoguidance guide the train stage made beside the model (or empty)."""
    if not t.guide_steps:
        return ""
    return (
        f" Beside it, a guide for autoguidance: the same recipe and data trained {t.guide_steps} "
        "steps (RUN/train/guide)."
    )


def _edited_cards(run: Path, memo: dict) -> list[str]:
    """A dataset card per edited pool: its pixels derive from patients, and it says so."""
    from medsynth.utils.csvsafe import read_rows

    cards = []
    for manifest in sorted((run / "generate").glob("*/manifest.csv")):
        rows = read_rows(manifest)
        if not rows or "edit" not in rows[0]:
            continue
        name = manifest.parent.name
        kinds = ", ".join(sorted({r["edit"] for r in rows}))
        n_cf = sum(r["counterfactual"] == "1" for r in rows)
        audit = audit_line(memo[name]) if name in memo else "not run (add the pool to evaluation)"
        cards.append(
            f"<h2>Dataset card: edited pool <code>{html.escape(name)}</code></h2>"
            f"<div class='card warn'><b>Derived from patient images; not for clinical use.</b> "
            f"{len(rows)} images made by editing ({html.escape(kinds)}) real training images of "
            f"this run: {n_cf} counterfactuals (class changed), {len(rows) - n_cf} same-class "
            "variations. Unlike generated samples these depict real patients, altered: treat them "
            "as patient-derived data. Written as Secondary Capture with ImageType "
            "DERIVED\\SECONDARY\\SYNTHETIC\\EDITED; the manifest names each source by its cache "
            "row in this run, never by a source identifier, and no source attribute is copied. "
            f"Memorization audit: {html.escape(audit)}.</div>"
        )
    return cards


def _precision_text(run: Path, precision: str) -> str:
    """The precision training ran in, read from its newest resume state (``auto`` resolves per
    machine); the setting itself when no state records one (runs made before it was recorded)."""
    import torch

    from medsynth.training.checkpoint import list_states

    for path in reversed(list_states(run / "train")):
        try:  # mmap: only the small "precision" entry is read, not the weights
            ran = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get(
                "precision"
            )
        except Exception:  # noqa: BLE001 - a torn newest state: try the previous one
            continue
        if ran:
            return f"{ran} (precision {precision})" if precision == "auto" else ran
        break
    if precision == "auto":
        return "bf16 autocast where the machine computes bf16 natively, else fp32 (precision auto)"
    return precision


def _adaptation(snaps: list[Path]) -> str:
    """A sentence on the base model, for a snapshot adapted from one (else empty)."""
    cfg = json.loads((snaps[-1] / "config.json").read_text()) if snaps else {}
    if "base" not in cfg:
        return ""
    a = cfg["adapter"]
    how = (
        f"LoRA adapters (rank {a['rank']}, alpha {a['alpha']:g}, on {', '.join(a['targets'])}) and "
        "class embeddings; the snapshot stores only these"
        if a["kind"] == "lora"
        else "full fine-tuning"
    )
    n = len(cfg.get("provenance", {}).get("train_pixel_sha256", []))
    return (
        f" Adapted by {how} from base snapshot sha256:{cfg['base']['sha256'][:16]}; the base's "
        f"training images ({n} pixel hashes with this run's) were checked against this dataset's "
        "validation and test images before training, with no overlap."
    )
