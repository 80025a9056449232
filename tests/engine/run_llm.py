"""One data-parallel rank of an offline vLLM engine, as vLLM's offline data-parallel example
runs it (VLLM_DP_RANK, VLLM_DP_SIZE, VLLM_DP_MASTER_IP/PORT set by the caller).

Usage: python run_llm.py JOB.json OUT.json, where the job holds `model`, `prompts` (lists of
token ids, this rank's share), `max_tokens`, `expert_parallel` (bool) and
`additional_config` (dict or null). Writes, per prompt, the greedy `token_ids` and, per
generated token, `logprob` of the chosen token and `margin` (its lead over the runner-up).
"""

from __future__ import annotations

import json
import sys
from typing import Any


def main(job_path: str, out_path: str) -> None:
    with open(job_path) as f:
        job = json.load(f)
    from vllm import LLM, SamplingParams

    options: dict[str, Any] = {}
    if job["expert_parallel"]:
        options.update(enable_expert_parallel=True, all2all_backend="allgather_reducescatter")
    if job["additional_config"] is not None:
        options["additional_config"] = job["additional_config"]
    llm = LLM(
        model=job["model"],
        dtype="bfloat16",
        enforce_eager=True,
        max_model_len=256,
        max_num_batched_tokens=256,
        max_num_seqs=8,
        seed=0,
        **options,
    )
    params = SamplingParams(
        temperature=0.0, max_tokens=job["max_tokens"], logprobs=2, ignore_eos=True
    )
    outputs = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]], params)
    results = []
    for output in outputs:
        completion = output.outputs[0]
        steps = []
        for token, candidates in zip(completion.token_ids, completion.logprobs, strict=True):
            chosen = candidates[token].logprob
            others = [c.logprob for t, c in candidates.items() if t != token]
            steps.append({"logprob": chosen, "margin": chosen - max(others, default=-1e9)})
        results.append({"token_ids": list(completion.token_ids), "steps": steps})
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
