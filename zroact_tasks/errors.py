"""zroact's exceptions.

::

    ZroactError
    ├── InputError                 bad input; never retried; CLI exit code 3
    │   ├── VideoError             the video cannot be used
    │   │   ├── VideoNotFoundError     missing path, or not a regular file
    │   │   ├── VideoDecodeError       empty, not a video, or nothing decodes
    │   │   ├── VideoTooShortError     fewer frames than one keyframe stride
    │   │   ├── VideoLimitError        over MAX_FRAMES / MAX_PIXELS / MAX_DURATION_S
    │   │   ├── MediaRootError         resolves outside MEDIA_ROOT
    │   │   ├── StreamNotAllowedError  a live source outside STREAM_SOURCES
    │   │   └── StreamError            a live source that cannot be opened
    │   ├── ModelError             the ONNX model is missing, unreadable or of the wrong layout
    │   ├── LabelsError            the labels file is unreadable or its count differs from C
    │   └── PromptError            the prompt is empty or too long
    ├── ConfigError                a setting is invalid (e.g. Stage 2 concurrency outside 2–3)
    ├── ClusterUnavailableError    the cluster's Redis does not answer
    ├── FrameMissingError          a frame is not in the store (expired, deleted, cancelled)
    ├── PoisonTaskError            a task killed its worker on every delivery; not run again
    ├── VLMError                   Stage 2 failed
    │   ├── VLMUnavailableError        transient: refused, timed out, HTTP 5xx/429; retried
    │   └── VLMResponseError           permanent: HTTP 4xx, not JSON, breaks the verdict schema,
    │                                  or cut off by max_tokens; not retried
    ├── JobNotFoundError           no such job id
    └── JobTimeoutError            waiting for a job took longer than asked

Celery's JSON result backend rebuilds an exception as ``cls(*exc.args)``: every class here passes
its constructor arguments to ``super().__init__`` so it survives the trip.
"""

from __future__ import annotations


class ZroactError(Exception):
    """Base of every zroact error."""


class InputError(ZroactError):
    """Bad input named by the user (video, model, labels, prompt). Never retried."""

    def __init__(self, subject: str, reason: str) -> None:
        super().__init__(subject, reason)
        self.subject, self.reason = subject, reason

    def __str__(self) -> str:
        return f"{self.subject}: {self.reason}"


class VideoError(InputError):
    """The video cannot be used."""


class StreamNotAllowedError(VideoError):
    """A live source whose URL no ``STREAM_SOURCES`` prefix allows."""


class StreamError(VideoError):
    """A live source that cannot be opened (refused, not a video, nothing within the timeout)."""


class VideoNotFoundError(VideoError):
    """The path does not exist or is not a regular file."""


class VideoDecodeError(VideoError):
    """The file is empty, not a video, or no frame decodes."""


class VideoTooShortError(VideoError):
    """The video has fewer frames than one keyframe stride, so no keyframe."""


class VideoLimitError(VideoError):
    """The video is over a configured limit (frames, pixels or duration)."""


class MediaRootError(VideoError):
    """The path resolves outside ``MEDIA_ROOT``."""


class ModelError(InputError):
    """The ONNX model is missing, not ONNX, or not in the YOWOv3 layout."""


class ModelConflictError(ZroactError):
    """A Stage 1 worker's model differs from the one live workers on its queue serve."""


class FrameSizeError(InputError):
    """Stage 1 frames were stored for a model of another input size than this worker's."""


class LabelsError(InputError):
    """The labels file is unreadable or has a different count than the model's classes."""


class PromptError(InputError):
    """The prompt is empty or longer than ``MAX_PROMPT_CHARS``."""


class ConfigError(ZroactError):
    """A setting has a value zroact refuses to run with."""


class ClusterUnavailableError(ZroactError):
    """The cluster's Redis does not answer (down, wrong URL or password)."""


class FrameMissingError(ZroactError):
    """Frames a task needs are not in the store (expired, deleted, or the job was cancelled)."""

    def __init__(self, job_id: str, frames: list[int]) -> None:
        super().__init__(job_id, frames)
        self.job_id, self.frames = job_id, frames

    def __str__(self) -> str:
        return f"job {self.job_id}: frames {self.frames} are not in the frame store"


class PoisonTaskError(ZroactError):
    """A task was delivered ``MAX_TASK_DELIVERIES`` times without finishing: each time its worker
    process died (a crashing input or runtime). ``task_reject_on_worker_lost`` would requeue it
    forever; zroact records this error instead of running it again."""

    def __init__(self, task_id: str, deliveries: int) -> None:
        super().__init__(task_id, deliveries)
        self.task_id, self.deliveries = task_id, deliveries

    def __str__(self) -> str:
        return (f"task {self.task_id} killed its worker on {self.deliveries - 1} deliveries; "
                "not run again")


class VLMError(ZroactError):
    """Stage 2 failed."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class VLMUnavailableError(VLMError):
    """Transient VLM failure: connection refused, timeout, HTTP 5xx or 429. Retried."""


class VLMResponseError(VLMError):
    """Permanent VLM failure: HTTP 4xx, a body that is not JSON, a verdict that breaks the
    schema, or a generation cut off by ``max_tokens``. Not retried."""


class VLMContextError(VLMResponseError):
    """A slot's request cannot fit the VLM's context even with its frames at the smallest size
    the model takes (raised before sending: the server would answer 400 for length)."""


class JobNotFoundError(ZroactError):
    """No job with this id is known to the cluster (never submitted, or expired)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id

    def __str__(self) -> str:
        return f"no job {self.job_id} (never submitted, or its records expired)"


class JobTimeoutError(ZroactError):
    """``Job.wait(timeout)`` ran out before the job ended."""

    def __init__(self, job_id: str, timeout: float) -> None:
        super().__init__(job_id, timeout)
        self.job_id, self.timeout = job_id, timeout

    def __str__(self) -> str:
        return f"job {self.job_id} did not end within {self.timeout:g} s"


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (a library's may run to a traceback's length),
    or its class name."""
    text = str(exc).strip().splitlines()
    return text[0][:limit] if text else type(exc).__name__
