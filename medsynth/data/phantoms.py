"""Embedded demo data: chest-radiograph-like (grey) or fundus-like (RGB) phantoms with a
class-defining finding.

Each image has a body outline, two lungs with a domed diaphragm, heart, spine, clavicles, ribs,
low-frequency shading and noise, all with per-patient anatomical variation. Findings:

- ``opacity``: one or two soft Gaussian opacities inside a lung (size/position/contrast vary);
- ``cardiomegaly``: an enlarged heart; ``effusion``: a fluid level at a lung base;
- ``nodule``: a small sharp round density.

``difficulty`` in [0, 1] scales findings down and noise up: at 0 a finding is obvious, at 1 it
is invisible. The default 0.6 leaves a small classifier trained on ~100 images clearly imperfect.
``body_part="fundus"`` writes 8-bit RGB colour fundus photographs instead (Modality OP; see
:func:`render_fundus`), whose findings differ mainly in colour, so a pipeline that drops colour
loses them. Headers carry fake ``CANARY`` identifiers so leak tests can look for them in every output.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLASS_NAMES = ("normal", "opacity", "cardiomegaly", "effusion", "nodule")
FUNDUS_CLASS_NAMES = ("normal", "haemorrhage", "exudate", "cotton_wool", "pale_disc")
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
OP_STORAGE = "1.2.840.10008.5.1.4.1.1.77.1.5.1"  # Ophthalmic Photography 8 Bit Image Storage


def class_names(body_part: str = "chest") -> tuple[str, ...]:
    """The phantom classes of ``body_part`` (chest | fundus), normal first."""
    if body_part not in ("chest", "fundus"):
        raise ValueError(f"unknown phantom body_part {body_part!r}; valid: chest, fundus")
    return FUNDUS_CLASS_NAMES if body_part == "fundus" else CLASS_NAMES


LABELS_FILE = "labels.csv"


@dataclass(frozen=True)
class Anatomy:
    """Drawn once per patient (TorchIO rule: draw, then apply deterministically)."""

    body_rx: float
    body_ry: float
    lung_rx: float
    lung_ry: float
    lung_dx: float
    lung_dy: float
    heart_r: float
    rib_gap: float
    tilt: float
    brightness: float


def draw_anatomy(rng: np.random.Generator) -> Anatomy:
    return Anatomy(
        body_rx=rng.uniform(0.78, 0.92),
        body_ry=rng.uniform(0.9, 1.0),
        lung_rx=rng.uniform(0.24, 0.31),
        lung_ry=rng.uniform(0.48, 0.6),
        lung_dx=rng.uniform(0.34, 0.42),
        lung_dy=rng.uniform(-0.12, 0.0),
        heart_r=rng.uniform(0.19, 0.24),
        rib_gap=rng.uniform(0.13, 0.17),
        tilt=rng.uniform(-0.06, 0.06),
        brightness=rng.uniform(0.9, 1.1),
    )


def _smooth_field(rng: np.random.Generator, size: int, scale: int = 4) -> np.ndarray:
    """Low-frequency shading in about [-1, 1]: a coarse grid upsampled bilinearly."""
    coarse = rng.standard_normal((scale + 1, scale + 1))
    idx = np.linspace(0, scale, size)
    i0 = np.minimum(idx.astype(int), scale - 1)
    f = idx - i0
    rows = coarse[i0] * (1 - f)[:, None] + coarse[i0 + 1] * f[:, None]
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]


def render(
    anatomy: Anatomy, finding: str, difficulty: float, size: int, rng: np.random.Generator
) -> np.ndarray:
    """One phantom radiograph ``(size, size) float32 in [0, 1]``, bright = dense."""
    s = 1.0 - difficulty  # finding strength
    ax = np.linspace(-1, 1, size)
    x, y = np.meshgrid(ax, ax)
    # Small rotation of the whole patient.
    c, t = np.cos(anatomy.tilt), np.sin(anatomy.tilt)
    x, y = c * x - t * y, t * x + c * y

    def ellipse(cx, cy, rx, ry, edge=0.04):
        d = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
        return np.clip((1 - d) / edge, 0, 1)

    img = 0.04 + 0.45 * ellipse(0, 0.05, anatomy.body_rx, anatomy.body_ry, 0.2)
    img += 0.22 * np.exp(-(x**2) / 0.006) * (y > -0.8)  # spine
    lungs = np.zeros_like(img)
    for side in (-1, 1):
        lung = ellipse(side * anatomy.lung_dx, anatomy.lung_dy, anatomy.lung_rx, anatomy.lung_ry)
        lung *= (
            y < anatomy.lung_dy + anatomy.lung_ry * 0.55 + 1.2 * (x - side * anatomy.lung_dx) ** 2
        )
        lungs = np.maximum(lungs, lung)
    img -= 0.3 * lungs
    # Ribs: bright arcs over the lungs.
    for k in range(9):
        y0 = -0.62 + k * anatomy.rib_gap
        arc = y0 + 0.6 * (np.abs(x) - 0.15) ** 2
        img += 0.09 * np.exp(-((y - arc) ** 2) / 0.0009) * (np.abs(x) > 0.08) * (lungs > 0)
    img += (
        0.12
        * np.exp(-((y + 0.72 + 0.3 * (np.abs(x) - 0.4) ** 2) ** 2) / 0.002)
        * (np.abs(x) < 0.75)
    )
    heart_r = anatomy.heart_r
    if finding == "cardiomegaly":
        heart_r *= 1.0 + 0.45 * s * rng.uniform(0.7, 1.0)
    img += 0.2 * ellipse(0.1, 0.22, heart_r * 1.35, heart_r * 1.1, 0.35)
    if finding == "opacity":
        for _ in range(rng.integers(1, 3)):
            side = rng.choice([-1, 1])
            cx = side * anatomy.lung_dx + rng.uniform(-0.12, 0.12)
            cy = anatomy.lung_dy + rng.uniform(-0.3, 0.35)
            sigma = rng.uniform(0.07, 0.16)
            blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))
            img += 0.28 * s * rng.uniform(0.6, 1.4) * blob * (0.3 + 0.7 * lungs)
    elif finding == "effusion":
        side = rng.choice([-1, 1])
        level = anatomy.lung_dy + anatomy.lung_ry * (0.75 - 0.55 * s * rng.uniform(0.6, 1.0))
        fluid = (y > level - 0.05 * np.abs(x - side * anatomy.lung_dx)) * (side * x > 0.1)
        img += 0.3 * fluid * lungs
    elif finding == "nodule":
        side = rng.choice([-1, 1])
        cx = side * anatomy.lung_dx + rng.uniform(-0.1, 0.1)
        cy = anatomy.lung_dy + rng.uniform(-0.3, 0.3)
        img += 0.35 * s * ellipse(cx, cy, 0.045, 0.045, 0.3)
    img = img * anatomy.brightness + 0.05 * _smooth_field(rng, size)
    img += (0.015 + 0.05 * difficulty) * rng.standard_normal(img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


def render_fundus(
    anatomy: Anatomy, finding: str, difficulty: float, size: int, rng: np.random.Generator
) -> np.ndarray:
    """One phantom colour fundus photograph ``(size, size, 3) float32 in [0, 1]`` (RGB).

    An orange-red retina in a dark circular field, a yellow optic disc on one side, a darker
    macula, dark red vessels arching from the disc. Findings: ``haemorrhage`` dark red blots,
    ``exudate`` small bright yellow spots, ``cotton_wool`` soft white-grey patches, ``pale_disc``
    a whitened optic disc. Patient variation reuses :class:`Anatomy` fields.
    """
    s = 1.0 - difficulty
    ax = np.linspace(-1, 1, size)
    x, y = np.meshgrid(ax, ax)
    r = np.sqrt(x**2 + y**2)
    field = np.clip((0.95 - r) / 0.05, 0, 1)  # circular aperture
    tint = np.array([0.78, 0.34, 0.14]) * anatomy.brightness
    img = tint[None, None] * (1.0 - 0.35 * r[..., None] ** 2)  # vignetting
    img = img * (1.0 - 0.35 * np.exp(-(x**2 + y**2) / 0.03))[..., None]  # macula
    side = 1 if anatomy.tilt >= 0 else -1  # which eye: disc left or right of the macula
    dx, dy = side * (anatomy.lung_dx + 0.1), anatomy.lung_dy + 0.05
    disc_r = anatomy.heart_r * 0.75
    disc = np.exp(-((x - dx) ** 2 + (y - dy) ** 2) / (2 * disc_r**2))
    disc_colour = np.array([0.98, 0.85, 0.55])
    if finding == "pale_disc":
        disc_colour = disc_colour + s * rng.uniform(0.7, 1.0) * (
            np.array([0.95, 0.95, 0.92]) - disc_colour
        )
    img = img * (1 - disc[..., None]) + disc_colour * disc[..., None]
    # Vessels: four dark red arcs leaving the disc towards the macula side.
    for sign in (-1, 1):
        for bend in (anatomy.rib_gap * 3, anatomy.rib_gap * 5):
            arc = dy + sign * bend * np.abs(x - dx) ** 0.8
            vessel = np.exp(-((y - arc) ** 2) / 0.0012) * (side * (dx - x) > 0)
            img = img * (1 - 0.55 * vessel[..., None]) + 0.55 * vessel[..., None] * np.array(
                [0.45, 0.05, 0.04]
            )

    def spots(n, radius, colour, alpha):
        nonlocal img
        for _ in range(n):
            cx, cy = rng.uniform(-0.55, 0.55, 2)
            blob = alpha * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * radius**2))
            img = img * (1 - blob[..., None]) + blob[..., None] * np.asarray(colour)

    if finding == "haemorrhage":
        spots(int(rng.integers(2, 5)), rng.uniform(0.05, 0.09), (0.35, 0.02, 0.02), 0.9 * s)
    elif finding == "exudate":
        spots(int(rng.integers(4, 9)), 0.035, (1.0, 0.92, 0.35), 0.9 * s)
    elif finding == "cotton_wool":
        spots(int(rng.integers(2, 4)), rng.uniform(0.07, 0.11), (0.92, 0.88, 0.82), 0.75 * s)
    # Choroidal texture and pigmentation differ between patients; without it two normal eyes
    # correlate > 0.99 and the ingest's duplicate search (rightly) groups them.
    img = img + 0.12 * _smooth_field(rng, size)[..., None] * np.array([1.0, 0.6, 0.4])
    img = img + (0.01 + 0.04 * difficulty) * rng.standard_normal(img.shape)
    return np.clip(img * field[..., None], 0, 1).astype(np.float32)


def write_phantoms(
    out_dir: str | Path,
    *,
    n_patients: int = 160,
    num_classes: int = 2,
    size_px: int = 128,
    difficulty: float = 0.6,
    seed: int = 0,
    body_part: str = "chest",
) -> Path:
    """Write a labeled phantom DICOM dataset; returns the path of its ``labels.csv``.

    Layout mimics an export: ``<PatientID>/<study>/IMxxxxx`` (some files without extension).
    ``labels.csv`` columns: accession, patient, finding — keyed by AccessionNumber on purpose,
    so the quickstart shows a join on a non-UID attribute. Classes are imbalanced: ~60 % normal.
    Chest pixels are 12-bit in 16; every fifth patient's images are stored as MONOCHROME1.
    ``body_part="fundus"``: 8-bit RGB Ophthalmic Photography instances (Modality OP) of
    :data:`FUNDUS_CLASS_NAMES` instead.
    """
    from medsynth.dicom.write import build_instance, deterministic_uid, write_instance

    names = class_names(body_part)
    fundus = body_part == "fundus"
    if not 2 <= num_classes <= len(names):
        raise ValueError(f"num_classes must be 2..{len(names)}, got {num_classes}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    classes = names[:num_classes]
    prior = np.array([0.6] + [0.4 / (num_classes - 1)] * (num_classes - 1))
    rows = []
    for p in range(n_patients):
        anatomy = draw_anatomy(rng)
        finding = classes[rng.choice(num_classes, p=prior)]
        pid = f"PH{seed:02d}{p:05d}"
        n_studies = 2 if rng.random() < 0.25 else 1
        monochrome1 = p % 5 == 4 and not fundus
        for s in range(n_studies):
            if fundus:
                unit = render_fundus(anatomy, finding, difficulty, size_px, rng)
                stored = np.round(unit * 255).astype(np.uint8)
            else:
                unit = render(anatomy, finding, difficulty, size_px, rng)
                stored = np.round(unit * 4095).astype(np.uint16)
            if monochrome1:
                stored = 4095 - stored
            study_uid = deterministic_uid("phantom", seed, pid, s, "study")
            accession = f"CAN{seed:02d}{p:05d}{s}"
            attrs = {
                "SpecificCharacterSet": "ISO_IR 100",
                "Modality": "OP" if fundus else "CR",
                "StudyDate": f"2024{1 + (p % 12):02d}{1 + (s * 7 + p) % 28:02d}",
                "StudyTime": "101500",
                "AccessionNumber": accession,
                "InstitutionName": f"CANARY INSTITUTE {p % 7}",
                "ReferringPhysicianName": f"CANARY^REFERRER^{p % 11}",
                "StudyDescription": "FUNDUS" if fundus else "CHEST PA",
                "PatientName": f"CANARY^PHANTOM^{pid}",
                "PatientID": pid,
                "PatientBirthDate": f"19{40 + p % 60:02d}0{1 + p % 9}1{p % 9}",
                "PatientSex": "FM"[p % 2],
                "BodyPartExamined": "EYE" if fundus else "CHEST",
                "StudyInstanceUID": study_uid,
                "SeriesInstanceUID": deterministic_uid("phantom", seed, pid, s, "series"),
                "StudyID": str(s + 1),
                "SeriesNumber": 1,
                "InstanceNumber": 1,
            }
            if not fundus:
                attrs.update(ViewPosition="PA", RescaleIntercept=0, RescaleSlope=1)
                attrs.update(WindowCenter=2048, WindowWidth=4096)
            sop = deterministic_uid("phantom", seed, pid, s, "image")
            ds = build_instance(
                stored,
                attrs,
                sop_class_uid=OP_STORAGE if fundus else CR_STORAGE,
                sop_instance_uid=sop,
                photometric="RGB" if fundus else "MONOCHROME1" if monochrome1 else "MONOCHROME2",
                bits_stored=8 if fundus else 12,
            )
            name = f"IM{s + 1:05d}" + (".dcm" if p % 2 else "")
            write_instance(out / pid / f"ST{s + 1}" / name, ds)
            rows.append({"accession": accession, "patient": pid, "finding": finding})
    labels = out / LABELS_FILE
    with labels.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["accession", "patient", "finding"])
        w.writeheader()
        w.writerows(rows)
    return labels
