"""ONNX export of the query tower, checked against PyTorch with ``onnxruntime``.

Used by :mod:`twotower.export` (``export.py --onnx``): the exported graph takes the history ids
(and user / hour / context, the per-play ``skips`` / ``gaps`` / ``request_gaps`` and the play
clock ``play_hours`` / ``play_weekdays`` when the tower reads them: exactly the inputs
``manifest.json`` ``query_tower.inputs`` describes) and returns the L2-normalised query vector.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from twotower.artifact import ONNX_FILE, ArtifactError
from twotower.query import QueryBatch, QuerySpec

ONNX_TOLERANCE = 1e-4  # max |onnxruntime - torch| on example queries


# ---------------------------------------------------------------------------------- ONNX
class OnnxQuery(nn.Module):
    """The query tower over positional tensors: exactly the inputs its :class:`QuerySpec` reads.

    ONNX graphs take no optional inputs, so the graph's inputs are the spec's fields in order;
    inside, they become the :class:`~twotower.query.QueryBatch` every tower takes.
    """

    def __init__(self, tower: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.tower = tower
        self.names = names

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        """Query vectors ``[B, dim]`` of the named inputs."""
        return self.tower(QueryBatch(**dict(zip(self.names, args, strict=True))))  # [B, dim]


def onnx_inputs(config: dict[str, Any]) -> list[str]:
    """Input names of the ONNX query tower for a QueryTower config."""
    return QuerySpec.from_config(config).input_names


def example_query_inputs(
    config: dict[str, Any], batch: int, length: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random valid inputs (variable left padding) for parity checks, by input name."""
    spec = QuerySpec.from_config({**config, "max_len": length})
    query = spec.example(
        config["num_items"], config.get("num_users", 0), config.get("num_contexts", 0), batch, seed
    )
    return {name: getattr(query, name) for name in spec.input_names}


class _PortableOps(TorchFunctionMode):
    """Trace ONNX-portable equivalents of ops whose boolean forms onnxruntime cannot run.

    ``cumsum`` of a bool tensor (torch sums it as int64) is traced on an int64 copy, and
    ``torch.eye(..., dtype=torch.bool)`` as a float identity compared with 0; results are
    identical, only the exported graph changes.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, D105
        kwargs = kwargs or {}
        if func in (torch.cumsum, torch.Tensor.cumsum) and args[0].dtype == torch.bool:
            return func(args[0].long(), *args[1:], **kwargs)
        if func is torch.eye and kwargs.get("dtype") == torch.bool:
            return func(*args, **{**kwargs, "dtype": torch.float32}) != 0
        return func(*args, **kwargs)


def export_onnx(tower: nn.Module, path: Path, history_len: int) -> dict[str, Any]:
    """Write the query tower as ONNX and compare it with torch on random inputs.

    Raises:
        ArtifactError: onnxruntime disagrees with torch by more than 1e-4.
        ImportError: onnx/onnxruntime are not installed (the ``onnx`` extra).
    """
    import onnxruntime as ort

    was_training = tower.training
    tower.eval()
    inputs = onnx_inputs(tower.config)
    wrapper = OnnxQuery(tower, inputs).eval()
    example = example_query_inputs(tower.config, 4, history_len)
    spec = QuerySpec.from_config(tower.config)
    # every [batch, length] input (history, the per-play signals and clock) has both axes free
    dynamic = {f.name: {0: "batch", 1: "length"} if "length" in f.shape else {0: "batch"}
               for f in spec.inputs}  # fmt: skip
    dynamic["query_emb"] = {0: "batch"}
    buf = io.BytesIO()
    with warnings.catch_warnings(), _PortableOps():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            tuple(example[n] for n in inputs),
            buf,
            input_names=inputs,
            output_names=["query_emb"],
            dynamic_axes=dynamic,
            opset_version=17,
            dynamo=False,
        )
    path.write_bytes(buf.getvalue())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    check = example_query_inputs(tower.config, 64, history_len, seed=1)
    with torch.no_grad():
        expected = wrapper(*(check[n] for n in inputs)).numpy()  # [B, dim]
    got = session.run(None, {n: check[n].numpy() for n in inputs})[0]
    diff = float(np.abs(got - expected).max())
    tower.train(was_training)
    if not diff <= ONNX_TOLERANCE:
        raise ArtifactError(
            f"ONNX query tower differs from torch by {diff:.3g} > {ONNX_TOLERANCE} "
            f"(opset 17, {len(check['history'])} random histories)"
        )
    return {
        "file": ONNX_FILE,
        "inputs": inputs,
        "output": "query_emb",
        "opset": 17,
        "max_abs_diff": diff,
        "checked_queries": len(check["history"]),
    }
