"""Which of all-MiniLM-L6-v2's layers tells each slot its digit (docs/RESULTS.md, "The text encoder's layer").

PixArt's cross-attention has to find, for the image tokens of the left slot, the caption token of the digit
the caption puts on the left. This probe asks whether one attention read-out can do that from a layer's token
states: per layer, a small read-out (the caption projection's shape, then one learned query per slot attending
over the tokens, then a linear classifier) is trained on the token states of two-digit training captions to name
the left and the right digit, and judged on held-back training captions and on the 40 two-digit evaluation
prompts (half of them held-out compositions).

    python benchmarks/text_encoder_probe.py                 # every layer, 0 (embeddings) to 6
    python benchmarks/text_encoder_probe.py --layers 3 6

About 20 seconds a layer on one CPU thread, after encoding the captions.
"""

from __future__ import annotations

import argparse

import torch

from diffcr.data.scenes import HELDOUT_PAIRS, SceneSpec, caption_for, evaluation_prompts, parse_caption
from diffcr.models.scene_pipeline import MAX_SEQUENCE_LENGTH, MINILM_LAYERS, load_text_encoder


class SlotReadout(torch.nn.Module):
    """Token states (n, L, D) -> digit logits (n, 2, 10) for the left and the right slot."""

    def __init__(self, in_dim: int = 384, width: int = 128):
        super().__init__()
        self.proj = torch.nn.Sequential(torch.nn.Linear(in_dim, width), torch.nn.GELU(), torch.nn.Linear(width, width))
        self.slot_queries = torch.nn.Parameter(torch.randn(2, width) * 0.1)
        self.to_k = torch.nn.Linear(width, width)
        self.to_v = torch.nn.Linear(width, width)
        self.classify = torch.nn.Linear(width, 10)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.proj(states)  # (n, L, W)
        scores = torch.einsum("sw,nlw->nsl", self.slot_queries, self.to_k(x)) / x.shape[-1] ** 0.5  # (n, 2, L)
        scores = scores.masked_fill(~mask.bool()[:, None], float("-inf"))
        read = torch.einsum("nsl,nlw->nsw", scores.softmax(-1), self.to_v(x))  # (n, 2, W)
        return self.classify(read)  # (n, 2, 10)


def training_captions(num: int, seed: int) -> tuple[list[str], torch.Tensor]:
    """`num` two-digit training captions (no held-out composition) and their (left, right) digits."""
    gen = torch.Generator().manual_seed(seed)
    captions, digits = [], []
    while len(captions) < num:
        left, right = (int(d) for d in torch.randint(10, (2,), generator=gen))
        if (left, right) in HELDOUT_PAIRS:
            continue
        sizes = [("large", "small")[int(torch.randint(2, (1,), generator=gen))] for _ in range(2)]
        captions.append(caption_for(SceneSpec(left, right, *sizes), gen))
        digits.append((left, right))
    return captions, torch.tensor(digits)


@torch.no_grad()
def layer_states(tokenizer, encoder, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(states (layers + 1, n, L, D), mask (n, L)): the embeddings and every layer's output."""
    tokens = tokenizer(
        captions, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True, return_tensors="pt"
    )
    out = encoder(tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True)
    return torch.stack(out.hidden_states), tokens.attention_mask


def probe_layer(states, mask, digits, eval_states, eval_mask, eval_digits, num_train: int, steps: int, seed: int):
    """(held-back captions: slots right, evaluation prompts: slots right, evaluation prompts read wrong)."""
    torch.manual_seed(seed)
    readout = SlotReadout(states.shape[-1])
    optimizer = torch.optim.Adam(readout.parameters(), lr=2e-3)
    for _ in range(steps):
        idx = torch.randint(num_train, (128,))
        logits = readout(states[idx], mask[idx])  # (128, 2, 10)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 10), digits[idx].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        held_back = (readout(states[num_train:], mask[num_train:]).argmax(-1) == digits[num_train:]).float().mean()
        predicted = readout(eval_states, eval_mask).argmax(-1)  # (m, 2)
    wrong = [i for i in range(len(predicted)) if not torch.equal(predicted[i], eval_digits[i])]
    return held_back.item(), (predicted == eval_digits).float().mean().item(), wrong, predicted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="*", default=list(range(MINILM_LAYERS + 1)))
    parser.add_argument("--num-train", type=int, default=5000)
    parser.add_argument("--num-held-back", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer, encoder = load_text_encoder(MINILM_LAYERS)
    captions, digits = training_captions(args.num_train + args.num_held_back, args.seed)
    prompts = [prompt for prompt, kind in evaluation_prompts() if kind != "single"]
    eval_digits = torch.tensor([parse_caption(p).digits for p in prompts])
    states, mask = layer_states(tokenizer, encoder, captions)
    eval_states, eval_mask = layer_states(tokenizer, encoder, prompts)
    print("| layer | held-back training captions: slots right | evaluation prompts: slots right | read wrong |")
    print("|---|---|---|---|")
    for layer in args.layers:
        held_back, on_eval, wrong, predicted = probe_layer(
            states[layer], mask, digits, eval_states[layer], eval_mask, eval_digits,
            args.num_train, args.steps, args.seed,
        )  # fmt: skip
        shown = "; ".join(f"{prompts[i]!r} -> {tuple(predicted[i].tolist())}" for i in wrong[:4])
        more = f" and {len(wrong) - 4} more" if len(wrong) > 4 else ""
        print(f"| {layer} | {held_back:.1%} | {on_eval:.1%} | {shown}{more} |", flush=True)


if __name__ == "__main__":
    main()
