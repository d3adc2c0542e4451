"""Triton python-backend model: a raw post (image bytes, UTF-8 text, optional caption) ->
pixel_values and input_ids, without torch.

The logic is `crisis_preprocess.py` (a copy of crisis_triton/preprocess/posts.py, which the
in-process paths run too), its parameters `preprocess.json`, both beside this file; tensor names
come from config.pbtxt. Each request is decoded on its own: a bad one gets INVALID_ARG naming the
problem and is counted in `crisis_rejected_posts_total{reason}` (docs/monitoring.md), the rest of
the batch is answered. Posts without an image: docs/text-only.md. Text at its own length
(preprocess.json trim_text, docs/fidelity.md): each request's ids are cut to its longest post
(trim_ids), rounded up to preprocess.json's text_lengths where the backend needs buckets.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from crisis_preprocess import (
    REJECTED_POSTS_METRIC,
    PreprocessError,
    PreprocessSpec,
    RejectReason,
    TextPreprocessor,
    compose_text,
    decode_utf8,
    modalities_used,
    preprocess_post_image,
    trim_ids,
)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        here = Path(__file__).resolve().parent
        self.spec = PreprocessSpec.from_json((here / "preprocess.json").read_text())
        self.text = TextPreprocessor(self.spec, assets_dir=here)
        self.image_name, self.text_name, self.caption_name = (t["name"] for t in config["input"])
        outputs = [t["name"] for t in config["output"]]
        self.pixels_name, self.ids_name, self.used_name = outputs[:3]
        self.present_name = outputs[3] if len(outputs) > 3 else None
        if self.spec.image_optional and self.present_name is None:
            # zero pixels through a head that cannot mask them would answer from nothing
            raise pb_utils.TritonModelException(
                "preprocess.json says image_optional, but this repository's head takes no "
                "image_present (it was not trained for posts without an image): set "
                "image_optional back to false (docs/text-only.md)"
            )
        # Every reason's series exists (at 0) from the start: rates and alerts see the first one.
        self.rejected_family = pb_utils.MetricFamily(
            name=REJECTED_POSTS_METRIC,
            description="Posts refused by preprocessing (INVALID_ARG answers), by reason",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        labels = {"model": args["model_name"], "version": args["model_version"]}
        self.rejected = {
            reason: self.rejected_family.Metric(labels={**labels, "reason": reason.value})
            for reason in RejectReason
        }

    def finalize(self):
        self.rejected.clear()  # the metrics go before their family (the backend requires it)
        self.rejected_family = None

    def _count_rejected(self, reason, request):
        """Adds the request's posts (rows of its text input) to the rejection counter."""
        try:
            text = pb_utils.get_input_tensor_by_name(request, self.text_name)
            rows = len(text.as_numpy()) if text is not None else 1
            self.rejected[reason].increment(max(rows, 1))
        except Exception as exc:  # counting never changes the answer
            pb_utils.Logger.log_warn(f"{REJECTED_POSTS_METRIC}: not counted: {exc}")

    def _rows(self, request):
        """(pixels [n, 3, S, S], texts [n], image_present [n, 1]) of one request, or
        PreprocessError."""
        text_tensor = pb_utils.get_input_tensor_by_name(request, self.text_name)
        if text_tensor is None:
            raise PreprocessError(
                f"the post has no '{self.text_name}' input: send the tweet text (an empty text "
                "for a photo posted without one)",
                reason=RejectReason.NO_TEXT,
            )
        texts = text_tensor.as_numpy()
        image_tensor = pb_utils.get_input_tensor_by_name(request, self.image_name)
        images = image_tensor.as_numpy() if image_tensor is not None else [None] * len(texts)
        caption_tensor = pb_utils.get_input_tensor_by_name(request, self.caption_name)
        captions = caption_tensor.as_numpy() if caption_tensor is not None else None
        if len(images) != len(texts) or (captions is not None and len(captions) != len(texts)):
            raise PreprocessError(
                "image, text and caption must have the same batch size",
                reason=RejectReason.BATCH_MISMATCH,
            )
        pixels, composed, present = [], [], []
        for i in range(len(images)):
            where = f" (row {i})" if len(images) > 1 else ""
            try:
                image = bytes(images[i][0]) if images[i] is not None else None
                row_pixels, row_present = preprocess_post_image(image, self.spec)
                pixels.append(row_pixels)
                present.append([row_present])
                tweet = decode_utf8(bytes(texts[i, 0]), "text")
                caption = (
                    decode_utf8(bytes(captions[i, 0]), "caption") if captions is not None else None
                )
            except PreprocessError as exc:
                raise PreprocessError(f"{exc}{where}", reason=exc.reason) from None
            composed.append(compose_text(tweet, caption, self.spec))
        return np.stack(pixels), composed, np.array(present, dtype=np.float32)

    def execute(self, requests):
        results = []
        for request in requests:
            try:
                results.append(self._rows(request))
            except PreprocessError as exc:
                self._count_rejected(exc.reason, request)
                results.append(pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG))
            except Exception as exc:  # anything unforeseen fails this request only
                self._count_rejected(RejectReason.INTERNAL, request)
                results.append(
                    pb_utils.TritonError(f"preprocessing failed: {type(exc).__name__}: {exc}")
                )
        good = [r for r in results if not isinstance(r, pb_utils.TritonError)]
        ids = self.text([t for _, texts, _ in good for t in texts]) if good else None
        responses, start = [], 0
        for result in results:
            if isinstance(result, pb_utils.TritonError):
                responses.append(pb_utils.InferenceResponse(error=result))
                continue
            pixels, texts, present = result
            n = len(texts)
            row_ids = ids[start : start + n]
            if self.spec.trim_text:
                row_ids = trim_ids(row_ids, self.text.eos_id, self.spec.text_lengths)
            tensors = [
                pb_utils.Tensor(self.pixels_name, pixels),
                pb_utils.Tensor(self.ids_name, row_ids),
                pb_utils.Tensor(
                    self.used_name, modalities_used(present, row_ids, self.text.eos_id)
                ),
            ]
            if self.present_name is not None:
                tensors.append(pb_utils.Tensor(self.present_name, present))
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += n
        return responses
