"""The ``plexus`` command line."""
from __future__ import annotations

import argparse
import os
import sys


def _generate(args: argparse.Namespace) -> int:
    from plexus.core.sampling_params import SamplingParams
    from plexus.entrypoints.llm import LLM

    # Sampling settings first: a typo fails before the model loads.
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    llm = LLM(model=args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
              seed=args.seed)
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params, use_tqdm=False)
    else:
        outputs = llm.generate(args.prompts, params, use_tqdm=False)
    for output in outputs:
        for completion in output.outputs:
            if len(args.prompts) > 1:
                print(f"--- {output.prompt!r}")
            print(completion.text)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from plexus.entrypoints.openai.api_server import run_server

    return run_server(args)


def _neuron_buckets(args: argparse.Namespace) -> int:
    from plexus.core.buckets import parse_buckets
    from plexus.platforms.neuron.advisor import advise_buckets, load_request_lengths

    def current(flag: str, text: str | None, variable: str) -> list[int] | None:
        # The flag, else the variable a Neuron deployment already sets; errors name whichever was used.
        name = flag
        if text is None:
            text, name = os.environ.get(variable), variable
        return None if text is None else parse_buckets(text, name, args.max_model_len, "--max-model-len")

    requests = load_request_lengths(args.requests)
    advice = advise_buckets(
        requests, args.max_buckets, max_context_buckets=args.max_context_buckets,
        max_token_gen_buckets=args.max_token_gen_buckets, multiple_of=args.multiple_of,
        max_model_len=args.max_model_len,
        current_context_buckets=current("--context-buckets", args.context_buckets, "NEURON_CONTEXT_LENGTH_BUCKETS"),
        current_token_gen_buckets=current("--token-gen-buckets", args.token_gen_buckets, "NEURON_TOKEN_GEN_BUCKETS"))
    proposed = advice.proposed
    # The table is shell comments, so the whole output can be pasted into a shell.
    print(f"export NEURON_CONTEXT_LENGTH_BUCKETS={','.join(map(str, proposed.context_buckets))}")
    print(f"export NEURON_TOKEN_GEN_BUCKETS={','.join(map(str, proposed.token_gen_buckets))}")
    print(f"# {advice.num_requests} requests; padding efficiency = real / padded tokens")
    print(f"# {'':8} {'context':>8} {'token-gen':>10} {'unservable':>11}  buckets (context; token-gen)")
    for label, fit in (("current", advice.current), ("proposed", advice.proposed)):
        print(f"# {label:8} {fit.context_efficiency:>8.1%} {fit.token_gen_efficiency:>10.1%} {fit.unservable:>11}  "
              f"{','.join(map(str, fit.context_buckets))}; {','.join(map(str, fit.token_gen_buckets))}")
    return 0


def quantize_config(args: argparse.Namespace):
    """The QuantizeConfig of parsed `plexus quantize` flags; every setting is checked here, before the
    model loads, so a bad combination fails at once."""
    from plexus.quantize import QuantizeConfig

    sym = args.sym if args.sym is not None else args.format != "awq"     # AutoAWQ's layout has zero points
    settings = {"method": args.method, "bits": args.bits, "group_size": args.group_size, "sym": sym,
                "act_order": args.act_order, "format": args.format, "dtype": args.dtype,
                "num_samples": args.num_samples, "seq_len": args.seq_len}
    if args.calibration is not None:
        settings["calibration"] = args.calibration
    return QuantizeConfig(**settings)


