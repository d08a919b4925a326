import torch

from diffcr.routing import gate_values, gather_tokens, routed_forward, scatter_tokens, select_tokens


def test_select_tokens_sorted_unique_top_scores():
    logits = torch.randn(3, 50)
    kept_idx = select_tokens(logits, 13)
    assert kept_idx.shape == (3, 13)
    for row, scores in zip(kept_idx, logits):
        assert torch.equal(row, torch.sort(row).values)
        assert row.unique().numel() == 13
        assert set(row.tolist()) == set(torch.topk(scores, 13).indices.tolist())


def test_gather_scatter_round_trip():
    tokens = torch.randn(2, 10, 4)
    idx = select_tokens(torch.randn(2, 10), 4)
    kept = gather_tokens(tokens, idx)
    assert torch.equal(kept[1, 2], tokens[1, idx[1, 2]])
    back = scatter_tokens(tokens, idx, kept * 2)
    for b in range(2):
        for n in range(10):
            expected = tokens[b, n] * (2 if n in idx[b].tolist() else 1)
            assert torch.equal(back[b, n], expected)


def test_straight_through_gate_is_exactly_one_even_for_extreme_logits():
    logits = torch.tensor([[-200.0, -20.0, 0.0, 30.0]], requires_grad=True)
    gate = gate_values(logits, "straight_through")
    assert torch.equal(gate, torch.ones(1, 4, 1))
    gate.sum().backward()
    # d/dl of s/stop(s) = (1 - s): the gradient direction of the sigmoid gate, rescaled
    assert torch.allclose(logits.grad, 1 - torch.sigmoid(logits.detach()))


def test_routed_forward_counts_and_bypass():
    tokens = torch.randn(2, 12, 3)
    logits = torch.randn(2, 12)
    seen = []

    def block_fn(x, mlp_gate, kept_idx):
        seen.append(x.shape[1])
        return x * 3 + 1

    out = routed_forward(tokens, logits, 5, block_fn, "straight_through", as_update=False)
    kept_idx = select_tokens(logits, 5)
    assert seen == [5]
    for b in range(2):
        mask = torch.zeros(12, dtype=torch.bool)
        mask[kept_idx[b]] = True
        assert torch.equal(out[b, ~mask], tokens[b, ~mask])  # bypassed: bit for bit
        assert torch.allclose(out[b, mask], tokens[b, mask] * 3 + 1)
    seen.clear()
    assert torch.equal(routed_forward(tokens, None, 0, block_fn, "straight_through", False), tokens)
    dense = routed_forward(tokens, None, 12, block_fn, "straight_through", False)
    assert seen == [12] and torch.equal(dense, tokens * 3 + 1)
    update = routed_forward(tokens, logits, 5, block_fn, "sigmoid_block", as_update=True)
    for b in range(2):
        mask = torch.zeros(12, dtype=torch.bool)
        mask[kept_idx[b]] = True
        assert torch.equal(update[b, ~mask], torch.zeros_like(update[b, ~mask]))
        expected = (tokens[b, mask] * 2 + 1) * torch.sigmoid(logits[b, mask]).unsqueeze(-1)
        assert torch.allclose(update[b, mask], expected)
