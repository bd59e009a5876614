"""Untrusted files: a pickle payload in a checkpoint, an artifact or the data cache never runs.

The payload is an object whose ``__reduce__`` makes unpickling call ``open(marker, "w")``; a
control test disassembles the checkpoint's pickle stream (``pickletools``, which never executes
it) and finds the ``builtins.open`` call on the marker, so the payload is live for any loader
that unpickles without restrictions. Nothing in this repository, tests included, runs such a
load. Every loader of the package must refuse the file and leave no marker. A static check (AST,
not regex) keeps pickle modules, numpy loads that allow pickles and torch loads without the
weights-only restriction out of the source tree.
"""

from __future__ import annotations

import ast
import json
import pickletools
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from twotower.export import ArtifactError, sha256_file

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden"
TINY = REPO / "configs" / "tiny.yaml"


class Payload:
    """Unpickling this calls ``open(marker, "w")``: creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def marker(tmp_path) -> Path:
    m = tmp_path / "PWNED"
    yield m
    assert not m.exists(), "the pickle payload ran"


def _evil_checkpoint(path: Path, marker: Path) -> Path:
    """A checkpoint shaped like train.py's, with the payload among the callback states."""
    ckpt = {
        "epoch": 1,
        "global_step": 10,
        "state_dict": {"query_tower.item_embedding.weight": torch.zeros(5, 4)},
        "hyper_parameters": {"dim": 4, "num_items": 5},
        "datamodule_hyper_parameters": {"format": "synthetic", "options": {"preset": "tiny"}},
        "callbacks": {"ModelCheckpoint": Payload(marker)},
    }
    torch.save(ckpt, path)
    return path


def _pickle_ops(ckpt: Path) -> list[tuple[str, object]]:
    """``(opcode name, argument)`` of the checkpoint's pickle stream.

    Static: ``pickletools.genops`` only decodes opcodes, it never imports or calls anything.
    """
    with zipfile.ZipFile(ckpt) as zf:
        stream = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    return [(op.name, arg) for op, arg, _ in pickletools.genops(stream)]


def test_payload_is_live_without_weights_only(tmp_path) -> None:
    """The file really carries a call of ``open`` on the marker (the control)."""
    marker = tmp_path / "control"
    ops = _pickle_ops(_evil_checkpoint(tmp_path / "evil.ckpt", marker))
    # the callable (``open`` pickles as io.open) is pushed ...
    start = next(
        i for i, op in enumerate(ops) if op in (("GLOBAL", "io open"), ("GLOBAL", "builtins open"))
    )
    rest = ops[start:]
    assert any(arg == str(marker) for _, arg in rest)  # ... with the marker path as argument ...
    assert any(name == "REDUCE" for name, _ in rest)  # ... and called when unpickled
    assert not marker.exists()  # inspecting it ran nothing


def test_checkpoint_loaders_refuse_the_payload(tmp_path, marker, capsys) -> None:
    from twotower.cli import main
    from twotower.evaluate import evaluate_checkpoint
    from twotower.export import export_checkpoint, load_checkpoint_dict
    from twotower.model.module import TwoTowerModule

    ckpt = _evil_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(ArtifactError, match="weights_only"):
        load_checkpoint_dict(ckpt)
    with pytest.raises(ArtifactError, match="weights_only"):
        export_checkpoint(str(ckpt), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ArtifactError, match="weights_only"):
        evaluate_checkpoint(ckpt)
    assert main(["evaluate", "--checkpoint", str(ckpt)]) == 2
    assert "weights_only" in capsys.readouterr().err
    with pytest.raises(Exception, match="[Ww]eights only load failed|weights_only"):
        TwoTowerModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)


def test_training_resume_refuses_the_payload_even_when_env_allows_pickle(
    tmp_path, marker, monkeypatch
) -> None:
    """``fit --ckpt_path evil.ckpt``: Lightning's loader goes through AtomicCheckpointIO, which
    keeps ``weights_only=True`` although TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD asks torch not to."""
    from twotower.train import fit

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    ckpt = _evil_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        fit(
            [TINY],
            {"trainer.max_epochs": 1, "trainer.logger": False, "data.cache_dir": None},
            ckpt_path=ckpt,
        )


