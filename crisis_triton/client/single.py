"""One post: `classify_post(PostRequest)` reads its image, checks that the served model is ready
and returns its predictions, one per task."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from crisis_triton.client.inputs import read_image
from crisis_triton.client.options import ClientOptions, open_client, warn_if_random
from crisis_triton.client.output import log_line
from crisis_triton.client.results import Prediction


@dataclass(frozen=True)
class PostRequest:
    """A post to classify: its image file (None: a text-only post), text and optional caption;
    `tasks` to report (None: every served one), `top_k` classes per task (None: all); the server:
    `client`."""

    image: Path | None
    text: str
    caption: str | None = None
    tasks: list[str] | None = None
    top_k: int | None = None
    client: ClientOptions = field(default_factory=ClientOptions)


def classify_post(
    request: PostRequest, log: Callable[[str], None] = log_line
) -> dict[str, Prediction]:
    """{task: Prediction} of the post. Raises `InputError` (the image file), `UsageError` (options
    the client refuses) or the `ClientError` of what went wrong; -v lines go to `log`."""
    image = read_image(request.image) if request.image is not None else None
    with open_client(request.client, log) as client:
        client.check_ready()
        warn_if_random(client)
        return client.classify(image, request.text, request.caption, request.tasks, request.top_k)
