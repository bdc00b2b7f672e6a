"""How every model is opened in onnxruntime: CPU, a set number of threads, no spinning.

Several sessions (and several services) share two cores in production and on a developer's machine; spinning
intra-op threads steal each other's time and double the latency (measured, see PLATFORM.md), so spinning is off.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort


def open_session(path: Path, threads: int = 1, what: str = "model") -> ort.InferenceSession:
    """An onnxruntime CPU session; FileNotFoundError saying how to get the models when the file is missing."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"{what} not found: {path} (run `make setup` or python -m sightline.common.models.convert.fetch)"
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
