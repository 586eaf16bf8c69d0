# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""
This example shows how to use LoRA with different quantization techniques
for offline inference.

vLLM's examples/offline_inference/lora_with_quantization_inference.py with
plexus's imports. vLLM's hub models and adapters (Llama-7B + QLoRA-flan,
TinyLlama AWQ/GPTQ + a "colorist" LoRA) are replaced by local ones that
examples/make_lora_assets.py makes from the bundled SmolLM2-135M-Instruct:
the SmolLM2 directory quantized on load by bitsandbytes with the "pirate"
adapter, and AWQ and GPTQ checkpoints made by `plexus quantize` with the
"colorist" adapter. They are made first if missing (several minutes on a CPU;
--quick: a minute or two).

    python examples/lora_with_quantization_inference.py [--assets DIR] [--quick]
        [--max-tokens N]
"""

import argparse
import gc
import importlib.util
import os
import pathlib

import torch

from plexus import EngineArgs, LLMEngine, RequestOutput, SamplingParams
from plexus.lora.request import LoRARequest

HERE = pathlib.Path(__file__).resolve().parent


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
    return [
        # this is an example of using quantization without LoRA
        (
            "My name is",
            SamplingParams(temperature=0.0, logprobs=1, max_tokens=max_tokens),
            None,
        ),
        # the next three examples use quantization with LoRA
        (
            "my name is",
            SamplingParams(temperature=0.0, logprobs=1, max_tokens=max_tokens),
            LoRARequest(lora_name="lora-test-1", lora_path=lora_path),
        ),
        (
            "The capital of USA is",
            SamplingParams(temperature=0.0, logprobs=1, max_tokens=max_tokens),
            LoRARequest(lora_name="lora-test-2", lora_path=lora_path),
        ),
        (
            "The capital of France is",
            SamplingParams(temperature=0.0, logprobs=1, max_tokens=max_tokens),
            LoRARequest(lora_name="lora-test-3", lora_path=lora_path),
        ),
    ]


def process_requests(
    engine: LLMEngine,
    test_prompts: list[tuple[str, SamplingParams, LoRARequest | None]],
):
    """Continuously process a list of prompts and handle the outputs."""
    request_id = 0

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
                print("----------------------------------------------------")
                print(f"Prompt: {request_output.prompt}")
                print(f"Output: {request_output.outputs[0].text}")


def initialize_engine(
    model: str, quantization: str, lora_repo: str | None
) -> LLMEngine:
    """Initialize the LLMEngine."""

    if quantization == "bitsandbytes":
        # QLoRA (https://arxiv.org/abs/2305.14314) is a quantization technique.
        # It quantizes the model when loading, with some config info from the
        # LoRA adapter repo. So need to set the parameter of load_format and
        # qlora_adapter_name_or_path as below.
        engine_args = EngineArgs(
            model=model,
            quantization=quantization,
            qlora_adapter_name_or_path=lora_repo,
            load_format="bitsandbytes",
            enable_lora=True,
            max_lora_rank=64,
            max_loras=4,
        )
    else:
        engine_args = EngineArgs(
            model=model,
            quantization=quantization,
            enable_lora=True,
            max_lora_rank=64,
            max_loras=4,
        )
    return LLMEngine.from_engine_args(engine_args)


def main(assets_dir: str | None = None, quick: bool = False, max_tokens: int = 128):
    """Main function that sets up and runs the prompt processing."""

    assets = local_assets(assets_dir, quick)
    test_configs = [
        # QLoRA (https://arxiv.org/abs/2305.14314)
        {
            "name": "qlora_inference_example",
            "model": assets["bitsandbytes"],
            "quantization": "bitsandbytes",
            "lora_repo": assets["adapters"]["pirate"],
        },
        {
            "name": "AWQ_inference_with_lora_example",
            "model": assets["awq"],
            "quantization": "awq",
            "lora_repo": assets["adapters"]["colorist"],
        },
        {
            "name": "GPTQ_inference_with_lora_example",
            "model": assets["gptq"],
            "quantization": "gptq",
            "lora_repo": assets["adapters"]["colorist"],
        },
    ]

    for test_config in test_configs:
        print(f"~~~~~~~~~~~~~~~~ Running: {test_config['name']} ~~~~~~~~~~~~~~~~")
        engine = initialize_engine(
            test_config["model"], test_config["quantization"], test_config["lora_repo"]
        )
        lora_path = snapshot_download(repo_id=test_config["lora_repo"])
        test_prompts = create_test_prompts(lora_path, max_tokens)
        process_requests(engine, test_prompts)

        # Clean up the GPU memory for the next test
        del engine
        gc.collect()
        torch.cuda.empty_cache()


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
