# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""
This example shows how to use the multi-LoRA functionality
for offline inference.

vLLM's examples/offline_inference/multilora_inference.py with plexus's
imports. vLLM's Llama-2-7B and its SQL LoRA adapter from the hub are replaced
by the bundled SmolLM2-135M-Instruct and the "sql" adapter (r=8 on q_proj and
v_proj) that examples/make_lora_assets.py trains for it. The assets are made
first if missing (several minutes on a CPU; --quick: a minute or two).

    python examples/multilora_inference.py [--assets DIR] [--quick] [--max-tokens N]
"""

import argparse
import importlib.util
import os
import pathlib

from plexus import EngineArgs, LLMEngine, RequestOutput, SamplingParams
from plexus.lora.request import LoRARequest

HERE = pathlib.Path(__file__).resolve().parent
SQL_PROMPT = "[user] Write a SQL query to answer the question based on the table schema.\n\n context: CREATE TABLE table_name_74 (icao VARCHAR, airport VARCHAR)\n\n question: Name the ICAO for lilongwe international airport [/user] [assistant]"  # noqa: E501
# vLLM stops the SQL answers at token 32003, an end-of-answer token that its adapter's Llama-2 vocabulary
# adds; SmolLM2's adapter was trained to end its answer with <|im_end|>, token 2.
STOP_TOKEN_IDS = [2]


def _assets_module():
    """examples/make_lora_assets.py, loaded by path (so this also runs through runpy, from any directory)."""
    spec = importlib.util.spec_from_file_location("make_lora_assets", HERE / "make_lora_assets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def snapshot_download(repo_id: str) -> str:
    return _assets_module().snapshot_download(repo_id)


def local_assets(assets_dir: str | None, quick: bool) -> dict:
    """The paths of the models and adapters made by examples/make_lora_assets.py."""
    module = _assets_module()
    return module.make_assets(assets_dir or module.DEFAULT_OUT, quick=quick)


def create_test_prompts(
    lora_path: str, max_tokens: int = 128
) -> list[tuple[str, SamplingParams, LoRARequest | None]]:
    """Create a list of test prompts with their sampling parameters.

    2 requests for base model, 4 requests for the LoRA. We define 2
    different LoRA adapters (using the same model for demo purposes).
    Since we also set `max_loras=1`, the expectation is that the requests
    with the second LoRA adapter will be run after all requests with the
    first adapter have finished.
    """
    return [
        (
            "A robot may not injure a human being",
            SamplingParams(
                temperature=0.0, logprobs=1, prompt_logprobs=1, max_tokens=max_tokens
            ),
            None,
        ),
        (
            "To be or not to be,",
            SamplingParams(
                temperature=0.8, top_k=5, presence_penalty=0.2, max_tokens=max_tokens
            ),
            None,
        ),
        (
            SQL_PROMPT,
            SamplingParams(
                temperature=0.0,
                logprobs=1,
                prompt_logprobs=1,
                max_tokens=max_tokens,
                stop_token_ids=STOP_TOKEN_IDS,
            ),
            LoRARequest("sql-lora", 1, lora_path),
        ),
        (
            SQL_PROMPT,
            SamplingParams(
                temperature=0.0,
                logprobs=1,
                prompt_logprobs=1,
                max_tokens=max_tokens,
                stop_token_ids=STOP_TOKEN_IDS,
            ),
            LoRARequest("sql-lora2", 2, lora_path),
        ),
    ]


def process_requests(
    engine: LLMEngine,
    test_prompts: list[tuple[str, SamplingParams, LoRARequest | None]],
):
    """Continuously process a list of prompts and handle the outputs."""
    request_id = 0

    print("-" * 50)
    while test_prompts or engine.has_unfinished_requests():
        if test_prompts:
            prompt, sampling_params, lora_request = test_prompts.pop(0)
            engine.add_request(
                str(request_id), prompt, sampling_params, lora_request=lora_request
            )
            request_id += 1

        request_outputs: list[RequestOutput] = engine.step()

        for request_output in request_outputs:
            if request_output.finished:
                print(request_output)
                print("-" * 50)


def initialize_engine(model: str) -> LLMEngine:
    """Initialize the LLMEngine."""
    # max_loras: controls the number of LoRAs that can be used in the same
    #   batch. Larger numbers will cause higher memory usage, as each LoRA
    #   slot requires its own preallocated tensor.
    # max_lora_rank: controls the maximum supported rank of all LoRAs. Larger
    #   numbers will cause higher memory usage. If you know that all LoRAs will
    #   use the same rank, it is recommended to set this as low as possible.
    # max_cpu_loras: controls the size of the CPU LoRA cache.
    engine_args = EngineArgs(
        model=model,
        enable_lora=True,
        max_loras=1,
        max_lora_rank=8,
        max_cpu_loras=2,
        max_num_seqs=256,
    )
    return LLMEngine.from_engine_args(engine_args)


def main(assets_dir: str | None = None, quick: bool = False, max_tokens: int = 128):
    """Main function that sets up and runs the prompt processing."""
    assets = local_assets(assets_dir, quick)
    engine = initialize_engine(assets["base"])
    lora_path = snapshot_download(repo_id=assets["adapters"]["sql"])
    test_prompts = create_test_prompts(lora_path, max_tokens)
    process_requests(engine, test_prompts)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--assets",
        default=os.environ.get("PLEXUS_LORA_ASSETS"),
        help="directory of make_lora_assets.py's output (default: $PLEXUS_LORA_ASSETS "
        "or examples/lora_assets)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="make missing assets with make_lora_assets.py --quick"
    )
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    main(args.assets, args.quick, args.max_tokens)
