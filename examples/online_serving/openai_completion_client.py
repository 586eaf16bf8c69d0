"""vLLM's examples/online_serving/openai_completion_client.py, against `plexus serve`.

    plexus serve                      # in one shell: the bundled SmolLM2 on http://localhost:8000
    python examples/online_serving/openai_completion_client.py [--stream]

Only the official `openai` client is used: nothing here imports plexus. --base-url is plexus's addition (the
tests point it at their own port)."""
import argparse

from openai import OpenAI

# Modify OpenAI's API key and API base to use the server.
openai_api_key = "EMPTY"
openai_api_base = "http://localhost:8000/v1"


def parse_args():
    parser = argparse.ArgumentParser(description="Client for the OpenAI Completions API")
    parser.add_argument("--stream", action="store_true", help="Enable streaming response")
    parser.add_argument("--base-url", default=openai_api_base, help="the server's /v1 URL")
    parser.add_argument("--api-key", default=openai_api_key)
    return parser.parse_args()


def main(args):
    client = OpenAI(
        # defaults to os.environ.get("OPENAI_API_KEY")
        api_key=args.api_key,
        base_url=args.base_url,
    )

    models = client.models.list()
    model = models.data[0].id

    # Completion API
    completion = client.completions.create(
        model=model,
        prompt="A robot may not injure a human being",
        echo=False,
        n=2,
        stream=args.stream,
        logprobs=3,
    )

    print("-" * 50)
    print("Completion results:")
    if args.stream:
        for c in completion:
            print(c)
    else:
        print(completion)
    print("-" * 50)


if __name__ == "__main__":
    main(parse_args())
