"""longgen.eval.forced.greedy_matches decides what greedy generation would produce, in one forward pass."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from longgen import convert
from longgen.eval.forced import greedy_matches
from longgen.patterns import SinkWindow


def _model(hybrid: bool):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    if hybrid:  # sparse layers run longgen's attention on the CPU
        convert(model, full_layers="middle", pattern=SinkWindow(4, 16))
    return model


def _greedy(model, prompt, steps):
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=steps, do_sample=False, pad_token_id=0)  # fmt: skip
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("hybrid", [False, True])
def test_equals_greedy_generation(hybrid):
    model = _model(hybrid)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 50, (n,), generator=g).tolist() for n in (40, 40, 40, 57, 57, 80)]
    steps = [3, 1, 5, 2, 4, 3]
    greedy = [_greedy(model, p, m + 1) for p, m in zip(prompts, steps, strict=True)]
    answers = [c[:m] for c, m in zip(greedy, steps, strict=True)]
    # several batches: same-length prompts batched, answers of different lengths padded within a batch
    assert greedy_matches(model, prompts, answers, max_batch_tokens=100) == [True] * 6
    wrong = [[*a[:-1], a[-1] % 49 + 1] for a in answers]  # the last answer token changed
    assert greedy_matches(model, prompts, wrong) == [False] * 6
    # reject_next: the token greedy decoding produces after the answer must not be one of these
    nexts = {c[m] for c, m in zip(greedy, steps, strict=True)}
    assert greedy_matches(model, prompts, answers, reject_next=nexts) == [False] * 6
    others = set(range(50)) - nexts
    assert greedy_matches(model, prompts, answers, reject_next=others) == [True] * 6


def test_bad_input_is_a_clear_error():
    model = _model(False)
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        greedy_matches(model, [[1, 2], [3]], [[1]])
    with pytest.raises(ValueError, match="at least one token"):
        greedy_matches(model, [[1, 2]], [[]])
