"""shared.align: padded batches, reply log-probs, the reward model, BT / DPO losses, GRPO."""

import math

import pytest
import torch
import torch.nn.functional as F

from shared import align
from shared.model import GPT, GPTConfig
from shared.tinyworld import encode_chat, make_world, tokenizer


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.fixture(scope="module")
def convs():
    world = make_world(seed=0, n_people=40, n_heldout=4)
    exs = world.examples("val", "string")[:3] + world.examples("val", "fact_qa")[:2]
    return [ex.messages() for ex in exs]


def tiny_model(tok, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=512, n_layer=2, n_head=2,
                         n_embd=32, positions="rope", norm="rmsnorm", mlp="swiglu",
                         bias=False)).eval()


def test_batch_chats_pads_on_the_right_and_keeps_the_mask(tok, convs):
    ids, labels, lengths = align.batch_chats(tok, convs)
    assert ids.shape == labels.shape == (len(convs), int(lengths.max()))
    for i, conv in enumerate(convs):
        x, y = encode_chat(tok, conv)
        assert lengths[i] == len(x)
        assert ids[i, :len(x)].tolist() == x and labels[i, :len(y)].tolist() == y
        assert (labels[i, len(y):] == -100).all() and (ids[i, len(x):] == 0).all()
    with pytest.raises(ValueError, match="at least one"):
        align.batch_chats(tok, [])


def test_reply_logprobs_equal_a_direct_sum_over_each_reply(tok, convs):
    model = tiny_model(tok)
    batched = align.reply_logprobs(model, tok, convs)
    for i, conv in enumerate(convs):
        x, y = encode_chat(tok, conv)
        logits, _ = model(torch.tensor([x]))
        logp = torch.log_softmax(logits[0, :-1], -1)
        direct = sum(logp[t, y[t + 1]] for t in range(len(x) - 1) if y[t + 1] != -100)
        assert batched[i].item() == pytest.approx(direct.item(), abs=1e-4)
    assert batched.requires_grad and (batched < 0).all()


def test_reward_model_reads_the_last_real_token_whatever_the_padding(tok, convs):
    rm = align.RewardModel(tiny_model(tok))
    assert torch.equal(rm.score(tok, convs), torch.zeros(len(convs)))  # zero-initialised head
    torch.nn.init.normal_(rm.head.weight)
    together = rm.score(tok, convs)
    alone = torch.cat([rm.score(tok, [c]) for c in convs])
    assert torch.allclose(together, alone, atol=1e-5)
    together.sum().backward()
    assert rm.head.weight.grad.abs().sum() > 0
    assert rm.gpt.transformer.h[0].attn.c_attn.weight.grad.abs().sum() > 0


def test_bradley_terry_is_binary_cross_entropy_on_the_reward_difference():
    torch.manual_seed(0)
    rc, rr = torch.randn(16), torch.randn(16)
    want = F.binary_cross_entropy_with_logits(rc - rr, torch.ones(16))
    assert align.bradley_terry_loss(rc, rr).item() == pytest.approx(want.item(), rel=1e-6)
    assert align.bradley_terry_loss(torch.zeros(3), torch.zeros(3)).item() == \
        pytest.approx(math.log(2))


def test_dpo_loss_matches_the_paper_formula():
    torch.manual_seed(1)
    pc, pr, rc, rr = (torch.randn(8) * 5 for _ in range(4))
    loss, r_c, r_r = align.dpo_loss(pc, pr, rc, rr, beta=0.3)
    want = -F.logsigmoid(0.3 * ((pc - rc) - (pr - rr))).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert torch.allclose(r_c, 0.3 * (pc - rc)) and torch.allclose(r_r, 0.3 * (pr - rr))
    same, _, _ = align.dpo_loss(pc, pr, pc, pr)  # policy == reference
    assert same.item() == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="beta"):
        align.dpo_loss(pc, pr, rc, rr, beta=0.0)


