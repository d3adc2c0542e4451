"""Triton python-backend model that serves one exported graph on CPU: ONNX Runtime (fp32, fp16,
int8 ONNX graphs) or OpenVINO (bf16; NNCF int8 models), as the config's `runtime`, `precision`
and `onnx_file` (the model file: model.onnx, or model.xml for OpenVINO int8) parameters say.

For a tritonserver without the onnxruntime/openvino backends (the one in the `nvidia-pytriton`
wheel). Names, dtypes and the ONNX file come from this model's config.pbtxt (generated from
crisis_triton/contract/spec.py); this file holds no tensor names. A dynamic batch of requests is
concatenated, run
once, and split back. A precision this machine cannot run fails the load with the reason.

Text at its own length (docs/fidelity.md): inputs with a dynamic token dim are ragged (Triton
hands each request's tensors at their own length). Requests are grouped by length (the config's
`length_groups`: a request goes to the first group at least as long), each group padded to its
longest request with the config's `pad_values` and run once, and the `ragged_outputs` cut back to
each request's length. Exact: what pads a row follows its <|endoftext|> (causal text tower) or is
masked (cma_clip's text_mask 0).
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
        self.pad_values = json.loads(params.get("pad_values", "{}"))
        self.ragged_outputs = set(json.loads(params.get("ragged_outputs", "[]")))
        self.length_groups = json.loads(params.get("length_groups", "[]"))

    def execute(self, requests):
        if not self.pad_values:
            return self._run(requests, None)
        lengths = [
            pb_utils.get_input_tensor_by_name(r, next(iter(self.pad_values))).as_numpy().shape[1]
            for r in requests
        ]
        groups = {}
        for i, length in enumerate(lengths):
            group = next((g for g in self.length_groups if g >= length), length)
            groups.setdefault(group, []).append(i)
        responses = [None] * len(requests)
        for members in groups.values():
            answers = self._run([requests[i] for i in members], [lengths[i] for i in members])
            for i, answer in zip(members, answers):
                responses[i] = answer
        return responses

    def _pad(self, name, array, length):
        """`array` of input `name` padded along its token axis to `length` tokens."""
        if name not in self.pad_values or array.shape[1] == length:
            return array
        widths = [(0, 0)] * array.ndim
        widths[1] = (0, length - array.shape[1])
        return np.pad(array, widths, constant_values=self.pad_values[name])

    def _run(self, requests, lengths):
        """One run of `requests` concatenated; `lengths`: each request's tokens (ragged inputs
        padded to the longest, ragged outputs cut back), None without ragged inputs."""
        longest = max(lengths) if lengths else 0
        columns = {
            name: [
                self._pad(name, pb_utils.get_input_tensor_by_name(r, name).as_numpy(), longest)
                for r in requests
            ]
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
        for k, size in enumerate(sizes):
            tensors = []
            for name, out in zip(self.output_names, results):
                rows = out[start : start + size]
                if name in self.ragged_outputs:
                    rows = np.ascontiguousarray(rows[:, : lengths[k]])
                tensors.append(pb_utils.Tensor(name, rows))
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses
