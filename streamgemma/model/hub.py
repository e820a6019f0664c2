"""Hugging Face Hub model ids: `sg.load("google/recurrentgemma-2b-it")`.

The id is resolved by `huggingface_hub` (an optional dependency), so its
cache (HF_HOME), offline mode (HF_HUB_OFFLINE=1) and token (HF_TOKEN, or
`hf auth login`) work as for every other Hub library. Only the files a
checkpoint needs are fetched.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import CheckpointError

MODEL_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name, as the Hub spells repository ids
FILES = ("config.json", "model.safetensors", "model-*.safetensors", "model.safetensors.index.json",
         "tokenizer.model")


def is_model_id(path: str | os.PathLike) -> bool:
    """True for an "owner/name" string that names no local file or directory."""
    return isinstance(path, str) and MODEL_ID.fullmatch(path) is not None and not Path(path).exists()


def download(model_id: str) -> Path:
    """The local directory of `model_id`'s checkpoint files: from the
    huggingface_hub cache, fetched into it first unless offline.
    CheckpointError says what to do when that is not possible."""
    try:
        import huggingface_hub
        from huggingface_hub import constants, errors
    except ImportError:
        raise CheckpointError(f"{model_id}: no such file or directory; to load it from the Hugging Face Hub, "
                              f"install huggingface_hub (pip install 'streamgemma[hub]')") from None
    page = f"https://huggingface.co/{model_id}"
    try:
        return Path(huggingface_hub.snapshot_download(model_id, allow_patterns=list(FILES)))
    except errors.GatedRepoError:
        problem = (f"the model is gated: accept its licence at {page} with your account, then log in "
                   f"(hf auth login, or set HF_TOKEN)")
    except errors.RepositoryNotFoundError:
        problem = ("no such local path, and no such model on the Hugging Face Hub (a private or gated model "
                   "needs a login: hf auth login, or set HF_TOKEN)")
    except errors.LocalEntryNotFoundError:
        reason = ("offline mode is on (HF_HUB_OFFLINE=1): download it once while online" if constants.HF_HUB_OFFLINE
                  else "the Hub cannot be reached: check the network, or download it where it can be")
        problem = (f"no such local path, and not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                   f"{reason}, e.g. hf download {model_id}")
    except (OSError, ValueError) as e:  # HTTP errors, a full disk, an invalid id
        problem = f"no such local path, and it cannot be fetched from the Hugging Face Hub: {_first_line(e)}"
    raise CheckpointError(f"{model_id}: {problem}")


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
