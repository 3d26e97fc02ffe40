"""Time to quality: medsynth's default against the peer recipe, FD_clf against wall time.

The question a user choosing a tool asks (issue #16): how long until the samples are as good as
what MONAI's own classifier-free-guidance tutorial gives (``benchmarks/peer.py``)? Both train on
the same ingest (the protocol's train split); each saves ``--points`` checkpoints on the way; each
checkpoint's ``--n`` samples (test-split class proportions, fixed seeds) are scored by the same
extractors (``benchmarks/quality.py``: two small CNNs and a ResNet-18 trained on the real train
split) against the real test split.

Time is wall-clock seconds from launching each training command to its checkpoint's file
appearing (imports, data loading and checkpoint writes included, for both), on whatever else the
machine is doing: run it alone. Sampling is timed separately and not counted: the curve is about
training. medsynth samples with its protocol's generation settings (sampler, steps, guidance);
an autoguided protocol is measured unguided (guidance 1 for every class), since each checkpoint
would need a guide of its own (the recipe at a fifth of its steps), which this curve does not
build.

Targets (per extractor): medsynth reaches the peer's final FD in <= 1/3 of the peer's training
time, and beats the peer at equal time (at each peer checkpoint, medsynth's newest checkpoint
that existed by then).

    python benchmarks/time_to_quality.py protocols/pneumoniamnist_full.yaml --out DIR \\
        [--seconds 900] [--medsynth-steps 1300] [--points 4] [--n 600] [--peer-args=--tutorial]
    python benchmarks/time_to_quality.py protocols/smoke.yaml --out DIR --smoke   # tests

Each finished part is kept in ``DIR`` and reused by a rerun (delete it to redo that part):
``medsynth/`` (ingest and training), ``peer/``, ``extractors/``, ``*.npz``, ``times.json``. Writes
``curve.json``, ``curve.md`` (the table and the verdicts) and ``curve.png``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.quality import EXTRACTORS, _extractor_path  # noqa: E402
from medsynth.protocol import sampler_revision  # noqa: E402
from medsynth.training.checkpoint import list_snapshots  # noqa: E402

SMOKE_SETS = ["dataset.phantoms.n_patients=160"]  # >= 10 test images per class for scoring
UNGUIDED = [
    "training.guide_fraction=0",
    "generation.autoguidance=false",
    "generation.guidance_scale=1",
    "generation.class_guidance={}",
]


def _run(cmd: list[str], log: Path) -> None:
    """Run ``cmd`` with its output appended to ``log``; exit naming it on failure."""
    timed_checkpoints(cmd, list, log)


def timed_checkpoints(cmd: list[str], listing: Callable[[], list[Path]], log: Path) -> dict:
    """Run ``cmd``; return ``{name: seconds after launch}`` for each path ``listing()`` returns,
    as first seen (polled every 0.2 s; both trainers publish checkpoints by atomic rename)."""
    seen: dict[str, float] = {}
    with log.open("a") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n")
        fh.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
        while True:
            done = proc.poll() is not None
            now = time.perf_counter() - t0
            for p in listing():
                seen.setdefault(p.name, now)
            if done:
                break
            time.sleep(0.2)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {shlex.join(cmd)}; see {log}")
    return seen


def train_peer(args, ingest: Path, log: Path) -> list[dict]:
    """Peer checkpoints as ``[{name, seconds, step, npz}]``, training and sampling them once."""
    out = args.out / "peer"
    if not (out / "peer.json").exists():
        cmd = [sys.executable, "benchmarks/peer.py", str(ingest), "--out", str(out)]
        cmd += ["--seconds", str(args.seconds), "--checkpoints", str(args.points)]
        cmd += ["--n", str(args.n), *shlex.split(args.peer_args)]
        cmd += ["--smoke"] if args.smoke else []
        seen = timed_checkpoints(cmd, lambda: sorted(out.glob("ckpt-*.pt")), log)
        (out / "times.json").write_text(json.dumps(seen, indent=1))
    stats = json.loads((out / "peer.json").read_text())
    seen = json.loads((out / "times.json").read_text())
    return [
        {
            "name": c["file"],
            "seconds": seen[c["file"]],
            "step": c["step"],
            "npz": out / c["samples"],
        }
        for c in stats["checkpoints"]
    ]


def train_medsynth(args, run: Path, log: Path) -> list[dict]:
    """medsynth snapshots as ``[{name, seconds, step, npz}]``, training and sampling them once."""
    times = run / "times.json"
    if not times.exists():
        steps = args.medsynth_steps
        every = max(1, steps // args.points)
        # Snapshots at multiples of `every` and at the end; keep them all (1300 // 3 = 433
        # writes 433, 866, 1299 and 1300).
        kept = steps // every + (steps % every > 0)
        sets = [f"training.max_steps={steps}"]
        sets += [f"training.checkpoint_every_steps={every}", f"training.keep_states={kept}"]
        sets += ["training.preview_every_steps=0"]
        cmd = _medsynth("train", args, run, sets)
        seen = timed_checkpoints(cmd, lambda: list_snapshots(run / "train"), log)
        times.write_text(json.dumps(seen, indent=1))
    seen = json.loads(times.read_text())
    proto = _protocol(args)
    gen, T = proto.generation, proto.schedule.num_train_timesteps
    rows = []
    for name, seconds in sorted(seen.items(), key=lambda kv: kv[1]):
        # Named by what made it, so a cache of another sampler or sampler revision is not reused.
        rev = sampler_revision(gen.sampler, gen.steps, T).get("sampler_revision", 1)
        made = f"{gen.sampler}{gen.steps}-g{gen.guidance_scale:g}-rev{rev}"
        npz = args.out / f"medsynth-{name}-{made}.npz"
        if not npz.exists():
            cmd = [sys.executable, "benchmarks/quality.py", "sample", str(run / "train" / name)]
            cmd += ["--ingest", str(run / "ingest"), "--out", str(npz), "--n", str(args.n)]
            cmd += ["--sampler", gen.sampler, "--steps", str(gen.steps)]
            cmd += ["--guidance", str(gen.guidance_scale)]
            _run(cmd, log)
        rows.append({"name": name, "seconds": seconds, "step": int(name.split("-")[1]), "npz": npz})
    return rows


def _protocol(args):
    from medsynth.protocol import load_protocol

    return load_protocol(args.protocol, args.sets)


def _medsynth(command: str, args, run: Path, sets: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "medsynth.cli", command, str(args.protocol), "--run-dir", str(run)]
    cmd += ["--threads", str(args.threads)]
    for s in [*args.sets, *sets]:
        cmd += ["--set", s]
    return cmd


def score(args, ingest: Path, curves: dict[str, list[dict]], log: Path) -> dict:
    """Scores of every checkpoint's samples: ``{set name: {part: {metric: value}}}``."""
    cache = args.cache or args.out / "extractors"
    if not all(_extractor_path(cache, name).exists() for name in EXTRACTORS):
        cmd = [sys.executable, "benchmarks/quality.py", "extractors", str(ingest)]
        cmd += ["--cache", str(cache)] + (["--epochs", "1"] if args.smoke else [])
        _run(cmd, log)
    out = args.out / "score.json"
    cmd = [sys.executable, "benchmarks/quality.py", "score", str(ingest), "--cache", str(cache)]
    for system, rows in curves.items():
        for r in rows:
            cmd += ["--set", f"{system}/{r['name']}={r['npz']}"]
    _run([*cmd, "--json", str(out)], log)
    return json.loads(out.read_text())


