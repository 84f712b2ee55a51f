"""Corpus loaders of merits.data on miniature fixtures of each official layout, plus the real shared data."""

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile

from merits.data import (
    DataFormatError,
    conversation_indices,
    leave_speaker_out_folds,
    load_audio,
    load_emodb,
    load_folder,
    load_iemocap,
    load_meld,
    load_mosi,
    load_msp_podcast,
)

SHARED_DATA = Path(os.environ.get("MERITS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def needs_shared(name):
    return pytest.mark.skipif(
        not (SHARED_DATA / name).is_dir(),
        reason=f"shared data {SHARED_DATA / name} is absent (set MERITS_SHARED_DATA to the folder holding meld/, mosi/, emodb/)",
    )


def write_wav(path, seconds=0.3, rate=16000, frequency=220.0, channels=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    signal = 0.3 * np.sin(2 * np.pi * frequency * t)
    if channels == 2:
        signal = np.stack([signal, signal], axis=1)
    soundfile.write(str(path), signal, rate)


# ---------------------------------------------------------------------------------------------- IEMOCAP


def make_iemocap(root, codes_by_session=None, with_wav=True):
    """A miniature IEMOCAP tree: per session one dialog whose utterances are listed out of temporal order."""
    codes_by_session = codes_by_session or {}
    for session in range(1, 6):
        dialog = f"Ses0{session}F_impro01"
        codes = codes_by_session.get(session, ["neu", "hap", "exc", "ang", "sad", "fru", "xxx"])
        evaluation = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
        transcript = []
        starts = [10.0 * (len(codes) - i) for i in range(len(codes))]  # listed in reverse temporal order
        for i, (code, start) in enumerate(zip(codes, starts)):
            name = f"{dialog}_{'F' if i % 2 == 0 else 'M'}{i:03d}"
            evaluation += [f"[{start:.4f} - {start + 2:.4f}]\t{name}\t{code}\t[2.5000, 3.0000, 3.5000]", "C-E1:\tNeutral;\t()", ""]
            transcript.append(f"{name} [{start:08.4f}-{start + 2:08.4f}]: utterance at {int(start)} seconds.")
            if with_wav:
                write_wav(root / f"Session{session}" / "sentences" / "wav" / dialog / f"{name}.wav", seconds=0.1)
        transcript.append("M_XX1 [000.0000-001.0000]: [LAUGHTER]")  # lines that are not utterances are ignored
        (root / f"Session{session}" / "dialog" / "EmoEvaluation").mkdir(parents=True, exist_ok=True)
        (root / f"Session{session}" / "dialog" / "transcriptions").mkdir(parents=True, exist_ok=True)
        (root / f"Session{session}" / "dialog" / "EmoEvaluation" / f"{dialog}.txt").write_text("\n".join(evaluation))
        (root / f"Session{session}" / "dialog" / "transcriptions" / f"{dialog}.txt").write_text("\n".join(transcript))
    return root


def test_iemocap_4class_merits_l_splits_order_and_report(tmp_path):
    root = make_iemocap(tmp_path / "IEMOCAP_full_release")
    dsd, report = load_iemocap(root, num_classes=4, return_report=True)
    assert set(dsd) == {"train", "validation", "test"}
    assert set(dsd["train"]["dialogue_id"]) == {"Ses02F_impro01", "Ses03F_impro01", "Ses04F_impro01"}
    assert set(dsd["validation"]["dialogue_id"]) == {"Ses01F_impro01"}
    assert set(dsd["test"]["dialogue_id"]) == {"Ses05F_impro01"}
    names = dsd["train"].features["label"].names
    assert names == ["angry", "happy", "sad", "neutral"]
    test = dsd["test"]
    # temporal order: listed last = earliest start; fru (20 s) and xxx (10 s) are dropped, sad (30 s) comes first
    assert test["text"][0] == "utterance at 30 seconds."
    assert [names[i] for i in test["label"]] == ["sad", "angry", "happy", "happy", "neutral"]  # exc merged into happy
    assert test["turn"] == sorted(test["turn"])
    assert report.dropped and sum(report.dropped.values()) == 5 * 2  # fru + xxx in each session
    assert "outside the 4-class set" in report.summary()
    audio = load_audio(test["audio"][0])
    assert audio.dtype == np.float32 and audio.shape == (1600,)
    assert "speaker" in test.column_names


def test_iemocap_6class_mister_e_and_unlabelled_option(tmp_path):
    root = make_iemocap(tmp_path / "iemocap")
    dsd = load_iemocap(root, num_classes=6, split_scheme="mister-e", validation_session=4)
    assert dsd["train"].features["label"].names == ["happy", "sad", "neutral", "angry", "excited", "frustrated"]
    assert set(dsd["validation"]["dialogue_id"]) == {"Ses04F_impro01"}
    assert set(dsd["test"]["dialogue_id"]) == {"Ses05F_impro01"}
    assert len(dsd["test"]) == 6  # only xxx dropped
    fraction = load_iemocap(root, num_classes=6, split_scheme="mister-e", validation_fraction=0.25, seed=0)
    assert len(set(fraction["validation"]["dialogue_id"])) == 1
    assert not set(fraction["validation"]["dialogue_id"]) & set(fraction["train"]["dialogue_id"])
    kept = load_iemocap(root, num_classes=4, other_labels="unlabelled")
    assert len(kept["test"]) == 7 and kept["test"]["label"].count(-1) == 2


def test_iemocap_bad_input(tmp_path):
    root = make_iemocap(tmp_path / "a")
    with pytest.raises(DataFormatError, match="outside the 4-class set"):
        load_iemocap(root, other_labels="error")
    missing = root / "Session3" / "sentences" / "wav" / "Ses03F_impro01" / "Ses03F_impro01_F000.wav"
    missing.unlink()
    with pytest.raises(DataFormatError, match="Ses03F_impro01_F000.wav not found"):
        load_iemocap(root)
    dsd, report = load_iemocap(root, missing_audio="none", return_report=True)
    assert sum(a is None for a in dsd["train"]["audio"]) == 1 and report.issues
    bad = make_iemocap(tmp_path / "b", codes_by_session={2: ["neu", "zzz"]})
    with pytest.raises(DataFormatError, match=r"Ses02F_impro01\.txt, line \d+ .*unknown emotion code 'zzz'"):
        load_iemocap(bad)
    with pytest.raises(DataFormatError, match="Session1/dialog/EmoEvaluation not found"):
        load_iemocap(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------------- MELD

MELD_HEADER = "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode,StartTime,EndTime\n"


def meld_row(sr, text, emotion, sentiment, dialogue, utterance):
    quoted = '"' + text.replace('"', '""') + '"'
    return f'{sr},{quoted},Joey,{emotion},{sentiment},{dialogue},{utterance},1,1,"00:00:01,000","00:00:02,000"\n'


def test_meld_single_csv_quotes_commas_and_audio_layout(tmp_path):
    csv = tmp_path / "test_sent_emo.csv"
    rows = [
        meld_row(1, "Oh, hi! \"Really\", you’re here?", "surprise", "positive", 3, 1),
        meld_row(2, "Line one,\nline two", "joy", "positive", 3, 0),
        meld_row(3, "No.", "anger", "negative", 3, 10),
        meld_row(4, "Fine", "neutral", "neutral", 3, 2),
        meld_row(5, "Hey", "neutral", "neutral", 7, 0),
    ]
    csv.write_text(MELD_HEADER + "".join(rows), encoding="utf-8")
    dsd = load_meld(csv)
    assert list(dsd) == ["test"]
    test = dsd["test"]
    assert test["dialogue_id"] == ["dia3"] * 4 + ["dia7"]
    assert test["turn"] == [0, 1, 2, 10, 0]  # numeric order, not string order
    assert test["text"][0] == "Line one,\nline two"
    assert test["text"][1] == "Oh, hi! \"Really\", you’re here?"
    assert all(audio is None for audio in test["audio"])
    sentiment = load_meld(csv, label="sentiment")["test"]
    assert sentiment.features["label"].names == ["negative", "neutral", "positive"]
    # audio in the official split folder: all rows present -> paths; some missing -> error naming the row
    for dialogue, utterance in [(3, 0), (3, 1), (3, 2), (3, 10), (7, 0)]:
        write_wav(tmp_path / "output_repeated_splits_test" / f"dia{dialogue}_utt{utterance}.wav", seconds=0.1, channels=2)
    with_audio = load_meld(csv)["test"]
    assert all(audio["path"].endswith(".wav") for audio in with_audio["audio"])
    assert load_audio(with_audio["audio"][0]).ndim == 1
    (tmp_path / "output_repeated_splits_test" / "dia7_utt0.wav").unlink()
    with pytest.raises(DataFormatError, match=r"line \d+ .*dia7_utt0\.wav"):
        load_meld(csv)
    partial, report = load_meld(csv, missing_audio="none", return_report=True)
    assert partial["test"]["audio"][-1] is None and report.issues


def test_meld_cp1252_and_bad_rows(tmp_path):
    directory = tmp_path / "meld"
    directory.mkdir()
    (directory / "train_sent_emo.csv").write_bytes((MELD_HEADER + meld_row(1, "I don’t know", "fear", "negative", 0, 0)).encode("cp1252"))
    (directory / "dev_sent_emo.csv").write_text(MELD_HEADER + meld_row(1, "ok", "disgust", "negative", 0, 0))
    dsd, report = load_meld(directory, return_report=True)
    assert set(dsd) == {"train", "validation"}
    assert dsd["train"]["text"][0] == "I don’t know"
    assert "cp1252" in report.summary()
    bad = tmp_path / "bad.csv"
    bad.write_text(MELD_HEADER + meld_row(1, "a", "joy", "positive", 0, 0) + meld_row(2, "b", "happy", "positive", 0, 1))
    with pytest.raises(DataFormatError, match=r"bad\.csv, line 3 .*unknown label 'happy'"):
        load_meld(bad)
    bad.write_text(MELD_HEADER + meld_row(1, "a", "joy", "positive", 0, 0) + meld_row(2, "b", "joy", "positive", 0, 0))
    with pytest.raises(DataFormatError, match="dialogue 'dia0' has turn 0 twice"):
        load_meld(bad)
    bad.write_text(MELD_HEADER + meld_row(1, "", "joy", "positive", 0, 0))
    with pytest.raises(DataFormatError, match=r"line 2 .*empty Utterance"):
        load_meld(bad)
    bad.write_text("Utterance,Emotion\nhi,joy\n")
    with pytest.raises(DataFormatError, match=r"missing column\(s\)"):
        load_meld(bad)
    bad.write_text(MELD_HEADER + '1,"unterminated,Joey,joy,positive,0,0,1,1,a,b\n')
    with pytest.raises(DataFormatError, match="fields where the header has"):
        load_meld(bad)


def test_meld_long_and_single_turn_dialogues(tmp_path):
    csv = tmp_path / "dev.csv"
    rows = [meld_row(i, f"turn {i}", "neutral", "neutral", 1, i) for i in range(500)] + [meld_row(900, "alone", "joy", "positive", 2, 0)]
    csv.write_text(MELD_HEADER + "".join(rows))
    dev = load_meld(csv)["validation"]
    groups = conversation_indices(dev)
    assert [len(rows) for _, rows in groups] == [500, 1]
    assert dev["turn"][:500] == list(range(500))


# ------------------------------------------------------------------------------------------------- MOSI


def test_mosi_fixture_with_sdk_audio(tmp_path):
    csv = tmp_path / "mosi_label.csv"
    csv.write_text(
        "id,text,label,mode\n"
        "vid_A-x_10,ten,-0.5,train\nvid_A-x_2,two,0.0,train\nvid_A-x_1,one,2.4,train\n"
        "v2_1,dev one,-3.0,valid\nv3_1,test one,1.0,test\n"
    )
    dsd = load_mosi(tmp_path)
    assert set(dsd) == {"train", "validation", "test"}
    train = dsd["train"]
    assert train["dialogue_id"] == ["vid_A-x"] * 3 and train["turn"] == [1, 2, 10]
    assert [train.features["label"].names[i] for i in train["label"]] == ["positive", "positive", "negative"]  # 0 -> positive
    assert train["sentiment_score"][1] == 0.0
    audio_dir = tmp_path / "Audio" / "WAV_16000" / "Segmented"
    for segment in ["vid_A-x_10", "vid_A-x_2", "vid_A-x_1", "v2_1", "v3_1"]:
        write_wav(audio_dir / f"{segment}.wav", seconds=0.1)
    assert all(a is not None for a in load_mosi(csv)["train"]["audio"])
    (audio_dir / "v3_1.wav").unlink()
    with pytest.raises(DataFormatError, match=r"line 6 \(id 'v3_1'\).*v3_1\.wav not found"):
        load_mosi(csv)
    csv.write_text("id,text,label,mode\nv_1,a,0.5,train\nv_x,b,0.5,train\n")
    with pytest.raises(DataFormatError, match=r"line 3 .*<video id>_<segment number>"):
        load_mosi(csv, with_audio=False)
    csv.write_text("id,text,label,mode\nv_1,a,seven,train\n")
    with pytest.raises(DataFormatError, match="line 2 .*label must be a number"):
        load_mosi(csv, with_audio=False)
    csv.write_text("id,text,label,mode\nv_1,a,0.5,holdout\n")
    with pytest.raises(DataFormatError, match="unknown mode 'holdout'"):
        load_mosi(csv, with_audio=False)


# ----------------------------------------------------------------------------------------- MSP-Podcast


def test_msp_podcast_fixture(tmp_path):
    (tmp_path / "Labels").mkdir()
    (tmp_path / "Labels" / "labels_consensus.csv").write_text(
        "FileName,EmoClass,EmoAct,EmoVal,EmoDom,SpkrID,Gender,Split_Set\n"
        "MSP-PODCAST_0001_0010.wav,H,4.0,6.2,4.0,127,Female,Train\n"
        "MSP-PODCAST_0001_0002.wav,A,5.0,2.0,5.0,127,Female,Train\n"
        "MSP-PODCAST_0001_0003.wav,X,3.0,4.0,3.0,127,Female,Train\n"
        "MSP-PODCAST_0002_0001.wav,N,3.0,3.0,3.0,15,Male,Development\n"
        "MSP-PODCAST_0003_0001.wav,S,2.0,5.0,2.0,16,Male,Test1\n"
    )
    for name in ["MSP-PODCAST_0001_0010", "MSP-PODCAST_0001_0002", "MSP-PODCAST_0001_0003", "MSP-PODCAST_0002_0001", "MSP-PODCAST_0003_0001"]:
        write_wav(tmp_path / "Audios" / f"{name}.wav", seconds=0.1)
    (tmp_path / "Transcripts").mkdir()
    (tmp_path / "Transcripts" / "MSP-PODCAST_0001_0010.txt").write_text("what a lovely day\n")
    sentiment = load_msp_podcast(tmp_path)
    train = sentiment["train"]
    names = train.features["label"].names
    assert train["turn"] == [2, 3, 10] and set(train["dialogue_id"]) == {"MSP-PODCAST_0001"}
    assert [names[i] for i in train["label"]] == ["negative", "neutral", "positive"]  # v=2 -> neg, 4 -> neutral, 6.2 -> pos
    assert train["text"] == ["", "", "what a lovely day"]
    assert [names[i] for i in sentiment["test"]["label"]] == ["positive"]  # v=5 is positive (v >= 5)
    emotion, report = load_msp_podcast(tmp_path, label="emotion", return_report=True)
    assert len(emotion["train"]) == 2 and sum(report.dropped.values()) == 1
    assert emotion["train"]["valence"] == [2.0, pytest.approx(6.2)]
    (tmp_path / "Audios" / "MSP-PODCAST_0002_0001.wav").unlink()
    with pytest.raises(DataFormatError, match="line 5 .*MSP-PODCAST_0002_0001.wav not found"):
        load_msp_podcast(tmp_path)


# ------------------------------------------------------------------------------------------- folder / EmoDB


def test_folder_fixture_and_speaker_folds(tmp_path):
    rows = ["file,speaker,emotion"]
    for speaker in ("s1", "s2", "s3"):
        for emotion in ("anger", "neutral"):
            write_wav(tmp_path / "clips" / f"{speaker}_{emotion}.wav", seconds=0.2, rate=22050)
            rows.append(f"clips/{speaker}_{emotion}.wav,{speaker},{emotion}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    dsd = load_folder(tmp_path)
    train = dsd["train"]
    assert len(train) == 6 and train.features["label"].names == ["anger", "neutral"]
    assert load_audio(train["audio"][0]).shape == (3200,)  # 0.2 s resampled 22.05 -> 16 kHz
    folds = leave_speaker_out_folds(dsd)
    assert [speaker for speaker, _ in folds] == ["s1", "s2", "s3"]
    for speaker, fold in folds:
        assert set(fold["test"]["speaker"]) == {speaker} and speaker not in fold["train"]["speaker"]
        assert len(fold["train"]) + len(fold["test"]) == 6
    (tmp_path / "labels.csv").write_text("\n".join(rows + ["clips/missing.wav,s1,anger"]) + "\n")
    with pytest.raises(DataFormatError, match=r"line 8: audio file .*missing\.wav not found"):
        load_folder(tmp_path)
    (tmp_path / "labels.csv").write_text("\n".join(rows + ["clips/s1_anger.wav,s1,joy"]) + "\n")
    with pytest.raises(DataFormatError, match=r"line 8: unknown label 'joy'"):
        load_folder(tmp_path, labels=["anger", "neutral"])


@needs_shared("meld")
def test_real_meld():
    dsd = load_meld(SHARED_DATA / "meld")
    assert len(dsd["train"]) == 9989 and len(dsd["validation"]) == 1109
    assert len(set(dsd["train"]["dialogue_id"])) == 1038 and len(set(dsd["validation"]["dialogue_id"])) == 114
    names = dsd["train"].features["label"].names
    counts = np.bincount(dsd["train"]["label"], minlength=len(names))
    assert dict(zip(names, counts.tolist()))["neutral"] == 4710 and dict(zip(names, counts.tolist()))["fear"] == 268
    assert max(len(rows) for _, rows in conversation_indices(dsd["train"])) == 24
    assert "’" in "".join(dsd["train"]["text"][:20])  # cp1252 quotes fixed in UTF-8


@needs_shared("mosi")
def test_real_mosi():
    dsd = load_mosi(SHARED_DATA / "mosi" / "mosi_label.csv")
    assert len(dsd["train"]) == 1281 and len(dsd["validation"]) == 229
    assert len(set(dsd["train"]["dialogue_id"])) == 52 and len(set(dsd["validation"]["dialogue_id"])) == 10
    scores, labels = np.asarray(dsd["train"]["sentiment_score"]), np.asarray(dsd["train"]["label"])
    assert np.array_equal(labels, (scores >= 0).astype(int))
    for _, rows in conversation_indices(dsd["train"]):
        turns = [dsd["train"]["turn"][i] for i in rows[:3]]
        assert turns == sorted(turns)


@needs_shared("emodb")
def test_real_emodb_folds_and_audio():
    dsd = load_emodb(SHARED_DATA / "emodb")
    train = dsd["train"]
    assert len(train) == 408
    names = train.features["label"].names
    assert dict(zip(names, np.bincount(train["label"], minlength=7).tolist()))["anger"] == 100
    folds = leave_speaker_out_folds(train)
    assert len(folds) == 8 and sum(len(fold["test"]) for _, fold in folds) == 408
    audio = load_audio(train["audio"][0])
    assert audio.shape == (32000,)  # 2.0 s at 22.05 kHz -> 16 kHz
