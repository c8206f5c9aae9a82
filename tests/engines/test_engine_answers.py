"""What the vLLM engines make of the answers they get, with stand-ins for vLLM's outputs (no vLLM
needed): a completion without a log-prob for each token is an error, never zeros."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from grpo_cli.engines.server import ServerError
from grpo_cli.engines.server import _completions as server_completions
from grpo_cli.engines.vllm import _completion as vllm_completion

URL = "http://10.0.0.2:8000"


def _choice(index: int, ids: list[int], logps: list[float] | None) -> dict:
    return {
        "index": index,
        "token_ids": ids,
        "logprobs": None if logps is None else {"token_logprobs": logps},
    }


def test_a_servers_completions_keep_their_ids_and_logprobs_in_index_order():
    answer = {"choices": [_choice(1, [7, 8], [-0.5, -0.25]), _choice(0, [5], [-1.0])]}
    out = server_completions(answer, 2, URL)
    assert [c.token_ids for c in out] == [[5], [7, 8]]
    assert [c.logprobs for c in out] == [[-1.0], [-0.5, -0.25]]


@pytest.mark.parametrize("logps", [None, [], [-0.5], [-0.5, None]])
def test_a_server_completion_without_every_logprob_is_an_error_naming_the_server(logps):
    answer = {"choices": [_choice(0, [7, 8], logps)]}
    with pytest.raises(ServerError, match=r"http://10\.0\.0\.2:8000 answered a completion of 2 tokens"):
        server_completions(answer, 1, URL)


def _vllm_output(ids: list[int], rows: list[dict] | None) -> SimpleNamespace:
    return SimpleNamespace(token_ids=ids, logprobs=rows)


def test_a_colocated_vllm_completion_reads_each_sampled_tokens_logprob():
    rows = [
        {7: SimpleNamespace(logprob=-0.5)},
        {8: SimpleNamespace(logprob=-0.25), 3: SimpleNamespace(logprob=-9)},
    ]
    c = vllm_completion(_vllm_output([7, 8], rows))
    assert (c.token_ids, c.logprobs) == ([7, 8], [-0.5, -0.25])


@pytest.mark.parametrize(
    "rows",
    [
        None,
        [],
        [{7: SimpleNamespace(logprob=-0.5)}],
        [{7: SimpleNamespace(logprob=-0.5)}, {9: SimpleNamespace(logprob=-1)}],
    ],
    ids=["none", "empty", "short", "other-token"],
)
def test_a_colocated_vllm_completion_without_every_logprob_is_an_error(rows):
    with pytest.raises(RuntimeError, match="vLLM returned a completion of 2 tokens"):
        vllm_completion(_vllm_output([7, 8], rows))
