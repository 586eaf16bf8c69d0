"""Offline batched generation: vLLM's basic example, with only the import changed.

    python examples/offline_inference.py [--model PATH]

Without --model it runs the bundled SmolLM2-135M-Instruct.
"""
import argparse

from plexus import LLM, SamplingParams

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=None, help="HF model directory or .gguf file (default: bundled SmolLM2)")
args = parser.parse_args()

# Sample prompts.
prompts = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]
# Create a sampling params object.
sampling_params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=48)

# Create an LLM.
llm = LLM(model=args.model)
# Generate texts from the prompts. The output is a list of RequestOutput objects
# that contain the prompt, generated text, and other information.
outputs = llm.generate(prompts, sampling_params)
# Print the outputs.
print("\nGenerated Outputs:\n" + "-" * 60)
for output in outputs:
    prompt = output.prompt
    generated_text = output.outputs[0].text
    print(f"Prompt:    {prompt!r}")
    print(f"Output:    {generated_text!r}")
    print("-" * 60)

# The bundled model is an instruct model: chat with it through its chat template.
conversation = [{"role": "user", "content": "Write one sentence about the sea."}]
reply = llm.chat(conversation, SamplingParams(temperature=0, max_tokens=48), use_tqdm=False)[0]
print(f"Chat:      {reply.outputs[0].text!r}")
