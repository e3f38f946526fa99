"""Caption stage: images in messages become text. For now images pass through unchanged.

The vision model is its own piece of work; until it lands, image parts are kept as they are and the
extract stage reads only the text parts (captions a caller already put in the text, such as LoCoMo's
BLIP captions, are used as text).
"""

from __future__ import annotations

from memq.models import AddJob
from pipeline.types import CaptionedMessages


def caption(job: AddJob) -> CaptionedMessages:
    """Return the job's messages for extraction (images passed through, no model call).

    Args:
        job: the add job.

    Returns:
        The messages, unchanged, with zero usage.
    """
    return CaptionedMessages(messages=list(job.messages))
