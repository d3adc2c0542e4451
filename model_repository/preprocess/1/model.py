"""Triton python-backend model: raw post (encoded image bytes, UTF-8 text, optional caption) ->
pixel_values and input_ids. No torch.

All the logic is in `crisis_preprocess.py` (a verbatim copy of export/preprocess.py, the same code
the in-process paths run) and its parameters in `preprocess.json`, both beside this file. Inputs and
outputs are taken from config.pbtxt in the order export/triton_config.py writes them: inputs (image,
text, caption), outputs (pixels, token ids). Each request is decoded in its own try block: a bad
request gets an INVALID_ARG error naming the problem and the others in the batch are answered.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from crisis_preprocess import (
    PreprocessError,
    PreprocessSpec,
    TextPreprocessor,
    compose_text,
    decode_utf8,
    preprocess_image,
)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        here = Path(__file__).resolve().parent
        self.spec = PreprocessSpec.from_json((here / "preprocess.json").read_text())
        self.text = TextPreprocessor(self.spec, assets_dir=here)
        self.image_name, self.text_name, self.caption_name = (t["name"] for t in config["input"])
        self.pixels_name, self.ids_name = (t["name"] for t in config["output"])

    def _rows(self, request):
        """(pixels [n, 3, S, S], texts [n]) of one request, or PreprocessError."""
        images = pb_utils.get_input_tensor_by_name(request, self.image_name).as_numpy()
        texts = pb_utils.get_input_tensor_by_name(request, self.text_name).as_numpy()
        caption_tensor = pb_utils.get_input_tensor_by_name(request, self.caption_name)
        captions = caption_tensor.as_numpy() if caption_tensor is not None else None
        if len(images) != len(texts) or (captions is not None and len(captions) != len(texts)):
            raise PreprocessError("image, text and caption must have the same batch size")
        pixels, composed = [], []
        for i in range(len(images)):
            where = f" (row {i})" if len(images) > 1 else ""
            try:
                pixels.append(preprocess_image(bytes(images[i, 0]), self.spec))
                tweet = decode_utf8(bytes(texts[i, 0]), "text")
                caption = (
                    decode_utf8(bytes(captions[i, 0]), "caption") if captions is not None else None
                )
            except PreprocessError as exc:
                raise PreprocessError(f"{exc}{where}") from None
            composed.append(compose_text(tweet, caption, self.spec))
        return np.stack(pixels), composed

    def execute(self, requests):
        results = []
        for request in requests:
            try:
                results.append(self._rows(request))
            except PreprocessError as exc:
                results.append(pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG))
            except Exception as exc:  # anything unforeseen fails this request only
                results.append(
                    pb_utils.TritonError(f"preprocessing failed: {type(exc).__name__}: {exc}")
                )
        good = [r for r in results if not isinstance(r, pb_utils.TritonError)]
        ids = self.text([t for _, texts in good for t in texts]) if good else None
        responses, start = [], 0
        for result in results:
            if isinstance(result, pb_utils.TritonError):
                responses.append(pb_utils.InferenceResponse(error=result))
                continue
            pixels, texts = result
            n = len(texts)
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor(self.pixels_name, pixels),
                        pb_utils.Tensor(self.ids_name, ids[start : start + n]),
                    ]
                )
            )
            start += n
        return responses
