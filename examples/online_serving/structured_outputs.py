"""Structured outputs through the OpenAI API (vLLM's examples/online_serving/structured_outputs), against
`plexus serve`: a choice, a regex, a JSON schema (OpenAI's response_format) and a grammar, each in the
field vLLM's server takes.

    plexus serve                      # in one shell
    python examples/online_serving/structured_outputs.py

Only the official `openai` client is used. --base-url is plexus's addition (the tests point it at their port)."""
import argparse
import json

from openai import OpenAI

openai_api_key = "EMPTY"
openai_api_base = "http://localhost:8000/v1"

CAR_SCHEMA = {
    "type": "object",
    "properties": {
        "brand": {"type": "string", "maxLength": 20},
        "model": {"type": "string", "maxLength": 20},
        "car_type": {"type": "string", "enum": ["sedan", "SUV", "Truck", "Coupe"]},
    },
    "required": ["brand", "model", "car_type"],
    "additionalProperties": False,
}

SQL_GRAMMAR = """
root ::= select_statement
select_statement ::= "SELECT " column " from " table " where " condition
column ::= "col_1 " | "col_2 "
table ::= "table_1 " | "table_2 "
condition ::= column "= " number
number ::= "1 " | "2 "
"""


def parse_args():
    parser = argparse.ArgumentParser(description="Structured outputs through the OpenAI API")
    parser.add_argument("--base-url", default=openai_api_base, help="the server's /v1 URL")
    parser.add_argument("--api-key", default=openai_api_key)
    return parser.parse_args()


def ask(client, model, content, **kwargs):
    completion = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], temperature=0, max_tokens=100, **kwargs)
    return completion.choices[0].message.content


def main(args):
    client = OpenAI(api_key=args.api_key, base_url=args.base_url)
    model = client.models.list().data[0].id

    # One of a list of strings: vLLM's `structured_outputs` field (older servers: guided_choice).
    choice = ask(client, model, "Classify this sentiment: vLLM is wonderful!",
                 extra_body={"structured_outputs": {"choice": ["positive", "negative"]}})
    print("choice:", choice)

    # A regular expression.
    email = ask(client, model, "Generate an example email address for Alan Turing, who works in Enigma. "
                "End in .com and new line. Example result: alan.turing@enigma.com\n",
                extra_body={"guided_regex": r"\w+@\w+\.com\n", "stop": ["\n"]})
    print("regex:", email)

    # A JSON schema, as OpenAI's response_format.
    car = ask(client, model, "Generate a JSON with the brand, model and car_type of the most iconic car "
              "from the 90's",
              response_format={"type": "json_schema",
                               "json_schema": {"name": "car-description", "schema": CAR_SCHEMA}})
    print("json:", json.loads(car))

    # A grammar (xgrammar's EBNF).
    sql = ask(client, model, "Generate an SQL query to show the 'username' and 'email' from the 'users' table.",
              extra_body={"guided_grammar": SQL_GRAMMAR})
    print("grammar:", sql)


if __name__ == "__main__":
    main(parse_args())
