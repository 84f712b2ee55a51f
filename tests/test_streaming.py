"""Tests of `merits.streaming.ConversationStream`: turn-by-turn predictions equal the full causal forward."""

import numpy as np
import pytest
import torch
from test_pipeline import build, conversations, probabilities, reference_probabilities

from merits import MeritsForConversationClassification
from merits.streaming import ConversationStream
from _tiny import tiny_merits_config


torch.set_num_threads(1)


@pytest.mark.parametrize("architecture", ["mister-e", "merits-l"])
def test_stream_equals_full_causal_forward(architecture):
    model, processor = build(architecture, causal=True)
    conversation = conversations()[0] + conversations()[1]
    stream = ConversationStream(model, processor)
    streamed = [stream.add_turn(**turn) for turn in conversation]
    assert len(stream) == len(conversation) == len(stream.latencies)
    full = reference_probabilities(model, processor, conversation)
    np.testing.assert_allclose(probabilities(streamed, model), full, atol=2e-5)
    # each turn uses only the turns so far: the forward over the prefix gives the same answer
    prefix = reference_probabilities(model, processor, conversation[:3])
    np.testing.assert_allclose(probabilities(streamed[:3], model), prefix, atol=2e-5)
    if architecture == "mister-e":
        assert set(streamed[0]["gate"]) == {"speech", "text", "cross-modal"}
    stream.reset()
    again = stream.add_turn(**conversation[0])
    np.testing.assert_allclose(probabilities([again], model), full[:1], atol=2e-5)


def test_stream_of_embeddings_for_a_feature_only_model():
    torch.manual_seed(0)
    model = MeritsForConversationClassification(
        tiny_merits_config("mister-e", causal=True, initializer_range=0.3)
    ).eval()
    rng = np.random.default_rng(0)
    text, audio = rng.standard_normal((6, 12)).astype(np.float32), rng.standard_normal((6, 10)).astype(np.float32)
    stream = ConversationStream(model)
    streamed = [stream.add_turn(text_embeds=text[i], audio_embeds=audio[i]) for i in range(6)]
    with torch.no_grad():
        full = model(text_embeds=torch.from_numpy(text)[None], audio_embeds=torch.from_numpy(audio)[None]).logits
    np.testing.assert_allclose(probabilities(streamed, model), full.softmax(-1)[0].numpy(), atol=2e-5)


def test_stream_needs_a_causal_model():
    model, processor = build("merits-l", causal=False)
    with pytest.raises(ValueError, match="causal model"):
        ConversationStream(model, processor)


def test_stream_bad_turns_name_the_turn():
    model, processor = build("mister-e", causal=True)
    stream = ConversationStream(model, processor)
    stream.add_turn(text="hello there")
    with pytest.raises(ValueError, match="turn 1: the turn has neither 'text' nor 'audio'"):
        stream.add_turn()
    with pytest.raises(FileNotFoundError, match="turn 1: audio file"):
        stream.add_turn(audio="/nonexistent/file.wav")
    assert len(stream) == 1  # failed turns leave the state untouched
    stream.add_turn(text="i got the job")
    assert len(stream) == 2