def _resign(art: Path) -> None:
    """Recompute the manifest checksums (an attacker controls the whole folder)."""
    manifest = json.loads((art / "manifest.json").read_text())
    for name in manifest["files"]:
        f = art / name
        manifest["files"][name] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    (art / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("victim", ["query_tower.pt", "item_embeddings.npy"])
def test_artifact_loaders_refuse_the_payload(tmp_path, marker, victim) -> None:
    from twotower.retrieve import Retriever
    from twotower.serve.app import create_app

    art = tmp_path / "art"
    shutil.copytree(GOLDEN / "artifact", art)
    if victim == "query_tower.pt":
        state = torch.load(art / victim, weights_only=True)
        state["payload"] = Payload(marker)
        torch.save(state, art / victim)
    else:
        arr = np.empty(24, dtype=object)
        arr[:] = [Payload(marker)] * 24
        np.save(art / victim, arr)  # numpy pickles object arrays by default
    _resign(art)
    with pytest.raises(ArtifactError, match=victim):
        Retriever.load(art)
    with pytest.raises(ArtifactError, match=victim):
        create_app(art)


def test_tampered_data_cache_is_rebuilt_never_trusted(tmp_path, caplog) -> None:
    """A prepared folder is Parquet and JSON only (nothing that can unpickle); a shard rewritten
    with its checksum updated but the wrong column types is refused and rebuilt."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from twotower.data.pipeline import DataConfig, cache_path, prepare_data

    cfg = DataConfig(format="synthetic", options={"preset": "tiny"}, cache_dir=str(tmp_path / "c"))
    clean = prepare_data(cfg)
    folder = cache_path(cfg)
    kinds = {p.suffix for p in folder.rglob("*") if p.is_file()}
    assert kinds == {".parquet", ".json"}
    shard = folder / "plays" / "part-00000.parquet"
    t = pq.read_table(shard)
    t = t.set_column(t.column_names.index("item"), "item", pa.array(["x"] * len(t)))
    pq.write_table(t, shard)
    header = json.loads((folder / "header.json").read_text())
    header["files"]["plays/part-00000.parquet"] = {
        "bytes": shard.stat().st_size,
        "sha256": hashlib.sha256(shard.read_bytes()).hexdigest(),
    }
    (folder / "header.json").write_text(json.dumps(header))
    with caplog.at_level("WARNING", logger="twotower"):
        again = prepare_data(cfg)
    assert "unusable, rebuilding" in caplog.text
    np.testing.assert_array_equal(again.train.items, clean.train.items)


# ------------------------------------------------------------------------------ static check
SOURCES = ["twotower", "tests", "bench", "train.py", "export.py"]
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve"}


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def pickle_findings(source: str, filename: str) -> list[str]:
    """Every use of unpickling in ``source`` (file:line: what)."""
    out = []
    for node in ast.walk(ast.parse(source, filename)):
        line = getattr(node, "lineno", 0)
        where = f"{filename}:{line}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            for m in mods:
                if m and m.split(".")[0] in PICKLE_MODULES:
                    out.append(f"{where}: imports {m}")
        if not isinstance(node, ast.Call):
            continue
        fn = _name(node.func)
        if _is_true(_kw(node, "allow_pickle")):
            out.append(f"{where}: numpy load that allows pickles")
        if fn.endswith("read_pickle"):
            out.append(f"{where}: {fn}")
        if fn in ("torch.load", "load_from_checkpoint") or fn.endswith(".load_from_checkpoint"):
            if not _is_true(_kw(node, "weights_only")):
                out.append(f"{where}: {fn} without weights_only=True")
    return out


def test_static_check_catches_what_it_should() -> None:
    # the offending snippet is assembled from pieces, so that no line of this file reads as an
    # unsafe load to a line-based scanner: it is input data for the AST check, never executed
    load, unsafe, allow = "torch" + ".load", "weights_only=" + "False", "allow_pickle=" + "True"
    bad = (
        "import pickle\nimport torch, numpy as np\nfrom joblib import load\n"
        f"{load}(p)\n{load}(p, {unsafe})\nnp.load(p, {allow})\n"
        "M.load_from_checkpoint(p)\nimport pandas as pd\npd.read_" + "pickle(p)\n"
    )
    assert len(pickle_findings(bad, "bad.py")) == 7
    good = "import torch\ntorch.load(p, map_location='cpu', weights_only=True)\nnp.load(p)\n"
    assert pickle_findings(good, "good.py") == []


def test_no_pickle_in_the_source_tree() -> None:
    files = []
    for entry in SOURCES:
        p = REPO / entry
        files += [p] if p.is_file() else sorted(p.rglob("*.py"))
    assert len(files) > 30
    findings = [
        f for path in files for f in pickle_findings(path.read_text(), str(path.relative_to(REPO)))
    ]
    assert findings == []
