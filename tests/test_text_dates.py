"""The dates a user's message mentions (features/text_dates.py), their cache, and that the
feature build stores them for the user's own messages only."""

from datetime import datetime, timezone

import numpy as np

from features import contract as C
from features.store import load_arrays
from features.text_dates import DURATION, mentioned_days, reading, span
from features.vocab import SENDER_IDS

WEDNESDAY_NOON = datetime(2026, 2, 4, 12, tzinfo=timezone.utc).timestamp()
TEXTS = ["flying to Lisbon in 5 days, back in 12 days", "see you on Friday", "back tomorrow",
         "had a salad for lunch", None, "in 3 days"]
READ = np.array([True] * 5 + [False])


def test_mentioned_days_start_days_after_the_message():
    ts = np.full(len(TEXTS), WEDNESDAY_NOON)
    first, last = mentioned_days(TEXTS, ts, ["en"], read=READ, progress=False)
    assert first[0] == 4.5 and last[0] == 11.5  # Monday and the Saturday after, from Wednesday noon
    assert first[1] == last[1] == 1.5  # Friday 00:00, a day and a half after Wednesday noon
    assert first[2] == 0.5
    assert np.isnan(first[3:]).all() and np.isnan(last[3:]).all()  # no date, no text, not read


def test_a_length_of_time_counts_from_the_day_the_message_mentions():
    texts = ["off to Rome on Friday for 5 days", "hospital stay, about a week", "see you next week",
             "that was 3 days ago", "leaving tomorrow for two weeks"]
    first, last = mentioned_days(texts, np.full(len(texts), WEDNESDAY_NOON), ["en"], progress=False)
    assert (first[0], last[0]) == (1.5, 6.5)  # Friday 00:00 and five days later, from Wednesday noon
    assert (first[1], last[1]) == (-0.5, 6.5)  # no day mentioned: the week runs from the message's day
    assert first[2] == last[2] == 6.5  # "next week" is a day (a week on), not a length
    assert first[3] == last[3] == -3.5
    assert (first[4], last[4]) == (0.5, 14.5)


def test_each_clause_is_read_on_its_own():
    # dateparser's search joins neighbours across a comma: "in 2 days, ten days" was one day 12
    # days on, "next week, eight days" lost its "next"; and it matches "7 days of" with the "of".
    texts = ["trip coming up in 2 days, ten days. any tips?", "off to Lima in 9 days! 7 days of holiday",
             "seville next week, eight days", "flying on March 6, 2027 for 3 days", "walked 1,000 steps tomorrow"]
    first, last = mentioned_days(texts, np.full(len(texts), WEDNESDAY_NOON), ["en"], progress=False)
    assert (first[0], last[0]) == (1.5, 11.5)  # Friday 00:00 and ten days later, from Wednesday noon
    assert (first[1], last[1]) == (8.5, 15.5)
    assert (first[2], last[2]) == (6.5, 14.5)
    assert first[3] == last[3] - 3 and first[3] > 390  # one date, its year kept: not split at ", 2027"
    assert first[4] == last[4] == 0.5  # nor at "1,000"


def test_a_comma_inside_one_date_does_not_split_it():
    # Split at every comma, "back on Friday, March 6" was two days 92 days apart and "tomorrow, at
    # 5pm" put the 5pm on the message's own day.
    joined = ["back on Friday, March 6", "Thursday, 10 December", "Dec 11, Friday", "Sunday, 13th",
              "tomorrow, at 5pm", "Friday, the 13th"]
    first, last = mentioned_days(joined, np.full(len(joined), WEDNESDAY_NOON), ["en"], progress=False)
    np.testing.assert_array_equal(first, last)  # one day each
    assert first[4] == 0.5  # tomorrow, from Wednesday noon
    split = ["leaving Friday, back Monday", "next Saturday, 5 days in Rome", "hi, lying in the sun. 3 days of bliss"]
    first, last = mentioned_days(split, np.full(len(split), WEDNESDAY_NOON), ["en"], progress=False)
    assert (first[0], last[0]) == (1.5, 4.5)  # two days
    assert last[1] - first[1] == 5  # a length from the Saturday
    assert last[2] - first[2] == 3  # "sun." keeps its full stop: "3 days" stays a length


