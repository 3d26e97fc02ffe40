"""Sharded evaluation: ``n`` shards + merge write exactly the files of a single-process study."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from medsynth.data.ingest import ingest_dataset
from medsynth.evaluation.shards import merge_shards, parse_shard, run_shard, shard_path
from medsynth.evaluation.study import run_study
from medsynth.generation.api import generate_from_protocol
from medsynth.protocol import parse_protocol
from medsynth.training.api import train_from_sections

YAML = """\
name: shards
dataset:
  kind: phantoms
  spatial_size: 16
  workers: 1
  phantoms: {n_patients: 20, size_px: 32}
model: {channels: [16, 32], attention_levels: [false, true], num_head_channels: 16}
training: {max_steps: 10, batch_size: 8, checkpoint_every_steps: 10, warmup_steps: 2}
generation: {per_class: 10, steps: 2}
evaluation:
  seeds: 2
  classifier: {epochs: 2}
  bootstrap: 100
  ratios: [1]
  selectors: [kcenter, fidelity]
  arms: [real_only, duplicate_control, classical_aug, synthetic, synthetic_only]
"""


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    proto = parse_protocol(YAML)
    ingest_dataset(proto.dataset, run)
    train_from_sections(
        run / "ingest", run / "train", proto.model, proto.schedule, proto.training, progress=False
    )
    generate_from_protocol(proto, run, progress=False)
    return run, proto


def _files(folder) -> dict[str, str]:
    out = {}
    for p in sorted(folder.iterdir()):
        data = p.read_bytes()
        if p.name == "summary.json":
            s = json.loads(data)
            s.pop("seconds")  # wall time: the only value allowed to differ
            data = json.dumps(s, sort_keys=True).encode()
        elif p.suffix == ".npz":  # compare arrays (zip members carry timestamps)
            with np.load(p) as z:
                data = b"".join(k.encode() + z[k].tobytes() for k in sorted(z.files))
        out[p.name] = hashlib.sha256(data).hexdigest()
    return out


def test_sharded_evaluation_equals_unsharded(study, tmp_path):
    run, proto = study
    ev = proto.evaluation
    args = (run / "ingest", run / "generate")
    run_study(*args, tmp_path / "single", ev, progress=False)
    # Shards in reverse order: each stands alone.
    for i in (2, 1, 0):
        run_shard(*args, tmp_path / "shards", ev, (i, 3), key="k", progress=False)
    merge_shards(*args, tmp_path / "shards", tmp_path / "merged", ev, 3, key="k")
    single, merged = _files(tmp_path / "single"), _files(tmp_path / "merged")
    assert set(single) >= {"runs.csv", "uplift.csv", "fidelity.json", "probas.npz"}
    assert merged == single
    # real-only, classical_aug, duplicate, 2 synthetic and synthetic_only arms over 3 shards.
    assert "synthetic:main:kcenter@1" in (tmp_path / "merged" / "uplift.csv").read_text()


def test_merge_refuses_missing_or_stale_shards(study, tmp_path):
    run, proto = study
    ev = proto.evaluation.model_copy(update={"arms": ["real_only", "classical_aug"]})
    args = (run / "ingest", run / "generate")
    run_shard(*args, tmp_path, ev, (0, 2), key="a", progress=False)
    with pytest.raises(FileNotFoundError, match=r"shard\(s\) 1 not found"):
        merge_shards(*args, tmp_path, tmp_path / "out", ev, 2, key="a")
    run_shard(*args, tmp_path, ev, (1, 2), key="b", progress=False)
    with pytest.raises(ValueError, match=r"shard\(s\) 1 .* other inputs"):
        merge_shards(*args, tmp_path, tmp_path / "out", ev, 2, key="a")
    assert shard_path(tmp_path, 1, 2).exists()


@pytest.mark.parametrize("text", ["2/2", "a/b", "1", "-1/3"])
def test_parse_shard_rejects_nonsense(text):
    with pytest.raises(ValueError, match="i/n"):
        parse_shard(text)


def test_cli_shard_then_merge(study, tmp_path):
    from typer.testing import CliRunner

    from medsynth.cli import app

    run, _ = study
    (tmp_path / "p.yaml").write_text(YAML)
    cli = CliRunner()
    base = ["evaluate", str(tmp_path / "p.yaml"), "--run-dir", str(run)]
    res = cli.invoke(app, [*base, "--merge", "2"])
    assert res.exit_code == 2 and "shard(s) 0, 1 not found" in res.output
    res = cli.invoke(app, [*base, "--shard", "0/2", "--merge", "2"])
    assert res.exit_code == 2 and "not both" in res.output
    res = cli.invoke(app, [*base, "--shard", "3/2"])
    assert res.exit_code == 2 and "0 <= i < n" in res.output
    for i in (0, 1):
        res = cli.invoke(app, [*base, "--shard", f"{i}/2", "--set", "evaluation.arms=[real_only]"])
        assert res.exit_code == 0, res.output
    res = cli.invoke(app, [*base, "--merge", "2", "--set", "evaluation.arms=[real_only]"])
    assert res.exit_code == 0, res.output
    assert "real_only" in (run / "evaluate" / "uplift.csv").read_text()
