"""vLLM's offline_inference_neuron_int8_quantization.py with only the import changed
(plus a model argument): s8 weight quantization, bucketed graphs and tensor
parallelism across two NeuronCores on an Inf2/Trn1 instance.

    python examples/offline_inference_neuron_int8_quantization.py [--model PATH]

Without a Neuron device, --cpu-reference runs the same settings through plexus's
CPU reference of the compiled Neuron model (see docs/neuron.md)."""
import argparse
import os

from plexus import LLM, SamplingParams

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default=None,
                    help="HF model directory or .gguf file (default: the bundled SmolLM2-135M-Instruct)")
parser.add_argument("--cpu-reference", action="store_true",
                    help="run on CPU through the reference backend instead of a Neuron device")
args = parser.parse_args()

# creates XLA hlo graphs for all the context length buckets.
os.environ["NEURON_CONTEXT_LENGTH_BUCKETS"] = "128,512,1024,2048"
# creates XLA hlo graphs for all the token gen buckets.
os.environ["NEURON_TOKEN_GEN_BUCKETS"] = "128,512,1024,2048"
# Quantizes neuron model weight to int8,
# The default config for quantization is int8 dtype.
os.environ["NEURON_QUANT_DTYPE"] = "s8"

# Sample prompts.
prompts = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]
# Create a sampling params object.
sampling_params = SamplingParams(temperature=0.8, top_p=0.95)

override_neuron_config = {"cast_logits_dtype": "bfloat16"}
if args.cpu_reference:
    override_neuron_config["backend"] = "cpu-reference"

# Create an LLM.
llm = LLM(
    model=args.model,
    max_num_seqs=8,
    # The max_model_len and block_size arguments are required to be same as
    # max sequence length when targeting neuron device: each sequence owns one
    # KV slot in transformers-neuronx's continuous batching.
    max_model_len=2048,
    block_size=2048,
    # The device can be automatically detected when AWS Neuron SDK is installed.
    # The device argument can be either unspecified for automated detection,
    # or explicitly assigned.
    device="neuron",
    quantization="neuron_quant",
    override_neuron_config=override_neuron_config,
    tensor_parallel_size=2)
# Generate texts from the prompts. The output is a list of RequestOutput objects
# that contain the prompt, generated text, and other information.
outputs = llm.generate(prompts, sampling_params)
# Print the outputs.
for output in outputs:
    prompt = output.prompt
    generated_text = output.outputs[0].text
    print(f"Prompt: {prompt!r}, Generated text: {generated_text!r}")