def test_a_short_month_or_weekday_name_with_a_full_stop_reads_as_without():
    # dateparser ended the date at the full stop: "Jan. 5" was "Jan" (the message's day of the
    # month in January) and "Sept. 12th" two days.
    dotted = ["back on Jan. 5", "back Sept. 12th", "flying Fri. 5pm", "on Wed. and back Sun. then home"]
    plain = ["back on Jan 5", "back Sept 12th", "flying Fri 5pm", "on Wed and back Sun then home"]
    ts = np.full(len(dotted), WEDNESDAY_NOON)
    got, want = mentioned_days(dotted, ts, ["en"], progress=False), mentioned_days(plain, ts, ["en"], progress=False)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert got[0][1] == got[1][1]  # one day, not two


def test_everyday_words_are_no_dates_unless_something_leads_to_one():
    # dateparser read "we" as a Wednesday (in every "can we talk"), the modal "may" as May, "sat"
    # and "sun" as weekdays, "march" as March, and amounts such as "1/2 cup" as 2 January.
    words = ["can we talk about it", "I may skip the gym", "I sat down for lunch", "I'll march on",
             "sun is out", "Jan said hi", "it may rain so we stay in", "ate 1/2 cup of rice", "did 3-4 sets",
             "2/3 of the plate was veggies"]
    first, last = mentioned_days(words, np.full(len(words), WEDNESDAY_NOON), ["en"], progress=False)
    assert np.isnan(first).all() and np.isnan(last).all()
    dates = ["away until may", "back in may", "on sat", "this sun", "may 5th", "end of march", "we fly on Friday",
             "back on 3/4", "until 4/10"]
    first, last = mentioned_days(dates, np.full(len(dates), WEDNESDAY_NOON), ["en"], progress=False)
    assert not np.isnan(first).any()
    assert first[2] == 2.5 and first[3] == 3.5  # Saturday and Sunday 00:00, from Wednesday noon
    assert first[6] == last[6] == 1.5  # Friday only: "we" is no Wednesday a week on


def test_a_weekday_told_in_the_past_is_the_last_one():
    # dateparser put "I skipped the gym on Monday" on the coming Monday, a plan out of a past day.
    past = ["I skipped the gym on Monday", "was sick on friday", "went out saturday night", "had a party on sat"]
    first, last = mentioned_days(past, np.full(len(past), WEDNESDAY_NOON), ["en"], progress=False)
    np.testing.assert_array_equal(first, [-2.5, -5.5, -4.5, -4.5])  # the last Monday, Friday, Saturday
    np.testing.assert_array_equal(first, last)
    plans = ["I will skip the gym on Monday", "flying on friday", "I need a break on friday", "I was going to rest on friday"]
    first, _ = mentioned_days(plans, np.full(len(plans), WEDNESDAY_NOON), ["en"], progress=False)
    np.testing.assert_array_equal(first, [4.5, 1.5, 1.5, 1.5])  # the coming ones


def test_a_day_of_the_month_alone_is_the_next_such_day():
    # Written on Wednesday 4 February 2026: dateparser put "the 3rd" a year on and "the 2nd" in
    # another month's wrong day; the next 3rd is 3 March, the next 12th 12 February.
    texts = ["see you on the 12th", "back the 3rd", "on the 4th", "from the 2nd to the 6th"]
    first, last = mentioned_days(texts, np.full(len(texts), WEDNESDAY_NOON), ["en"], progress=False)
    assert first[0] == 7.5  # 12 February 00:00, from 4 February noon
    assert first[1] == 26.5  # 3 March
    assert first[2] == -0.5  # today
    assert (first[3], last[3]) == (1.5, 25.5)  # 6 February, 2 March
    base = datetime(2026, 2, 4)
    assert reading("on the 30th", 0.0, "back on the 30th", base) == 54  # no 30 February: 30 March
    assert reading("the 45th", 0.0, "the 45th", base) is None


