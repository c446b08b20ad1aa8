"""Training and research access through the swarm, against local transformers on tiny models.

Real server processes serve tiny random Llama, Mistral and Qwen2 models, each split over 2 servers
(under its own DHT prefix in one swarm). Checked against the local model: the loss with labels,
every hidden state, gradients w.r.t. inputs (also through intermediate hidden states), slices of the
remote blocks, prompt tuning and deep prompt tuning, LoRA gradients and generation with a trained
adapter (sent by the client, or preloaded by a server), beam search, and sequence classification.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from client import AutoDistributedModelForCausalLM, AutoDistributedModelForSequenceClassification
from swarm.tools.localswarm import LocalSwarm
from tests.swarm.references import copies, deep_prompt_hooks, lora_hooks, prefixed

pytestmark = pytest.mark.timeout(300)
FAMILIES = ["llama", "mistral", "qwen2"]
LOSS, STATES, GRADS = dict(rtol=0, atol=1e-4), dict(rtol=0, atol=1e-4), dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def swarm(tiny_models):
    with LocalSwarm() as local_swarm:
        specs = [
            (span, ("--model", str(tiny_models[family]), "--dht-prefix", f"{family}-train"))
            for family in FAMILIES
            for span in ("0:3", "3:6")
        ]
        local_swarm.start(None, specs)
        yield local_swarm


@pytest.fixture(scope="module")
def models(swarm, tiny_models):
    """(local transformers model, a factory of distributed models) per family."""
    made = []

    def distributed(family: str, **options):
        options.setdefault("dht_prefix", f"{family}-train")
        model = AutoDistributedModelForCausalLM.from_pretrained(
            str(tiny_models[family]), initial_peers=swarm.initial_peers, **options
        )
        made.append(model)
        return model

    locals_ = {family: AutoModelForCausalLM.from_pretrained(tiny_models[family]).eval() for family in FAMILIES}
    shared = {family: distributed(family) for family in FAMILIES}
    try:
        yield locals_, shared, distributed
    finally:
        for model in made:
            model.shutdown()


def batch(seed: int, tokens: int = 10):
    """3 rows of token ids, a padding mask (row 1 left-padded, row 2 right-padded) and labels ignoring the padding."""
    ids = torch.randint(3, 256, (3, tokens), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, -2:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask, ids.masked_fill(mask == 0, -100)


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_hidden_states_and_input_gradients_match_local(models, family):
    locals_, shared, _ = models
    local, remote = locals_[family], shared[family]
    ids, mask, labels = batch(1)
    embeds = local.model.embed_tokens(ids).detach()
    x_remote, x_local = copies([embeds, embeds])

    out = remote(inputs_embeds=x_remote, attention_mask=mask, labels=labels, output_hidden_states=True)
    ref = local(inputs_embeds=x_local, attention_mask=mask, labels=labels, output_hidden_states=True)
    torch.testing.assert_close(out.loss, ref.loss, **LOSS)
    torch.testing.assert_close(out.logits, ref.logits, **STATES)
    assert len(out.hidden_states) == len(ref.hidden_states) == 7  # embeddings, 5 blocks, the final-normed output
    for got, want in zip(out.hidden_states, ref.hidden_states, strict=True):
        torch.testing.assert_close(got, want, **STATES)

    # the loss, plus a term on an intermediate hidden state: gradients flow back through both
    (out.loss + out.hidden_states[2].square().mean()).backward()
    (ref.loss + ref.hidden_states[2].square().mean()).backward()
    torch.testing.assert_close(x_remote.grad, x_local.grad, **GRADS)
    assert x_remote.grad.abs().sum() > 0

    with torch.no_grad():  # input ids, as a user would call it
        torch.testing.assert_close(remote(ids, attention_mask=mask, labels=labels).loss, ref.loss, **LOSS)


def test_local_parts_sit_where_transformers_keeps_them(models):
    locals_, shared, _ = models
    local, remote = locals_["llama"], shared["llama"]
    local_names = {name for name, _ in local.named_parameters() if ".layers." not in name}
    assert {name for name, _ in remote.named_parameters()} == local_names
    assert remote.get_submodule("model.embed_tokens") is remote.model.embed_tokens is remote.embed_tokens
    assert remote.get_submodule("model.norm") is remote.norm and remote.get_submodule("lm_head") is remote.lm_head
    assert len(remote.model.layers) == 6


def test_block_slices_match_local_blocks(models):
    locals_, shared, _ = models
    local, remote = locals_["llama"], shared["llama"]
    layers = remote.model.layers
    assert len(layers) == 6 and len(layers[2:5]) == 3 and len(layers[-2:]) == 2 and len(layers[4:2]) == 0
    assert [len(block) for block in layers] == [1] * 6
    hidden = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(2))
    positions = torch.arange(3, 10).expand(2, 7)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0

    def local_blocks(start: int, end: int, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        causal = torch.ones(7, 7, dtype=torch.bool).tril() & mask.bool()[:, None, None, :]
        embeddings = local.model.rotary_emb(x, positions)
        for index in range(start, end):
            x = local.model.layers[index](
                x, attention_mask=causal, position_embeddings=embeddings, position_ids=positions
            )
            if index == 2:
                x = x * scale  # a local module inserted between blocks
        return x

    scale_remote, scale_local, x_remote, x_local = copies([torch.tensor(1.5), torch.tensor(1.5), hidden, hidden])
    middle = layers[1:3](x_remote, attention_mask=mask, position_ids=positions) * scale_remote
    got = layers[3:5](middle, attention_mask=mask, position_ids=positions)
    want = local_blocks(1, 5, x_local, scale_local)
    torch.testing.assert_close(got, want, **STATES)
    got.square().sum().backward()
    want.square().sum().backward()
    torch.testing.assert_close(x_remote.grad, x_local.grad, **GRADS)
    torch.testing.assert_close(scale_remote.grad, scale_local.grad, rtol=1e-5, atol=1e-3)

    with torch.no_grad():
        one_by_one = hidden
        for block in layers[1:5]:
            one_by_one = block(one_by_one, attention_mask=mask, position_ids=positions)
        torch.testing.assert_close(one_by_one, local_blocks(1, 5, hidden, torch.tensor(1.0)), **STATES)


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_prompt_tuning_gradients_and_generation_match_local(models, mode):
    locals_, _, distributed = models
    local = locals_["llama"]
    remote = distributed("llama", tuning_mode=mode, pre_seq_len=3)
    tuning = remote.model.prompt_tuning
    assert [name for name, p in remote.named_parameters() if p.requires_grad] == [
        name
        for name in ("model.prompt_tuning.prefix", "model.prompt_tuning.deep")
        if mode == "deep_ptune" or "deep" not in name
    ]
    if tuning.deep is not None:
        with torch.no_grad():
            tuning.deep.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
    ids = torch.randint(3, 256, (2, 8), generator=torch.Generator().manual_seed(4))
    labels = ids.clone()

    out = remote(ids, labels=labels)
    out.loss.backward()
    prefix, deep = copies([tuning.prefix, tuning.deep if tuning.deep is not None else torch.zeros(6, 3, 64)])
    with deep_prompt_hooks(local, deep):
        logits = prefixed(local, prefix, ids)
    ref_loss = local.loss_function(logits=logits, labels=labels, vocab_size=local.config.vocab_size)
    ref_loss.backward()
    torch.testing.assert_close(out.logits, logits, **STATES)
    torch.testing.assert_close(out.loss, ref_loss, **LOSS)
    torch.testing.assert_close(tuning.prefix.grad, prefix.grad, **GRADS)
    if tuning.deep is not None:
        torch.testing.assert_close(tuning.deep.grad, deep.grad, **GRADS)

    prompt = ids[:1]
    with deep_prompt_hooks(local, deep.detach()), torch.no_grad():
        embeds = torch.cat([prefix.detach().unsqueeze(0), local.model.embed_tokens(prompt)], dim=1)
        expected = local.generate(inputs_embeds=embeds, max_new_tokens=8, do_sample=False)
    actual = remote.generate(prompt, max_new_tokens=8, do_sample=False)
    assert actual[:, prompt.shape[1] :].tolist() == expected.tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_gradients_match_local(models, family):
    locals_, _, distributed = models
    local, remote = locals_[family], distributed(family)
    lora = remote.add_lora(rank=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))
    assert {name for name, p in remote.named_parameters() if p.requires_grad} == {
        f"model.layers.lora.{name}" for name, _ in lora.named_parameters()
    }
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in lora.parameters():
            param.normal_(0, 0.2, generator=generator)
    adapter, params = lora.adapter(remote.model.layers.span)
    local_params = copies(params)
    local_weights = {key: (local_params[2 * i], local_params[2 * i + 1]) for i, key in enumerate(adapter.weights)}
    ids, mask, labels = batch(5)

    out = remote(ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    with lora_hooks(local, local_weights, adapter.scaling):
        ref = local(ids, attention_mask=mask, labels=labels)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, **LOSS)
    for param, local_param in zip(params, local_params, strict=True):
        torch.testing.assert_close(param.grad, local_param.grad, **GRADS)
    assert all(param.grad.abs().sum() > 0 for param in params)


def test_trained_lora_generates_like_local_sent_and_preloaded(models, swarm, tiny_models, tmp_path):
    locals_, _, distributed = models
    local, remote = locals_["llama"], distributed("llama")
    lora = remote.add_lora(rank=4, alpha=8)
    optimizer = torch.optim.Adam(lora.parameters(), lr=0.05)
    ids, mask, labels = batch(6)
    losses = []
    for _ in range(3):  # a few training steps through the swarm
        optimizer.zero_grad()
        loss = remote(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    adapter, _ = lora.adapter(remote.model.layers.span)
    prompt = ids[:1, :6]
    with lora_hooks(local, adapter.weights, adapter.scaling), torch.no_grad():
        expected = local.generate(prompt, max_new_tokens=10, do_sample=False)
        expected_beams = local.generate(prompt, max_new_tokens=6, num_beams=3, do_sample=False)
    assert expected.tolist() != local.generate(prompt, max_new_tokens=10, do_sample=False).tolist()
    assert remote.generate(prompt, max_new_tokens=10, do_sample=False).tolist() == expected.tolist()
    assert remote.generate(prompt, max_new_tokens=6, num_beams=3, do_sample=False).tolist() == expected_beams.tolist()

    folder = remote.save_adapter(tmp_path / "adapter")  # a server preloads it; clients pick it by name
    swarm.start(tiny_models["llama"], [("0:6", ("--dht-prefix", "llama-adapters", "--adapters", f"trained={folder}"))])
    by_name = distributed("llama", dht_prefix="llama-adapters", adapter="trained")
    assert by_name.generate(prompt, max_new_tokens=10, do_sample=False).tolist() == expected.tolist()
    reloaded = distributed("llama")
    reloaded.load_adapter(folder)
    assert reloaded.generate(prompt, max_new_tokens=10, do_sample=False).tolist() == expected.tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search_matches_local(models, family):
    locals_, shared, _ = models
    local, remote = locals_[family], shared[family]
    ids, mask, _ = batch(7, tokens=8)
    ids, mask = ids[:2], mask[:2]  # one row left-padded
    for options in (dict(num_beams=3), dict(num_beams=3, num_return_sequences=2, length_penalty=0.5)):
        expected = local.generate(
            ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, **options
        )
        actual = remote.generate(
            ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, **options
        )
        assert actual.tolist() == expected.tolist(), options


@pytest.fixture(scope="module")
def classifiers(tiny_models, tmp_path_factory):
    """The tiny Llama with score heads of 3 labels and of 1 (the same blocks as the served model)."""
    folders = {}
    for labels in (3, 1):
        folders[labels] = tmp_path_factory.mktemp(f"classifier{labels}")
        torch.manual_seed(8 + labels)
        model = AutoModelForSequenceClassification.from_pretrained(tiny_models["llama"], num_labels=labels)
        model.save_pretrained(folders[labels])
    return folders


@pytest.mark.parametrize("problem", ["single_label_classification", "multi_label_classification", "regression"])
def test_sequence_classification_matches_local(swarm, classifiers, problem):
    num_labels = 1 if problem == "regression" else 3
    folder = classifiers[num_labels]
    local = AutoModelForSequenceClassification.from_pretrained(folder, problem_type=problem).eval()
    remote = AutoDistributedModelForSequenceClassification.from_pretrained(
        str(folder), initial_peers=swarm.initial_peers, dht_prefix="llama-train", problem_type=problem
    )
    try:
        ids, mask, _ = batch(9)
        labels = {
            "single_label_classification": torch.tensor([0, 2, 1]),
            "multi_label_classification": torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 1, 0]]),
            "regression": torch.tensor([0.5, -1.0, 2.0]),
        }[problem]
        out = remote(ids, attention_mask=mask, labels=labels)
        ref = local(ids, attention_mask=mask, labels=labels)
        torch.testing.assert_close(out.logits, ref.logits, **STATES)
        torch.testing.assert_close(out.loss, ref.loss, **LOSS)
        out.loss.backward()
        ref.loss.backward()
        torch.testing.assert_close(remote.score.weight.grad, local.score.weight.grad, **GRADS)
        torch.testing.assert_close(remote.model.embed_tokens.weight.grad, local.model.embed_tokens.weight.grad, **GRADS)
    finally:
        remote.shutdown()
