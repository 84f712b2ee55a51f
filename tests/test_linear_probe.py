"""Stage I text head initialised from a linear probe (LP-FT, `text_head_init: linear_probe`)."""

import numpy as np
import pytest
import torch

from merits import MeritsForConversationClassification
from merits.training.linear_probe import classifier_inputs, init_text_head_from_probe

from _tiny import tiny_merits_config, tiny_roberta_config


def token_items(n: int, num_labels: int, seed: int, unlabelled_every: int = 0):
    """1-turn conversations whose label is written in their tokens (a frozen random encoder still separates them)."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        label = i % num_labels
        length = int(rng.integers(4, 9))
        ids = [0] + [10 + 7 * label + int(rng.integers(0, 3)) for _ in range(length)] + [2]
        items.append([{"ids": ids, "label": -100 if unlabelled_every and i % unlabelled_every == 0 else label}])
    return items


def collate(batch):
    length = max(len(row["ids"]) for conversation in batch for row in conversation)
    input_ids = torch.ones(len(batch), length, dtype=torch.long)  # pad id 1
    attention_mask = torch.zeros(len(batch), length, dtype=torch.long)
    for b, (row,) in enumerate(batch):
        input_ids[b, :len(row["ids"])] = torch.tensor(row["ids"])
        attention_mask[b, :len(row["ids"])] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "turn_mask": torch.ones(len(batch), 1, dtype=torch.long),
            "labels": torch.tensor([[row["label"]] for (row,) in batch])}


@pytest.mark.parametrize("architecture,num_labels", [("merits-l", 3), ("merits-l", 2), ("mister-e", 3)])
def test_the_text_head_becomes_the_probe_chosen_on_validation(architecture, num_labels):
    from sklearn.linear_model import LogisticRegression

    torch.manual_seed(0)
    labels = {i: name for i, name in enumerate(["neutral", "happy", "sad"][:num_labels])}
    config = tiny_merits_config(architecture, text_config=tiny_roberta_config(hidden_dropout_prob=0.3), id2label=labels,
                                text_pooling="mean", text_head_dropout=0.5)
    model = MeritsForConversationClassification(config).train()
    train, validation = token_items(60, num_labels, seed=0, unlabelled_every=7), token_items(24, num_labels, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    chosen = init_text_head_from_probe(model, train, validation, collate, list(labels.values()), c_grid=(0.001, 1.0))

    assert model.training and model.text_encoder.training  # the mode it had
    assert set(chosen["per_C"]) == {0.001, 1.0} and chosen["C"] in chosen["per_C"]
    assert chosen["validation_weighted_f1"] == max(chosen["per_C"].values())
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"text_encoder.classifier.weight", "text_encoder.classifier.bias"}
    # the head now computes the probe's decision function on the features the classifier reads (eval mode)
    x, y = classifier_inputs(model, train, collate)
    assert len(y) == 60 - len(range(0, 60, 7)) and -100 not in y
    probe = LogisticRegression(C=chosen["C"], max_iter=2000, random_state=0).fit(x, y)
    classifier = model.text_encoder.classifier
    with torch.no_grad():
        logits = classifier(torch.from_numpy(x)).numpy()
    decision = probe.decision_function(x)
    if num_labels == 2:
        np.testing.assert_allclose(logits[:, 1] - logits[:, 0], decision, rtol=1e-4, atol=1e-4)
    else:
        np.testing.assert_allclose(logits - logits.mean(1, keepdims=True), decision - decision.mean(1, keepdims=True),
                                   rtol=1e-4, atol=1e-4)
    assert (logits.argmax(1) == probe.predict(x)).all()
    # the features are the classifier's input: the pooled embedding, or the activated projection of MiSTER-E
    model.eval()
    with torch.no_grad():
        batch = collate(train[:5])
        embeds, _ = model.text_encoder(batch["input_ids"], batch["attention_mask"])
    expected = torch.relu(embeds) if architecture == "mister-e" else embeds  # relu(projection) either way
    np.testing.assert_allclose(classifier_inputs(model, train[:5], collate)[0],
                               expected[[i for i in range(5) if train[i][0]["label"] != -100]].numpy(), rtol=1e-5, atol=1e-6)


def test_one_training_class_is_refused():
    config = tiny_merits_config(text_config=tiny_roberta_config())
    model = MeritsForConversationClassification(config)
    items = [[{"ids": [0, 11, 2], "label": 1}]] * 4
    with pytest.raises(ValueError, match="two classes"):
        init_text_head_from_probe(model, items, items, collate, ["neutral", "happy", "sad"])


def test_train_py_starts_stage1_from_the_probe(tmp_path, capsys, monkeypatch):
    """`--text_head_init linear_probe` through run_training: the head is fitted before the first update (its
    validation score printed), then fine-tuned; a wrong value is refused naming the option."""
    from merits.training import stages
    from merits.training.arguments import ConfigError, parse_args

    fitted = []
    real = stages.init_text_head_from_probe
    monkeypatch.setattr(stages, "init_text_head_from_probe", lambda model, *a, **k: fitted.append(
        model.text_encoder.classifier.weight.detach().clone()) or real(model, *a, **k))
    argv = ["--dataset", "demo", "--dataset_options", "{num_dialogues: 24, seed: 0}", "--report_to", "none",
            "--seed", "0", "--architecture", "merits-l", "--modalities", "[text]", "--stages", "[utterance]",
            "--utterance.num_epochs", "1", "--checkpointing_steps", "1000", "--output_dir", str(tmp_path / "out")]
    results = stages.run_training(parse_args([*argv, "--text_head_init", "linear_probe"]))
    assert len(fitted) == 1
    assert "[stage1] text head from a linear probe (C=" in capsys.readouterr().out
    assert 0.0 <= results["validation_stage1_text_weighted_f1"] <= 1.0
    # a resumed run loads the finished stage I: no second probe
    again = stages.run_training(parse_args([*argv, "--text_head_init", "linear_probe", "--resume"]))
    assert len(fitted) == 1 and again["validation_stage1_text_weighted_f1"] == results["validation_stage1_text_weighted_f1"]
    with pytest.raises(ConfigError, match="text_head_init"):
        parse_args([*argv, "--text_head_init", "probe"])
