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


def _reference_gather(tokens, idx):
    return torch.gather(tokens, 1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def _reference_scatter(tokens, idx, values):
    return torch.scatter(tokens, 1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]), values)


def test_row_gather_scatter_match_torch_gather_scatter_with_gradients():
    # non-contiguous input (a transposed view), as a block may hand over
    base = torch.randn(3, 6, 20, requires_grad=True)
    tokens = base.transpose(1, 2)  # (3, 20, 6), not contiguous
    idx = select_tokens(torch.randn(3, 20), 7)
    kept = gather_tokens(tokens, idx)
    expected_kept = _reference_gather(tokens, idx)
    assert torch.equal(kept, expected_kept)
    values = kept * 2 + 1
    out = scatter_tokens(tokens, idx, values)
    expected_out = _reference_scatter(tokens, idx, _reference_gather(tokens, idx) * 2 + 1)
    assert torch.equal(out, expected_out)
    assert out.is_contiguous() and out.data_ptr() != tokens.data_ptr()  # a fresh copy: the input is untouched
    weights = torch.randn_like(out)
    (grad,) = torch.autograd.grad((out * weights).sum(), base)
    (expected_grad,) = torch.autograd.grad((expected_out * weights).sum(), base)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-6)
    # a kept token's gradient goes through its new value (x2 here), a bypassed token's straight through
    kept_mask = torch.zeros(3, 20, dtype=torch.bool).scatter_(1, idx, True)
    assert torch.equal(grad.transpose(1, 2)[~kept_mask], weights[~kept_mask])
    torch.testing.assert_close(grad.transpose(1, 2)[kept_mask], 2 * weights[kept_mask])


def test_scatter_widens_to_the_values_dtype_and_keeps_bypassed_tokens_exact():
    tokens = torch.randn(2, 9, 4, dtype=torch.bfloat16)
    idx = select_tokens(torch.randn(2, 9), 3)
    values = torch.randn(2, 3, 4, dtype=torch.float32)
    out = scatter_tokens(tokens, idx, values)
    assert out.dtype == torch.float32
    assert torch.equal(out, _reference_scatter(tokens.float(), idx, values))


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
