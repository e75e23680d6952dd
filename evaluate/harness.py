"""Tasks of EleutherAI's lm-evaluation-harness on a lit_llama checkpoint (zero-shot by default)."""

import json
from pathlib import Path
from typing import Optional

from lit_llama.infer.load import LoadArgs
from lit_llama.io.checkpoint import DEFAULT_CHECKPOINT_DIR
from lit_llama.utils import run_cli

# the common-sense reasoning benchmarks of the LLaMA paper's Table 3
LLAMA_TASKS = "boolq,piqa,social_iqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa"


def main(
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    tasks: str = LLAMA_TASKS,
    num_fewshot: Optional[int] = None,
    limit: Optional[int] = None,
    include_path: Optional[Path] = None,
    output_path: Optional[Path] = None,
    loading: LoadArgs = LoadArgs(),
) -> None:
    """Run lm-eval tasks against the checkpoint through lit_llama's model adapter (no conversion);
    the harness downloads each task's data from the Hugging Face hub the first time.

    Args:
        checkpoint_dir: a checkpoint directory (a float one, or one written by quantize/gptq.py).
        tasks: comma-separated task names (default: the LLaMA paper's Table 3).
        num_fewshot: examples in each prompt (default: each task's own, zero for those above).
        limit: evaluate only the first this many documents of each task (a quick estimate).
        include_path: a folder of your own task YAML files.
        output_path: also write the results as JSON there.
    """
    # lm_eval is the optional `eval` extra: imported here, so that --help works without it and its
    # absence is one line (lit_llama.eval.harness says how to install it)
    from lit_llama.eval.harness import LitLLaMALM, load_tasks, run_tasks
    from lm_eval.utils import make_table

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    manager = load_tasks(names, str(include_path) if include_path else None)
    lm = LitLLaMALM(str(checkpoint_dir), quantize=loading.quantize, precision=loading.precision)
    results = run_tasks(lm, names, manager, num_fewshot, limit)

    print(make_table(results))
    if output_path is not None:
        Path(output_path).write_text(json.dumps(results["results"], indent=2, default=str))


if __name__ == "__main__":
    run_cli(main)