def test_group_advantages_normalise_within_each_group():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    a = align.group_advantages(r)
    assert torch.allclose(a.mean(-1), torch.zeros(3), atol=1e-6)
    assert torch.allclose(a[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-3)
    assert torch.equal(a[1], torch.zeros(4))  # all alike: no signal
    assert a[2, 3] > 0 > a[2, 0]
    assert torch.allclose(align.group_advantages(r[0]), a[0])
    with pytest.raises(ValueError, match="rewards"):
        align.group_advantages(torch.zeros(2, 2, 2))


def test_kl_per_token_estimators_agree_with_the_exact_kl_on_average():
    torch.manual_seed(2)
    logits_p, logits_q = torch.randn(5), torch.randn(5)
    p, logp, logq = logits_p.softmax(-1), logits_p.log_softmax(-1), logits_q.log_softmax(-1)
    exact = (p * (logp - logq)).sum()
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    k1 = align.kl_per_token(logp[x], logq[x])
    k3 = align.kl_per_token(logp[x], logq[x], "k3")
    assert k1.mean().item() == pytest.approx(exact.item(), abs=0.02)
    assert k3.mean().item() == pytest.approx(exact.item(), abs=0.02)
    assert (k3 >= 0).all() and k3.std() < k1.std()
    with pytest.raises(ValueError, match="kind"):
        align.kl_per_token(logp, logq, "k2")


def gae_loop(rewards, values, mask, gamma, lam):  # one row at a time, straight from the paper
    adv = torch.zeros_like(values)
    for b in range(values.shape[0]):
        n = int(mask[b].sum())
        for t in range(n):
            adv[b, t] = sum((gamma * lam) ** (k - t) * (
                rewards[b, k] + gamma * (values[b, k + 1] if k + 1 < n else 0.0) - values[b, k])
                for k in range(t, n))
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.95), (0.9, 0.5), (0.99, 0.0)])
def test_gae_equals_the_sum_of_discounted_td_errors(gamma, lam):
    torch.manual_seed(3)
    lengths = torch.tensor([5, 1, 3, 7])
    mask = (torch.arange(7)[None] < lengths[:, None]).float()
    rewards, values = torch.randn(4, 7) * mask, torch.randn(4, 7)
    adv, ret = align.gae(rewards, values, mask, gamma, lam)
    want = gae_loop(rewards, values, mask, gamma, lam)
    assert torch.allclose(adv, want, atol=1e-5)
    assert torch.equal(adv * (1 - mask), torch.zeros_like(adv))
    assert torch.allclose(ret, (adv + values) * mask)
    if gamma == lam == 1.0:  # reward-to-go minus value
        to_go = rewards.flip(1).cumsum(1).flip(1)
        assert torch.allclose(adv, (to_go - values) * mask, atol=1e-5)
    with pytest.raises(ValueError, match="gamma"):
        align.gae(rewards, values, mask, gamma=1.5)


def test_ppo_clip_loss_stops_the_gradient_outside_the_clip_range():
    old = torch.zeros(1, 4)
    ratio = torch.tensor([[0.5, 0.9, 1.1, 1.5]])
    adv = torch.tensor([[1.0, -1.0, 1.0, 1.0]])
    logp = ratio.log().requires_grad_()
    loss, frac = align.ppo_clip_loss(logp, old, adv, torch.ones(1, 4), clip=0.2)
    want = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert frac.item() == pytest.approx(0.5)
    loss.backward()
    # token 4 moved past 1 + clip with a positive advantage: no more push; the others are live
    assert logp.grad[0, 3] == 0 and (logp.grad[0, :3] != 0).all()
    masked, _ = align.ppo_clip_loss(logp.detach(), old, adv, torch.tensor([[1, 1, 0, 0]]))
    assert masked.item() == pytest.approx(-(0.5 - 0.9) / 2)
    with pytest.raises(ValueError, match="clip"):
        align.ppo_clip_loss(logp, old, adv, torch.ones(1, 4), clip=0.0)
