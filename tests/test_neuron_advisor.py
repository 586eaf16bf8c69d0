"""The Neuron bucket advisor: optimal buckets for observed request lengths, and `plexus neuron-buckets`."""
import itertools
import json
import random

import pytest

from plexus.core.buckets import pick_bucket
from plexus.entrypoints.cli import main
from plexus.platforms.neuron.advisor import advise_buckets, load_request_lengths

# Context sizes 100, 100, 300, 500; decode sizes 101, 102 | 301 | 501, 502, 503 (p+1 .. p+o-1).
REQUESTS = [(100, 1), (100, 3), (300, 2), (500, 4)]


@pytest.fixture(autouse=True)
def no_neuron_bucket_variables(monkeypatch):
    monkeypatch.delenv("NEURON_CONTEXT_LENGTH_BUCKETS", raising=False)
    monkeypatch.delenv("NEURON_TOKEN_GEN_BUCKETS", raising=False)


def _padded(sizes, chosen):
    return sum(pick_bucket(s, chosen) for s in sizes)


def _best_by_brute_force(sizes, max_buckets, largest):
    """The least padded total over every choice of at most max_buckets buckets whose largest is `largest`."""
    return min(_padded(sizes, choice) for n in range(1, max_buckets + 1)
               for choice in itertools.combinations(range(1, largest + 1), n) if choice[-1] == largest)


def test_proposal_matches_brute_force_over_every_bucket_choice():
    rng = random.Random(0)
    for _ in range(100):
        requests = [(rng.randint(1, 12), rng.randint(0, 6)) for _ in range(rng.randint(1, 6))]
        max_context, max_token_gen = rng.randint(1, 3), rng.randint(1, 3)
        prompts = [p for p, _ in requests]
        decode_steps = [s for p, o in requests for s in range(p + 1, p + o)]
        longest_sequence = max(p + max(o - 1, 0) for p, o in requests)

        fit = advise_buckets(requests, max_context_buckets=max_context, max_token_gen_buckets=max_token_gen).proposed

        assert len(fit.context_buckets) <= max_context and len(fit.token_gen_buckets) <= max_token_gen
        assert fit.context_buckets[-1] == max(prompts) and fit.token_gen_buckets[-1] == longest_sequence
        assert _padded(prompts, fit.context_buckets) == _best_by_brute_force(prompts, max_context, max(prompts))
        assert _padded(decode_steps, fit.token_gen_buckets) == _best_by_brute_force(
            decode_steps, max_token_gen, longest_sequence)
        assert fit.unservable == 0


