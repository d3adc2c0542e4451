"""The names the client shares with the server: tasks and their labels, model, tensor and config
parameter names.

Standard library only (and nothing else of the project), so the thin client (`pip install .`,
`client/`) imports it without numpy's image stack, tokenizers, ONNX Runtime or torch.
`crisis_triton/contract/spec.py` re-exports every name here and builds the tensor specs of every
graph from them.
"""

from __future__ import annotations

# ------------------------------------------------------------------------------ tasks and labels

LABELS: dict[str, tuple[str, ...]] = {
    "task1": ("not_informative", "informative"),
    "task2": (
        "infrastructure_and_utility_damage",
        "not_humanitarian",
        "other_relevant_information",
        "rescue_volunteering_or_donation_effort",
        "vehicle_damage",
        "affected_individuals",
    ),
    "task2_full": (
        "infrastructure_and_utility_damage",
        "not_humanitarian",
        "other_relevant_information",
        "rescue_volunteering_or_donation_effort",
        "vehicle_damage",
        "affected_individuals",
        "injured_or_dead_people",
        "missing_or_found_people",
    ),
    "task3": ("little_or_no_damage", "mild_damage", "severe_damage"),
}
ALL_TASKS: tuple[str, ...] = tuple(LABELS)
DEFAULT_TASKS: tuple[str, ...] = ("task1", "task2", "task3")


def probs_name(task: str) -> str:
    """Name of a task's probability output, in the head graph and the ensemble alike."""
    return f"probs_{task}"


def label_file(task: str) -> str:
    return f"labels_{task}.txt"


def task_of_output(name: str) -> str | None:
    task = name.removeprefix("probs_")
    return task if name.startswith("probs_") and task in LABELS else None


# The two modalities of a post, in the order of every [image, text] tensor below.
MODALITIES: tuple[str, ...] = ("image", "text")


def modality_weights_name(task: str) -> str:
    """Name of a task's modality weights output ([image, text], the cma_clip head's modality-wise
    attention), in the head graph and the ensemble alike."""
    return f"modality_weights_{task}"


def task_of_modality_weights(name: str) -> str | None:
    task = name.removeprefix("modality_weights_")
    return task if name.startswith("modality_weights_") and task in LABELS else None


# ----------------------------------------------------------------------------- model names

ENSEMBLE = "crisis_classifier"
PREPROCESS = "preprocess"
IMAGE_ENCODER = "image_encoder"
TEXT_ENCODER = "text_encoder"
HEAD = "fusion_head"

# Ensemble config parameter telling clients where the weights came from ("RANDOM ..." when random).
WEIGHTS_PARAMETER = "weights"
RANDOM_WEIGHTS_NOTE = "RANDOM weights: for tests and demos, predictions are meaningless"
# The segment of that parameter ("; "-separated) saying how well the served heads answer posts
# without an image, from their head files' test metrics (or that no such figure exists):
# "text-only posts: task1 accuracy 0.78 on the head's test split (full posts 0.89); ...".
TEXT_ONLY_NOTE_PREFIX = "text-only posts:"
# Ensemble config parameter naming the encoders' precision when it is not fp32 (int8, bf16, fp16).
PRECISION_PARAMETER = "precision"

# ------------------------------------------------------------------------------- tensor names

# Ensemble / preprocess request inputs (raw post).
IMAGE_INPUT = "image"
TEXT_INPUT = "text"
CAPTION_INPUT = "caption"
# Intermediate tensors.
PIXELS = "pixel_values"
INPUT_IDS = "input_ids"
IMAGE_FEATURES = "image_features"
TEXT_FEATURES = "text_features"
# The encoders' token sequences (the cma_clip head): image tokens [1+P, Di], text tokens [T, Dt]
# and the text mask [T] (1.0 up to and including the end-of-text token).
IMAGE_TOKENS = "image_tokens"
TEXT_TOKENS = "text_tokens"
TEXT_MASK = "text_mask"
# Preprocess output [1]: 1.0 when the post has an image, 0.0 for a text-only post (zero pixels).
IMAGE_PRESENT = "image_present"
# Ensemble output [2] = [image, text] (MODALITIES): 1.0 where that modality of the post went into
# the answer (image: the post had one; text: its cleaned text was not empty).
MODALITIES_USED = "modalities_used"
