"""SFT: loss on response tokens only (checked against full logits and by its gradient), training
lowers the loss, gradient accumulation does not change the update, packing and LoRA run."""
import pytest
import torch

from rlhf_engine.data import byte_tokenizer, pad_sft_batch, tokenize_sft_example
from rlhf_engine.model.config import preset
from rlhf_engine.model.llama import CausalLM
from rlhf_engine.trainer.sft import sft_loss, sft_targets, train_sft

DATA = [{"prompt": f"Question {i}? ", "response": "Answer: " + "xyz"[i % 3] * (2 + i % 4)} for i in range(12)]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _model(tok, seed=0):
    torch.manual_seed(seed)
    return CausalLM(preset("tiny-llama", vocab_size=len(tok), attn_backend="torch"))


def _batch(tok):
    exs = [tokenize_sft_example(tok, ex, 64) for ex in DATA[:4]]
    return pad_sft_batch(exs, tok.pad_token_id)


def test_loss_matches_full_logits_on_response_tokens(tok):
    model = _model(tok)
    b = _batch(tok)
    loss, n = sft_loss(model, b["input_ids"], b["attention_mask"], b["labels_mask"])
    logits = model(b["input_ids"], b["attention_mask"]).double()  # (B, T, V)
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, b["input_ids"][:, 1:, None]).squeeze(-1)
    resp = b["labels_mask"][:, 1:]
    assert n == resp.sum()
    torch.testing.assert_close(loss.double(), -(logp[resp]).mean(), rtol=1e-5, atol=1e-5)
    # marking the prompt tokens as targets changes the loss: they are really left out above
    all_tokens = b["attention_mask"].bool()
    loss_all, n_all = sft_loss(model, b["input_ids"], b["attention_mask"], all_tokens)
    assert n_all > n and not torch.isclose(loss_all, loss)


def test_gradient_only_from_response_positions(tok):
    model = _model(tok)
    b = _batch(tok)
    captured = {}
    orig = model.hidden_states

    def hidden_states(*args, **kwargs):
        h = orig(*args, **kwargs)
        h.retain_grad()
        captured["h"] = h
        return h

    model.hidden_states = hidden_states
    loss, _ = sft_loss(model, b["input_ids"], b["attention_mask"], b["labels_mask"])
    loss.backward()
    g = captured["h"].grad.abs().sum(-1)  # (B, T)
    trained = torch.zeros_like(b["labels_mask"])
    trained[:, :-1] = b["labels_mask"][:, 1:]  # position t is trained when token t+1 is a response token
    assert (g[~trained] == 0).all()  # prompt, padding and last positions: no gradient at all
    assert (g[trained] > 0).all()
    assert (sft_targets(b["input_ids"], b["labels_mask"])[~trained[:, :-1]] == -100).all()


def test_training_lowers_the_loss(tok):
    model = _model(tok)
    s = train_sft(model, tok, DATA, epochs=8, batch_size=6, lr=3e-3, max_len=64, progress=False, seed=1)
    assert s["steps"] == 16 and len(s["losses"]) == 16
    assert s["losses"][-1] < 0.6 * s["losses"][0]
    assert s["tokens_per_s"] > 0 and s["tokens"] > 0
    assert all(torch.isfinite(torch.tensor(s["losses"])))


def test_grad_accum_gives_the_same_update(tok):
    m1, m2 = _model(tok), _model(tok)
    kw = dict(epochs=1, lr=1e-2, max_len=64, progress=False, seed=3, max_grad_norm=None, max_steps=1)
    s1 = train_sft(m1, tok, DATA[:8], batch_size=8, grad_accum=1, **kw)
    s2 = train_sft(m2, tok, DATA[:8], batch_size=2, grad_accum=4, **kw)
    assert s1["steps"] == s2["steps"] == 1
    torch.testing.assert_close(torch.tensor(s1["losses"]), torch.tensor(s2["losses"]), rtol=1e-5, atol=1e-6)
    for (name, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-6, msg=name)


def test_packing_and_lora(tok):
    model = _model(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = train_sft(model, tok, DATA, epochs=3, batch_size=2, lr=1e-2, max_len=48, packing=True,
                  lora=dict(rank=4, alpha=8.0), progress=False)
    assert s["n_rows"] < s["n_examples"]  # examples were packed
    assert s["losses"][-1] < s["losses"][0]
    after = model.state_dict()
    for k, v in before.items():  # base weights frozen, only adapters trained
        assert torch.equal(v, after[k]), k
    assert any(k.endswith("lora_B") and after[k].abs().sum() > 0 for k in after)


def test_chat_rows_and_log_fn(tok):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 4
    logged = []
    s = train_sft(_model(tok), tok, rows, batch_size=2, lr=1e-3, max_len=32, progress=False,
                  log_fn=lambda step, m: logged.append((step, m)))
    assert [st for st, _ in logged] == [1, 2] and set(logged[0][1]) >= {"loss", "grad_norm", "lr"}
    assert s["tokens"] == 4 * 6  # "hello" (5 byte tokens) + the end-of-turn </s>, per row


@pytest.mark.gpu
def test_sft_on_cuda_bf16_with_triton_kernels(tok):
    torch.manual_seed(0)
    model = CausalLM(preset("tiny-llama", vocab_size=len(tok))).to("cuda", torch.bfloat16)  # attn "auto": Triton
    b = {k: v.cuda() for k, v in _batch(tok).items()}
    loss, _ = sft_loss(model, b["input_ids"], b["attention_mask"], b["labels_mask"])
    ref, _ = sft_loss(model.float(), b["input_ids"], b["attention_mask"], b["labels_mask"])
    assert torch.isfinite(loss) and abs(loss.item() - ref.item()) < 0.05 * ref.item()
    model.to(torch.bfloat16)
    s = train_sft(model, tok, DATA, epochs=6, batch_size=6, lr=3e-3, max_len=64, packing=True, progress=False)
    assert all(torch.isfinite(torch.tensor(s["losses"]))) and s["losses"][-1] < s["losses"][0]