def test_what_dateparser_matched_is_a_length_only_when_it_is_a_bare_count_of_days_weeks_or_months():
    lengths = ["5 days", "for two weeks", "about a week", "3 Months", "for 4 nights", "ten days", "7 days of"]
    days = ["in 5 days", "next week", "5 days ago", "Friday", "a week from Monday", "tomorrow", "in a week"]
    assert all(DURATION.fullmatch(m) for m in lengths) and not any(DURATION.fullmatch(m) for m in days)
    assert span([("Friday", 2.0), ("5 days", 5.0)]) == (2.0, 7.0)
    assert span([("5 days", 5.0)]) == (0.0, 5.0)
    assert span([("Friday", 2.0), ("5 days", -5.0)]) == (2.0, 7.0)  # resolved into the past: still a length
    assert span([("in 5 days", 5.0), ("in 12 days", 12.0)]) == (5.0, 12.0)  # two days, as before
    assert span([("Friday", 2.0), ("Monday", 5.5), ("a week", 7.0)]) == (2.0, 9.0)  # from the earliest


def test_the_cache_gives_the_same_days_and_parses_only_what_is_new(tmp_path, monkeypatch):
    from features import text_dates

    ts = np.full(len(TEXTS), WEDNESDAY_NOON)
    want = mentioned_days(TEXTS, ts, ["en"], read=READ, cache_root=tmp_path, key="k", progress=False)
    parsed = []
    real = text_dates._parse
    monkeypatch.setattr(text_dates, "_parse", lambda texts, *a: parsed.extend(texts) or real(texts, *a))
    again = mentioned_days(TEXTS + ["see you on Friday"], np.append(ts, WEDNESDAY_NOON + 86400), ["en"],
                           read=np.append(READ, True), cache_root=tmp_path, key="k", progress=False)
    assert parsed == ["see you on Friday"]  # the only (text, day) not seen before
    assert np.array_equal(again[0][:-1], want[0], equal_nan=True) and np.array_equal(again[1][:-1], want[1], equal_nan=True)
    assert again[0][-1] == 0.5  # written on Thursday noon: Friday is half a day away


def test_no_language_reads_nothing():
    first, last = mentioned_days(["in 3 days"], np.array([WEDNESDAY_NOON]), [], progress=False)
    assert np.isnan(first).all() and np.isnan(last).all()


def test_the_store_holds_the_dates_of_the_users_own_messages(sim_store):
    a, _ = load_arrays(sim_store[0], ("conversation",))
    cv = a["conversation"]
    user = cv["sender"] == SENDER_IDS[C.SENDER_USER]
    found = np.isfinite(cv["mention_first"])
    assert found[user].mean() > 0.02 and not found[~user].any()  # the coach's messages are not read
    assert (cv["mention_last"][found] >= cv["mention_first"][found]).all()


def test_mention_buckets_count_days_from_the_cutoff():
    from features import timebuckets as tb

    got = tb.mention_buckets(np.array([np.nan, -30.0, -7.0, -0.5, 0.0, 6.9, 21.0, 400.0]))
    first = tb.FIRST - tb.MENTION_FROM  # the id of day 0
    assert got.tolist() == [tb.NO_MENTION, tb.FIRST, tb.FIRST, first - 1, first, first + 6,
                            tb.N_MENTION_BUCKETS - 1, tb.N_MENTION_BUCKETS - 1]


def test_the_model_reads_each_messages_mentioned_days_from_its_examples_cutoff(sim_store):
    from features import timebuckets as tb
    from features.dataset import FeatureDataset

    path, _, mcfg = sim_store
    data = FeatureDataset(path, mcfg)
    cv = load_arrays(path, ("conversation",))[0]["conversation"]
    checked = 0
    for i in range(len(data)):
        item = data[i]["conversation"]
        if not (item["mention_first"] > tb.NO_MENTION).any():
            continue
        e = {k: v[data.indices[i]] for k, v in data.examples.items()}
        lo = max(int(e["conversation_start"]), int(e["conversation_end"]) - mcfg.max_len_conversation)
        at = np.arange(lo, int(e["conversation_end"]))
        age = (e["as_of"] - cv["ts"][at]) / 86400
        assert np.array_equal(item["mention_first"], tb.mention_buckets(cv["mention_first"][at] - age))
        assert np.array_equal(item["mention_last"], tb.mention_buckets(cv["mention_last"][at] - age))
        checked += 1
    assert checked > 5
