"""vLLM's examples/online_serving/openai_chat_completion_client.py, against `plexus serve`.

    plexus serve                      # in one shell: the bundled SmolLM2 on http://localhost:8000
    python examples/online_serving/openai_chat_completion_client.py [--stream]

Only the official `openai` client is used. --base-url is plexus's addition (the tests point it at their port)."""
import argparse

from openai import OpenAI

# Modify OpenAI's API key and API base to use the server.
openai_api_key = "EMPTY"
openai_api_base = "http://localhost:8000/v1"

messages = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Who won the world series in 2020?"},
    {"role": "assistant", "content": "The Los Angeles Dodgers won the World Series in 2020."},
    {"role": "user", "content": "Where was it played?"},
]


def parse_args():
    parser = argparse.ArgumentParser(description="Client for the OpenAI Chat Completions API")
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

    # Chat Completion API
    chat_completion = client.chat.completions.create(
        messages=messages,
        model=model,
        stream=args.stream,
    )

    print("-" * 50)
    print("Chat completion results:")
    if args.stream:
        for c in chat_completion:
            print(c)
    else:
        print(chat_completion)
    print("-" * 50)


if __name__ == "__main__":
    main(parse_args())
