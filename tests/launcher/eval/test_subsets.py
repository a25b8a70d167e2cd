"""The model-free subsets and statistics (notellm2.launcher.eval.subsets): lengths count every text field
(topics included), text_poor / text_rich, degenerate subsets, exact duplicates of test notes among the
training notes (same text and same image bytes)."""
import numpy as np

from notellm2.data_shards.catalog.notes import Note
from notellm2.launcher.eval.subsets import (degenerate, exact_duplicate_stats, note_text, text_chars,
                                            text_poor_subsets)


def test_lengths_count_title_topics_and_content():
    note = Note("a", "Cat", "sleeps", topics=["animals", "pets"])
    assert text_chars(note) == 3 + 7 + 4 + 6  # separators not counted
    assert note_text(note) == "Cat animals pets sleeps"
    assert text_chars(Note("b", "", "")) == 0 and note_text(Note("b", "", "", topics=[])) == ""


def test_text_poor_is_either_end_below_the_threshold():
    lengths = {"q1": 0, "t1": 50, "q2": 30, "t2": 19, "q3": 20, "t3": 200}
    subs = text_poor_subsets(["q1", "q2", "q3"], ["t1", "t2", "t3"], lengths, 20)
    assert subs["text_poor"].tolist() == [True, True, False]  # no text; a target of 19; 20 is enough
    assert subs["text_rich"].tolist() == [False, False, True]


def test_degenerate_subsets_say_why():
    assert degenerate(np.array([True, False])) is None
    assert degenerate(np.array([False, False])) == "empty: no evaluated pair is in it"
    assert degenerate(np.array([True, True, True])) == "equals all: every one of the 3 evaluated pairs is in it"


def test_exact_duplicates_need_the_same_text_and_the_same_image_bytes(tmp_path):
    def image(name, data):
        path = tmp_path / name
        path.write_bytes(data)
        return str(path)

    same, other = image("a.png", b"pixels-1"), image("b.png", b"pixels-2")
    copy = image("c.png", b"pixels-1")  # another file, the same bytes
    notes = [Note("test_dup", "star", "", topics=["shapes"], image_path=same),
             Note("test_text_only", "moon", "", image_path=same),
             Note("test_no_image", "sun", ""),
             Note("test_alone", "comet", "", image_path=same),
             Note("train_dup", "star", "", topics=["shapes"], image_path=copy),
             Note("train_moon", "moon", "", image_path=other),
             Note("train_sun", "sun", ""),
             Note("train_topics", "comet", "", topics=["space"], image_path=same)]
    catalog = {n.note_id: n for n in notes}
    stats = exact_duplicate_stats(["test_dup", "test_text_only", "test_no_image", "test_alone"],
                                  ["train_dup", "train_moon", "train_sun", "train_topics"], catalog)
    # same text: star, moon, sun (comet differs in its topics); same image too: star, and sun (no image at all)
    assert stats == {"test_notes_with_train_text_duplicate": 3, "test_notes_with_exact_train_duplicate": 2}
    # a note is not its own duplicate (all-pairs: a test note may also be in a training pair)
    assert exact_duplicate_stats(["train_dup"], ["train_dup"], catalog)["test_notes_with_train_text_duplicate"] == 0
