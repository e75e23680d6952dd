"""Download a LLaMA-architecture model from the Hugging Face hub and convert it to a checkpoint dir."""

from pathlib import Path
from typing import Optional

from lit_llama.io.convert import convert_hf_checkpoint
from lit_llama.utils import UserError


def download_hf(repo_id: str, output_dir: Optional[Path] = None, download_dir: Optional[Path] = None,
                access_token: Optional[str] = None, dtype: Optional[str] = None) -> Path:
    """Fetch the config, weights and tokenizer of `repo_id` ("org/name") into `download_dir`
    (default checkpoints/hf/org/name), then convert them into `output_dir` (default
    checkpoints/name). Returns the output directory."""
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts):
        raise UserError(f"repo_id {repo_id!r} is not of the form org/name")
    download_dir = Path(download_dir or Path("checkpoints/hf") / repo_id)
    output_dir = Path(output_dir or Path("checkpoints") / parts[1])
    unreachable = f"cannot reach the Hugging Face hub to download {repo_id}"
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"{unreachable}: HF_HUB_OFFLINE is set (to convert files already downloaded, "
                        f"run scripts/convert_hf_checkpoint.py)")
    try:
        # one request (no retries, unlike the tree listing) tells whether the hub answers and which
        # weight format the repo has
        files = [s.rfilename for s in HfApi(token=access_token).model_info(repo_id).siblings or []]
        # "model*" skips duplicates some repos carry in another layout (e.g. consolidated.safetensors)
        weights = "model*.safetensors" if any(f.startswith("model") and f.endswith(".safetensors") for f in files) \
            else "*.safetensors" if any(f.endswith(".safetensors") for f in files) else "*.bin"
        snapshot_download(repo_id, local_dir=download_dir, token=access_token,
                          allow_patterns=["*.json", weights, "tokenizer.model", "chat_template.jinja"])
    except GatedRepoError:
        raise UserError(f"{repo_id} is gated: accept its license on https://huggingface.co/{repo_id}, "
                        f"then pass --access_token (or set HF_TOKEN)")
    except RepositoryNotFoundError:
        raise UserError(f"{repo_id} was not found on the Hugging Face hub (a private repo needs --access_token)")
    except Exception as e:
        # huggingface_hub raises its own HTTP errors and its HTTP client's transport errors, which
        # differ between versions; everything raised by these two calls is a failed download
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise UserError(f"{unreachable}: {type(e).__name__}: {reason}")
    convert_hf_checkpoint(download_dir, output_dir, dtype=dtype)
    return output_dir
