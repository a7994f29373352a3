"""The similarity reward over the 1024 shared example rows: each reference's own calls score
1, dropping or corrupting a call scores what the reward's formula gives by hand, under
both rule sets (they agree on these cases)."""

import json
import re

import pytest

from star_train.reward import similarity_reward as reward_with_rules
from test_reward import DATA_FILE, render


def _load_rows():
    if not DATA_FILE.exists():
        pytest.skip(f"shared data not found at {DATA_FILE} (CI clones the repo beside shared/)")
    with DATA_FILE.open() as handle:
        return [json.loads(line) for line in handle]


def _rouge_token_count(text: str) -> int:
    return len(re.findall(r"[a-z0-9]+", text.lower()))


def _corrupt_one_argument(calls):
    """(calls with one argument changed, that value's expected similarity), or None.

    Prefer a string with tokens: appending an unknown word gives ROUGE-L F
    2L/(2L+1) for L tokens (LCS L, precision L/(L+1), recall 1). Otherwise change
    a value of another type completely (similarity 0).
    """
    candidates = [(i, key) for i, (_, args) in enumerate(calls) for key in args]
    if not candidates:
        return None
    tokened = [(i, key) for i, key in candidates
               if isinstance(calls[i][1][key], str) and _rouge_token_count(calls[i][1][key])]
    i, key = (tokened or candidates)[0]
    value = calls[i][1][key]
    if tokened:
        tokens = _rouge_token_count(value)
        new_value, expected_value_similarity = value + " qqzx", 2 * tokens / (2 * tokens + 1)
    else:
        new_value, expected_value_similarity = ["corrupted", value], 0.0
    corrupted = [(name, dict(args)) for name, args in calls]
    corrupted[i][1][key] = new_value
    return corrupted, i, expected_value_similarity


@pytest.mark.parametrize("rules", ["released", "strict"])
def test_sweep_example_rows(rules):
    def similarity_reward(response, reference, tools):
        return reward_with_rules(response, reference, tools, rules=rules)

    rows = _load_rows()
    assert len(rows) == 1024
    checked_drop = checked_corrupt = zero_by_design = 0
    for row in rows:
        reference, tools = row["messages"][-1], row["tools"]
        calls = [(c["name"], c["arguments"] if isinstance(c["arguments"], dict) else json.loads(c["arguments"]))
                 for c in reference["tool_calls"]]
        n = len(calls)
        names_unique = len({name for name, _ in calls}) == n
        assert similarity_reward(render(calls), reference, tools) == 1.0, row["id"]

        # Dropping call i from n >= 2: n-1 exact credits / (n-1 predicted + 1 unmatched).
        for i in range(n if n >= 2 else 0):
            reward = similarity_reward(render(calls[:i] + calls[i + 1:]), reference, tools)
            assert 0.0 < reward < 1.0, row["id"]
            assert reward == pytest.approx((n - 1) / n), row["id"]
            checked_drop += 1

        corruption = _corrupt_one_argument(calls)
        if corruption is None:
            continue  # every call has empty arguments: nothing to corrupt
        corrupted, index, value_similarity = corruption
        reward = similarity_reward(render(corrupted), reference, tools)
        k = len(calls[index][1])
        if n == 1 and k == 1 and value_similarity == 0.0:
            # One call, one exact-match-typed argument: nothing else earns credit.
            assert reward == 0.0, row["id"]
            zero_by_design += 1
            continue
        assert 0.0 < reward < 1.0, row["id"]
        if names_unique:  # matching is then forced, so the value is exact:
            # corrupted call (k-1 + v)/k, others 1 each, over n predicted + 0 unmatched
            assert reward == pytest.approx((n - 1 + (k - 1 + value_similarity) / k) / n), row["id"]
        checked_corrupt += 1
    assert checked_drop > 1000 and checked_corrupt > 900, (checked_drop, checked_corrupt, zero_by_design)