def test_largest_buckets_hold_the_longest_prompt_and_sequence():
    rng = random.Random(1)
    requests = [(rng.randint(1, 3000), rng.randint(2, 500)) for _ in range(500)]
    fit = advise_buckets(requests, 3, multiple_of=64).proposed
    assert fit.context_buckets[-1] == 64 * -(-max(p for p, _ in requests) // 64)
    assert fit.token_gen_buckets[-1] >= max(p + o - 1 for p, o in requests)
    assert fit.unservable == 0


def test_hand_computed_example():
    advice = advise_buckets(REQUESTS, 2)
    # Context {100, 500} pads 1200 (vs 1400 for {300, 500}); token-gen {102, 503} pads 2 * 102 + 4 * 503.
    assert advice.proposed.context_buckets == [100, 500]
    assert advice.proposed.token_gen_buckets == [102, 503]
    assert advice.proposed.context_efficiency == pytest.approx(1000 / 1200)
    assert advice.proposed.token_gen_efficiency == pytest.approx(2010 / 2216)
    # Without max_model_len the current buckets are the longest size seen, 503, for both kinds.
    assert advice.current.context_buckets == advice.current.token_gen_buckets == [503]
    assert advice.current.context_efficiency == pytest.approx(1000 / (4 * 503))
    assert advice.current.token_gen_efficiency == pytest.approx(2010 / (6 * 503))
    assert advice.current.unservable == advice.proposed.unservable == 0
    assert advice.num_requests == 4


def test_current_buckets_that_are_too_small_refuse_requests_and_are_scored_on_the_rest():
    current = advise_buckets(REQUESTS, 2, current_context_buckets=[128, 256],
                             current_token_gen_buckets=[512]).current
    # (300, 2) needs a 300 context bucket and (500, 4) a 500 one: both refused.
    assert current.unservable == 2
    assert current.context_efficiency == pytest.approx(200 / 256)
    assert current.token_gen_efficiency == pytest.approx((101 + 102) / 1024)


def test_multiple_of_rounds_buckets_up():
    fit = advise_buckets(REQUESTS, 2, multiple_of=128).proposed
    assert fit.context_buckets == [128, 512]
    assert fit.token_gen_buckets == [128, 512]


def test_max_model_len_caps_buckets_and_refuses_longer_requests():
    advice = advise_buckets(REQUESTS, 2, multiple_of=256, max_model_len=400)
    # 300 rounds to 512, capped at 400; (500, 4) cannot be served at all and is left out of the fit.
    assert advice.proposed.context_buckets == [256, 400]
    assert advice.proposed.token_gen_buckets == [256, 400]
    assert advice.proposed.unservable == advice.current.unservable == 1
    assert advice.current.context_buckets == advice.current.token_gen_buckets == [400]
    with pytest.raises(ValueError, match="current_token_gen_buckets: bucket 512 is larger than max_model_len"):
        advise_buckets(REQUESTS, max_model_len=400, current_token_gen_buckets=[512])
    with pytest.raises(ValueError, match="none of the 1 requests fits in max_model_len=100"):
        advise_buckets([(500, 4)], max_model_len=100)


def test_prompts_without_decode_steps_still_fit_the_kv_cache():
    # (1000, 1) decodes nothing, but its 1000 tokens sit in a KV cache the size of the largest token-gen bucket.
    advice = advise_buckets([(10, 5), (1000, 1)], 2)
    assert advice.proposed.token_gen_buckets == [14, 1000] and advice.proposed.unservable == 0
    assert advise_buckets([(100, 1), (200, 0)], 2).proposed.token_gen_buckets == [200]
    assert advise_buckets([(10, 5), (1000, 1)], 2, current_token_gen_buckets=[512]).current.unservable == 1


def test_bad_arguments_name_the_setting():
    with pytest.raises(ValueError, match="max_token_gen_buckets must be at least 1, got 0"):
        advise_buckets(REQUESTS, max_token_gen_buckets=0)
    with pytest.raises(ValueError, match="multiple_of must be at least 1"):
        advise_buckets(REQUESTS, multiple_of=0)
    with pytest.raises(ValueError, match=r"request 1: expected \(prompt_len >= 1, output_len >= 0\)"):
        advise_buckets([(10, 1), (0, 5)])


def _write(tmp_path, lines, name="requests.jsonl"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_loader_reads_both_formats(tmp_path):
    path = _write(tmp_path, [
        json.dumps({"prompt_len": 100, "output_len": 1}),
        "",
        json.dumps({"prompt_tokens": 100, "completion_tokens": 3, "total_tokens": 103}),
        json.dumps({"id": "cmpl-1", "usage": {"prompt_tokens": 300, "completion_tokens": 2}}),
    ])
    assert load_request_lengths(path) == [(100, 1), (100, 3), (300, 2)]


@pytest.mark.parametrize("line, why", [
    ('{"prompt_len": 100}', "expected"),
    ('{"prompt_len": 0, "output_len": 5}', "expected"),
    ('{"prompt_len": "100", "output_len": 5}', "expected"),
    ('[100, 5]', "expected"),
    ('{"prompt_len": 100, ', "not JSON"),
])
def test_loader_names_the_file_line_and_format_of_a_bad_line(tmp_path, line, why):
    path = _write(tmp_path, ['{"prompt_len": 10, "output_len": 5}', line])
    with pytest.raises(ValueError, match=rf"requests\.jsonl:2: {why}.*prompt_len.*prompt_tokens") as e:
        load_request_lengths(path)
    assert str(path) in str(e.value)


def test_loader_rejects_an_empty_file(tmp_path):
    with pytest.raises(ValueError, match="no requests"):
        load_request_lengths(_write(tmp_path, []))


def _requests_file(tmp_path):
    return str(_write(tmp_path, [json.dumps({"prompt_len": p, "output_len": o}) for p, o in REQUESTS]))


def test_cli_prints_pasteable_exports_and_the_comparison(tmp_path, capsys):
    assert main(["neuron-buckets", _requests_file(tmp_path), "--max-buckets", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["export NEURON_CONTEXT_LENGTH_BUCKETS=100,500", "export NEURON_TOKEN_GEN_BUCKETS=102,503"]
    assert all(line.startswith(("export ", "# ")) for line in lines)
    rows = {line.split()[1]: line.split()[2:] for line in lines[2:]}
    assert rows["current"] == [f"{1000 / 2012:.1%}", f"{2010 / 3018:.1%}", "0", "503;", "503"]
    assert rows["proposed"] == [f"{1000 / 1200:.1%}", f"{2010 / 2216:.1%}", "0", "100,500;", "102,503"]


def test_cli_options_reach_the_advisor(tmp_path, capsys):
    assert main(["neuron-buckets", _requests_file(tmp_path), "--max-context-buckets", "1",
                 "--max-token-gen-buckets", "3", "--multiple-of", "64", "--max-model-len", "448",
                 "--context-buckets", "128,256", "--token-gen-buckets", "448"]) == 0
    out = capsys.readouterr().out
    assert "export NEURON_CONTEXT_LENGTH_BUCKETS=320\n" in out
    assert "export NEURON_TOKEN_GEN_BUCKETS=128,320\n" in out
    assert "  128,256; 448\n" in out


def test_cli_current_buckets_default_to_the_neuron_variables(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NEURON_CONTEXT_LENGTH_BUCKETS", "256,128")
    monkeypatch.setenv("NEURON_TOKEN_GEN_BUCKETS", "512")
    assert main(["neuron-buckets", _requests_file(tmp_path), "--max-buckets", "2"]) == 0
    current = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("# current "))
    assert current.split()[2:] == [f"{200 / 256:.1%}", f"{203 / 1024:.1%}", "2", "128,256;", "512"]
    # A flag wins over the variable.
    assert main(["neuron-buckets", _requests_file(tmp_path), "--context-buckets", "1024"]) == 0
    current = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("# current "))
    assert current.endswith("  1024; 512")


def test_cli_errors_name_the_variable_or_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NEURON_TOKEN_GEN_BUCKETS", "128,x")
    assert main(["neuron-buckets", _requests_file(tmp_path)]) == 2
    assert "plexus: error: NEURON_TOKEN_GEN_BUCKETS='128,x': 'x' is not an integer" in capsys.readouterr().err
    monkeypatch.delenv("NEURON_TOKEN_GEN_BUCKETS")
    assert main(["neuron-buckets", _requests_file(tmp_path), "--max-model-len", "400",
                 "--context-buckets", "512"]) == 2
    assert "--context-buckets: bucket 512 is larger than --max-model-len (400)" in capsys.readouterr().err
    assert main(["neuron-buckets", str(_write(tmp_path, ["{}"], "bad.jsonl"))]) == 2
    assert "bad.jsonl:1: expected" in capsys.readouterr().err
    assert main(["neuron-buckets", str(tmp_path / "missing.jsonl")]) == 2
    assert "plexus: error:" in capsys.readouterr().err
