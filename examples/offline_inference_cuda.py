"""vLLM's basic offline example on an NVIDIA GPU, with only the import changed (plus a model argument): the
KV cache from gpu_memory_utilization, CUDA graphs for decode steps (--enforce-eager turns them off).

    python examples/offline_inference_cuda.py [--model PATH] [--enforce-eager]

Without a GPU it stops with the reason (no CUDA build of torch, or no visible GPU); see docs/cuda.md."""
import argparse

from plexus import LLM, SamplingParams

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default=None,
                    help="HF model directory, hub id or .gguf file (default: the bundled SmolLM2-135M-Instruct)")
parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
args = parser.parse_args()

# Sample prompts.
prompts = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]
# Create a sampling params object.
sampling_params = SamplingParams(temperature=0.8, top_p=0.95)

# Create an LLM on the GPU: 90% of its memory for weights, activations and the KV cache.
llm = LLM(model=args.model, device="cuda", dtype="bfloat16", gpu_memory_utilization=0.9,
          enforce_eager=args.enforce_eager)
# Generate texts from the prompts. The output is a list of RequestOutput objects
# that contain the prompt, generated text, and other information.
outputs = llm.generate(prompts, sampling_params)
# Print the outputs.
for output in outputs:
    prompt = output.prompt
    generated_text = output.outputs[0].text
    print(f"Prompt: {prompt!r}, Generated text: {generated_text!r}")