def _quantize(args: argparse.Namespace) -> int:
    from plexus.quantize import quantize

    quantized = quantize(args.model, quantize_config(args), args.out)
    print(f"wrote {args.out} ({len(quantized)} quantized linears, {args.format} format)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("plexus-llm")
    except PackageNotFoundError:    # a source tree that was never installed
        installed = "unknown"
    from plexus.entrypoints.arg_parser import FlexibleArgumentParser
    from plexus.entrypoints.openai.api_server import add_server_args

    parser = FlexibleArgumentParser(prog="plexus", description="plexus LLM inference engine")
    parser.add_argument("--version", action="version", version=f"plexus {installed}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="the OpenAI-compatible HTTP server (vLLM's `vllm serve`)",
                           description="Serve a model over vLLM's OpenAI-compatible API: /v1/completions, "
                                       "/v1/chat/completions, /v1/models, /tokenize, /detokenize, /metrics, /health.")
    add_server_args(serve)
    serve.set_defaults(func=_serve)
    gen = sub.add_parser("generate", help="generate text from one or more prompts")
    gen.add_argument("prompts", nargs="+", help="prompt text")
    gen.add_argument("--model", default=None, help="HF model directory or .gguf file (default: bundled SmolLM2-135M-Instruct)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--device", default="auto")
    gen.add_argument("--max-model-len", type=int, default=None)
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    gen.set_defaults(func=_generate)

    nb = sub.add_parser("neuron-buckets", help="propose Neuron length buckets for observed request lengths",
                        description="Propose the NEURON_CONTEXT_LENGTH_BUCKETS and NEURON_TOKEN_GEN_BUCKETS that pad "
                                    "the fewest tokens for the requests in a JSONL file, and compare them with the "
                                    "current ones (the flags, else those variables, else [--max-model-len], else "
                                    "the longest observed sequence).")
    nb.add_argument("requests", help='JSONL, one request a line: {"prompt_len": .., "output_len": ..} or OpenAI '
                                     'usage {"prompt_tokens": .., "completion_tokens": ..} (also under "usage")')
    nb.add_argument("--max-buckets", type=int, default=4, help="buckets of each kind (default 4)")
    nb.add_argument("--max-context-buckets", type=int, default=None, help="context buckets (default --max-buckets)")
    nb.add_argument("--max-token-gen-buckets", type=int, default=None,
                    help="token-gen buckets (default --max-buckets)")
    nb.add_argument("--multiple-of", type=int, default=1, help="round proposed buckets up to a multiple, e.g. 64")
    nb.add_argument("--max-model-len", type=int, default=None,
                    help="no bucket above this; longer requests count as unservable")
    nb.add_argument("--context-buckets", default=None,
                    help="current context buckets, e.g. 128,512 (default $NEURON_CONTEXT_LENGTH_BUCKETS)")
    nb.add_argument("--token-gen-buckets", default=None,
                    help="current token-gen buckets, e.g. 128,512 (default $NEURON_TOKEN_GEN_BUCKETS)")
    nb.set_defaults(func=_neuron_buckets)

    from plexus.quantize.config import DTYPES, FORMATS, METHODS

    qz = sub.add_parser("quantize", help="quantize a model's weights (RTN, GPTQ, AWQ) into a checkpoint",
                        description="Weight-only integer quantization of the decoder linears, calibrated on a "
                                    "text file, written as a compressed-tensors, GPTQ or AWQ checkpoint "
                                    "directory (embeddings, norms and lm_head stay unquantized).")
    qz.add_argument("model", nargs="?", default=None,
                    help="HF model directory, .gguf file or hub id (default: bundled SmolLM2-135M-Instruct)")
    qz.add_argument("--method", choices=METHODS, default="gptq")
    qz.add_argument("--bits", type=int, default=4, help="4 or 8 (the awq format: 4)")
    qz.add_argument("--group-size", type=int, default=None,
                    help="input columns per scale; -1: one per row (default: per row for 8 bits, as "
                         "compressed-tensors' W8A16; for 4 bits the largest of 128, 64, 32 that divides the inputs)")
    qz.add_argument("--act-order", action="store_true",
                    help="GPTQ: quantize columns by descending Hessian diagonal (gptq format: desc_act, groups "
                         "recorded in g_idx; compressed-tensors: actorder 'weight', groups in column order)")
    sym = qz.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None,
                     help="symmetric, no zero point (default, but for --format awq)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric, integer zero points")
    qz.add_argument("--format", choices=FORMATS, default="compressed-tensors")
    qz.add_argument("--out", required=True, help="output model directory")
    qz.add_argument("--calibration", default=None,
                    help="calibration text file (default: a public-domain text shipped with plexus)")
    qz.add_argument("--num-samples", type=int, default=24, help="calibration sequences (default 24)")
    qz.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence (default 512)")
    qz.add_argument("--dtype", choices=DTYPES, default="auto",
                    help="dtype of the unquantized tensors (auto: the model's; float16 for gptq/awq formats)")
    qz.set_defaults(func=_quantize)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, RuntimeError, OSError) as e:
        print(f"plexus: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
