# The same prompts on the two executor backends: "uni" runs the worker (the model and its KV cache) in this
# process, "mp" in a process of its own. Greedy output is the same token for token.
#
#     python examples/offline_inference/executor_backends.py
#
# No `if __name__ == "__main__":` guard is needed: a worker process starts a fresh interpreter and never
# imports this script.

from plexus import LLM, SamplingParams

prompts = ["Hello, my name is", "The capital of France is", "The future of AI is"]
sampling_params = SamplingParams(temperature=0, max_tokens=16)

texts = {}
for backend in ("uni", "mp"):
    llm = LLM(max_model_len=512, distributed_executor_backend=backend)
    texts[backend] = [output.outputs[0].text for output in llm.generate(prompts, sampling_params)]
    llm.llm_engine.shutdown()
    for prompt, text in zip(prompts, texts[backend]):
        print(f"[{backend}] {prompt!r} -> {text!r}")

print(f"identical: {texts['uni'] == texts['mp']}")
