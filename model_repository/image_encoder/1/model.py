"""Triton python-backend model that serves one ONNX graph with ONNX Runtime (CPU).

For a tritonserver without the onnxruntime backend (the one in the `nvidia-pytriton` wheel). Names,
dtypes and the ONNX file come from this model's config.pbtxt (generated from export/spec.py); this
file holds no tensor names. A dynamic batch of requests is concatenated, run once, and split back.
"""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils
from crisis_cpus import usable_cpus  # export/cpus.py, copied beside this file


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.input_names = [t["name"] for t in config["input"]]
        self.output_names = [t["name"] for t in config["output"]]
        instances = sum(g.get("count", 1) for g in config.get("instance_group", [])) or 1
        threads = int(params.get("intra_op_num_threads", "0"))
        if threads <= 0:
            threads = max(1, usable_cpus() // instances)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        spinning = params.get("intra_op_spinning", "0")
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        path = Path(args["model_repository"]) / args["model_version"] / params["onnx_file"]
        if not path.is_file():
            raise pb_utils.TritonModelException(f"ONNX file not found: {path}")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph_inputs = [i.name for i in self.session.get_inputs()]
        if sorted(graph_inputs) != sorted(self.input_names):
            raise pb_utils.TritonModelException(
                f"{path.name} inputs {graph_inputs} differ from config.pbtxt {self.input_names}"
            )

    def execute(self, requests):
        columns = {
            name: [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for r in requests]
            for name in self.input_names
        }
        sizes = [a.shape[0] for a in columns[self.input_names[0]]]
        feed = {name: np.concatenate(arrays) for name, arrays in columns.items()}
        try:
            results = self.session.run(self.output_names, feed)
        except Exception as exc:  # one failed run fails this batch's requests, not the server
            error = pb_utils.TritonError(f"ONNX Runtime failed: {exc}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        responses = []
        start = 0
        for size in sizes:
            tensors = [
                pb_utils.Tensor(name, out[start : start + size])
                for name, out in zip(self.output_names, results)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses
