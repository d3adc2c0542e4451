"""Triton python-backend model that serves one exported graph on CPU: ONNX Runtime (fp32, fp16,
int8 ONNX graphs) or OpenVINO (bf16; NNCF int8 models), as the config's `runtime`, `precision`
and `onnx_file` (the model file: model.onnx, or model.xml for OpenVINO int8) parameters say.

For a tritonserver without the onnxruntime/openvino backends (the one in the `nvidia-pytriton`
wheel). Names, dtypes and the ONNX file come from this model's config.pbtxt (generated from
crisis_triton/contract/spec.py); this file holds no tensor names. A dynamic batch of requests is
concatenated, run
once, and split back. A precision this machine cannot run fails the load with the reason.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from crisis_cpus import usable_cpus  # crisis_triton/runtime/cpus.py, copied beside this file
from crisis_runtimes import (  # crisis_triton/runtime/runtimes.py, copied beside
    RuntimeRefused,
    open_session,
)


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
        path = Path(args["model_repository"]) / args["model_version"] / params["onnx_file"]
        if not path.is_file():
            raise pb_utils.TritonModelException(f"ONNX file not found: {path}")
        precision = params.get("precision", "fp32")
        try:
            self.session = open_session(
                path,
                precision,
                runtime=params.get("runtime") or None,
                threads=threads,
                spinning=params.get("intra_op_spinning", "0") == "1",
            )
        except RuntimeRefused as exc:
            raise pb_utils.TritonModelException(f"{args['model_name']}: {exc}") from None
        graph_inputs = self.session.input_names
        if sorted(graph_inputs) != sorted(self.input_names):
            raise pb_utils.TritonModelException(
                f"{path.name} inputs {graph_inputs} differ from config.pbtxt {self.input_names}"
            )
        missing = [n for n in self.output_names if n not in self.session.output_names]
        if missing:
            raise pb_utils.TritonModelException(
                f"{path.name} has no output {missing} of config.pbtxt {self.output_names}"
            )
        # the graph's outputs in the config's order, found once
        self.output_order = [self.session.output_names.index(n) for n in self.output_names]

    def execute(self, requests):
        columns = {
            name: [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for r in requests]
            for name in self.input_names
        }
        sizes = [a.shape[0] for a in columns[self.input_names[0]]]
        feed = {name: np.concatenate(arrays) for name, arrays in columns.items()}
        try:
            results = self.session.run(feed)
            results = [results[i] for i in self.output_order]
        except Exception as exc:  # one failed run fails this batch's requests, not the server
            error = pb_utils.TritonError(f"{self.session.runtime} failed: {exc}")
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
