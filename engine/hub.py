"""Hub ids (`--model org/name`): transformers' cache first, the network only when it answers.

A model already in the HuggingFace cache loads with local_files_only (no request at all, so it works
offline and starts fast). Otherwise we ask the hub once, with a short timeout and no retries,
whether it is reachable: huggingface_hub's own client retries a refused connection five times with
backoff (about 25 s per file, 50 s for a config and a tokenizer), which is no way to say "no network".
An unreachable hub is a one-line error that says how to use a local folder instead.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request

from .errors import UserError

PROBE_TIMEOUT_S = 5.0


def endpoint() -> str:
    """The hub's base URL as huggingface_hub sees it (HF_ENDPOINT overrides huggingface.co)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def cached(repo_id: str) -> bool:
    """Whether the repo's config is in the local HuggingFace cache (its weights came with it)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    return isinstance(found, str)


def reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the hub answers at all (any HTTP status); else why not, in a few words."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:  # 401/404/...: the hub is there; transformers reports the details
        return None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return str(reason) or type(e).__name__
    return None


def how_to_use_a_folder(repo_id: str) -> str:
    return (f"download it where the hub is reachable (`hf download {repo_id} --local-dir DIR`, or "
            f"`huggingface-cli download`), copy DIR here and pass --model DIR")


def access(repo_id: str) -> dict:
    """Keyword arguments for transformers' from_pretrained, or a one-line UserError when neither the
    cache nor the hub can provide the model."""
    if cached(repo_id):
        return {"local_files_only": True}
    if offline():
        raise UserError(f"model '{repo_id}' is not in the HuggingFace cache and HF_HUB_OFFLINE is set; "
                        + how_to_use_a_folder(repo_id))
    base = endpoint()
    why = reachable(f"{base}/api/models/{repo_id}")
    if why is not None:
        raise UserError(f"model '{repo_id}': the hub ({base}) is unreachable ({why}) and the model is not in the "
                        "HuggingFace cache; " + how_to_use_a_folder(repo_id))
    return {}