def verdicts(curves: dict[str, list[dict]], fd: str) -> dict:
    """The two targets for one extractor's FD (rows carry ``fd``; seconds ascending)."""
    peer, med = curves["peer"], curves["medsynth"]
    final = peer[-1]
    reach = next((r["seconds"] for r in med if r[fd] <= final[fd]), None)
    equal = []
    for p in peer:
        before = [r for r in med if r["seconds"] <= p["seconds"]]
        if before:
            equal.append((p["seconds"], before[-1][fd], p[fd]))
    return {
        "peer_final_fd": final[fd],
        "peer_seconds": final["seconds"],
        "medsynth_reaches_at": reach,
        "reach_target_met": reach is not None and reach <= final["seconds"] / 3,
        "equal_time": equal,
        "beats_at_equal_time": bool(equal) and all(m < p for _, m, p in equal),
    }


def report(args, curves: dict[str, list[dict]], scores: dict) -> dict:
    fds = [f"FD_{n}" for n in EXTRACTORS]
    for system, rows in curves.items():
        for r in rows:
            res = scores[f"{system}/{r['name']}"]["all"]
            r.update({k: res[k] for k in fds})
            r.update({k: res.get(k) for k in ("precision", "recall", "mean_intensity")})
            r["npz"] = str(r["npz"])
    result = {"curves": curves, "verdicts": {k: verdicts(curves, k) for k in fds}}
    (args.out / "curve.json").write_text(json.dumps(result, indent=1))
    lines = ["| system | checkpoint | step | train s | " + " | ".join(fds) + " | P / R |"]
    lines.append("|---|---|---:|---:|" + "---:|" * len(fds) + "---|")
    for system, rows in curves.items():
        for r in rows:
            figs = " | ".join(f"{r[k]:.3g}" for k in fds)
            pr = f"{r['precision']:.2f} / {r['recall']:.2f}"
            lines.append(
                f"| {system} | {r['name']} | {r['step']} | {r['seconds']:.0f} | {figs} | {pr} |"
            )
    lines.append("")
    for k, v in result["verdicts"].items():
        reach = "never" if v["medsynth_reaches_at"] is None else f"{v['medsynth_reaches_at']:.0f} s"
        lines.append(
            f"- {k}: peer final {v['peer_final_fd']:.3g} at {v['peer_seconds']:.0f} s; "
            f"medsynth reaches it at {reach} (target <= {v['peer_seconds'] / 3:.0f} s: "
            f"{'met' if v['reach_target_met'] else 'not met'}); beats the peer at equal time: "
            f"{'yes' if v['beats_at_equal_time'] else 'no'} "
            f"({', '.join(f'{t:.0f} s {m:.3g} vs {p:.3g}' for t, m, p in v['equal_time'])})"
        )
    (args.out / "curve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(args.out / "curve.png", curves, fds)
    return result


def plot(path: Path, curves: dict[str, list[dict]], fds: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(fds), figsize=(4 * len(fds), 3.2))
    for ax, k in zip(axes, fds, strict=True):
        for system, rows in curves.items():
            ax.plot([r["seconds"] for r in rows], [r[k] for r in rows], "o-", label=system)
        ax.set(xlabel="training wall time (s)", ylabel=k, yscale="log")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("protocol", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=900.0, help="the peer's training budget")
    ap.add_argument("--medsynth-steps", type=int, default=1300)
    ap.add_argument("--points", type=int, default=4, help="checkpoints per system")
    ap.add_argument("--n", type=int, default=600, help="samples per checkpoint")
    ap.add_argument("--peer-args", default="", help="extra benchmarks/peer.py flags (quoted)")
    ap.add_argument("--cache", type=Path, help="extractor cache (default OUT/extractors)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="protocol override")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny everything, for the tests")
    args = ap.parse_args()
    if args.smoke:
        args.medsynth_steps, args.points, args.n = 20, 2, 40
        args.sets = [*SMOKE_SETS, *args.sets]
    if _protocol(args).generation.autoguidance:
        args.sets += UNGUIDED
        print(f"note: autoguidance needs a guide per checkpoint; measured unguided ({UNGUIDED})")
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "log.txt"
    run = args.out / "medsynth"
    _run(_medsynth("ingest", args, run, []), log)
    ingest = run / "ingest"
    curves = {"peer": train_peer(args, ingest, log), "medsynth": train_medsynth(args, run, log)}
    report(args, curves, score(args, ingest, curves, log))


if __name__ == "__main__":
    main()
