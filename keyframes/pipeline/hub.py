"""Where weights named by a hub id are: the Hugging Face cache, or the hub when it answers.

The pre-flight asks here before anything heavy loads. The hub is asked at most once per
process whether it answers (one request, a few seconds): when it does not, huggingface_hub is
put in offline mode for the rest of the process, so that no loader spends about 25 s per file
on retries ("Retrying in 8s" warnings) before it falls back to the cache."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

log = logging.getLogger("keyframes")
_unreachable = False  # set once the hub did not answer: offline mode is then ours, not the user's


def offline() -> bool:
    """The user set HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), as huggingface_hub reads it."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) and not _unreachable


@functools.cache
def reachable() -> bool:
    if offline():
        return False
    from huggingface_hub import constants, get_session

    global _unreachable
    try:
        get_session().head(constants.ENDPOINT, timeout=5)
    except Exception as e:  # noqa: BLE001 - any network error means "not now"
        log.info(
            "the Hugging Face hub (%s) does not answer (%s): using the cache only",
            constants.ENDPOINT,
            type(e).__name__,
        )
        _unreachable = True
        constants.HF_HUB_OFFLINE = True  # read at each request by huggingface_hub's session
        return False
    return True


def cached(repo: str, filename: str) -> Path | None:
    """The file of a hub repo in the local cache, or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename)
    return Path(found) if isinstance(found, str) else None


def fetch(repo: str, filename: str) -> Path | None:
    """The file from the cache, else downloaded when the hub answers; None when neither."""
    found = cached(repo, filename)
    if found is not None or not reachable():
        return found
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename))
    except Exception:  # noqa: BLE001 - no such file in the repo, or the download broke off
        return None


def where() -> str:
    """Where fetch looked, for messages."""
    from huggingface_hub import constants

    cache = f"the Hugging Face cache {constants.HF_HUB_CACHE} (set by HF_HOME / HF_HUB_CACHE)"
    if offline():
        return cache + "; HF_HUB_OFFLINE is set, so nothing is downloaded"
    return cache + ("" if reachable() else "; the hub could not be reached")


def missing(repo: str, filename: str, what: str, include: str) -> str | None:
    """Pre-flight for one hub repo: None when `filename` is cached or the hub answers (the
    loader then downloads); else what is missing and how to get it."""
    if cached(repo, filename) is not None or reachable():
        return None
    return (
        f"{what} ({repo}) is not available.\n  Looked for {filename} in {where()}.\n"
        f"  Download it on a machine with network: uv run hf download {repo} {include}"
    )
